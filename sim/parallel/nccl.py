"""NCCL's device memory: buffers per communicator that NCCL allocates itself (cudaMalloc / cuMem), outside
PyTorch's statistics, so they count as non-PyTorch memory and shrink what the caching allocator can get.

Sources: NVIDIA/nccl src/include/device.h (buffer sizes), src/transport/p2p.cc (which side of a connection holds
which buffer, each rounded to CUDA_IPC_MIN = 2 MiB), src/init.cc (ring and tree channels connected at
communicator init up to 2.21; NCCL_RUNTIME_CONNECT from 2.22 connects an algorithm at its first use),
src/transport/nvls.cc (NVLink SHARP buffers per version). Communicators: DeepSpeed uses the world group and its own
clone of it (deepspeed/utils/groups.py _clone_world_group), torch DDP one process group.
"""

from sim.plan import DevicePlan, NcclPlan, World

MIB = 1 << 20
_IPC_ALIGN = 2 * MIB  # src/include/comm.h CUDA_IPC_MIN; cuMem's minimum granularity is the same 2 MiB on A100/H100
_MEM_ALIGN = 4096  # ncclSendMem / ncclRecvMem, each padded to MEM_ALIGN
_LL_BYTES = 524288  # DEFAULT_LL_BUFFSIZE = 8 lines/thread × 512 threads × 8 steps × 16 B
_LL128_BYTES = 4915200  # DEFAULT_LL128_BUFFSIZE = 120 elems/thread × 640 threads × 8 steps × 8 B
_NVLS_CHANNELS = 16  # src/transport/nvls.cc nvlsChannels on sm90 (2.19, and again from 2.22)
_NVLS_MIN_GPUS = 3  # ncclNvlsInit: NVLS needs more than 2 local GPUs (and multicast: Hopper, not A100)
_NVLS_CREDIT_BYTES = 2 * MIB  # per NVLS buffer in 2.19-2.21 (memSize 2097152 in vllm#9699's log)


def _aligned(size: int) -> int:
    return -(-size // _IPC_ALIGN) * _IPC_ALIGN


def connection_bytes(nccl: NcclPlan, device: DevicePlan) -> int:
    """One P2P connection's buffers on this GPU, send and receive side together. sm80 over NVLink uses P2P read:
    the Simple buffer sits with the sender (p2p.cc useRead); otherwise every buffer sits with the receiver."""
    simple = nccl.buffsize_bytes
    p2p_read = (device.compute_capability or "8.0") == "8.0"  # paths.cc: read only between sm80 GPUs over NVLink
    if p2p_read:
        return _aligned(_MEM_ALIGN + simple) + _aligned(_MEM_ALIGN + _LL_BYTES + _LL128_BYTES)
    return _aligned(_MEM_ALIGN) + _aligned(_MEM_ALIGN + simple + _LL_BYTES + _LL128_BYTES)


def nvls_bytes(nccl: NcclPlan, device: DevicePlan, world: World) -> int:
    """NVLink SHARP buffers per communicator (nHeads = GPUs in the node), by NCCL version (src/transport/nvls.cc)."""
    gpus, version, channels = world.gpus_per_node, nccl.version, nccl.channels
    supported = device.nvlink_sharp and (device.compute_capability or "8.0").startswith("9.") and gpus >= _NVLS_MIN_GPUS
    enabled = nccl.nvls if nccl.nvls is not None else supported
    if not (enabled and supported) or version < (2, 17, 0):
        return 0
    buffer = nccl.buffsize_bytes
    if version < (2, 20, 0):
        return gpus * _NVLS_CHANNELS * 2 * (buffer + _NVLS_CREDIT_BYTES)
    if version < (2, 21, 0):
        return gpus * channels * 2 * (buffer + _NVLS_CREDIT_BYTES)
    if version < (2, 22, 0):
        return gpus * channels * 2 * (MIB + _NVLS_CREDIT_BYTES)  # NVLS_CHUNKSIZE 128 KiB × 8 steps
    return gpus * _NVLS_CHANNELS * 2 * MIB


def communicator_bytes(nccl: NcclPlan, device: DevicePlan, world: World) -> int:
    """Device bytes NCCL holds for one communicator for the whole run: each channel's ring and tree connections (a
    single-node tree is a chain in ring order, so two neighbours: two connections per channel; from NCCL 2.22 only
    the ring is connected unless an algorithm needs more) and the NVLS buffers."""
    # Approximations: connections across nodes (NET transport) are counted like NVLink P2P ones; NVLS buffers are
    # not rounded to the multicast granularity, and from 2.22 are counted although set up at first use.
    connections = 1 if nccl.version >= (2, 22, 0) else 2
    return nccl.channels * connections * connection_bytes(nccl, device) + nvls_bytes(nccl, device, world)


def nccl_buffer_bytes(nccl: NcclPlan, device: DevicePlan, world: World) -> int:
    """Device bytes NCCL holds on one rank: every communicator's."""
    return nccl.communicators * communicator_bytes(nccl, device, world)
