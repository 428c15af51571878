"""Op durations. Kernels: the roofline (Williams et al. 2009), the longer of FLOPs at the achievable rate of the
unit that runs them and bytes at the achievable HBM bandwidth. Collectives: NCCL's own cost model
(NVIDIA/nccl src/graph/tuning.cc): a base latency, a per-step latency for each ring step, and the bytes
each rank sends at the measured bus bandwidth of the slowest link the algorithm crosses; an all-reduce runs as a
ring or a tree, whichever NCCL's model finds faster. Copies between pinned host memory and the device: their bytes at
the per-direction PCIe bandwidth. The host CPU's work (Stream.CPU): its bytes at the rank's share of the host's
DRAM bandwidth (the node's ranks step at once, each on its own cores). The achievable fractions
are measured figures in the hardware YAML (DeviceEfficiency); 1.0 gives the bare datasheet roofline."""

from operator import attrgetter

import numpy as np

from sim.errors import MAX_CLOCK_US, ClockOverflow
from sim.ops import Op, OpKind, Stream
from sim.plan import DevicePlan
from sim.vocab import DType

_FLOPS_KEY = {DType.BFLOAT16: "bf16", DType.FLOAT16: "fp16", DType.FLOAT32: "fp32"}
# NVIDIA/nccl src/graph/tuning.cc (ncclTopoTuneModel, ncclTopoGetAlgoTime), Simple protocol: the collectives here move
# megabytes, where NCCL runs Simple; LL and LL128 (lower latency, lower bandwidth) win only for small messages and
# are not modelled. baseLat[Ring][Simple] = 8.4 µs per collective in every version read (2.18-2.29).
NCCL_BASE_LATENCY_US = 8.4
# Tree (all-reduce only), (baseLat, hwLat[NVLINK], hwLat[NET]) of [Tree][Simple]: 0, 28, 28 µs up to 2.22; 8.4, 4.0,
# 14 µs from 2.23 (a tree step was costed as a 256 kB chunk before).
_TREE_LATENCY_US = (((2, 23, 0), (8.4, 4.0, 14.0)), ((0, 0, 0), (0.0, 28.0, 28.0)))
# perChMaxTreeBws (GB/s per channel) by compute capability major, for 1, 2 and more nodes (same in 2.18-2.22)
_TREE_MAX_BYTES_PER_S_PER_CHANNEL = {7: (26.5e9, 18.5e9, 10.0e9), 8: (24.0e9, 23.6e9, 17.8e9),
                                     9: (38.7e9, 41.4e9, 36.0e9)}
# treeCorrectionFactor[Simple]: the tree's bandwidth is scaled by it for messages of 64·2^k bytes, k = 0..22
_TREE_CORRECTION = (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9)
# What issuing one op costs the host thread in PyTorch eager mode: Python, the dispatcher and autograd's bookkeeping,
# 2 µs (median of bench/bench_host_overhead.py on this project's 2-core machine, torch 2.13: 1.7-4.7 µs by op), plus
# cudaLaunchKernel, 5 µs (measured 4-5 µs a launch while the launch queue has room: stackoverflow.com/q/53970187,
# forums.developer.nvidia.com/t/68937; NVIDIA documents no figure).
HOST_DISPATCH_US = 2
CUDA_LAUNCH_US = 5
HOST_US_PER_KERNEL = HOST_DISPATCH_US + CUDA_LAUNCH_US
# Kernel launches queued before cudaLaunchKernel blocks the host until one drains: about 1000 observed
# (stackoverflow.com/q/53970187, forums.developer.nvidia.com/t/68937); NVIDIA documents none. Modelled as the ops
# issued past the last one finished.
LAUNCH_QUEUE_DEPTH = 1024
_KIND_CODE = {kind: code for code, kind in enumerate(OpKind)}
_CODE_BY_ID = {id(kind): code for kind, code in _KIND_CODE.items()}  # hashing an Enum is slow


