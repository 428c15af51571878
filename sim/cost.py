"""A first cost model: an op takes the longer of its FLOPs at the device's peak rate and its bytes at HBM
bandwidth (the roofline, Williams et al. 2009). Achievable-efficiency factors come with the timing issue."""

import numpy as np

from sim.ops import Op
from sim.scenario import DeviceSpec, DType

_FLOPS_KEY = {DType.BFLOAT16: "bf16", DType.FLOAT16: "fp16", DType.FLOAT32: "fp32"}


class CostModel:
    """Compute ops: roofline. Collectives: `wire_bytes` over the slowest link a ring crosses, plus one link
    latency per ring step (Patarasuk & Yuan 2009, bandwidth-optimal ring all-reduce)."""

    def __init__(self, device: DeviceSpec, compute_dtype: DType, gpus_per_node: int = 1, nodes: int = 1) -> None:
        key = _FLOPS_KEY.get(compute_dtype, "fp32")
        self.peak_flops = device.peak_flops.get(key) or max(device.peak_flops.values())
        self.hbm_bytes_per_s = device.hbm_bytes_per_s
        # NVLink figures are bidirectional aggregates: one direction carries half (NVIDIA A100/H100 datasheets).
        intra = device.intra_node_bytes_per_s / 2
        self.link_bytes_per_s = min(intra, device.inter_node_bytes_per_s) if nodes > 1 else intra
        latency_us = device.inter_node_latency_us if nodes > 1 else device.intra_node_latency_us
        self.ring_latency_s = (gpus_per_node * nodes - 1) * latency_us / 1e6

    def durations_us(self, ops: list[Op]) -> list[int]:
        """duration_us of every op, vectorised (same rounding: up to whole µs, at least 1 µs for any work)."""
        flops = np.fromiter((op.flops for op in ops), dtype=np.float64, count=len(ops))
        moved = np.fromiter((op.bytes_moved for op in ops), dtype=np.float64, count=len(ops))
        wire = np.fromiter((op.wire_bytes for op in ops), dtype=np.float64, count=len(ops))
        seconds = np.maximum(flops / self.peak_flops, moved / self.hbm_bytes_per_s)
        seconds = np.where(wire > 0, wire / self.link_bytes_per_s + self.ring_latency_s, seconds)
        micros = np.ceil(seconds * 1e6).astype(np.int64)
        micros[(seconds > 0) & (micros < 1)] = 1
        return micros.tolist()
