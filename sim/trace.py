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
