"""The columnar memory trace: one row per allocation, free or OOM, in the order they happen."""

from dataclasses import dataclass

import numpy as np

from sim.ops import CATEGORIES


@dataclass(frozen=True, slots=True)
class Trace:
    """Arrays of equal length, row i = the i-th allocator event (seq order breaks same-time ties)."""

    time_us: np.ndarray  # int64
    op_index: np.ndarray  # int64: the op during which it happened
    buffer_id: np.ndarray  # int64
    delta_bytes: np.ndarray  # int64: +size for an allocation, -size for a free
    category: np.ndarray  # int8: index into CATEGORIES
    allocated_bytes: np.ndarray  # int64 after the event
    reserved_bytes: np.ndarray  # int64 after the event

    def __len__(self) -> int:
        return len(self.time_us)

    def category_bytes_at(self, index: int, baseline: np.ndarray) -> dict:
        """Live bytes per category just after event `index` (baseline: per-category bytes alive before t=0)."""
        upto = slice(0, index + 1)
        totals = baseline.astype(np.int64).copy()
        np.add.at(totals, self.category[upto].astype(np.int64), self.delta_bytes[upto])
        return {c.value: int(totals[i]) for i, c in enumerate(CATEGORIES)}


class TraceBuilder:
    """Appends rows in plain lists (fast in the engine loop) and freezes them into numpy arrays."""

    def __init__(self) -> None:
        self.time_us: list[int] = []
        self.op_index: list[int] = []
        self.buffer_id: list[int] = []
        self.delta_bytes: list[int] = []
        self.category: list[int] = []
        self.allocated_bytes: list[int] = []
        self.reserved_bytes: list[int] = []

    def freeze(self) -> Trace:
        def arr(values: list[int], dtype: type) -> np.ndarray:
            return np.asarray(values, dtype=dtype)

        return Trace(arr(self.time_us, np.int64), arr(self.op_index, np.int64), arr(self.buffer_id, np.int64),
                     arr(self.delta_bytes, np.int64), arr(self.category, np.int8),
                     arr(self.allocated_bytes, np.int64), arr(self.reserved_bytes, np.int64))
