"""The exact backend: memory is the sum of live tensor bytes; reserved equals allocated."""

from collections.abc import Iterable

import numpy as np

from sim.allocator.base import OutOfMemory
from sim.allocator.event_log import AllocatorEventLog
from sim.ops import Stream
from sim.units import format_bytes


class ExactAllocator:
    """Counts live bytes exactly; an allocation fails when live bytes would pass the capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        """`capacity_bytes`: the live bytes past which an allocation raises OutOfMemory."""
        self.capacity_bytes = capacity_bytes
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        # none: PyTorch's trace entries name blocks and segments by address, and live bytes have neither
        self.event_log: AllocatorEventLog | None = None
        self._sizes: dict[int, int] = {}

    def malloc(self, buffer_id: int, size_bytes: int, stream: Stream) -> None:
        """Count `size_bytes` for `buffer_id`; raises OutOfMemory (after counting) past the capacity."""
        assert buffer_id not in self._sizes, f"buffer {buffer_id} allocated twice"
        self._sizes[buffer_id] = size_bytes
        self.allocated_bytes += size_bytes
        self.reserved_bytes = self.allocated_bytes
        if self.allocated_bytes > self.capacity_bytes:
            raise self._oom(size_bytes, self.allocated_bytes - size_bytes)

    def free(self, buffer_id: int, pending_on: Iterable[Stream] = ()) -> None:
        """Stop counting a live buffer (at once: nothing is cached, so a block pending on other streams is simply
        not counted, as PyTorch's statistics do not count it)."""
        self.allocated_bytes -= self._sizes.pop(buffer_id)
        self.reserved_bytes = self.allocated_bytes

    def largest_free_block_bytes(self) -> None:
        """None: nothing is cached."""
        return None

    def _oom(self, size_bytes: int, allocated_before_bytes: int) -> OutOfMemory:
        """The error an allocation of `size_bytes` on top of `allocated_before_bytes` raises."""
        free = self.capacity_bytes - allocated_before_bytes
        return OutOfMemory(size_bytes, f"Out of memory. Tried to allocate {format_bytes(size_bytes)}; "
                                       f"{format_bytes(max(free, 0))} of {format_bytes(self.capacity_bytes)} free.")

    # ---- whole runs at once

    def can_replay_vectorised(self) -> bool:
        """Always: the state is live bytes, a running sum."""
        return True

    def replay_vectorised(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray
                          ) -> tuple[np.ndarray, tuple[int, OutOfMemory] | None]:
        """Apply a whole run of events (id >= 0: malloc, ~id: free) in one cumulative sum: allocated bytes after
        each event and the first allocation that passes the capacity (its event index and error, else None).
        Same results and end state as calling malloc/free one by one."""
        is_free = signed_ids < 0
        signed_sizes = np.where(is_free, -sizes_bytes, sizes_bytes)
        allocated = self.allocated_bytes + np.cumsum(signed_sizes)
        over = np.nonzero((allocated > self.capacity_bytes) & ~is_free)[0]
        oom = None
        if len(over):
            at = int(over[0])
            size = int(signed_sizes[at])
            oom = at, self._oom(size, int(allocated[at]) - size)
        if len(allocated):
            self.allocated_bytes = self.reserved_bytes = int(allocated[-1])
            ids = np.where(is_free, ~signed_ids, signed_ids)
            last_ids, last_from_end = np.unique(ids[::-1], return_index=True)  # each buffer's last event
            last = len(ids) - 1 - last_from_end
            live = ~is_free[last]
            for buffer_id in last_ids[~live].tolist():
                self._sizes.pop(buffer_id, None)
            self._sizes.update(zip(last_ids[live].tolist(), sizes_bytes[last[live]].tolist()))
        return allocated, oom

    def can_replay_compiled(self) -> bool:
        """Never: there is no compiled core for live bytes (replay_vectorised is the fast path)."""
        return False

    def replay_compiled(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray, stream_codes: np.ndarray,
                        release_at: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, tuple[int, OutOfMemory] | None, int | None]:
        """Refused: there is no compiled core for live bytes (can_replay_compiled is False)."""
        raise NotImplementedError("the exact allocator has no compiled core; use replay_vectorised")

    # ---- repeated windows

    def pending_buffer_ids(self) -> list[int]:
        """None: a free is complete at once here."""
        return []

    def rename_pending(self, renames: dict[int, int]) -> None:
        """Nothing: no block is ever pending here."""

    def release_pending(self, buffer_id: int) -> None:
        """Nothing: a free is complete at once here (see free)."""

    def can_repeat(self) -> bool:
        """Always: the live buffers' sizes are the whole state, and `state_signature` holds them."""
        return True

    def live_buffer_ids(self) -> list[int]:
        """The buffers counted now."""
        return list(self._sizes)

    def state_signature(self, owner_keys: dict[int, int]) -> tuple:
        """The live buffers' sizes by owner key: equal signatures mean equal live bytes now and after any
        sequence of calls that frees buffers by the same keys."""
        return tuple(sorted((owner_keys[buffer_id], size) for buffer_id, size in self._sizes.items()))

    def rename_live(self, renames: dict[int, int]) -> None:
        """Count live buffers under new ids (old -> new)."""
        self._sizes = {renames.get(buffer_id, buffer_id): size for buffer_id, size in self._sizes.items()}

    def counters(self) -> tuple:
        """Nothing is counted beyond the live bytes: an empty reading."""
        return ()

    def add_counters(self, before: tuple, after: tuple, times: int = 1) -> None:
        """Nothing to count again (counters() reads nothing)."""
