"""DeepSpeed ZeRO-3 as events (deepspeed/runtime/zero/{partition_parameters,partitioned_param_coordinator,
parameter_offload,stage3}.py): partitioned parameters gathered before each module and released after it,
with persistence, prefetch from the recorded module trace and the reuse distance; gradients copied into the
IPG bucket and reduce-scattered into the persistent gradient partition; the optimizer step per sub-group.

One rank is simulated; collectives run on the allgather and reduce streams.
"""

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

from sim.ops import Category, OpKind, Stream
from sim.parallel.zero_step import CPU_ADAM_BYTES_PER_ELEMENT, grad_norms, inner_adam_step
from sim.parallel.partition import padded_partition_numel
from sim.plan import ZeroPlan
from sim.vocab import DType
from sim.workload.tape import Node, Param, Tape, Tensor


# partitioned_param_coordinator.py __max_ongoing_fetch_events = 2 (DeepSpeed 0.6.2 to 0.19.5; stage3.py in 0.6.0): in
# fetch_sub_module, before waiting for an in-flight parameter, the host drops the fetch events already complete and,
# if more than 2 remain, synchronizes the oldest; after the wait it records a new event on the allgather stream.
# Events complete in order, so before the k-th event the host waits for event k-3 to complete (no wait if it has).
FETCH_EVENTS_BEFORE_SYNC = 2


@dataclass(slots=True, eq=False)
class _Zp:
    """ZeRO-3 state of one parameter."""

    param: Param
    partition_numel: int
    persist: bool
    ds_id: int  # registration order (partition_parameters.py _convert_to_deepspeed_param numbers params as created)
    gathered: Tensor | None = None  # the full tensor while AVAILABLE (or INFLIGHT alone in its gather)
    ready_op: int | None = None  # side op after which `gathered` holds the data
    fetched_for_step: int = -(10**10)  # __most_recent_step_id_param_fetched_for
    handle: "_Coalesced | None" = None  # the coalesced gather it came with, until its first fetch or release
    in_flight: bool = False  # in __inflight_param_registry: gathered, not yet waited for by a fetch

    @property
    def not_available(self) -> bool:
        """ZeroParamStatus.NOT_AVAILABLE: neither gathered nor in flight."""
        return self.gathered is None and self.handle is None


@dataclass(slots=True, eq=False)
class _Coalesced:
    """An AllGatherCoalescedHandle: its partitions are views of the flat buffer, and the in-flight registry holds
    it for each of its parameters until that parameter is fetched (or released), so the flat buffer lives until
    the last of them (partitioned_param_coordinator.py fetch_sub_module pops and waits per parameter)."""

    flat: Tensor
    params: list[Param]  # in ds_id order, as gathered
    waiting: set[str]
    gather_op: int
    label: str
    wait_op: int | None = None  # the side op of wait(): each parameter's copy out of the flat buffer


