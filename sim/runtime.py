"""The device runtime under PyTorch, decided once: a plain host (the CPU calibration: nothing outside the
allocator, no workspaces) or a CUDA device, with its CUDA context, NCCL's buffers per communicator and the library
workspaces that the caching allocator serves (cuBLAS, cuBLASLt). #13 grows the CUDA side here (context by driver
and torch version, lazy module loading, kernel images)."""

from sim.parallel.nccl import communicator_bytes
from sim.plan import DevicePlan, DeviceRuntime, Holder, NcclPlan, Reservation, Version, Workspaces, World


def device_runtime(on_host: bool, device: DevicePlan, nccl: NcclPlan, world: World, torch: Version,
                   zero3: bool) -> DeviceRuntime:
    """The runtime of one simulated rank; `zero3`: DeepSpeed ZeRO-3 replaces torch's linear."""
    if on_host:
        return DeviceRuntime((), Workspaces(0, 0, False))
    reservations = [Reservation(Holder.CUDA_CONTEXT, "cuda_context", device.cuda_context_bytes)]
    per_communicator = communicator_bytes(nccl, device, world)
    reservations += [Reservation(Holder.NCCL, f"nccl.communicator[{index}]", per_communicator)
                     for index in range(nccl.communicators)]
    return DeviceRuntime(tuple(r for r in reservations if r.size_bytes), cuda_workspaces(device, torch, zero3))


def cuda_workspaces(device: DevicePlan, torch: Version, zero3: bool) -> Workspaces:
    """cuBLAS: the default CUBLAS_WORKSPACE_CONFIG as PyTorch sets it (aten/src/ATen/cuda/CublasHandlePool.cpp):
    ":4096:2:16:8" = 2·4096 KiB + 8·16 KiB = 8,519,680 B; ":4096:8" = 32 MiB on Hopper (compute capability 9)
    from torch 2.1. cuBLASLt: the workspace a bias linear (addmm → gemm_and_bias) uses; none under ZeRO-3, whose
    linear (deepspeed/runtime/zero/linear.py) runs matmul then adds the bias. CUBLASLT_WORKSPACE_SIZE defaults to
    1024 KiB (pytorch#101145); allocated per call through the caching allocator before torch 2.8, kept per
    (handle, stream) from 2.8 (pytorch#156495), and from 2.10 cuBLASLt shares the cuBLAS workspace by default
    (pytorch#168175)."""
    hopper = device.compute_capability_major >= 9 and torch >= (2, 1, 0)
    cublas = 8 * 4096 * 1024 if hopper else 2 * 4096 * 1024 + 8 * 16 * 1024
    if zero3 or torch >= (2, 10, 0):
        return Workspaces(cublas, 0, False)
    return Workspaces(cublas, 1024 * 1024, torch >= (2, 8, 0))
