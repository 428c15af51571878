"""Plain DDP and DeepSpeed ZeRO-1/2 on one simulated rank: where the model states live and the collectives that
reduce the gradients.

DDP (torch/nn/parallel/distributed.py, reducer.cpp): the whole model, gradients and optimizer on every rank, plus
flat bucket buffers for all gradients (bucket_cap_mb 25, the first bucket 1 MiB, buckets in reverse parameter
order; gradient_as_bucket_view False as HF Trainer leaves it), allreduced on the last micro-batch of an
accumulation (the others run under no_sync).

ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): the whole bf16 model (bit16_groups_flat), fp32 master
partitions and Adam moments of 1/P (created at engine init), IPG buckets during backward (reduce_bucket_size,
twice with overlap_comm); ZeRO-2 copies each gradient into the bucket, reduces it and keeps only this rank's
partition (grads_in_partition), ZeRO-1 keeps the full gradients and reduces them at the accumulation boundary.
The step flattens the partition's gradients, casts them to fp32, steps, and all-gathers the bf16 partitions in
place. With offload_optimizer cpu the optimizer side moves to the host (Zero12's docstring).
"""

from sim.ops import Category, OpKind, Stream
from sim.parallel.partition import flat_partition_numel
from sim.scenario import DType, ZeroOptimization
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
        (ring: 2·(P-1)/P of its bytes on the wire) on the NCCL stream."""
        if not self.sync:
            return
        index = self.bucket_of[param.name]
        self.pending[index] -= 1
        if self.pending[index] == 0:
            size = sum(p.tensor.size_bytes for p in self.buckets[index])
            op = self.tape.side_op(f"ddp.allreduce[bucket {index}]", Stream.REDUCE, bytes_moved=2 * size,
                                   wire_bytes=2 * (self.world - 1) * size // self.world, kind=OpKind.ALL_REDUCE)
            self.allreduces.append(op)

    def finalize(self) -> None:
        """finalize_backward: wait for the allreduces, copy the averaged buckets back into the grads."""
        for op in self.allreduces:
            self.tape.wait_for(op)
        self.tape.op("ddp.copy_buckets_to_grads", bytes_moved=2 * self.bucket_bytes())
        self.allreduces.clear()
        self.pending = [len(b) for b in self.buckets]


class Zero12:
    """DeepSpeed ZeRO stage 1 or 2 for one rank (rank 0: its partition is the first 1/P of the flat group).

    With offload_optimizer cpu (stage_1_and_2.py, DeepSpeed 0.14): the fp32 master, its gradient and the Adam
    moments live on the host; the GPU keeps the bf16 model, a staging buffer of the largest parameter
    (temp_grad_buffer_for_gpu_offload), the IPG buckets, and at the accumulation boundary, for each gradient in
    this rank's partition, a per-parameter fp64 norm and the transients of the norm, the inf/nan check and the fp32
    copy to the host (copy_grads_in_partition)."""

    def __init__(self, tape: Tape, config: ZeroOptimization, world: int, trainable: list[Param],
                 dtype: DType, deepspeed_version: tuple[int, int, int], comm_dtype: DType | None = None) -> None:
        self.tape, self.config, self.world, self.dtype = tape, config, world, dtype
        self.comm_dtype = comm_dtype or dtype  # communication_data_type
        self.stage = config.stage
        self.version = deepspeed_version
        self.offload = (config.offload_optimizer or {}).get("device", "none") == "cpu"
        total = sum(p.tensor.numel for p in trainable)
        self.partition = flat_partition_numel(total, world)
        self.overlap = bool(config.overlap_comm)
        self.largest = max((p.tensor.numel for p in trainable), default=0)
        self.numel = {p.name: p.tensor.numel for p in trainable}
        self.in_partition: dict[str, int] = {}  # param name -> its elements inside rank 0's partition
        offset = 0
        for p in trainable:
            inside = max(0, min(offset + p.tensor.numel, self.partition) - offset)
            if inside:
                self.in_partition[p.name] = inside
            offset += p.tensor.numel
        if self.offload:
            tape.persistent_buffer("zero.temp_grad_buffer_for_gpu_offload", self.largest, dtype, Category.GRADIENTS)
        else:
            tape.persistent_buffer("zero.single_partition_of_fp32_groups", self.partition, DType.FLOAT32,
                                   Category.OPTIMIZER_STATES)
            for state in ("exp_avg", "exp_avg_sq"):
                tape.persistent_buffer(f"zero.{state}", self.partition, DType.FLOAT32, Category.OPTIMIZER_STATES)
        self.grads_in_partition: Tensor | None = None
        if self.stage == 2 and not self.offload:
            self.grads_in_partition = tape.persistent_buffer("zero.grads_in_partition", self.partition, dtype,
                                                             Category.GRADIENTS)
        self.partition_allocated = False
        self.boundary = True  # this micro-batch ends an accumulation
        self.ipg: list[Tensor] = []
        self.bucket: list[tuple[Param | None, Tensor]] = []
        self.bucket_numel = 0
        self.norms: list[Tensor] = []  # offload: fp64 norm per partition gradient, kept until the step

    def state_bytes(self) -> int:
        return 0 if self.offload else 12 * self.partition

    def host_bytes(self, accumulation: int) -> int:
        """Host memory with offload: fp32 master, its fp32 gradient and two Adam moments per partition element,
        the host staging buffer of the largest parameter, and with accumulation a bf16 copy of every parameter in
        the partition (accumulated_grads_in_cpu holds whole parameters)."""
        if not self.offload:
            return 0
        size = self.dtype.size_bytes
        whole = sum(self.numel[name] for name in self.in_partition) if accumulation > 1 else 0
        return 16 * self.partition + size * self.largest + size * whole

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

    def on_grad(self, param: Param, grad: Tensor) -> None:
        """ZeRO-2's reduce_ready_partitions_and_remove_grads: copy the grad into the IPG bucket and free it,
        reducing the bucket first when this grad would overflow it. (ZeRO-1 keeps param.grad; see Tape.)"""
        tp = self.tape
        grad.storage.category = Category.GRADIENTS
        if self.bucket_numel + grad.numel > self.config.reduce_bucket_size and self.bucket:
            self._reduce()
        tp.op(f"zero.copy_grad_to_ipg[{param.name}]", bytes_moved=2 * grad.size_bytes)
        self.bucket.append((param, grad))
        self.bucket_numel += grad.numel
        tp.drop(grad)

    def _reduce(self) -> None:
        """average_tensor on the bucket: with use_multi_rank_bucket_allreduce (the default) allreduce_bucket
        flattens it into a new tensor and all-reduces it, and each rank keeps its slices; they go to
        grads_in_partition (allocated at the first reduction) or, with offload, to the host
        (copy_grads_in_partition, on the same stream)."""
        tp, size = self.tape, self.dtype.size_bytes
        if self.stage == 2 and not self.offload and not self.partition_allocated:
            tp.op("zero.allocate_grads_in_partition")
            tp.allocate_existing(self.grads_in_partition)
            self.partition_allocated = True
        numel = self.bucket_numel
        label = f"zero.reduce[{len(self.bucket)} grads]"
        comm = self.comm_dtype
        wire = 2 * (self.world - 1) * numel * comm.size_bytes // self.world
        moved = 2 * numel * size + (numel * (size + 2 * comm.size_bytes) if comm is not self.dtype else 0)
        # allreduce_bucket: the flat copy, and with another communication_data_type its .to(), reduced there and
        # copied back into the flat copy
        buffers = [("zero.allreduce_bucket_flat", self.dtype)] + (
            [("zero.allreduce_bucket_comm", comm)] if comm is not self.dtype else [])
        if self.overlap:  # on the reduction stream, waited for before the next bucket reuses the buffer
            reduce = tp.side_op(label, Stream.REDUCE, bytes_moved=moved, wire_bytes=wire, kind=OpKind.ALL_REDUCE)
            made = [tp.empty_in(reduce, name, numel, dtype, Category.COMMUNICATION) for name, dtype in buffers]
            for tensor in made:
                tp.release_in(reduce, tensor.storage)
        else:
            reduce = None
            tp.op(label, bytes_moved=moved, kind=OpKind.ALL_REDUCE, wire_bytes=wire)
            tp.drop(*[tp.empty(name, numel, dtype, Category.COMMUNICATION) for name, dtype in buffers])
        last = self._grads_to_host(reduce) if self.offload else reduce
        if last is not None:
            tp.wait_for(last)
        self.bucket, self.bucket_numel = [], 0

    def _grads_to_host(self, reduce: int | None) -> int | None:
        """copy_grads_in_partition with offload, for the bucket's gradients in this rank's partition, on the
        reduction stream after `reduce` (with overlap_comm; else on the compute stream). Before the boundary:
        accumulate through the staging buffer (no new GPU memory). At it, per gradient: its fp64 slice norm (kept
        until the step), _has_inf_or_nan on the whole gradient (x.float(), isnan, isinf, logical_or, .float(): 4 +
        1 + 1 + 1 + 4 bytes per element alive together), and the fp32 slice copied to the host. Returns the last
        reduction-stream op (the one the compute stream waits for)."""
        tp = self.tape
        mine = [(param, self.in_partition[param.name]) for param, _ in self.bucket
                if param is not None and param.name in self.in_partition]
        last = reduce

        def step(name: str, bytes_moved: int, sizes: list[tuple[str, int, DType]], keep: bool = False) -> None:
            nonlocal last
            if reduce is None:
                tp.op(name, bytes_moved=bytes_moved)
                made = [tp.empty(label, numel, dtype) for label, numel, dtype in sizes]
            else:
                last = tp.side_op(name, Stream.REDUCE, bytes_moved=bytes_moved, deps=(last,))
                made = [tp.empty_in(last, label, numel, dtype, Category.TEMPORARIES) for label, numel, dtype in sizes]
            if keep:
                for tensor in made:
                    tensor.storage.category = Category.GRADIENTS
                self.norms.extend(made)
            elif reduce is None:
                tp.drop(*made)
            else:
                for tensor in made:
                    tp.release_in(last, tensor.storage)

        if not self.boundary:
            if mine:
                moved = sum(param.tensor.numel for param, _ in mine) * self.dtype.size_bytes
                step("zero.offload.accumulate_grad_in_cpu_via_gpu", 4 * moved, [])
            return last
        for param, inside in mine:
            whole = param.tensor.numel
            step(f"zero.offload.norm[{param.name}]", 10 * inside,
                 [("zero.offload.grad_fp64_slice", inside, DType.FLOAT64)])
            step(f"zero.offload.norm_result[{param.name}]", 8, [("zero.offload.norm_for_param_grads", 1,
                                                                   DType.FLOAT64)], keep=True)
            step(f"zero.offload.has_inf_or_nan[{param.name}]", 13 * whole,
                 [("zero.offload.inf_nan_check", whole, dtype)
                  for dtype in (DType.FLOAT32, DType.BOOL, DType.BOOL, DType.BOOL, DType.FLOAT32)])
            step(f"zero.offload.copy_grad_to_fp32_host[{param.name}]", 10 * inside,
                 [("zero.offload.grad_fp32_slice", inside, DType.FLOAT32)])
        return last

    def end_of_backward(self, params: list[Param]) -> None:
        """The epilogue: reduce what is left (ZeRO-1: every parameter's full gradient, bucket by bucket: each is
        copied into the bucket and its own storage freed, param.grad becoming a view of the bucket,
        stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads), release the IPG buffers."""
        tp = self.tape
        if self.stage == 1:
            for param in params:
                grad = param.grad
                if self.bucket_numel + grad.numel > self.config.reduce_bucket_size and self.bucket:
                    self._reduce()
                tp.op("zero.copy_grad_to_ipg", bytes_moved=2 * grad.size_bytes)
                self.bucket.append((param, grad))
                self.bucket_numel += grad.numel
                tp.drop(grad)
                param.grad = None
        if self.bucket:
            tp.op("zero.reduce_epilogue")
            self._reduce()
        tp.op("zero.release_ipg_buffers")
        tp.drop(*self.ipg)
        self.ipg = []

    def step(self, temporaries: int) -> None:
        """Without offload: flatten this rank's gradient partition (16-bit) and cast it to fp32, step, copy back
        to bf16. With offload: DeepSpeedCPUAdam on the host; the fp32 partition comes back through a blocking copy
        that casts on the host (0.14.0) or, from 0.14.1, as a GPU fp32 copy cast on the device. Then the bf16
        partitions are all-gathered into the flat model in place."""
        tp, numel = self.tape, self.partition
        if self.offload:
            tp.op("zero.step.cpu_adam")  # on the host: its duration is not modelled
            tp.drop(*self.norms)
            self.norms = []
            if self.version >= (0, 14, 1):  # fp32_partition.to(device) before the copy (DeepSpeed #5301)
                tp.op("zero.step.fp32_partition_to_gpu", bytes_moved=4 * numel)
                fp32 = tp.empty("zero.step.fp32_partition", numel, DType.FLOAT32, Category.OPTIMIZER_STATES)
                tp.op("zero.step.copy_to_bf16", bytes_moved=6 * numel)
                tp.drop(fp32)
            else:
                tp.op("zero.step.copy_to_bf16", bytes_moved=2 * numel)
        else:
            tp.op("zero.step.flatten_partition_grads", bytes_moved=4 * numel * self.dtype.size_bytes)
            flat = tp.empty("zero.flat_partition_grad", numel, self.dtype)
            tp.op("zero.step.grad_to_fp32", bytes_moved=6 * numel)
            grad32 = tp.empty("zero.fp32_partition_grad", numel, DType.FLOAT32)
            tp.drop(flat)
            # Adam: ~12 FLOPs per element; reads fp32 param, grad, m, v and writes param, m, v: 28 B per element
            tp.op("zero.step.optimizer_step", flops=12.0 * numel, bytes_moved=28 * numel)
            temps = [tp.empty("zero.optimizer_temp", numel, DType.FLOAT32) for _ in range(temporaries)]
            tp.drop(*temps)
            tp.op("zero.step.copy_to_bf16", bytes_moved=6 * numel)
            tp.drop(grad32)
        size = self.dtype.size_bytes
        gather = tp.side_op("zero.all_gather_dp_groups", Stream.ALLGATHER, bytes_moved=2 * numel * self.world * size,
                            wire_bytes=(self.world - 1) * numel * size, kind=OpKind.ALL_GATHER)
        tp.wait_for(gather)
        tp.op("zero.step.end")