@dataclass(slots=True)
class Zero3:
    tape: Tape
    config: ZeroPlan
    world: int
    dtype: DType  # parameter / communication dtype
    grad_dtype: DType  # gradient accumulation dtype (data_types.grad_accum_dtype, default the model dtype)
    comm_dtype: DType | None = None  # communication_data_type of gradient reduction (None: the model dtype)
    states: dict[str, _Zp] = field(default_factory=dict)
    modules: dict[str, list[Param]] = field(default_factory=dict)
    trace: list[str] = field(default_factory=list)  # module order of the first micro-batch (fwd + bwd)
    trace_complete: bool = False
    step_id: int = 0
    available_numel: int = 0
    queue: deque = field(default_factory=deque)
    ipg: list[tuple[Param, int]] = field(default_factory=list)  # params in the bucket and their numel
    ipg_numel: int = 0
    ipg_buffer: Tensor | None = None
    outstanding_reduces: deque = field(default_factory=deque)
    _engine_buffers: list[Tensor] = field(default_factory=list)  # allocated by finish_engine_init
    _trace_uses: dict[str, list[int]] = field(default_factory=dict)  # per param: trace positions of its modules
    _trace_numel_before: list[int] = field(default_factory=lambda: [0])  # per trace position: numel before it
    # schedule positions (Tape.track_positions keeps them right when micro-batches repeat): the latest op issued on
    # the allgather stream, and those at which fetch_sub_module recorded its latest events (__ongoing_fetch_events)
    _latest_allgather_op: deque = field(default_factory=lambda: deque(maxlen=1))
    _fetch_events: deque = field(default_factory=lambda: deque(maxlen=FETCH_EVENTS_BEFORE_SYNC + 1))

    def __post_init__(self) -> None:
        self.tape.track_positions(self._latest_allgather_op)
        self.tape.track_positions(self._fetch_events)

    @property
    def offload_param(self) -> bool:
        """offload_param.device cpu: the bf16 partitions live in pinned host memory (offload_config.py)."""
        return self.config.offload_param

    @property
    def offload_optimizer(self) -> bool:
        """offload_optimizer.device cpu: fp32 master, Adam moments and gradient partitions live on the host."""
        return self.config.offload_optimizer

    # ---- set-up -------------------------------------------------------------------------------------------------
    def register(self, params: list[Param]) -> None:
        """_convert_to_deepspeed_param + persistence (numel <= param_persistence_threshold, within
        model_persistence_threshold in total)."""
        persisted = 0
        for ds_id, p in enumerate(params):
            numel = p.tensor.numel
            persist = numel <= self.config.stage3_param_persistence_threshold and \
                persisted + numel <= self.config.stage3_model_persistence_threshold
            persisted += numel if persist else 0
            self.states[p.name] = _Zp(p, padded_partition_numel(numel, self.world), persist, ds_id)

    def partition_numel(self, params: list[Param]) -> int:
        return sum(self.states[p.name].partition_numel for p in params)

    def init_buffers(self, trainable: list[Param]) -> None:
        """The bf16 partitions (lp_param_buffer) are on the GPU from t=0: zero.Init partitioned the model and
        _create_fp16_partitions_with_defragmentation copied them into one buffer and emptied the cache. The IPG
        bucket (contiguous_gradients) and the gradient partitions (grad_partitions_flat_buffer, zeros) come later in
        _setup_for_real_optimizer, after the fp32 partitions and the optimizer states (`finish_engine_init`)."""
        tp = self.tape
        if not self.offload_param:
            tp.persistent_buffer("zero3.lp_param_buffer",
                                 self.partition_numel([z.param for z in self.states.values()]), self.dtype,
                                 Category.PARAMETERS)
        self._engine_buffers = []
        if self.config.contiguous_gradients:
            self.ipg_buffer = tp.persistent_buffer("zero3.ipg_bucket", self.config.reduce_bucket_size, self.dtype,
                                                   Category.COMMUNICATION)
            self._engine_buffers.append(self.ipg_buffer)
        if not self.offload_optimizer:
            self._engine_buffers.append(tp.persistent_buffer("zero3.grad_partitions_flat_buffer",
                                                             self.partition_numel(trainable), self.grad_dtype,
                                                             Category.GRADIENTS))

    def finish_engine_init(self, trainable: list[Param]) -> None:
        """The end of DeepSpeedZeroOptimizer_Stage3.__init__: the IPG bucket and the gradient partitions, then
        create_reduce_and_remove_grad_hooks, which gathers each trainable parameter whole (the hook needs the
        unpartitioned parameter) and partitions it again, one at a time. Persistent parameters (a few MB) are
        left out."""
        tp = self.tape
        tp.op("zero3.init.ipg_bucket_and_gradient_partitions")
        tp.allocate_existing(*self._engine_buffers)
        for p in trainable:
            zp = self.states[p.name]
            if zp.persist:
                continue
            tp.op(f"zero3.init.gradient_hook[{p.name}]", bytes_moved=2 * zp.partition_numel * self.world *
                  self.dtype.size_bytes)
            tp.drop(tp.empty(f"{p.name}.gathered", zp.partition_numel * self.world, self.dtype, Category.PARAMETERS))

    # ---- module hooks -----------------------------------------------------------------------------------------
    def pre_forward(self, module: str, params: list[Param], x: Tensor | None) -> Tensor | None:
        """_pre_forward_module_hook: fetch, and wrap the input so its backward runs the post-backward release."""
        self.modules.setdefault(module, params)
        self.fetch(module)
        if x is None or not x.requires_grad or not self.tape.grad_enabled:
            return None
        return self._hook_node(f"{module}.post_backward_hook", x, lambda: self.release(module))

    def post_forward(self, module: str, out: Tensor) -> Tensor | None:
        """_post_forward_module_hook: release, and wrap the output so its backward fetches first."""
        self.release(module)
        if not out.requires_grad or not self.tape.grad_enabled:
            return None
        return self._hook_node(f"{module}.pre_backward_hook", out, lambda: self.fetch(module))

    def _hook_node(self, name: str, x: Tensor, action) -> Tensor:
        tp = self.tape
        out = tp.alias(x)

        def backward(tape: Tape, node: Node, grad: Tensor) -> list:
            action()
            return [tape.alias(grad)]

        node = tp.record(name, [x], [], backward)
        return tp.output(out, node)

    # ---- fetch / release (PartitionedParameterCoordinator) ----------------------------------------------------
    def fetch(self, module: str) -> None:
        params = self.modules[module]
        if not self.trace_complete:
            self.trace.append(module)
        missing = [p for p in params if self.states[p.name].not_available]
        if missing:
            self._all_gather(missing)
        for p in params:
            zp = self.states[p.name]
            if zp.in_flight and len(self._fetch_events) > FETCH_EVENTS_BEFORE_SYNC:
                self.tape.host_wait_for_position(self._fetch_events[0])  # the oldest of the last three: event k-3
            if zp.handle is not None:
                self._wait(zp.handle)
            if zp.ready_op is not None:
                self.tape.wait_for(zp.ready_op)
            if zp.in_flight:
                zp.in_flight = False
                self._fetch_events.append(self._latest_allgather_op[0])
            self._pop_handle(zp)
        if self.trace_complete:
            self._prefetch(params)
        self.step_id += 1  # fetch_sub_module advances __step_id last: prefetch sees this module's own id

    def _prefetch(self, params: list[Param]) -> None:
        """Pop this module's params off the queue, then gather the next ones in trace order up to
        min(max_live_parameters - available, prefetch_bucket_size) elements."""
        fetched = {p.name for p in params if self.states[p.name].fetched_for_step < self.step_id}
        popped = 0
        while self.queue and popped < len(fetched):
            name, used_at = self.queue.popleft()
            self.states[name].fetched_for_step = max(self.states[name].fetched_for_step, used_at)
            popped += 1
        budget = min(self.config.stage3_max_live_parameters - self.available_numel,
                     self.config.stage3_prefetch_bucket_size)
        chosen, numel = [], 0
        while self.queue and numel < budget:
            name, used_at = self.queue.popleft()
            zp = self.states[name]
            if zp.not_available and zp.param not in chosen:
                chosen.append(zp.param)
                numel += zp.param.tensor.numel
            zp.fetched_for_step = max(zp.fetched_for_step, used_at)
        if chosen:
            self._all_gather(chosen)

    def _all_gather(self, params: list[Param]) -> None:
        """all_gather_coalesced on the allgather stream. One param: a buffer of ceil(numel/P)·P and the param is
        a view of it. Several: a flat buffer Σ partition·P; the copies out of it come at the handle's wait(), when
        the first of its params is fetched (`_wait`), and the flat buffer lives until the last is (_Coalesced)."""
        tp, P = self.tape, self.world
        size = self.dtype.size_bytes
        params = sorted(params, key=lambda p: self.states[p.name].ds_id)  # all_gather_coalesced sorts by ds_id
        total = sum(self.states[p.name].partition_numel for p in params)
        wire = (P - 1) * total * size  # ring all-gather: each rank sends and receives (P-1)/P of the result
        label = params[0].name if len(params) == 1 else f"{params[0].name}+{len(params) - 1}"
        staged = None
        if self.offload_param:  # ds_tensor.to(device, non_blocking): the host partitions come over PCIe first
            to_device = tp.side_op(f"zero3.partition_to_device[{label}]", Stream.ALLGATHER, bytes_moved=total * size,
                                   kind=OpKind.HOST_TO_DEVICE)
            staged = tp.empty_in(to_device, "zero3.partition_to_device", total, self.dtype, Category.COMMUNICATION)
        # asynchronous, on the default group's NCCL stream (zero.Init's dist.get_world_group()), after the copy in
        gather = tp.side_op(f"zero3.allgather[{label}]", Stream.ALLGATHER, bytes_moved=2 * total * P * size,
                            wire_bytes=wire, kind=OpKind.ALL_GATHER, runs_on=Stream.NCCL_WORLD,
                            deps=(to_device,) if staged is not None else ())
        self._latest_allgather_op.append(tp.final_position(gather))
        if staged is not None:  # the gather's input, DeepSpeed's last reference dropped once the gather is issued:
            # ProcessGroupNCCL keeps it until the gather has run (recordStream before torch 2.8, the Work's stash
            # from 2.8, released at wait(), taken here as the gather's end)
            tp.record_stream(staged.storage, Stream.NCCL_WORLD)
            tp.release_in(gather, staged.storage)
        if len(params) == 1:
            zp = self.states[params[0].name]
            zp.gathered = tp.empty_in(gather, f"{params[0].name}.gathered", total * P, self.dtype,
                                      Category.PARAMETERS)
            tp.record_on_nccl(Stream.NCCL_WORLD, zp.gathered.storage)
            zp.ready_op = gather
        else:
            flat = tp.empty_in(gather, "zero3.allgather_flat", total * P, self.dtype, Category.COMMUNICATION)
            tp.record_on_nccl(Stream.NCCL_WORLD, flat.storage)
            handle = _Coalesced(flat, params, {p.name for p in params}, gather, label)
            for p in params:
                self.states[p.name].handle = handle
        for p in params:
            self.available_numel += p.tensor.numel
            self.states[p.name].in_flight = True

    def release(self, module: str) -> None:
        """release_sub_module: partition the module's params unless persistent, prefetched past, or used again
        within max_reuse_distance elements of the trace (DeepSpeed walks the trace from the current step id,
        adding each module's numel, and stops once the sum reaches the distance: a module is within it when the
        modules before it from here sum to less)."""
        params = self.modules[module]
        for p in params:
            zp = self.states[p.name]
            if zp.persist or (self.trace_complete and (zp.fetched_for_step > self.step_id or self._reused_soon(p))):
                continue
            self._partition(zp)

    def _reused_soon(self, param: Param) -> bool:
        """Whether `param`'s next use in the trace, from the current step id on, lies within max_reuse_distance."""
        uses = self._trace_uses.get(param.name, ())
        k = bisect_left(uses, self.step_id)
        if k == len(uses):
            return False
        numel_before = self._trace_numel_before
        return numel_before[uses[k]] - numel_before[self.step_id] < self.config.stage3_max_reuse_distance

    def _wait(self, handle: _Coalesced) -> None:
        """AllGatherCoalescedHandle.wait() (partition_parameters.py), at most once: fetch_sub_module calls it on
        the allgather stream for the first of the handle's params it needs; it torch.cat's every param's slices of
        the flat buffer into a full tensor of its own."""
        if handle.wait_op is not None:
            return
        tp = self.tape
        numel = sum(p.tensor.numel for p in handle.params)
        wait = tp.side_op(f"zero3.allgather_wait[{handle.label}]", Stream.ALLGATHER,
                          bytes_moved=2 * numel * self.dtype.size_bytes, deps=(handle.gather_op,))
        self._latest_allgather_op.append(tp.final_position(wait))
        for p in handle.params:
            zp = self.states[p.name]
            zp.gathered = tp.empty_in(wait, f"{p.name}.gathered", p.tensor.numel, self.dtype, Category.PARAMETERS)
            zp.ready_op = wait
        handle.wait_op = wait

    def _pop_handle(self, zp: _Zp) -> None:
        """The registry lets go of a parameter's coalesced handle; the last one frees the flat buffer."""
        handle, zp.handle = zp.handle, None
        if handle is None:
            return
        handle.waiting.discard(zp.param.name)
        if not handle.waiting:  # after the gather's wait (an op of its own: the current one may precede it)
            self.tape.wait_for(handle.wait_op)
            self.tape.op("zero3.allgather_flat_freed")
            self.tape.drop(handle.flat)

    def _partition(self, zp: _Zp) -> None:
        if zp.handle is not None:  # still in flight (DeepSpeed's release_and_reset_all would raise): copies first
            self._wait(zp.handle)
        self._pop_handle(zp)
        if zp.gathered is None:
            return
        # free_param (partition_parameters.py): param.data.record_stream(current stream), then param.data = empty
        self.tape.record_stream(zp.gathered.storage, Stream.COMPUTE)
        self.tape.drop(zp.gathered)
        zp.gathered, zp.ready_op, zp.in_flight = None, None, False
        self.available_numel -= zp.param.tensor.numel

    def end_of_forward_backward(self) -> None:
        """After a micro-batch: the trace of the first one is complete; the fetch queue and step id restart."""
        if not self.trace_complete:  # the trace is fixed from here: index it once for _reused_soon
            for step_id, module in enumerate(self.trace):
                for p in self.modules[module]:
                    self._trace_uses.setdefault(p.name, []).append(step_id)
                self._trace_numel_before.append(self._trace_numel_before[-1] + sum(p.tensor.numel
                                                                                   for p in self.modules[module]))
        self.trace_complete = True
        self.step_id = 0
        self.queue = deque()
        for step_id, module in enumerate(self.trace):
            for p in self.modules[module]:
                self.queue.append((p.name, step_id))
        for zp in self.states.values():
            zp.fetched_for_step = -(10**10)
            zp.ready_op = None  # gathers of kept params completed before their use in this micro-batch
            zp.in_flight = False

    def release_and_reset_all(self) -> None:
        """stage3 step(): every non-persistent parameter back to its partition."""
        for zp in self.states.values():
            if not zp.persist:
                self._partition(zp)

    # ---- gradients --------------------------------------------------------------------------------------------
    def on_grad(self, param: Param, grad: Tensor) -> None:
        """reduce_ready_partitions_and_remove_grads: flush the bucket when this grad would overflow it, then copy
        the grad into the IPG bucket on the reduce stream (the original is freed after the copy); a param larger
        than the bucket keeps its own grad until its reduce."""
        tp = self.tape
        numel = param.tensor.numel
        if self.ipg_numel + numel > self.config.reduce_bucket_size and self.ipg:
            self._reduce_ipg()
        if self.ipg_buffer is not None and self.ipg_numel + numel <= self.config.reduce_bucket_size:
            copy = tp.side_op(f"zero3.ipg_copy[{param.name}]", Stream.REDUCE, bytes_moved=2 * grad.size_bytes)
            # stage3.py __add_grad_to_ipg_bucket: param.grad.record_stream(current stream: the reduce stream)
            tp.record_stream(grad.storage, Stream.REDUCE)
            tp.release_in(copy, grad.storage)
            self.ipg.append((param, numel, None))
        else:
            self.ipg.append((param, numel, grad))
        self.ipg_numel += numel

    def _reduce_ipg(self) -> None:
        """__reduce_and_partition_ipg_grads on the reduce stream, at most 2 in flight. __avg_scatter_grads casts
        each gradient to communication_data_type when it is not the model dtype (new tensors);
        reduce_scatter_coalesced concatenates the padded per-rank chunks into a new flat buffer and
        reduce-scatters it in place, except for a single gradient that needs no padding, which is reduced in place
        (comm/coalesced_collectives.py); the rank's slices are cast back, then copied (first micro-step) or added
        into grad_partitions_flat_buffer."""
        tp, P = self.tape, self.world
        comm = self.comm_dtype or self.dtype
        cast = comm is not self.dtype
        numels = [n for _, n, _ in self.ipg]
        padded = sum(padded_partition_numel(n, P) * P for n in numels)
        deps = (self.outstanding_reduces.popleft(),) if len(self.outstanding_reduces) >= 2 else ()
        size = comm.size_bytes
        # _torch_reduce_scatter_fn calls reduce_scatter_tensor synchronously (async_op=False): the reduce stream waits
        # for it, and torch records nothing on ProcessGroupNCCL's stream for it (from 2.2, #111431; from 2.8 it runs
        # on the reduce stream itself), so it is laid out on the reduce stream
        reduce = tp.side_op(f"zero3.reduce_scatter[{self.ipg[0][0].name}+{len(self.ipg) - 1}]", Stream.REDUCE,
                            bytes_moved=3 * padded * size, wire_bytes=(P - 1) * padded // P * size, deps=deps,
                            kind=OpKind.REDUCE_SCATTER)
        made = [tp.empty_in(reduce, "zero3.grad_to_communication_dtype", n, comm, Category.COMMUNICATION)
                for n in numels] if cast else []
        if len(numels) > 1 or numels[0] % P:
            made.append(tp.empty_in(reduce, "zero3.reduce_scatter_flat", padded, comm, Category.COMMUNICATION))
        if cast:
            made.extend(tp.empty_in(reduce, "zero3.grad_partition_to_dtype", padded_partition_numel(n, P), self.dtype,
                                    Category.COMMUNICATION) for n in numels)
        for tensor in made:
            tp.release_in(reduce, tensor.storage)
        for _, _, own_grad in self.ipg:
            if own_grad is not None:  # __reduce_and_partition_ipg_grads: param.grad.record_stream(reduce stream)
                tp.record_stream(own_grad.storage, Stream.REDUCE)
                tp.release_in(reduce, own_grad.storage)
        if self.offload_optimizer:
            reduce = self._grads_to_host(reduce, sum(padded_partition_numel(n, P) for n in numels))
        self.outstanding_reduces.append(reduce)
        self.ipg, self.ipg_numel = [], 0

    def _grads_to_host(self, reduce: int, numel: int) -> int:
        """partition_grads with offload_optimizer, on the reduce stream after `reduce`: the rank's gradient
        partitions go to their host buffers (the first micro-step's copy_, non_blocking; later ones add on the GPU
        and copy back), and the host buffer comes back to the GPU (grad_buffer.to(device)), each over PCIe. Returns
        the last op. Not modelled: the boundary's fp32 copy to the optimizer's host gradients
        (_offload_grad_partition_at_boundary)."""
        tp, moved = self.tape, numel * self.dtype.size_bytes
        to_host = tp.side_op("zero3.grad_partitions_to_host", Stream.REDUCE, bytes_moved=moved, deps=(reduce,),
                             kind=OpKind.DEVICE_TO_HOST)
        return tp.side_op("zero3.grad_buffer_to_device", Stream.REDUCE, bytes_moved=moved, deps=(to_host,),
                          kind=OpKind.HOST_TO_DEVICE)

    def end_of_backward(self) -> None:
        """independent_gradient_partition_epilogue: flush the last bucket and synchronise the reduce stream."""
        if self.ipg:
            self._reduce_ipg()
        for reduce in self.outstanding_reduces:
            self.tape.wait_for(reduce)
        self.outstanding_reduces.clear()


