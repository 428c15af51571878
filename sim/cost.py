"""Op durations. Kernels: the roofline (Williams et al. 2009), the longer of FLOPs at the achievable rate of the
unit that runs them and bytes at the achievable HBM bandwidth. Collectives: NCCL's own cost model
(NVIDIA/nccl src/graph/tuning.cc): a base latency, a per-step latency for each ring step, and the bytes
each rank sends at the measured bus bandwidth of the slowest link the algorithm crosses. The achievable fractions
are measured figures in the hardware YAML (DeviceEfficiency); 1.0 gives the bare datasheet roofline."""

import numpy as np

from sim.ops import COLLECTIVES, Op, OpKind
from sim.scenario import DeviceSpec, DType

_FLOPS_KEY = {DType.BFLOAT16: "bf16", DType.FLOAT16: "fp16", DType.FLOAT32: "fp32"}
# NVIDIA/nccl src/graph/tuning.cc: baseLat[NCCL_ALGO_RING][NCCL_PROTO_SIMPLE] = 8.4 µs per collective; the
# collectives here move tens to hundreds of MB, where NCCL runs the ring with the Simple protocol.
NCCL_BASE_LATENCY_US = 8.4
_KIND_CODE = {kind: code for code, kind in enumerate(OpKind)}
_CODE_BY_ID = {id(kind): code for kind, code in _KIND_CODE.items()}  # hashing an Enum is slow


class CostModel:
    """Durations of ops on one device of a `gpus_per_node` × `nodes` machine, in whole µs."""

    def __init__(self, device: DeviceSpec, compute_dtype: DType, gpus_per_node: int = 1, nodes: int = 1) -> None:
        eff = device.efficiency
        key = _FLOPS_KEY.get(compute_dtype, "fp32")
        tensor_peak = device.peak_flops.get(key) or max(device.peak_flops.values())
        self.gemm_flops_per_s = tensor_peak * eff.gemm
        self.attention_flops_per_s = tensor_peak * eff.attention
        # elementwise kernels run on the CUDA cores: the fp32 (non-tensor) peak where the device lists one
        self.vector_flops_per_s = device.peak_flops.get("fp32") or max(device.peak_flops.values())
        self.hbm_bytes_per_s = device.hbm_bytes_per_s * eff.hbm
        self.ranks, self.nodes = gpus_per_node * nodes, nodes
        # NVLink figures are bidirectional aggregates: one direction carries half (NVIDIA A100/H100 datasheets).
        # NIC figures are per GPU and direction (one NIC per GPU); NCCL spreads its channels over all the node's
        # NICs (tuning.cc: busBw = nChannels × bwInter), so across nodes the bus bandwidth is the node's NICs
        # together, and a ring that leaves the node runs at its slower link.
        self.intra_bus_bytes_per_s = device.intra_node_bytes_per_s / 2 * eff.nvlink
        self.inter_bus_bytes_per_s = device.inter_node_bytes_per_s * gpus_per_node * eff.network
        self.bus_bytes_per_s = (min(self.intra_bus_bytes_per_s, self.inter_bus_bytes_per_s) if nodes > 1
                                else self.intra_bus_bytes_per_s)
        self.intra_latency_us = device.intra_node_latency_us
        self.inter_latency_us = device.inter_node_latency_us

    def collective_latency_us(self, kind: OpKind) -> float:
        """NCCL's ring latency for one collective over all ranks (tuning.cc): the base latency plus one link
        latency per ring step (all-reduce: reduce-scatter then all-gather, 2(n-1) steps; all-gather and
        reduce-scatter: n-1), the steps that cross nodes at the network latency. NCCL's tree (all-reduce only) has
        its own, larger per-hop latencies and wins only for small messages; it is not modelled."""
        n, nodes = self.ranks, self.nodes
        if n <= 1:
            return 0.0
        if kind is OpKind.ALL_REDUCE:
            steps, inter_steps = 2 * (n - 1), (2 * nodes if nodes > 1 else 0)
        else:
            steps, inter_steps = n - 1, nodes - 1
        return NCCL_BASE_LATENCY_US + (steps - inter_steps) * self.intra_latency_us + \
            inter_steps * self.inter_latency_us

    def durations_us(self, ops: list[Op]) -> list[int]:
        """duration_us of every op, vectorised: rounded up to whole µs, at least 1 µs for any work."""
        count = len(ops)
        flops = np.fromiter((op.flops for op in ops), dtype=np.float64, count=count)
        moved = np.fromiter((op.bytes_moved for op in ops), dtype=np.float64, count=count)
        wire = np.fromiter((op.wire_bytes for op in ops), dtype=np.float64, count=count)
        kind = np.fromiter((_CODE_BY_ID[id(op.kind)] for op in ops), dtype=np.int64, count=count)
        rate = np.full(count, self.vector_flops_per_s)
        rate[kind == _KIND_CODE[OpKind.GEMM]] = self.gemm_flops_per_s
        rate[kind == _KIND_CODE[OpKind.ATTENTION]] = self.attention_flops_per_s
        seconds = np.maximum(flops / rate, moved / self.hbm_bytes_per_s)
        latency_s = np.zeros(count)
        for collective in COLLECTIVES:
            latency_s[kind == _KIND_CODE[collective]] = self.collective_latency_us(collective) / 1e6
        seconds = np.where(wire > 0, wire / self.bus_bytes_per_s + latency_s, seconds)
        micros = np.ceil(seconds * 1e6).astype(np.int64)
        micros[(seconds > 0) & (micros < 1)] = 1
        return micros.tolist()
