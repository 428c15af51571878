"""torch.utils.checkpoint as HF gradient checkpointing applies it to each decoder layer.

Reentrant (torch/utils/checkpoint.py CheckpointFunction): the layer runs under no_grad, only its tensor
inputs are saved; in backward the layer is re-run with grad on detached inputs (phase RECOMPUTE), then
torch.autograd.backward runs through it and the inputs' .grad are returned.

Non-reentrant (use_reentrant=False; torch/utils/checkpoint.py _checkpoint_without_reentrant_generator, the same
at torch 2.1, 2.4, 2.8 and 2.13 in what follows): the layer runs with grad on under saved-tensor hooks
(_checkpoint_hook), so its autograd nodes are recorded but every tensor they save is packed into an empty
_Holder instead; the frame keeps the layer's inputs (save_inputs), the function with its keyword tensors and the
RNG state. In backward the first unpack re-runs the layer under _recomputation_hook, which keeps each tensor the
layer saves, in order, and stops the re-run with _StopRecomputationError once it has as many as the forward
packed (early_stop, default True; set_checkpoint_early_stop). Each unpack hands its tensor to the node and drops
the frame's reference (Rule 4 of "NOTE [ Nestable Checkpoint ]"); the frame, and with it the inputs and the RNG
state, goes when the last node holding its hooks has run its backward. Gradients flow through the layer's own
nodes: no inner backward, no detached input.
"""

from collections.abc import Callable, Sequence

from sim.ops import Category, Phase
from sim.workload.context import RunContext
from sim.workload.tape import Node, Storage, Tape, Tensor


def checkpoint(ctx: RunContext, fn: Callable[[Tensor], Tensor], x: Tensor, extra: list[Tensor]) -> Tensor:
    """Run fn(x) without keeping its activations; save x and the other tensor arguments for the recompute."""
    tp = ctx.tape
    grad_enabled, tp.grad_enabled = tp.grad_enabled, False
    out = fn(x)
    tp.grad_enabled = grad_enabled
    node = tp.record("checkpoint", [x], [x, *extra], _checkpoint_backward, fn=fn, ctx=ctx)
    return tp.output(out, node)


def _checkpoint_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    run: RunContext = node.ctx["ctx"]
    source = node.inputs[0]
    tp.phase = Phase.RECOMPUTE
    tp.hold(source.storage)
    detached = Tensor(source.storage, source.numel, source.dtype, requires_grad=True, leaf_grad=[])
    outer_nodes, tp._nodes = tp._nodes, []
    tp.grad_enabled = True
    out = node.ctx["fn"](detached)
    run.clear_cast_cache()  # the recompute ran inside its own autocast region
    tp.grad_enabled = False
    tp.phase = Phase.BACKWARD
    tp.backward(out, tp.alias(grad))
    tp._nodes = outer_nodes
    tp.drop(out)
    grads = detached.leaf_grad
    tp.drop(detached)
    return [grads[0] if grads else None]


class _StopRecomputation(Exception):
    """_StopRecomputationError: the re-run has recomputed every tensor the forward packed (early stop)."""