def sub_groups(zero: Zero3, trainable: list[Param]) -> list[int]:
    """Elements per optimizer sub-group: params are appended until a group reaches sub_group_size
    (stage3.py _create_fp16_sub_groups)."""
    groups, current = [], 0
    for p in trainable:
        current += zero.states[p.name].partition_numel
        if current >= zero.config.sub_group_size:
            groups.append(current)
            current = 0
    if current:
        groups.append(current)
    return groups


class Zero3Optimizer:
    """The ZeRO-3 optimizer side: fp32 master partitions per sub-group from engine init, Adam states per sub-group,
    and the per-sub-group step: flatten the bf16 gradient partitions, cast them to fp32, step, copy back into the
    bf16 partitions."""

    def __init__(self, zero: Zero3, trainable: list[Param], temporaries_per_step: int, states_at_init: bool) -> None:
        """`temporaries_per_step`: fp32 tensors of the sub-group size the inner optimizer makes in its step
        (torch AdamW foreach: exp_avg_sq_sqrt = 1; DeepSpeed FusedAdam, torch fused: 0). `states_at_init`:
        DeepSpeed before 0.13.2 ran one step on zero gradients in initialize_optimizer_states, so the Adam states
        exist from engine init; from 0.13.2 (#5104) the optimizer makes them at its first step of each sub-group.
        With offload_optimizer all of it lives and runs on the host (DeepSpeedCPUAdam): nothing on the GPU."""
        self.zero, self.trainable = zero, trainable
        self.groups = sub_groups(zero, trainable)
        self.temporaries = temporaries_per_step
        self.lazy_states: list[list[Tensor]] = []  # per sub-group, made by its first step
        tp = zero.tape
        if zero.offload_optimizer:
            return
        for index, numel in enumerate(self.groups):  # _create_fp32_partitions: .clone().float() per sub-group
            tp.op(f"zero3.init.create_fp32_partition[{index}]", bytes_moved=8 * numel)
            clone = tp.empty(f"zero3.init.group{index}.bf16_clone", numel, zero.dtype)
            tp.allocate_existing(tp.persistent_buffer(f"zero3.fp32_partitioned_groups_flat[{index}]", numel,
                                                      DType.FLOAT32, Category.OPTIMIZER_STATES))
            tp.drop(clone)
            self.lazy_states.append([tp.persistent_buffer(f"zero3.group{index}.{state}", numel, DType.FLOAT32,
                                                          Category.OPTIMIZER_STATES)
                                     for state in ("exp_avg", "exp_avg_sq")])
        # initialize_optimizer_states: a zero fp32 gradient of the largest sub-group, given to each sub-group's
        # master as .grad; before 0.13.2 an optimizer step on it made the Adam states (with its temporaries)
        tp.op("zero3.init.initialize_optimizer_states")
        gradient = tp.empty("zero3.init.gradient_buffer", max(self.groups, default=0), DType.FLOAT32)
        if states_at_init:
            for index, numel in enumerate(self.groups):
                self._inner_step(index, numel, f"zero3.init.optimizer_step[{index}]")
        tp.drop(gradient)

    def _inner_step(self, index: int, numel: int, name: str) -> None:
        """The inner optimizer's step on sub-group `index` (its first makes the sub-group's moments)."""
        inner_adam_step(self.zero.tape, name, numel, self.lazy_states[index], self.temporaries,
                        f"zero3.group{index}.optimizer_temp")
        self.lazy_states[index] = []

    def state_bytes(self) -> int:
        """GPU bytes of fp32 master partitions and Adam moments."""
        return 0 if self.zero.offload_optimizer else 12 * sum(self.groups)

    def host_bytes(self) -> int:
        """Pinned host bytes per rank: offloaded bf16 partitions (2 B), and with offload_optimizer fp32 master,
        Adam moments and fp32 gradient partitions (16 B) per partition element."""
        zero = self.zero
        params = zero.partition_numel([z.param for z in zero.states.values()]) * zero.dtype.size_bytes
        return (params if zero.offload_param else 0) + (16 * sum(self.groups) if zero.offload_optimizer else 0)

    def step(self) -> None:
        tp, zero = self.zero.tape, self.zero
        if zero.offload_optimizer:
            # the host waits for the GPU (the gradients on the host), then per sub-group: DeepSpeedCPUAdam, and
            # _reassign_or_swap_out_partitioned_parameters's copy_ of the fp32 master into the bf16 partition: cast on
            # the host, then (partitions on the GPU) a blocking copy over PCIe
            tp.op("zero3.step.synchronize")
            tp.host_sync()
            for index, numel in enumerate(self.groups):
                tp.host_work(f"zero3.step.group{index}.cpu_adam", CPU_ADAM_BYTES_PER_ELEMENT * numel)
                tp.host_work(f"zero3.step.group{index}.fp32_to_bf16_on_host", (4 + zero.dtype.size_bytes) * numel)
                if not zero.offload_param:
                    tp.op(f"zero3.step.group{index}.copy_to_device", bytes_moved=numel * zero.dtype.size_bytes,
                          kind=OpKind.HOST_TO_DEVICE)
                    tp.host_sync()
            return
        grad_norms(tp, "zero3", [zero.states[p.name].partition_numel for p in self.trainable])
        for index, numel in enumerate(self.groups):
            tp.op(f"zero3.step.group{index}.flatten_grads", bytes_moved=4 * numel * zero.grad_dtype.size_bytes)
            flat = tp.empty(f"zero3.group{index}.flat_grad", numel, zero.grad_dtype, Category.TEMPORARIES)
            tp.op(f"zero3.step.group{index}.grad_to_fp32", bytes_moved=6 * numel)
            grad32 = tp.empty(f"zero3.group{index}.fp32_grad", numel, DType.FLOAT32, Category.TEMPORARIES)
            tp.drop(flat)
            self._inner_step(index, numel, f"zero3.step.group{index}.optimizer_step")
            tp.op(f"zero3.step.group{index}.copy_to_bf16", bytes_moved=6 * numel)
            tp.drop(grad32)
