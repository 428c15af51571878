"""The device runtime under PyTorch, decided once: a plain host (the CPU calibration: nothing outside the
allocator, no workspaces) or a CUDA device, with its CUDA context (by module loading, from the torch version and its
CUDA runtime), NCCL's buffers per communicator and the library workspaces that the caching allocator serves (cuBLAS,
cuBLASLt). The sources of every figure, and what no source gives yet, are in docs/cuda-context.md."""

from sim.parallel.nccl import communicator_bytes
from sim.plan import (
    DevicePlan,
    DeviceRuntime,
    Holder,
    ModuleLoading,
    NcclPlan,
    Reservation,
    Version,
    Workspaces,
    World,
)

MIB = 1 << 20
# The context a torch process creates at its first CUDA call with lazy module loading: ptrblck in pytorch/pytorch#109888
# (2023-09): "around 400MB if CUDA >= 11.7 is used and lazy module loading enabled (default in PyTorch)". No published
# reading splits it by device, driver or torch version, or measures what the kernels a training step loads lazily
# afterwards (cuBLAS/cuBLASLt, flash-attn, NCCL, Triton) add: that growth is not modelled (docs/cuda-context.md).
LAZY_CONTEXT_BYTES = 400 * MIB
# What eager loading adds: pytorch/pytorch#86509 measured one script (a 20×16×50×100 fp32 tensor moved to the GPU,
# then cudaMemGetInfo total − free) at 287,047,680 B with CUDA_MODULE_LOADING=LAZY and 666,632,192 B with DEFAULT
# (eager in that CUDA); the difference is every module's kernels loaded at context creation.
EAGER_MODULES_BYTES = 666_632_192 - 287_047_680


def module_loading(torch: Version, cuda: tuple[int, int] | None) -> ModuleLoading:
    """Lazy where torch sets CUDA_MODULE_LOADING=LAZY when the user has not (from 1.13, pytorch/pytorch#86509) and its
    CUDA runtime has lazy loading (11.7 on, CUDA Programming Guide "Lazy Loading", runtime version requirement); eager
    before torch 1.13 (nothing sets the variable, and CUDA before 12.2 loads eagerly by default) or with an older
    runtime. `cuda`: the runtime the torch build names (`+cu116`); None: the PyPI wheel's, 11.7 or newer from 1.13
    (torch-1.13.0 pins nvidia-cuda-runtime-cu11==11.7.99, pytorch/builder#1182; later wheels cu117/cu118, then cu12x).
    The driver's requirement is assumed met (a scenario names no driver), and so is an unset CUDA_MODULE_LOADING."""
    lazy = torch >= (1, 13, 0) and (cuda is None or cuda >= (11, 7))
    return ModuleLoading.LAZY if lazy else ModuleLoading.EAGER


def cuda_context(override_bytes: int | None, loading: ModuleLoading) -> tuple[Reservation, ...]:
    """The CUDA context in named parts: the device's own `cuda_context_bytes` as one part where it states one (0: none,
    a plain host), else the lazy context and, under eager loading, every module's kernels on top."""
    if override_bytes is not None:
        return (Reservation(Holder.CUDA_CONTEXT, "cuda_context", override_bytes),)
    parts = [Reservation(Holder.CUDA_CONTEXT, "cuda_context", LAZY_CONTEXT_BYTES)]
    if loading is ModuleLoading.EAGER:
        parts.append(Reservation(Holder.CUDA_CONTEXT, "cuda_context.eager_modules", EAGER_MODULES_BYTES))
    return tuple(parts)


def device_runtime(on_host: bool, device: DevicePlan, nccl: NcclPlan, world: World, torch: Version,
                   zero3: bool) -> DeviceRuntime:
    """The runtime of one simulated rank; `zero3`: DeepSpeed ZeRO-3 replaces torch's linear."""
    if on_host:
        return DeviceRuntime((), Workspaces(0, 0, False))
    reservations = list(device.cuda_context)
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
