"""A symbolic autograd tape: tensors with byte sizes, the nodes autograd would record, and the ops they emit.

Modelling code (hf_decoder.py, loss.py, ...) calls the primitives in `sim.workload.primitives` in the order the
real Python code runs. The tape tracks who holds each storage (Python variables, autograd's saved tensors, grad
buffers, param.grad) and frees it when the last holder lets go, exactly as reference counting does in PyTorch.
`backward()` replays the recorded nodes in reverse creation order, as torch/csrc/autograd/engine.cpp does
(its ready queue is ordered by sequence number), accumulating gradients as input_buffer.cpp and
AccumulateGrad do.
"""

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sim.errors import MAX_TENSOR_BYTES, TensorTooLarge, WorkTooLarge
from sim.ops import CATEGORIES, STREAMS, BufferTable, Category, Op, OpKind, Phase, ReplicaSpan, Schedule, Stream
from sim.vocab import DType


@dataclass(slots=True, eq=False)
class Storage:
    """One allocation. `refs` counts holders; the storage is freed when it drops to zero."""

    buffer_id: int
    name: str
    size_bytes: int
    category: Category
    refs: int = 0
    persistent: bool = False  # never freed: parameters, optimizer states, model buffers
    lazy: bool = False  # persistent but first allocated by an op (optimizer state at the first step)
    row: int = 0  # position in Tape.storages (the BufferTable row of its facts)
    recorded: int = 0  # streams (bit STREAMS.index) record_stream'ed on: freed, its block waits for them


@dataclass(slots=True, eq=False)
class Param:
    """A leaf parameter: its storage is persistent; `grad` is param.grad."""

    name: str
    tensor: "Tensor"
    grad: "Tensor | None" = None


@dataclass(slots=True, eq=False)
class Tensor:
    """A tensor (or a view: views share their base's storage)."""

    storage: Storage
    numel: int
    dtype: DType
    requires_grad: bool = False
    node: "Node | None" = None  # grad_fn; None for leaves
    param: Param | None = None  # set for parameters (AccumulateGrad target)
    leaf_grad: "list[Tensor] | None" = None  # detached checkpoint inputs collect their .grad here
    is_view: bool = False  # a view of another tensor's storage (autograd never accumulates into it in place)
    output_index: int = 0  # which output of a multi-output node (split) this tensor is

    @property
    def size_bytes(self) -> int:
        return self.numel * self.dtype.size_bytes


BackwardFn = Callable[["Tape", "Node", Tensor], list["Tensor | None"]]


@dataclass(slots=True, eq=False)
class Node:
    """An autograd Node: where gradients of its output go (`inputs`), what it saved, how its backward allocates."""

    seq: int
    name: str
    inputs: list[Tensor | None]  # the forward inputs that require grad (None: no grad flows there)
    saved: list[Storage]
    backward: BackwardFn
    layer: int | None
    ctx: dict = field(default_factory=dict)
    grad: Tensor | None = None  # the input buffer: accumulated gradient of this node's output
    output_grads: "list[Tensor | None] | None" = None  # input buffers of a multi-output node, one per output
    frame: "SavedTensorsHooks | None" = None  # whose saved-tensor hooks packed what this node saved (unpacked here)


class SavedTensorsHooks(Protocol):
    """torch.autograd.graph.saved_tensors_hooks as the tape sees them: `pack` takes what a node being recorded
    saves (instead of the node holding it); `unpack` runs before the node's backward and hands it its saved
    storages back; `unpacked` runs once the node has released them."""

    def pack(self, tape: "Tape", node: Node, saved: Sequence[Tensor]) -> None: ...

    def unpack(self, tape: "Tape", node: Node) -> None: ...

    def unpacked(self, tape: "Tape", node: Node) -> None: ...


class _OpDraft(Op):
    """An op as the tape records it: its buffer lists grow while later code runs (frees attach to the op current
    then); the step and micro-batch it was recorded in stand beside it."""

    __slots__ = ("step", "micro_batch")

    def __init__(self, name: str, stream: Stream, phase: Phase, layer: int | None, step: int, micro_batch: int,
                 flops: float, bytes_moved: int, deps: tuple[int, ...], wire_bytes: int, kind: OpKind,
                 host_waits: tuple[int, ...], alloc_stream: Stream | None = None) -> None:
        Op.__init__(self, name, stream, phase, layer, [], [], flops, bytes_moved, deps, wire_bytes, kind, host_waits,
                    alloc_stream)
        self.step = step
        self.micro_batch = micro_batch


