"""The allocator protocol the engine drives."""

from typing import Protocol

from sim.ops import Stream


class OutOfMemory(Exception):
    """No block could be found or made; carries what PyTorch would print."""

    def __init__(self, requested_bytes: int, message: str) -> None:
        super().__init__(message)
        self.requested_bytes = requested_bytes


class Allocator(Protocol):
    capacity_bytes: int
    allocated_bytes: int
    reserved_bytes: int

    def malloc(self, buffer_id: int, size_bytes: int, stream: Stream) -> None:
        """Allocate; raises OutOfMemory when the device cannot hold it (the allocation then still happens,
        over capacity, so the simulation can show the whole demand)."""

    def free(self, buffer_id: int) -> None: ...
