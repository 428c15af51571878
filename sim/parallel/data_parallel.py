"""Plain DDP and DeepSpeed ZeRO-1/2 on one simulated rank: where the model states live and the collectives that
reduce the gradients.

DDP (torch/nn/parallel/distributed.py, reducer.cpp): the whole model, gradients and optimizer on every rank, plus
flat bucket buffers for all gradients (bucket_cap_mb 25, the first bucket 1 MiB, buckets in reverse parameter
order; gradient_as_bucket_view False as HF Trainer leaves it), allreduced on the last micro-batch of an
accumulation (the others run under no_sync).

ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): the whole bf16 model (bit16_groups_flat), fp32 master
partitions of 1/P (engine init) and Adam moments of 1/P (from DeepSpeed 0.13.2 made at the first step), IPG
buckets during backward (reduce_bucket_size, twice with overlap_comm); ZeRO-2 copies each gradient into the bucket
(one larger than the bucket is reduced in place), reduces it and keeps only this rank's part in grads_in_partition,
ZeRO-1 keeps the full gradients and reduces them at the accumulation boundary. The step flattens the partition's
gradients, casts them to fp32, steps, and all-gathers the bf16 partitions in place. With offload_optimizer cpu the
optimizer side moves to the host (Zero12's docstring).
"""

from sim.ops import Category, OpKind, Stream
from sim.parallel.zero_step import CPU_ADAM_BYTES_PER_ELEMENT, grad_norms, inner_adam_step
from sim.parallel.partition import flat_partition_numel
from sim.plan import ZeroPlan
from sim.vocab import DType
from sim.workload.tape import Param, Tape, Tensor

DDP_BUCKET_CAP_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=25)
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


def ddp_buckets(trainable: list[Param]) -> list[list[Param]]:
    """_compute_bucket_assignment_by_size: parameters in reverse order, a bucket closes when it reaches its cap."""
    buckets: list[list[Param]] = [[]]
    filled, cap = 0, DDP_FIRST_BUCKET_BYTES
    for p in reversed(trainable):
        buckets[-1].append(p)
        filled += p.tensor.size_bytes
        if filled >= cap:
            buckets.append([])
            filled, cap = 0, DDP_BUCKET_CAP_BYTES
    return [b for b in buckets if b]


class Ddp:
    """DistributedDataParallel's reducer for one rank."""

    def __init__(self, tape: Tape, world: int, trainable: list[Param]) -> None:
        self.tape, self.world = tape, world
        self.buckets = ddp_buckets(trainable)
        self.bucket_of = {p.name: i for i, bucket in enumerate(self.buckets) for p in bucket}
        for i, bucket in enumerate(self.buckets):
            numel = sum(p.tensor.numel for p in bucket)
            tape.persistent_buffer(f"ddp.bucket[{i}]", numel, bucket[0].tensor.dtype, Category.COMMUNICATION)
        self.pending = [len(b) for b in self.buckets]
        self.sync = False
        self.allreduces: list[int] = []

    def bucket_bytes(self) -> int:
        return sum(p.tensor.size_bytes for b in self.buckets for p in b)

    def on_grad_ready(self, param: Param) -> None:
        """The autograd hook after AccumulateGrad: copy the grad into its bucket view; a full bucket is allreduced
        (ring: 2·(P-1)/P of its bytes on the wire) on the default group's NCCL stream, after the work the autograd
        thread's stream has queued."""
        if not self.sync:
            return
        index = self.bucket_of[param.name]
        self.pending[index] -= 1
        if self.pending[index] == 0:
            size = sum(p.tensor.size_bytes for p in self.buckets[index])
            op = self.tape.side_op(f"ddp.allreduce[bucket {index}]", Stream.COMPUTE, bytes_moved=2 * size,
                                   wire_bytes=2 * (self.world - 1) * size // self.world, kind=OpKind.ALL_REDUCE,
                                   runs_on=Stream.NCCL_WORLD)
            self.allreduces.append(op)

    def finalize(self) -> None:
        """finalize_backward: wait for the allreduces, copy the averaged buckets back into the grads."""
        for op in self.allreduces:
            self.tape.wait_for(op)
        self.tape.op("ddp.copy_buckets_to_grads", bytes_moved=2 * self.bucket_bytes())
        self.allreduces.clear()
        self.pending = [len(b) for b in self.buckets]