class _Frame:
    """_CheckpointFrame with _checkpoint_hook (forward) and _recomputation_hook (backward) on the tape."""

    def __init__(self, ctx: RunContext, fn: Callable[[Tensor], Tensor], x: Tensor, kept: list[Storage]) -> None:
        self.ctx, self.fn, self.x = ctx, fn, x
        self.kept = kept  # saved_args (the input), the partial's keyword tensors, fwd_cpu_state: held by the frame
        self.holders: list[Node] = []  # weak_holders: per tensor packed in the forward, the node that saved it
        self.nodes = 0  # nodes still holding the frame's unpack hook
        self.recomputing = False
        self.recomputed: list[Storage] | None = None  # recomputed[gid], in packing order
        self.before_kernel = False  # the stop came from a node saving only its inputs: its op never ran

    def pack(self, tape: Tape, node: Node, saved: Sequence[Tensor]) -> None:
        """Forward: a _Holder per saved tensor, no tensor kept. Re-run: the tensor itself, kept by the frame."""
        if not self.recomputing:
            node.frame = self
            self.holders += [node] * len(saved)
            self.nodes += 1
            return
        recomputed = self.recomputed
        for tensor in saved:
            storage = tensor.storage
            storage.refs += 1  # frame.recomputed[gid][handle]: not a Python local of the layer's code
            if storage.category is Category.TEMPORARIES:
                storage.category = Category.ACTIVATIONS
            recomputed.append(storage)
        if len(recomputed) == len(self.holders):  # pack_hook raises once the count is reached
            # autograd saves a node's inputs before its kernel runs (the generated VariableType code sets the
            # SavedVariables, then redispatches) and its outputs after: a stop on inputs only skips the kernel
            made = set(tape.current_allocs())
            self.before_kernel = not any(t.storage.buffer_id in made for t in saved)
            raise _StopRecomputation

    def unpack(self, tape: Tape, node: Node) -> None:
        """The node's first saved tensor unpacked: re-run the layer if this backward has not; its tensors go to it."""
        if self.recomputed is None:
            self._recompute(tape)
            for holder, storage in zip(self.holders, self.recomputed, strict=True):
                holder.saved.append(storage)  # the frame's reference passes to the node, dropped after its backward

    def unpacked(self, tape: Tape, node: Node) -> None:
        """The node released its SavedVariables and with them the hooks; the last one takes the frame along."""
        self.nodes -= 1
        if self.nodes == 0:
            for storage in self.kept:
                tape.release(storage)
            self.kept = []

    def _recompute(self, tape: Tape) -> None:
        """recompute_fn under enable_grad and _recomputation_hook: the layer again on its saved input, up to the
        last saved tensor; what its code held when the stop was raised goes as the exception unwinds it."""
        self.recomputed, self.recomputing = [], True
        outer_hooks, tape.saved_tensors_hooks = tape.saved_tensors_hooks, self
        outer_nodes, tape._nodes = tape._nodes, []
        grad_enabled, tape.grad_enabled = tape.grad_enabled, True
        phase, tape.phase = tape.phase, Phase.RECOMPUTE
        tape.journal = {}
        args = tape.alias(self.x)  # frame.get_inputs(): the saved input unpacked
        try:
            out = self.fn(args)
            tape.drop(out)
        except _StopRecomputation:
            pass
        tape.drop(args)
        self.ctx.clear_cast_cache()  # the re-run's autocast region has been left (its cache is no Python local)
        for storage, gained in tape.journal.items():  # Python references still held when the re-run stopped
            for _ in range(gained):
                tape.release(storage)
        tape.journal = None
        if self.before_kernel:
            tape.cancel_op()
        tape.phase, tape.grad_enabled = phase, grad_enabled
        tape._nodes, tape.saved_tensors_hooks = outer_nodes, outer_hooks  # the re-run's graph is dropped
        self.recomputing = False
        assert len(self.recomputed) == len(self.holders), "check_recomputed_tensors_match"


def checkpoint_without_reentrant(ctx: RunContext, fn: Callable[[Tensor], Tensor], x: Tensor, extra: list[Tensor],
                                 stashes: list[Tensor]) -> Tensor:
    """Run fn(x) with grad on under the frame's pack hooks; the frame keeps x, `extra` and the RNG `stashes` the
    forward appends (taken over) until the layer's backward has unpacked everything."""
    tp = ctx.tape
    for tensor in (x, *extra):  # save_inputs' SavedVariables: saved for backward, as a node's saved tensors are
        tp.hold(tensor.storage)
        if tensor.storage.category is Category.TEMPORARIES:
            tensor.storage.category = Category.ACTIVATIONS
    frame = _Frame(ctx, fn, x, [t.storage for t in (x, *extra)])
    outer, tp.saved_tensors_hooks = tp.saved_tensors_hooks, frame
    out = fn(x)
    tp.saved_tensors_hooks = outer
    frame.kept += [t.storage for t in stashes]  # fwd_cpu_state, captured by recompute_fn
    stashes.clear()
    if not frame.holders:  # nothing packed: nothing references the frame once the forward has returned
        for storage in frame.kept:
            tp.release(storage)
    return out