@dataclass(frozen=True, slots=True)
class _Replica:
    """ops[start:end] again, same buffers (see Tape.replicate)."""

    start: int
    end: int
    step: int
    micro_batch: int


@dataclass(frozen=True, slots=True)
class _Remapped:
    """ops[start:end] again with the span's own buffers moved to fresh ids (+moved) and the buffers it frees on
    entry mapped to the ones its previous instance left alive (see Tape.replicate)."""

    start: int
    end: int
    moved: int
    low: int  # the span's own buffer ids are [low, high)
    high: int
    entry: dict  # buffer id freed on entry → id to free instead
    step: int
    micro_batch: int


class Tape:
    """Builds the schedule of one rank while modelling code runs on it."""

    def __init__(self) -> None:
        self.storages: list[Storage] = []
        self._buffer_source: list[Storage] = []  # per buffer id: the storage it is (or copies, for replicas)
        self._ops: list[_OpDraft | _Replica] = []
        self._carry: dict[int, Storage] = {}  # replicated spans: template outbound id → its live storage
        self.grad_enabled = True
        self.phase = Phase.FORWARD
        self.layer: int | None = None
        self.step = 0
        self.micro_batch = 0
        self._seq = 0
        self._nodes: list[Node] = []  # nodes recorded since the last backward, in creation order
        self._compute: int | None = None  # index of the current compute op (frees attach to it)
        self._final_of: list[int] = []  # per entry of _ops: the position of its (first) op in the schedule
        self._final_total = 0
        self._waits: list[int] = []  # side ops the next compute op waits for
        self._host_waits: list[int] = []  # ops (final positions) the host waits to see end before the next op
        self._tracked: list[deque] = []  # callers' schedule positions, moved to each repetition (track_positions)
        self.grad_hook: Callable[[Param, Tensor], None] | None = None  # ZeRO takes param grads over
        self.post_grad_hook: Callable[[Param], None] | None = None  # runs after AccumulateGrad (DDP's reducer)
        self.blas_workspace_bytes = 0  # cuBLAS workspace made at a thread's first GEMM on the stream (0: none)
        self._blas_workspaces: dict[str, Tensor] = {}  # by buffer name: cu(BLAS|BLASLt)_workspace[thread]
        self.lt_workspace_bytes = 0  # cuBLASLt workspace of a bias GEMM (0: none; see schedule.cublaslt_workspace)
        self.lt_workspace_persistent = False  # kept per (handle, stream) instead of allocated per call
        self._template: tuple | None = None  # ((start, end), allocated ids, freed ids) of the last replicated span
        self.saved_tensors_hooks: SavedTensorsHooks | None = None  # the innermost active saved_tensors_hooks
        self.journal: dict[Storage, int] | None = None  # while set: holders gained (+) or lost (-) per storage
        self.op_limit = 1 << 62  # more recorded ops than this: WorkTooLarge (sim/schedule.py sets it)
        self.nccl_records_streams = False  # record_on_nccl records (torch before 2.8; sim/schedule.py sets it)

    # ---- storages ---------------------------------------------------------------------------------------
    def new_storage(self, name: str, size_bytes: int, category: Category, persistent: bool = False) -> Storage:
        """A new storage with one holder, the caller; TensorTooLarge beyond MAX_TENSOR_BYTES."""
        if size_bytes > MAX_TENSOR_BYTES:
            raise TensorTooLarge(f"{name}: a tensor of {size_bytes:.3e} bytes, more than the 2^62 bytes any device "
                                 "could address")
        storages, source = self.storages, self._buffer_source
        storage = Storage(len(source), name, size_bytes, category, 1, persistent, False, len(storages))
        storages.append(storage)
        source.append(storage)
        if self.journal is not None:
            self.journal[storage] = 1
        return storage

    def hold(self, storage: Storage) -> None:
        storage.refs += 1
        if self.journal is not None:
            self.journal[storage] = self.journal.get(storage, 0) + 1

    def release(self, storage: Storage) -> None:
        """Drop one holder; free at the end of the current op when none is left."""
        storage.refs -= 1
        if self.journal is not None:
            self.journal[storage] = self.journal.get(storage, 0) - 1
        assert storage.refs >= 0, storage.name
        if storage.refs == 0 and not storage.persistent:
            self._ops[self._compute].frees.append(storage.buffer_id)

    # ---- tensors ------------------------------------------------------------------------------------------
    def empty(self, name: str, numel: int, dtype: DType, category: Category = Category.TEMPORARIES) -> Tensor:
        """A new tensor allocated by the current op, held by the caller (one Python reference)."""
        storage = self.new_storage(name, numel * dtype.size_bytes, category)
        self._ops[self._compute].allocs.append(storage.buffer_id)
        return Tensor(storage, numel, dtype)

    def alias(self, tensor: Tensor, numel: int | None = None, view: bool = False) -> Tensor:
        """The same tensor under another name, or (view=True) a view of it: shares the storage, adds a holder."""
        self.hold(tensor.storage)
        return Tensor(tensor.storage, tensor.numel if numel is None else numel, tensor.dtype,
                      tensor.requires_grad, tensor.node, tensor.param, tensor.leaf_grad, tensor.is_view or view)

    def drop(self, *tensors: Tensor | None) -> None:
        """The Python variable goes away (rebinding or end of scope)."""
        for tensor in tensors:
            if tensor is not None:
                self.release(tensor.storage)

    def parameter(self, name: str, numel: int, dtype: DType, requires_grad: bool,
                  category: Category = Category.PARAMETERS, resident: bool = True) -> Param:
        """A parameter. `resident=False`: its full tensor is not kept on the device (ZeRO-3 partitions it);
        the storage only stands for the param in autograd and is never allocated."""
        storage = self.new_storage(name, numel * dtype.size_bytes, category, persistent=True)
        storage.lazy = not resident  # never allocated at t=0 (and no op allocates it)
        param = Param(name, Tensor(storage, numel, dtype, requires_grad))
        param.tensor.param = param
        return param

    def persistent_buffer(self, name: str, numel: int, dtype: DType, category: Category) -> Tensor:
        """A buffer that lives for the whole run; alive from t=0 unless `allocate_existing` is called on it."""
        storage = self.new_storage(name, numel * dtype.size_bytes, category, persistent=True)
        return Tensor(storage, numel, dtype)

    def allocate_existing(self, *tensors: Tensor) -> None:
        """Mark persistent buffers as allocated by the current op instead of before t=0 (lazy optimizer state)."""
        for tensor in tensors:
            tensor.storage.lazy = True
            self._ops[self._compute].allocs.append(tensor.storage.buffer_id)

    def first_gemm(self) -> None:
        """The first cuBLAS call of a handle on a stream allocates a workspace through the caching allocator and
        keeps it for the process, one per (handle, stream) (aten/src/ATen/cuda/CublasHandlePool.cpp
        getCurrentCUDABlasHandle). Handles are per thread: the forward runs on the Python thread, backward (and a
        checkpointed layer's recompute) on the autograd engine's device thread, so training makes two."""
        if self.blas_workspace_bytes:
            self._thread_workspace("cublas_workspace", self.blas_workspace_bytes)

    def cublaslt_gemm(self) -> None:
        """A GEMM with a bias epilogue through cuBLASLt (addmm, CUDABlas.cpp gemm_and_bias): its workspace comes
        from the caching allocator for the call and is freed after it, or, where torch keeps one per (handle,
        stream), once per thread as for cuBLAS."""
        if not self.lt_workspace_bytes:
            return
        if self.lt_workspace_persistent:
            self._thread_workspace("cublaslt_workspace", self.lt_workspace_bytes)
        else:
            self.drop(self.empty("cublaslt_workspace", self.lt_workspace_bytes, DType.BOOL))

    def _thread_workspace(self, kind: str, size_bytes: int) -> None:
        """A workspace kept for the process, made by the current thread's first call: the Python thread's in
        forward and optimizer, the autograd engine's in backward and recompute."""
        thread = "main" if self.phase in (Phase.FORWARD, Phase.OPTIMIZER) else "autograd"
        name = f"{kind}[{thread} thread]"
        if name not in self._blas_workspaces:
            workspace = self.persistent_buffer(name, size_bytes, DType.BOOL, Category.TEMPORARIES)
            self._blas_workspaces[name] = workspace
            self.allocate_existing(workspace)

    # ---- ops ----------------------------------------------------------------------------------------------
    def op(self, name: str, flops: float = 0.0, bytes_moved: int = 0, kind: OpKind = OpKind.MEMORY,
           wire_bytes: int = 0) -> None:
        """Start a new compute op: following allocations happen when it starts, following frees when it ends.
        It waits for the side-stream ops registered with `wait_for` since the last compute op."""
        own = self._final_total
        deps = ()
        if self._waits:
            deps, self._waits = tuple([w - own for w in self._waits]), []
        if len(self._ops) >= self.op_limit:
            raise WorkTooLarge(f"the run's first micro-batch alone records more than {self.op_limit:,} ops")
        self._compute = self._append(_OpDraft(name, Stream.COMPUTE, self.phase, self.layer, self.step,
                                              self.micro_batch, flops, bytes_moved, deps, wire_bytes, kind,
                                              self._take_host_waits(own)))

    def current_allocs(self) -> list[int]:
        """The buffer ids the current compute op allocates."""
        return self._ops[self._compute].allocs

    def cancel_op(self) -> None:
        """The current compute op never ran its kernel (an autograd pack hook raised before it): no cost, and the
        buffers it both allocated and freed are never made."""
        op = self._ops[self._compute]
        transient = set(op.allocs) & set(op.frees)
        op.allocs = [i for i in op.allocs if i not in transient]
        op.frees = [i for i in op.frees if i not in transient]
        op.flops, op.bytes_moved = 0.0, 0

    def side_op(self, name: str, stream: Stream, bytes_moved: int = 0, wire_bytes: int = 0,
                deps: tuple[int, ...] = (), kind: OpKind = OpKind.MEMORY, runs_on: Stream | None = None) -> int:
        """An op on another stream (a collective). Returns its index for `empty_in`, `release_in`, `wait_for`.
        It is issued after the current compute op, which it waits for as CUDA stream semantics imply
        (wait_stream before the collective), plus any `deps`. `runs_on`: the stream it runs on where that is not
        the caller's `stream` (a collective on ProcessGroupNCCL's stream; its buffers come from `stream`'s pool)."""
        final, own = self._final_of, self._final_total
        after = (final[self._compute] - own,) if self._compute is not None else ()
        return self._append(_OpDraft(name, runs_on or stream, self.phase, self.layer, self.step, self.micro_batch,
                                     0.0, bytes_moved, after + tuple([final[d] - own for d in deps]), wire_bytes,
                                     kind, self._take_host_waits(own), stream if runs_on is not None else None))

    def host_work(self, name: str, bytes_moved: int) -> int:
        """The host CPU's own memory-bound work (DeepSpeedCPUAdam, a cast into a pinned buffer), called
        synchronously: it starts once the host has issued everything before it (and waited where the caller made it
        wait), and the host issues nothing else until it is done. It allocates no device memory. Returns its
        index."""
        index = self._append(_OpDraft(name, Stream.CPU, self.phase, self.layer, self.step, self.micro_batch, 0.0,
                                      bytes_moved, (), 0, OpKind.HOST_MEMORY,
                                      self._take_host_waits(self._final_total)))
        self.host_wait_for(index)
        return index

    def _append(self, draft: "_OpDraft") -> int:
        """Record one new op at the next schedule position; its index among the tape's entries."""
        self._ops.append(draft)
        self._final_of.append(self._final_total)
        self._final_total += 1
        return len(self._ops) - 1

    def record_on_nccl(self, stream: Stream, *storages: Storage) -> None:
        """ProcessGroupNCCL's recordStream of a collective's inputs and outputs on its internal `stream`, which
        torch before 2.8 makes (unless TORCH_NCCL_AVOID_RECORD_STREAMS); from 2.8 it keeps them on the Work object
        until wait() instead, which changes nothing the caller's own references do not (`nccl_records_streams`)."""
        if self.nccl_records_streams:
            for storage in storages:
                self.record_stream(storage, stream)

    @staticmethod
    def record_stream(storage: Storage, stream: Stream) -> None:
        """tensor.record_stream(stream): once freed, the block is reused only after `stream` has passed the free
        (ignored for the stream it was allocated on, as the caching allocator ignores it)."""
        storage.recorded |= 1 << STREAMS.index(stream)

    def final_position(self, op_index: int) -> int:
        """Where op `op_index` stands in the schedule (repetitions counted)."""
        return self._final_of[op_index]

    def track_positions(self, positions: deque) -> None:
        """Keep schedule positions a caller holds on to pointing at the latest instance of their ops: when a
        micro-batch is repeated, those in the instance before it move to the repetition (as pending waits do)."""
        self._tracked.append(positions)

    def host_wait_for_position(self, position: int) -> None:
        """The host waits until the op at schedule position `position` has ended before it issues the next op (an
        event synchronize)."""
        self._host_waits.append(position)

    def host_wait_for(self, op_index: int) -> None:
        """The host waits until op `op_index` has ended before it issues the next op (an event synchronize)."""
        self.host_wait_for_position(self._final_of[op_index])

    def host_sync(self) -> None:
        """The host waits until the current compute op has ended before it issues the next op (`.item()` or
        `bool()` of a tensor that op computed: a copy to the host on the compute stream, then a stream
        synchronize)."""
        self.host_wait_for(self._compute)

    def _take_host_waits(self, own: int) -> tuple[int, ...]:
        """The pending host waits, relative to the op at final position `own` that takes them."""
        waits, self._host_waits = tuple(sorted({w - own for w in self._host_waits})), []
        return waits

    def wait_for(self, op_index: int) -> None:
        """The next compute op waits until side op `op_index` has finished (wait_stream / event wait)."""
        self._waits.append(self._final_of[op_index])

    def empty_in(self, op_index: int, name: str, numel: int, dtype: DType, category: Category) -> Tensor:
        """A new tensor allocated by side op `op_index`, held by the caller."""
        storage = self.new_storage(name, numel * dtype.size_bytes, category)
        self._ops[op_index].allocs.append(storage.buffer_id)
        return Tensor(storage, numel, dtype)

    def release_in(self, op_index: int, storage: Storage) -> None:
        """Drop one holder; when none is left, the storage is freed at the end of side op `op_index`."""
        storage.refs -= 1
        assert storage.refs >= 0, storage.name
        if storage.refs == 0 and not storage.persistent:
            self._ops[op_index].frees.append(storage.buffer_id)

    def record(self, name: str, inputs: Sequence[Tensor | None], saved: Sequence[Tensor],
               backward: BackwardFn, **ctx) -> Node | None:
        """Record an autograd node if grad mode is on and an input requires grad; hold its saved tensors."""
        if not self.grad_enabled:
            return None
        grad_inputs = [t if t is not None and t.requires_grad else None for t in inputs]
        if not any(grad_inputs):
            return None
        self._seq += 1
        if self.saved_tensors_hooks is not None:
            node = Node(self._seq, name, grad_inputs, [], backward, self.layer, ctx)
            self._nodes.append(node)
            if saved:
                self.saved_tensors_hooks.pack(self, node, saved)
            return node
        for tensor in saved:
            storage = tensor.storage
            storage.refs += 1
            if storage.category is Category.TEMPORARIES:
                storage.category = Category.ACTIVATIONS
        node = Node(self._seq, name, grad_inputs, [t.storage for t in saved], backward, self.layer, ctx)
        self._nodes.append(node)
        return node

    def output(self, tensor: Tensor, node: Node | None) -> Tensor:
        """Attach the producing node to a freshly computed tensor."""
        if node is not None:
            tensor.node = node
            tensor.requires_grad = True
        return tensor

    # ---- backward -----------------------------------------------------------------------------------------
    def backward(self, root: Tensor, grad: Tensor) -> None:
        """Run autograd from `root` with `grad` (held by the caller, released here)."""
        nodes, self._nodes = self._nodes, []
        grad_enabled, self.grad_enabled = self.grad_enabled, False
        pending: dict[int, Node] = {}
        self._route(root, grad, pending)
        while pending:
            seq = max(pending)
            node = pending.pop(seq)
            self._run_node(node, pending)
        self.grad_enabled = grad_enabled
        del nodes

    def _run_node(self, node: Node, pending: dict[int, "Node"]) -> None:
        grad, node.grad = node.grad, None
        layer, self.layer = self.layer, node.layer
        if node.frame is not None:
            node.frame.unpack(self, node)
        grads = node.backward(self, node, grad)  # a multi-output node reads and releases node.output_grads
        for storage in node.saved:
            self.release(storage)
        node.saved = []
        if node.frame is not None:
            node.frame.unpacked(self, node)
            node.frame = None
        for tensor, grad_in in zip(node.inputs, grads, strict=True):
            if grad_in is None or tensor is None:
                continue
            self._route(tensor, grad_in, pending)
        if grad is not None:
            self.release(grad.storage)
        self.layer = layer

    def _route(self, target: Tensor, grad: Tensor, pending: dict[int, Node]) -> None:
        """Deliver `grad` (a tensor the caller holds one reference to, which passes to this call)."""
        if grad.dtype is not target.dtype:  # engine.cpp validate_outputs casts to the input's dtype
            self.op(f"{self._name(target)}.grad_to_{target.dtype.value}", bytes_moved=grad.size_bytes)
            cast = self.empty("grad_cast", grad.numel, target.dtype)
            self.release(grad.storage)
            grad = cast
        if target.param is not None:
            self._accumulate_param(target.param, grad)
        elif target.leaf_grad is not None:  # a detached checkpoint input: AccumulateGrad into its .grad
            if target.leaf_grad:
                self.op("leaf.grad_add_", bytes_moved=3 * grad.size_bytes)
                self.release(grad.storage)
            else:
                target.leaf_grad.append(self._stolen_or_cloned(grad, "leaf.grad_clone"))
        elif target.node is not None and target.node.output_grads is not None:
            node, index = target.node, target.output_index
            slot = node.output_grads[index]
            node.output_grads[index] = grad if slot is None else self._accumulate(slot, grad)
            pending[node.seq] = node
        elif target.node is not None:
            node = target.node
            if node.grad is None:
                node.grad = grad
                pending[node.seq] = node
            else:
                node.grad = self._accumulate(node.grad, grad)
        else:
            self.release(grad.storage)

    def _accumulate(self, old: Tensor, new: Tensor) -> Tensor:
        """input_buffer.cpp accumulate: add in place into the buffered grad when nobody else holds it and it is
        not a view; otherwise out of place into a new tensor (the incoming grad is never reused)."""
        self.op("autograd.accumulate", bytes_moved=3 * old.size_bytes)
        if old.storage.refs == 1 and not old.is_view:
            self.release(new.storage)
            return old
        out = self.empty("grad_sum", old.numel, old.dtype)
        self.release(old.storage)
        self.release(new.storage)
        return out

    def _stolen_or_cloned(self, grad: Tensor, clone_name: str, category: Category = Category.TEMPORARIES) -> Tensor:
        """AccumulateGrad's first grad: stolen when nobody else holds it and it is not a view, else cloned."""
        if grad.storage.refs == 1 and not grad.is_view:
            if category is not Category.TEMPORARIES:
                grad.storage.category = category
            return grad
        self.op(clone_name, bytes_moved=2 * grad.size_bytes)
        clone = self.empty(clone_name, grad.numel, grad.dtype, category)
        self.release(grad.storage)
        return clone

    def _accumulate_param(self, param: Param, grad: Tensor) -> None:
        """AccumulateGrad (accumulate_grad.h): the first grad becomes param.grad; later ones add in place.
        Under ZeRO the grad-accumulation hook takes the grad over instead (`grad_hook`)."""
        if self.grad_hook is not None:
            self.grad_hook(param, grad)
            return
        if param.grad is None:
            param.grad = self._stolen_or_cloned(grad, f"{param.name}.grad_clone", Category.GRADIENTS)
        else:
            self.op(f"{param.name}.grad_add_", bytes_moved=3 * grad.size_bytes)
            self.release(grad.storage)
        if self.post_grad_hook is not None:
            self.post_grad_hook(param)

    @staticmethod
    def _name(tensor: Tensor) -> str:
        return tensor.param.name if tensor.param else (tensor.node.name if tensor.node else tensor.storage.name)

    # ---- repetition -----------------------------------------------------------------------------------------
    def op_count(self) -> int:
        return len(self._ops)

    def events_since(self, start: int) -> int:
        """Allocations and frees of the ops recorded from entry `start` of op_count() on (repetitions counted)."""
        total = 0
        for entry in self._ops[start:]:
            if isinstance(entry, _OpDraft):
                total += len(entry.allocs) + len(entry.frees)
            else:
                total += sum(len(d.allocs) + len(d.frees) for d in self._ops[entry.start:entry.end])
        return total

    def replicate(self, start: int, end: int, step: int, micro_batch: int) -> bool:
        """Run ops[start:end] again as the next micro-batch; False if the span does not repeat.

        A self-contained span (every buffer it allocates it frees, and nothing else) is what a micro-batch
        after the first of a step usually is: it is repeated with the same ops and buffer ids, since each of
        its buffers is freed before it starts again. A periodic span (ZeRO-3 keeps parameters gathered across
        micro-batches) frees, on entry, buffers that its previous instance left alive under the same names:
        it is repeated with fresh ids, the entry frees pointing at the previous instance's buffers.
        """
        if self._host_waits or not self._host_waits_repeat(start, end):
            return False
        if self._template is None or self._template[0] != (start, end):  # the same template repeats many times
            drafts = self._ops[start:end]
            if not all(isinstance(d, _OpDraft) for d in drafts):
                return False
            self._template = ((start, end), {b for d in drafts for b in d.allocs}, {b for d in drafts for b in d.frees})
        _, allocated, freed = self._template
        if allocated == freed:
            self._append_replica(_Replica(start, end, step, micro_batch), end - start)
            return True
        return self._replicate_periodic(start, end, allocated, freed, step, micro_batch)

    def _append_replica(self, entry: "_Replica | _Remapped", count: int) -> None:
        """Append a repetition of `count` ops. Waits left pending by the instance before it (the same ops,
        `count` positions earlier) now refer to the same ops in this repetition."""
        previous_first = self._final_total - count
        self._ops.append(entry)
        self._final_of.append(self._final_total)
        self._final_total += count
        self._waits = [w + count if w >= previous_first else w for w in self._waits]
        for positions in self._tracked:
            moved = [p + count if p >= previous_first else p for p in positions]
            positions.clear()
            positions.extend(moved)
        self._compute = None  # the next op starts a new compute op before anything is freed

    def _replicate_periodic(self, start: int, end: int, allocated: set, freed: set, step: int,
                            micro_batch: int) -> bool:
        previous = self._ops[-1]
        follows_an_instance = len(self._ops) == end or (
            isinstance(previous, (_Replica, _Remapped)) and (previous.start, previous.end) == (start, end))
        source = self._buffer_source
        outbound = {(source[b].name, source[b].size_bytes): b for b in allocated - freed}
        inbound = {(source[b].name, source[b].size_bytes): b for b in freed - allocated}
        low, high = min(allocated), max(allocated) + 1
        if len(outbound) != len(allocated - freed) or outbound.keys() != inbound.keys() or \
                high - low != len(allocated):
            return False
        if follows_an_instance:  # the previous instance's outbound buffers, under their current ids
            alive = {key: self._carry.get(out) or self._storage_with_id(out) for key, out in outbound.items()}
        else:  # ops built one by one ran since (the first micro-batch of a later step): what they left alive
            if not self._waits_match_entry(start, end):
                return False
            alive = self._alive_with_keys(outbound.keys())
            if alive is None:
                return False
        moved = len(source) - low  # the span's own buffers get the next ids, in the same order
        source.extend(source[low:high])
        entry = {inbound[key]: alive[key].buffer_id for key in outbound}
        self._append_replica(_Remapped(start, end, moved, low, high, entry, step, micro_batch), end - start)
        for key, template_out in outbound.items():  # what is alive now stands for this repetition's buffers
            storage = alive[key]
            storage.buffer_id = template_out + moved
            self._carry[template_out] = storage
        return True

    def _waits_match_entry(self, start: int, end: int) -> bool:
        """Whether the ops built just before now leave the template ops[start:end] what its own predecessor left
        it: the ops it waits for outside itself are pending now at the same offsets from its start, and are the
        same ops (name, stream). Its repetition's deps (relative) then point at the right ops, and the waits it
        leaves pending are shifted like an instance's (`_append_replica`)."""
        first = self._final_of[start]
        outside = {own + d - first for draft, own in zip(self._ops[start:end], self._final_of[start:end])
                   for d in draft.deps if own + d < first}
        pending = {w - self._final_total for w in self._waits}
        if outside != pending:
            return False
        for offset in pending:
            here, there = self._draft_at(self._final_total + offset), self._draft_at(first + offset)
            if here is None or there is None or (here.name, here.stream) != (there.name, there.stream):
                return False
        return True

    def _host_waits_repeat(self, start: int, end: int) -> bool:
        """Whether the template ops[start:end], repeated from here, makes the host wait for the same ops it waited
        for: every host wait reaching before the template lands, from here, on an op of the same name and stream."""
        first, here = self._final_of[start], self._final_total
        for draft, own in zip(self._ops[start:end], self._final_of[start:end]):
            for d in draft.host_waits:
                if own + d < first:
                    there, now = self._resolved_draft(own + d), self._resolved_draft(here + own - first + d)
                    if there is None or now is None or (there.name, there.stream) != (now.name, now.stream):
                        return False
        return True

    def _resolved_draft(self, final: int) -> "_OpDraft | None":
        """The op at position `final` of the schedule, through repetitions to the draft they repeat (None: before
        the first op)."""
        if final < 0:
            return None
        index = bisect_right(self._final_of, final) - 1
        entry = self._ops[index]
        if isinstance(entry, _OpDraft):
            return entry
        return self._ops[entry.start + final - self._final_of[index]]

    def _draft_at(self, final: int) -> "_OpDraft | None":
        """The op built at position `final` of the schedule, or None where a repetition stands there."""
        index = bisect_right(self._final_of, final) - 1
        entry = self._ops[index]
        return entry if isinstance(entry, _OpDraft) and self._final_of[index] == final else None

    def _alive_with_keys(self, keys) -> "dict[tuple[str, int], Storage] | None":
        """The live, non-persistent storage of each (name, size), or None unless exactly one exists for each."""
        wanted = set(keys)
        found: dict[tuple[str, int], Storage] = {}
        for storage in self.storages:
            key = (storage.name, storage.size_bytes)
            if storage.refs > 0 and not storage.persistent and key in wanted:
                if key in found:
                    return None
                found[key] = storage
        return found if len(found) == len(wanted) else None

    def _storage_with_id(self, buffer_id: int) -> Storage:
        storage = self._buffer_source[buffer_id]
        assert storage.buffer_id == buffer_id
        return storage

    # ---- result -------------------------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Freeze what was recorded into a Schedule of ops: the recorded ops themselves, repeated spans sharing
        them; a periodic repetition's ops carry a ReplicaSpan that moves their buffer ids. Where nothing was
        repeated it is in the expanded form (no op_source: see Schedule)."""
        index_of = {id(c): i for i, c in enumerate(CATEGORIES)}  # hashing an Enum is slow
        storages = self.storages
        buffers = BufferTable([s.name for s in storages], [s.size_bytes for s in storages],
                              [index_of[id(s.category)] for s in storages], [s.row for s in self._buffer_source],
                              [s.recorded for s in storages])
        persistent = [i for i, s in enumerate(self._buffer_source) if s.persistent and not s.lazy]
        ops: list[Op] = []
        sources: list[int] = []
        steps: list[int] = []
        micros: list[int] = []
        spans: list[tuple[int, int, ReplicaSpan]] = []
        repeated = False  # whether any span repeats earlier ops
        for entry in self._ops:
            if isinstance(entry, _OpDraft):
                sources.append(len(ops))
                ops.append(entry)
                steps.append(entry.step)
                micros.append(entry.micro_batch)
                continue
            repeated = True
            count = entry.end - entry.start
            first = self._final_of[entry.start]  # a repeated span's ops are consecutive, in ops as in _ops
            ops.extend(ops[first:first + count])
            sources.extend(range(first, first + count))
            steps.extend([entry.step] * count)
            micros.extend([entry.micro_batch] * count)
            if isinstance(entry, _Remapped):
                spans.append((len(ops) - count, len(ops), ReplicaSpan(entry.moved, entry.low, entry.high,
                                                                      entry.entry)))
        return Schedule(buffers, persistent, ops, steps, micros, spans, sources if repeated else None)