class Zero12:
    """DeepSpeed ZeRO stage 1 or 2 for one rank: the one with the heaviest peak. Ranks differ only in their
    partition's gradients: without offload, in when grads_in_partition is made; the last rank's gradients (LM head,
    last layers) come first in backward, so it holds that buffer longest: the last rank is simulated. With offload,
    in the per-gradient transients of the boundary, which scale with whole parameters: rank 0 (embedding) is.

    With offload_optimizer cpu (stage_1_and_2.py, DeepSpeed 0.14): the fp32 master, its gradient and the Adam
    moments live on the host; the GPU keeps the bf16 model, a staging buffer of the largest parameter
    (temp_grad_buffer_for_gpu_offload), the IPG buckets, and at the accumulation boundary, for each gradient in
    this rank's partition, a per-parameter fp64 norm and the transients of the norm, the inf/nan check and the fp32
    copy to the host (copy_grads_in_partition)."""

    def __init__(self, tape: Tape, config: ZeroPlan, world: int, trainable: list[Param],
                 dtype: DType, deepspeed_version: tuple[int, int, int], comm_dtype: DType | None = None,
                 temporaries: int = 0) -> None:
        """`temporaries`: fp32 tensors of the partition's size the inner optimizer makes in its step (see
        schedule._inner_optimizer_temporaries)."""
        self.tape, self.config, self.world, self.dtype = tape, config, world, dtype
        self.temporaries = temporaries
        self.comm_dtype = comm_dtype or dtype  # communication_data_type
        self.stage = config.stage
        self.version = deepspeed_version
        self.offload = config.offload_optimizer
        total = sum(p.tensor.numel for p in trainable)
        self.partition = flat_partition_numel(total, world)
        self.overlap = bool(config.overlap_comm)
        self.largest = max((p.tensor.numel for p in trainable), default=0)
        self.numel = {p.name: p.tensor.numel for p in trainable}
        rank = 0 if self.offload else world - 1
        first, end = rank * self.partition, (rank + 1) * self.partition
        self.in_partition: dict[str, int] = {}  # param name -> its elements inside the simulated rank's partition
        self.flat_offset: dict[str, int] = {}  # param name -> its first element in the flat group
        offset = 0
        for p in trainable:
            inside = max(0, min(offset + p.tensor.numel, end) - max(offset, first))
            if inside:
                self.in_partition[p.name] = inside
            self.flat_offset[p.name] = offset
            offset += p.tensor.numel
        if self.offload:
            tape.persistent_buffer("zero.temp_grad_buffer_for_gpu_offload", self.largest, dtype, Category.GRADIENTS)
        self.adam_states: list[Tensor] = []  # made by the first step
        if not self.offload:
            self._init_optimizer_partition()
        # copy_grads_in_partition's buffer: whole parameters that have elements in this rank's partition
        self.partition_whole = sum(self.numel[name] for name in self.in_partition)
        self.grads_in_partition: Tensor | None = None  # this backward's (set to None by _release_ipg_buffers)
        self.averaged: Tensor | None = None  # the first one of an accumulation, kept by averaged_gradients' views
        self.boundary = True  # this micro-batch ends an accumulation
        self.ipg: list[Tensor] = []
        self.bucket: list[tuple[Param, Tensor | None]] = []  # with the own gradient of one larger than the bucket
        self.kept: list[Tensor] = []  # ZeRO-1: reduced own gradients outside the partition, until the epilogue
        self.bucket_numel = 0
        self.norms: list[Tensor] = []  # offload: fp64 norm per partition gradient, kept until the step

    def _init_optimizer_partition(self) -> None:
        """The engine init's fp32 side (stage_1_and_2.py, DeepSpeed 0.14): the fp32 master is the 16-bit partition
        `.to(device).clone().float()` (a 16-bit clone, freed after the cast); initialize_optimizer_states gives it a
        zero fp32 gradient of the partition's size, before 0.13.2 (#5104) steps the optimizer on it (the Adam
        states then exist from engine init), and sets the gradient to None."""
        tp, numel = self.tape, self.partition
        tp.op("zero.init.create_fp32_partition", bytes_moved=(2 * self.dtype.size_bytes + 4) * numel)
        clone = tp.empty("zero.init.bf16_clone", numel, self.dtype)
        tp.allocate_existing(tp.persistent_buffer("zero.single_partition_of_fp32_groups", numel, DType.FLOAT32,
                                                  Category.OPTIMIZER_STATES))
        tp.drop(clone)
        self.adam_states = [tp.persistent_buffer(f"zero.{state}", numel, DType.FLOAT32, Category.OPTIMIZER_STATES)
                            for state in ("exp_avg", "exp_avg_sq")]
        tp.op("zero.init.initialize_optimizer_states")
        gradient = tp.empty("zero.init.fp32_gradient_partition", numel, DType.FLOAT32)
        if self.version < (0, 13, 2):
            self._inner_step("zero.init.optimizer_step")
        tp.drop(gradient)

    def _inner_step(self, name: str) -> None:
        """The inner optimizer's step on the fp32 partition (its first makes the moments)."""
        inner_adam_step(self.tape, name, self.partition, self.adam_states, self.temporaries, "zero.optimizer_temp")
        self.adam_states = []

    def state_bytes(self) -> int:
        return 0 if self.offload else 12 * self.partition

    def host_bytes(self, accumulation: int) -> int:
        """Host memory with offload: fp32 master, its fp32 gradient and two Adam moments per partition element,
        the host staging buffer of the largest parameter, with accumulation a bf16 copy of every parameter in the
        partition (accumulated_grads_in_cpu holds whole parameters), and from DeepSpeed 0.17.0 a 16-bit copy of the
        partition (param_buffer_of_bit16_for_cpu_offload_groups, DeepSpeed #7309)."""
        if not self.offload:
            return 0
        size = self.dtype.size_bytes
        whole = sum(self.numel[name] for name in self.in_partition) if accumulation > 1 else 0
        bit16 = size * self.partition if self.version >= (0, 17, 0) else 0
        return 16 * self.partition + size * self.largest + size * whole + bit16

    def begin_backward(self) -> None:
        """optimizer.backward: a fresh IPG bucket list every backward (twice reduce_bucket_size with overlap_comm),
        the previous one dropped first (ZeRO-1 keeps it between micro-batches)."""
        tp = self.tape
        if self.ipg:  # self.ipg_buffer = [] first: the old blocks go back to the cache before the new ones
            tp.op("zero.release_previous_ipg_buffers")
            tp.drop(*self.ipg)
        tp.op("zero.allocate_ipg_buffers")
        self.ipg = [tp.empty(f"zero.ipg_buffer[{i}]", self.config.reduce_bucket_size, self.dtype,
                             Category.COMMUNICATION) for i in range(2 if self.overlap else 1)]
        tp.record_on_nccl(Stream.NCCL_DP, *[buffer.storage for buffer in self.ipg])  # reduced in place

    def on_grad(self, param: Param, grad: Tensor) -> None:
        """ZeRO-2's reduce_ready_partitions_and_remove_grads (ZeRO-1 keeps param.grad; see Tape)."""
        grad.storage.category = Category.GRADIENTS
        self._add_to_bucket(param, grad)

    def on_accumulated_grad(self, param: Param) -> None:
        """ZeRO-1 with overlap_comm: create_reduce_and_remove_grad_hooks registers ZeRO-2's hook then too; it runs
        after AccumulateGrad and reduces only in the accumulation's last micro-batch
        (reduce_ready_partitions_and_remove_grads), taking the accumulated gradient."""
        if self.boundary:
            grad, param.grad = param.grad, None
            self._add_to_bucket(param, grad)

    def _add_to_bucket(self, param: Param, grad: Tensor) -> None:
        """reduce_independent_p_g_buckets_and_remove_grads: reduce the bucket first when this gradient would
        overflow it; copy the gradient into the IPG buffer and free it, except one larger than the bucket
        (extra_large_param_to_reduce), which is reduced in place, alone, at the next reduction."""
        tp = self.tape
        if self.bucket_numel + grad.numel > self.config.reduce_bucket_size and self.bucket:
            self._reduce()
        if grad.numel > self.config.reduce_bucket_size:
            self.bucket.append((param, grad))
        else:
            tp.op(f"zero.copy_grad_to_ipg[{param.name}]", bytes_moved=2 * grad.size_bytes)
            self.bucket.append((param, None))
            tp.drop(grad)
        self.bucket_numel += grad.numel

    def _slices(self) -> list[int]:
        """average_tensor's (rank, slice) list for the bucket, as element counts: each parameter's part in each
        rank's partition, in bucket order, a slice merged into the one before when both go to the same rank."""
        slices: list[int] = []
        previous = -1
        for param, _ in self.bucket:
            start, end = self.flat_offset[param.name], self.flat_offset[param.name] + self.numel[param.name]
            for rank in range(start // self.partition, (end - 1) // self.partition + 1):
                numel = min(end, (rank + 1) * self.partition) - max(start, rank * self.partition)
                if rank == previous:
                    slices[-1] += numel
                else:
                    slices.append(numel)
                previous = rank
        return slices

    def _reduce(self) -> None:
        """reduce_ipg_grads → average_tensor → allreduce_and_scatter (use_multi_rank_bucket_allreduce, the
        default): the slices go in groups of up to reduce_bucket_size elements to allreduce_bucket, which
        flattens a group into a new tensor unless it is one slice (a view), casts it to communication_data_type
        when that differs (another copy), all-reduces, and copies back. Then each gradient in this rank's
        partition is copied into grads_in_partition (made at the first copy of each backward) and every reduced
        own gradient is freed, except, with ZeRO-1, those outside the partition (until the epilogue). With
        offload the partition's gradients go to the host instead (copy_grads_in_partition)."""
        tp, size = self.tape, self.dtype.size_bytes
        comm = self.comm_dtype
        groups: list[list[int]] = [[]]
        grouped = 0  # elements in groups[-1], kept as a running total: slices grow with the world size
        for numel in self._slices():
            groups[-1].append(numel)
            grouped += numel
            if grouped > self.config.reduce_bucket_size:
                groups.append([])
                grouped = 0
        last = None
        for group in (g for g in groups if g):
            numel = sum(group)
            label = f"zero.reduce[{len(self.bucket)} grads, {len(group)} slices]"
            wire = 2 * (self.world - 1) * numel * comm.size_bytes // self.world
            buffers = ([("zero.allreduce_bucket_flat", self.dtype)] if len(group) > 1 else []) + (
                [("zero.allreduce_bucket_comm", comm)] if comm is not self.dtype else [])
            moved = 2 * numel * size * (len(buffers) + 1)
            if self.overlap:  # from the reduction stream onto the NCCL stream of DeepSpeed's data-parallel group,
                # waited for before the IPG buffer is reused
                last = tp.side_op(label, Stream.REDUCE, bytes_moved=moved, wire_bytes=wire, kind=OpKind.ALL_REDUCE,
                                  deps=(last,) if last is not None else (), runs_on=Stream.NCCL_DP)
                made = [tp.empty_in(last, name, numel, dtype, Category.COMMUNICATION) for name, dtype in buffers]
                tp.record_on_nccl(Stream.NCCL_DP, *[tensor.storage for tensor in made[-1:]])  # what it reduces
                for tensor in made:
                    tp.release_in(last, tensor.storage)
            else:
                tp.op(label, bytes_moved=moved, kind=OpKind.ALL_REDUCE, wire_bytes=wire)
                tp.drop(*[tp.empty(name, numel, dtype, Category.COMMUNICATION) for name, dtype in buffers])
        last = self._grads_to_host(last) if self.offload else self._grads_to_partition(last)
        for param, grad in self.bucket:  # the reduced own gradients: cleared, or copied into the partition
            if grad is None:
                continue
            if self.stage == 1 and param.name not in self.in_partition:
                self.kept.append(grad)
            elif last is None:
                tp.drop(grad)
            else:
                tp.release_in(last, grad.storage)
        if last is not None:
            tp.wait_for(last)
        self.bucket, self.bucket_numel = [], 0

    def _grads_to_partition(self, reduce: int | None) -> int | None:
        """copy_grads_in_partition for the bucket's gradients in this rank's partition, on the reduction stream
        after `reduce` with overlap_comm, else on the compute stream. Returns the last reduction-stream op."""
        tp = self.tape
        mine = [param for param, _ in self.bucket if param.name in self.in_partition]
        if not mine:
            return reduce
        name = "zero.copy_grads_in_partition"
        moved = 2 * sum(self.numel[p.name] for p in mine) * self.dtype.size_bytes
        if reduce is None:
            tp.op(name, bytes_moved=moved)
        else:
            reduce = tp.side_op(name, Stream.REDUCE, bytes_moved=moved, deps=(reduce,))
        if self.grads_in_partition is None:
            if reduce is None:
                self.grads_in_partition = tp.empty("zero.grads_in_partition", self.partition_whole, self.dtype,
                                                   Category.GRADIENTS)
            else:
                self.grads_in_partition = tp.empty_in(reduce, "zero.grads_in_partition", self.partition_whole,
                                                      self.dtype, Category.GRADIENTS)
        return reduce

    def _grads_to_host(self, reduce: int | None) -> int | None:
        """copy_grads_in_partition with offload, for the bucket's gradients in this rank's partition, on the
        reduction stream after `reduce` (with overlap_comm; else on the compute stream). With accumulation,
        async_accumulate_grad_in_cpu_via_gpu through the staging buffer (no new GPU memory): from the second
        micro-batch the host's sum comes over PCIe and is added on the GPU; the gradient goes back to the host before
        the boundary (0.14), from 0.15.2 in the first micro-batch only (DeepSpeed #6550). At the boundary, per
        gradient: its fp64 slice norm (kept until the step), _has_inf_or_nan on the whole gradient
        (x.float(), isnan, isinf, logical_or, .float(): 4 + 1 + 1 + 1 + 4 bytes per element alive together), and
        the slice cast to fp32 on the GPU and copied to the host (non_blocking). Returns the last reduction-stream op
        (the one the compute stream waits for)."""
        tp = self.tape
        mine = [(param, self.in_partition[param.name]) for param, _ in self.bucket
                if param is not None and param.name in self.in_partition]
        last = reduce

        def step(name: str, bytes_moved: int, sizes: list[tuple[str, int, DType]], keep: bool = False,
                 kind: OpKind = OpKind.MEMORY) -> list[Tensor]:
            """One op with the tensors it makes: kept as gradients (`keep`), else returned, for the caller to drop."""
            nonlocal last
            if reduce is None:
                tp.op(name, bytes_moved=bytes_moved, kind=kind)
                made = [tp.empty(label, numel, dtype) for label, numel, dtype in sizes]
            else:
                last = tp.side_op(name, Stream.REDUCE, bytes_moved=bytes_moved, deps=(last,), kind=kind)
                made = [tp.empty_in(last, label, numel, dtype, Category.TEMPORARIES) for label, numel, dtype in sizes]
            if keep:
                for tensor in made:
                    tensor.storage.category = Category.GRADIENTS
                self.norms.extend(made)
                return []
            return made

        def drop(made: list[Tensor]) -> None:
            """Free tensors made by `step` when its latest op is done."""
            if reduce is None:
                tp.drop(*made)
            else:
                for tensor in made:
                    tp.release_in(last, tensor.storage)

        if mine and (not self.boundary or tp.micro_batch > 0):  # gradient_accumulation_steps > 1
            moved = sum(param.tensor.numel for param, _ in mine) * self.dtype.size_bytes
            if tp.micro_batch > 0:  # micro_step_id > 0: accumulate_gradients
                step("zero.offload.accumulated_grad_to_gpu", moved, [], kind=OpKind.HOST_TO_DEVICE)
                step("zero.offload.accumulate_grad", 3 * moved, [])
            # copy_gradients_to_cpu: before the boundary (0.14); from 0.15.2 only in the first micro-step (#6550)
            if (not self.boundary) if self.version < (0, 15, 2) else tp.micro_batch == 0:
                step("zero.offload.copy_gradients_to_cpu", moved, [], kind=OpKind.DEVICE_TO_HOST)
        if not self.boundary:
            return last
        for param, inside in mine:
            whole = param.tensor.numel
            drop(step(f"zero.offload.norm[{param.name}]", 10 * inside,
                      [("zero.offload.grad_fp64_slice", inside, DType.FLOAT64)]))
            step(f"zero.offload.norm_result[{param.name}]", 8, [("zero.offload.norm_for_param_grads", 1,
                                                                   DType.FLOAT64)], keep=True)
            drop(step(f"zero.offload.has_inf_or_nan[{param.name}]", 13 * whole,
                      [("zero.offload.inf_nan_check", whole, dtype)
                       for dtype in (DType.FLOAT32, DType.BOOL, DType.BOOL, DType.BOOL, DType.FLOAT32)]))
            fp32 = step(f"zero.offload.grad_to_fp32[{param.name}]", 6 * inside,
                        [("zero.offload.grad_fp32_slice", inside, DType.FLOAT32)])
            step(f"zero.offload.copy_grad_to_host[{param.name}]", 4 * inside, [], kind=OpKind.DEVICE_TO_HOST)
            drop(fp32)
        return last

    def end_of_backward(self, params: list[Param]) -> None:
        """The epilogue: reduce what is left (ZeRO-1 without overlap_comm: every parameter's full gradient, bucket
        by bucket, through the same path as ZeRO-2's hook), keep this backward's grads_in_partition through
        averaged_gradients' views when it is the first of the accumulation (later ones are added into it and
        dropped), free ZeRO-1's remaining gradients (zero_grad), release the IPG buffers."""
        tp = self.tape
        if self.stage == 1:
            for param in params:
                grad, param.grad = param.grad, None
                self._add_to_bucket(param, grad)
        if self.bucket:
            tp.op("zero.reduce_epilogue")
            self._reduce()
        done = self.grads_in_partition
        if done is not None and self.averaged is None:
            self.averaged, done = done, None
        elif done is not None:
            tp.op("zero.accumulate_averaged_gradients", bytes_moved=3 * self.partition * self.dtype.size_bytes)
        tp.op("zero.release_ipg_buffers")
        tp.drop(done, *self.kept, *self.ipg)
        self.grads_in_partition, self.kept, self.ipg = None, [], []

    def step(self) -> None:
        """Without offload: flatten this rank's gradient partition (16-bit) and cast it to fp32, step, copy back
        to bf16. With offload: the host waits for the GPU (the epilogue's synchronize with overlap_comm, the norms'
        .item()), runs DeepSpeedCPUAdam, and the fp32 partition comes back through a blocking copy that casts on
        the host (0.14.0), from 0.14.1 as a GPU fp32 copy cast on the device, from 0.17.0 cast on the host into a
        pinned 16-bit buffer and copied without blocking (DeepSpeed #7309). Then the bf16 partitions are
        all-gathered into the flat model in place."""
        tp, numel = self.tape, self.partition
        if self.offload:
            # complete_grad_norm_calculation_for_cpu_offload: .item() of each norm, a copy to the host and a sync
            tp.op("zero.step.grad_norm_item", bytes_moved=8 * len(self.norms), kind=OpKind.DEVICE_TO_HOST)
            tp.host_sync()
            tp.host_work("zero.step.cpu_adam", CPU_ADAM_BYTES_PER_ELEMENT * numel)
            tp.drop(*self.norms)
            self.norms = []
            if self.version >= (0, 17, 0):  # bit16_partition_buffer.copy_(fp32), then a non_blocking copy
                tp.host_work("zero.step.fp32_to_bf16_on_host", (4 + self.dtype.size_bytes) * numel)
                tp.op("zero.step.copy_to_bf16", bytes_moved=self.dtype.size_bytes * numel,
                      kind=OpKind.HOST_TO_DEVICE)
            elif self.version >= (0, 14, 1):  # fp32_partition.to(device) before the copy (DeepSpeed #5301)
                tp.op("zero.step.fp32_partition_to_gpu", bytes_moved=4 * numel, kind=OpKind.HOST_TO_DEVICE)
                fp32 = tp.empty("zero.step.fp32_partition", numel, DType.FLOAT32, Category.OPTIMIZER_STATES)
                tp.op("zero.step.copy_to_bf16", bytes_moved=6 * numel)
                tp.drop(fp32)
            else:  # copy_ of a host fp32 tensor into a device bf16 one: cast on the host, then a blocking copy
                tp.host_work("zero.step.fp32_to_bf16_on_host", (4 + self.dtype.size_bytes) * numel)
                tp.op("zero.step.copy_to_bf16", bytes_moved=self.dtype.size_bytes * numel,
                      kind=OpKind.HOST_TO_DEVICE)
                tp.host_sync()
        else:
            grad_norms(tp, "zero", list(self.in_partition.values()))
            tp.op("zero.step.flatten_partition_grads", bytes_moved=4 * numel * self.dtype.size_bytes)
            flat = tp.empty("zero.flat_partition_grad", numel, self.dtype)
            tp.op("zero.step.grad_to_fp32", bytes_moved=6 * numel)
            grad32 = tp.empty("zero.fp32_partition_grad", numel, DType.FLOAT32)
            tp.drop(flat, self.averaged)  # averaged_gradients[i] = None
            self.averaged = None
            self._inner_step("zero.step.optimizer_step")
            tp.op("zero.step.copy_to_bf16", bytes_moved=6 * numel)
            tp.drop(grad32)
        size = self.dtype.size_bytes
        gather = tp.side_op("zero.all_gather_dp_groups", Stream.ALLGATHER, bytes_moved=2 * numel * self.world * size,
                            wire_bytes=(self.world - 1) * numel * size, kind=OpKind.ALL_GATHER,
                            runs_on=Stream.NCCL_DP)
        tp.wait_for(gather)
        tp.op("zero.step.end")
