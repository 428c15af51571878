"""NCCL's device memory: buffers per communicator that NCCL allocates itself (cudaMalloc / cuMem), outside
PyTorch's statistics, so they count as non-PyTorch memory and shrink what the caching allocator can get.

Sources: NVIDIA/nccl src/include/device.h (buffer sizes), src/transport/p2p.cc (which side of a connection holds
which buffer, each rounded to CUDA_IPC_MIN = 2 MiB), src/init.cc (ring and tree channels connected at
communicator init up to 2.21; NCCL_RUNTIME_CONNECT from 2.22 connects an algorithm at its first use),
src/transport/nvls.cc (NVLink SHARP buffers per version). Communicators: DeepSpeed uses the world group and its own
clone of it (deepspeed/utils/groups.py _clone_world_group), torch DDP one process group.
"""

from sim.scenario import Scenario
from sim.versions import parse_version

MIB = 1 << 20
_IPC_ALIGN = 2 * MIB  # src/include/comm.h CUDA_IPC_MIN; cuMem's minimum granularity is the same 2 MiB on A100/H100
_MEM_ALIGN = 4096  # ncclSendMem / ncclRecvMem, each padded to MEM_ALIGN
_LL_BYTES = 524288  # DEFAULT_LL_BUFFSIZE = 8 lines/thread × 512 threads × 8 steps × 16 B
_LL128_BYTES = 4915200  # DEFAULT_LL128_BUFFSIZE = 120 elems/thread × 640 threads × 8 steps × 8 B
_DEFAULT_CHANNELS = 24  # HGX A100 8-GPU NVSwitch: "Channel 23/24" (NVIDIA/nccl-tests#100); 8×H200: nvlsPerRankSize 288 MiB
#                         = 24 channels × 2 × 6 MiB (vllm-project/vllm#9699)
_NVLS_CHANNELS = 16  # src/transport/nvls.cc nvlsChannels on sm90 (2.19, and again from 2.22)
_NVLS_MIN_GPUS = 3  # ncclNvlsInit: NVLS needs more than 2 local GPUs (and multicast: Hopper, not A100)
_NVLS_CREDIT_BYTES = 2 * MIB  # per NVLS buffer in 2.19-2.21 (memSize 2097152 in vllm#9699's log)

# The NCCL of each torch PyPI wheel (nvidia-nccl-cu12 in the wheel's Requires-Dist)
_NCCL_OF_TORCH = [((2, 2), (2, 19, 3)), ((2, 3), (2, 20, 5)), ((2, 5), (2, 21, 5)), ((2, 7), (2, 26, 2)),
                  ((2, 8), (2, 27, 3))]


def nccl_version(scenario: Scenario) -> tuple[int, int, int]:
    """`nccl.version`, else the one torch's wheel pins (the newest known for newer torch). Wheels before 2.2 were
    not read; they get a 2.18 (before NCCL 2.19's cuMem and before 2.20's NVLS sizing), which the figures here
    treat like 2.19."""
    if scenario.nccl.version is not None:
        return parse_version(scenario.nccl.version, "nccl.version")
    torch = scenario.software.version("torch")[:2]
    chosen = (2, 18, 6)
    for first_torch, version in _NCCL_OF_TORCH:
        if torch >= first_torch:
            chosen = version
    return chosen


def nccl_channels(scenario: Scenario) -> int:
    """`nccl.channels`, else what NCCL opens on an 8-GPU NVSwitch node."""
    return scenario.nccl.channels or _DEFAULT_CHANNELS


def communicators(scenario: Scenario) -> int:
    """NCCL communicators of one rank: none on one GPU; DeepSpeed (any ZeRO stage) the world group (parameter
    all-gathers, zero.Init broadcasts) and its clone for gradient reduction; torch DDP its one process group."""
    if scenario.nccl.communicators is not None:
        return scenario.nccl.communicators
    if scenario.hardware.gpus <= 1:
        return 0
    return 2 if scenario.deepspeed is not None else 1


def _aligned(size: int) -> int:
    return -(-size // _IPC_ALIGN) * _IPC_ALIGN


def connection_bytes(scenario: Scenario) -> int:
    """One P2P connection's buffers on this GPU, send and receive side together. sm80 over NVLink uses P2P read:
    the Simple buffer sits with the sender (p2p.cc useRead); otherwise every buffer sits with the receiver."""
    simple = scenario.nccl.buffsize_bytes
    device = scenario.hardware.device
    p2p_read = (device.compute_capability or "8.0") == "8.0"  # paths.cc: read only between sm80 GPUs over NVLink
    if p2p_read:
        return _aligned(_MEM_ALIGN + simple) + _aligned(_MEM_ALIGN + _LL_BYTES + _LL128_BYTES)
    return _aligned(_MEM_ALIGN) + _aligned(_MEM_ALIGN + simple + _LL_BYTES + _LL128_BYTES)


def nvls_bytes(scenario: Scenario, version: tuple[int, int, int], channels: int) -> int:
    """NVLink SHARP buffers per communicator (nHeads = GPUs in the node), by NCCL version (src/transport/nvls.cc)."""
    device, gpus = scenario.hardware.device, scenario.hardware.gpus_per_node
    supported = (device.compute_capability or "8.0").startswith("9.") and gpus >= _NVLS_MIN_GPUS
    enabled = scenario.nccl.nvls if scenario.nccl.nvls is not None else supported
    if not (enabled and supported) or version < (2, 17, 0):
        return 0
    buffer = scenario.nccl.buffsize_bytes
    if version < (2, 20, 0):
        return gpus * _NVLS_CHANNELS * 2 * (buffer + _NVLS_CREDIT_BYTES)
    if version < (2, 21, 0):
        return gpus * channels * 2 * (buffer + _NVLS_CREDIT_BYTES)
    if version < (2, 22, 0):
        return gpus * channels * 2 * (MIB + _NVLS_CREDIT_BYTES)  # NVLS_CHUNKSIZE 128 KiB × 8 steps
    return gpus * _NVLS_CHANNELS * 2 * MIB


def nccl_buffer_bytes(scenario: Scenario) -> int:
    """Device bytes NCCL holds on one rank for the whole run: per communicator, each channel's ring and tree
    connections (a single-node tree is a chain in ring order, so two neighbours: two connections per channel; from
    NCCL 2.22 only the ring is connected unless an algorithm needs more) and the NVLS buffers."""
    count = communicators(scenario)
    if count == 0:
        return 0
    version = nccl_version(scenario)
    channels = nccl_channels(scenario)
    # Approximations: connections across nodes (NET transport) are counted like NVLink P2P ones; NVLS buffers are
    # not rounded to the multicast granularity, and from 2.22 are counted although set up at first use.
    connections = 1 if version >= (2, 22, 0) else 2
    per_communicator = channels * connections * connection_bytes(scenario) + nvls_bytes(scenario, version, channels)
    return count * per_communicator
