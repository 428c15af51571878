"""torch.utils.checkpoint as HF gradient checkpointing applies it to each decoder layer.

Reentrant (torch/utils/checkpoint.py CheckpointFunction): the layer runs under no_grad, only its tensor
inputs are saved; in backward the layer is re-run with grad on detached inputs (phase RECOMPUTE), then
torch.autograd.backward runs through it and the inputs' .grad are returned. The non-reentrant variant
recomputes the same tensors when backward first unpacks one, so the memory it needs is modelled the same way.
"""

from collections.abc import Callable

from sim.ops import Phase
from sim.workload.context import RunContext
from sim.workload.tape import Node, Tape, Tensor


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
