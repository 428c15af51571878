"""A first cost model: an op takes the longer of its FLOPs at the device's peak rate and its bytes at HBM
bandwidth (the roofline, Williams et al. 2009). Achievable-efficiency factors come with the timing issue."""

import numpy as np

from sim.ops import Op
from sim.scenario import DeviceSpec, DType
from sim.units import seconds_to_us

_FLOPS_KEY = {DType.BFLOAT16: "bf16", DType.FLOAT16: "fp16", DType.FLOAT32: "fp32"}


class CostModel:
    def __init__(self, device: DeviceSpec, compute_dtype: DType) -> None:
        key = _FLOPS_KEY.get(compute_dtype, "fp32")
        self.peak_flops = device.peak_flops.get(key) or max(device.peak_flops.values())
        self.hbm_bytes_per_s = device.hbm_bytes_per_s

    def duration_us(self, op: Op) -> int:
        seconds = max(op.flops / self.peak_flops, op.bytes_moved / self.hbm_bytes_per_s)
        return seconds_to_us(seconds)

    def durations_us(self, ops: list[Op]) -> list[int]:
        """duration_us of every op, vectorised (same rounding: up to whole µs, at least 1 µs for any work)."""
        flops = np.fromiter((op.flops for op in ops), dtype=np.float64, count=len(ops))
        moved = np.fromiter((op.bytes_moved for op in ops), dtype=np.float64, count=len(ops))
        seconds = np.maximum(flops / self.peak_flops, moved / self.hbm_bytes_per_s)
        micros = np.ceil(seconds * 1e6).astype(np.int64)
        micros[(seconds > 0) & (micros < 1)] = 1
        return micros.tolist()