class CostModel:
    """Durations of ops on one device of a `gpus_per_node` × `nodes` machine, and what issuing them costs the
    host, in whole µs. `synchronous`: the device is the host itself (a plain CPU): each op runs when issued, and
    issuing costs nothing beyond it."""

    def __init__(self, device: DevicePlan, compute_dtype: DType, gpus_per_node: int = 1, nodes: int = 1,
                 nccl_version: tuple[int, int, int] = (2, 19, 3), nccl_channels: int = 24,
                 synchronous: bool = False) -> None:
        self.synchronous = synchronous
        self.queue_depth = 0 if synchronous else LAUNCH_QUEUE_DEPTH
        key = _FLOPS_KEY.get(compute_dtype, "fp32")
        tensor_peak = device.peak_flops.get(key) or max(device.peak_flops.values())
        self.gemm_flops_per_s = tensor_peak * device.gemm_efficiency
        self.attention_flops_per_s = tensor_peak * device.attention_efficiency
        # elementwise kernels run on the CUDA cores: the fp32 (non-tensor) peak where the device lists one
        self.vector_flops_per_s = device.peak_flops.get("fp32") or max(device.peak_flops.values())
        self.hbm_bytes_per_s = device.hbm_bytes_per_s * device.hbm_efficiency
        # PCIe figures are bidirectional aggregates like NVLink's: one direction carries half (A100/H100 datasheets)
        self.pcie_bytes_per_s = device.host_link_bytes_per_s / 2 * device.pcie_efficiency
        self.host_memory_bytes_per_s = device.host_memory_bytes_per_s * device.host_memory_efficiency / gpus_per_node
        self.ranks, self.nodes = gpus_per_node * nodes, nodes
        # NVLink figures are bidirectional aggregates: one direction carries half (NVIDIA A100/H100 datasheets).
        # NIC figures are per GPU and direction (one NIC per GPU); NCCL spreads its channels over all the node's
        # NICs (tuning.cc: busBw = nChannels × bwInter), so across nodes the bus bandwidth is the node's NICs
        # together, and a ring that leaves the node runs at its slower link.
        self.intra_bus_bytes_per_s = device.intra_node_bytes_per_s / 2 * device.nvlink_efficiency
        self.inter_bus_bytes_per_s = device.inter_node_bytes_per_s * gpus_per_node * device.network_efficiency
        self.bus_bytes_per_s = (min(self.intra_bus_bytes_per_s, self.inter_bus_bytes_per_s) if nodes > 1
                                else self.intra_bus_bytes_per_s)
        self.intra_latency_us = device.intra_node_latency_us
        self.inter_latency_us = device.inter_node_latency_us
        self.nccl_version, self.channels = tuple(nccl_version), nccl_channels
        major = device.compute_capability_major
        self.ring_plateau = 1.9 if major < 8 else 1.4  # ncclTopoGetAlgoTime: "Plateau effect of ring"
        # the tree's bus bandwidth: busBw × .92, at most nChannels × perChMaxTreeBw; algorithm bandwidth half of it
        cap = _TREE_MAX_BYTES_PER_S_PER_CHANNEL.get(major)
        tree_bus = 0.92 * self.bus_bytes_per_s
        if cap is not None:
            tree_bus = min(tree_bus, nccl_channels * cap[min(nodes, 3) - 1])
        self.tree_bytes_per_s = 0.5 * tree_bus

    def collective_latency_us(self, kind: OpKind) -> float:
        """NCCL's ring latency for one collective over all ranks (tuning.cc): the base latency plus one link
        latency per ring step (all-reduce: reduce-scatter then all-gather, 2(n-1) steps; all-gather and
        reduce-scatter: n-1), the steps that cross nodes at the network latency (all-reduce: 2·nodes of them up to
        NCCL 2.22, 2(nodes-1) from 2.23)."""
        n, nodes = self.ranks, self.nodes
        if n <= 1:
            return 0.0
        if kind is OpKind.ALL_REDUCE:
            steps = 2 * (n - 1)
            inter_steps = 0 if nodes == 1 else 2 * (nodes - 1) if self.nccl_version >= (2, 23, 0) else 2 * nodes
        else:
            steps, inter_steps = n - 1, nodes - 1
        return NCCL_BASE_LATENCY_US + (steps - inter_steps) * self.intra_latency_us + \
            inter_steps * self.inter_latency_us

    def tree_latency_us(self) -> float:
        """NCCL's tree all-reduce latency (tuning.cc): base + 2·((ranks per node - 1)·intra + log2(nodes)·inter)
        hop latencies, up the tree and down again. The network's own latency (graph latencyInter) is 0 for IB."""
        if self.ranks <= 1:
            return 0.0
        base, nvlink, net = next(lat for first, lat in _TREE_LATENCY_US if self.nccl_version >= first)
        per_node = self.ranks // self.nodes
        return base + 2 * ((per_node - 1) * nvlink + (self.nodes.bit_length() - 1) * net)

    def all_reduce_us(self, message_bytes: np.ndarray, wire_bytes: np.ndarray) -> np.ndarray:
        """An all-reduce of `message_bytes` as NCCL runs it: the faster of ring and tree by NCCL's own estimate
        (ncclTopoGetAlgoTime; the tree's bandwidth scaled by treeCorrectionFactor, the ring's latency by the
        plateau factor across nodes once each rank's share per channel reaches 64 B)."""
        ring_latency = np.full(len(message_bytes), self.collective_latency_us(OpKind.ALL_REDUCE))
        if self.nodes > 1:
            ring_latency[message_bytes / (self.channels * self.ranks) >= 64] *= self.ring_plateau
        ring = ring_latency + wire_bytes / self.bus_bytes_per_s * 1e6
        log_size = np.floor(np.log2(np.maximum(message_bytes // 64, 1))).astype(np.int64)
        correction = np.where(log_size < len(_TREE_CORRECTION),
                              np.asarray(_TREE_CORRECTION)[np.minimum(log_size, len(_TREE_CORRECTION) - 1)], 1.0)
        tree = self.tree_latency_us() + message_bytes / (self.tree_bytes_per_s * correction) * 1e6
        return np.minimum(ring, tree)

    def host_us(self, ops: list[Op]) -> list[int]:
        """What issuing each op costs the host thread: HOST_US_PER_KERNEL for an op that launches a kernel or a copy
        (any work on a CUDA stream), nothing for bookkeeping or for the host CPU's own work (its duration is the
        host's time), and nothing on a synchronous device, where the op's own time is the host's."""
        if self.synchronous:
            return [0] * len(ops)
        cpu = Stream.CPU
        return [HOST_US_PER_KERNEL if (op.flops or op.bytes_moved or op.wire_bytes) and op.stream is not cpu else 0
                for op in ops]

    def durations_us(self, ops: list[Op]) -> list[int]:
        """duration_us of every op, vectorised: rounded up to whole µs, at least 1 µs for any work."""
        count = len(ops)
        flops = np.fromiter(map(attrgetter("flops"), ops), dtype=np.float64, count=count)
        moved = np.fromiter(map(attrgetter("bytes_moved"), ops), dtype=np.float64, count=count)
        wire = np.fromiter(map(attrgetter("wire_bytes"), ops), dtype=np.float64, count=count)
        kind = np.fromiter(map(_CODE_BY_ID.__getitem__, map(id, map(attrgetter("kind"), ops))), dtype=np.int64,
                           count=count)
        rate = np.full(count, self.vector_flops_per_s)
        rate[kind == _KIND_CODE[OpKind.GEMM]] = self.gemm_flops_per_s
        rate[kind == _KIND_CODE[OpKind.ATTENTION]] = self.attention_flops_per_s
        seconds = np.maximum(flops / rate, moved / self.hbm_bytes_per_s)
        pcie = (kind == _KIND_CODE[OpKind.HOST_TO_DEVICE]) | (kind == _KIND_CODE[OpKind.DEVICE_TO_HOST])
        seconds[pcie] = moved[pcie] / self.pcie_bytes_per_s
        host = kind == _KIND_CODE[OpKind.HOST_MEMORY]
        seconds[host] = moved[host] / self.host_memory_bytes_per_s
        latency_s = np.zeros(count)
        for ring_only in (OpKind.ALL_GATHER, OpKind.REDUCE_SCATTER):  # NCCL runs these as a ring
            latency_s[kind == _KIND_CODE[ring_only]] = self.collective_latency_us(ring_only) / 1e6
        seconds = np.where(wire > 0, wire / self.bus_bytes_per_s + latency_s, seconds)
        all_reduce = np.flatnonzero((kind == _KIND_CODE[OpKind.ALL_REDUCE]) & (wire > 0))
        if len(all_reduce):  # ring or tree; wire = 2(n-1)/n of the message (ring all-reduce)
            n = self.ranks
            message = np.round(wire[all_reduce] * n / (2 * (n - 1)))
            seconds[all_reduce] = self.all_reduce_us(message, wire[all_reduce]) / 1e6
        if count and seconds.max() * 1e6 > MAX_CLOCK_US:
            raise ClockOverflow(f"an op would run for {seconds.max():.3e} s, more than the 2^62 µs the simulated "
                                "clock counts")
        micros = np.ceil(seconds * 1e6).astype(np.int64)
        micros[(seconds > 0) & (micros < 1)] = 1
        return micros.tolist()
