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

    def allocated_delta(self) -> np.ndarray:
        """How much each event changed `allocated` (the allocator's block sizes, e.g. 512-byte rounded)."""
        return np.diff(self.allocated_bytes, prepend=0)

    def category_bytes_at(self, index: int, baseline: np.ndarray) -> dict:
        """Allocated bytes per category just after event `index`, as the allocator counts them (block sizes);
        they sum to allocated_bytes[index]. `baseline`: per-category bytes alive before the first event."""
        upto = slice(0, index + 1)
        totals = baseline.astype(np.int64).copy()
        np.add.at(totals, self.category[upto].astype(np.int64), self.allocated_delta()[upto])
        return {c.value: int(totals[i]) for i, c in enumerate(CATEGORIES)}


class TraceBuilder:
    """Appends rows in plain lists (fast in the engine loop) and freezes them into numpy arrays.

    `buffer_id` holds the id for an allocation and its bitwise complement (~id, negative) for a free.
    """

    def __init__(self) -> None:
        self.time_us: list[int] = []
        self.op_index: list[int] = []
        self.buffer_id: list[int] = []
        self.allocated_bytes: list[int] = []
        self.reserved_bytes: list[int] = []

    def freeze(self, sizes_by_id: list[int], categories_by_id: list[int]) -> Trace:
        signed = np.asarray(self.buffer_id, dtype=np.int64)
        is_free = signed < 0
        ids = np.where(is_free, ~signed, signed)
        sizes = np.asarray(sizes_by_id, dtype=np.int64)
        categories = np.asarray(categories_by_id, dtype=np.int8)
        delta = np.where(is_free, -sizes[ids], sizes[ids]) if len(ids) else np.zeros(0, dtype=np.int64)
        return Trace(np.asarray(self.time_us, dtype=np.int64), np.asarray(self.op_index, dtype=np.int64), ids,
                     delta, categories[ids] if len(ids) else np.zeros(0, dtype=np.int8),
                     np.asarray(self.allocated_bytes, dtype=np.int64),
                     np.asarray(self.reserved_bytes, dtype=np.int64))
