"""The exact backend: memory is the sum of live tensor bytes; reserved equals allocated."""

import numpy as np

from sim.allocator.base import OutOfMemory
from sim.ops import Stream
from sim.units import format_bytes


class ExactAllocator:
    """Counts live bytes exactly; an allocation fails when live bytes would pass the capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self._sizes: dict[int, int] = {}

    def malloc(self, buffer_id: int, size_bytes: int, stream: Stream) -> None:
        assert buffer_id not in self._sizes, f"buffer {buffer_id} allocated twice"
        self._sizes[buffer_id] = size_bytes
        self.allocated_bytes += size_bytes
        self.reserved_bytes = self.allocated_bytes
        if self.allocated_bytes > self.capacity_bytes:
            free = self.capacity_bytes - (self.allocated_bytes - size_bytes)
            raise OutOfMemory(
                size_bytes,
                f"Out of memory. Tried to allocate {format_bytes(size_bytes)}; "
                f"{format_bytes(max(free, 0))} of {format_bytes(self.capacity_bytes)} free.",
            )

    def free(self, buffer_id: int) -> None:
        self.allocated_bytes -= self._sizes.pop(buffer_id)
        self.reserved_bytes = self.allocated_bytes

    def replay(self, signed_sizes: np.ndarray) -> tuple[np.ndarray, OutOfMemory | None, int]:
        """Apply a whole sequence of allocations (+size) and frees (-size) at once: `allocated` after each event,
        and the first allocation that passes the capacity (with its event index, else -1). Same results as
        calling malloc/free one by one; used by the engine for a lone stream."""
        allocated = self.allocated_bytes + np.cumsum(signed_sizes)
        over = np.nonzero((allocated > self.capacity_bytes) & (signed_sizes > 0))[0]
        oom, at = None, -1
        if len(over):
            at = int(over[0])
            size = int(signed_sizes[at])
            free = self.capacity_bytes - (int(allocated[at]) - size)
            oom = OutOfMemory(size, f"Out of memory. Tried to allocate {format_bytes(size)}; "
                                    f"{format_bytes(max(free, 0))} of {format_bytes(self.capacity_bytes)} free.")
        if len(allocated):
            self.allocated_bytes = self.reserved_bytes = int(allocated[-1])
        return allocated, oom, at
