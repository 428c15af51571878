"""The allocator protocol: every attribute and method the engine's roles (sim/engine.py, sim/drivers.py) use on an
allocator, written down whole; tests/test_allocator_protocol.py checks they use nothing else and that every
backend has all of it."""

from collections.abc import Iterable
from typing import Protocol

import numpy as np

from sim.allocator.event_log import AllocatorEventLog
from sim.ops import Stream


class OutOfMemory(Exception):
    """No block could be found or made; carries what PyTorch would print."""

    def __init__(self, requested_bytes: int, message: str) -> None:
        super().__init__(message)
        self.requested_bytes = requested_bytes


class Allocator(Protocol):
    """A device's memory allocator as the engine drives it: one event at a time (malloc, free), or a whole run
    at once where a backend offers a replay path; its capabilities (`can_*`) tell the engine which path applies."""

    capacity_bytes: int  # what the allocator can get from the device
    allocated_bytes: int  # bytes of live blocks, as PyTorch counts them
    reserved_bytes: int  # bytes held from the device (allocated plus cached)
    event_log: AllocatorEventLog | None  # the log it writes, one allocator event per malloc/free (None: none)

    def malloc(self, buffer_id: int, size_bytes: int, stream: Stream) -> None:
        """Allocate; raises OutOfMemory when the device cannot hold it (the allocation then still happens,
        over capacity, so the simulation can show the whole demand)."""

    def free(self, buffer_id: int, pending_on: Iterable[Stream] = ()) -> None:
        """Release a live buffer's block; `pending_on`: streams it was used on besides its allocation stream
        (record_stream), whose events must complete (`release_pending`) before the block is reused."""

    def release_pending(self, buffer_id: int) -> None:
        """The streams a freed buffer was pending on have passed its free: its block may be reused from the next
        malloc."""

    def largest_free_block_bytes(self) -> int | None:
        """The largest cached free block (0: none cached); None for an allocator that caches nothing."""

    # ---- whole runs at once

    def can_replay_vectorised(self) -> bool:
        """Whether `replay_vectorised` applies (the state is live bytes alone: one pass of arithmetic)."""

    def replay_vectorised(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray
                          ) -> tuple[np.ndarray, tuple[int, OutOfMemory] | None]:
        """Apply a whole run of events at once (signed id >= 0: malloc of that buffer, ~id: its free): allocated
        bytes after each event, and the first OOM with its event index (None: none); as malloc/free event by event
        would give, the allocator then holding the state the events leave."""

    def can_replay_compiled(self) -> bool:
        """Whether `replay_compiled` applies now (a compiled core that runs this allocator's algorithm exists for
        its configuration, and nothing has happened yet)."""

    def replay_compiled(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray, stream_codes: np.ndarray,
                        release_at: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, tuple[int, OutOfMemory] | None, int | None]:
        """Apply a whole run of events (malloc on STREAMS[code] or ~id free; a free pending where `release_at`
        says, AllocatorEvents.release_at) through the compiled core: allocated
        and reserved bytes after each event, the first OOM with its event index (None: none), and the largest
        free block at the first event with the most reserved (None without events); the allocator then holds the
        state the events leave, as if malloc and free had been called for each."""

    # ---- repeated windows: skipping calls whose outcome an identical earlier window already gave

    def can_repeat(self) -> bool:
        """Whether `state_signature` captures everything later mallocs and frees depend on."""

    def live_buffer_ids(self) -> list[int]:
        """The buffers allocated and not yet freed."""

    def pending_buffer_ids(self) -> list[int]:
        """The freed buffers whose blocks still wait for other streams (release_pending)."""

    def state_signature(self, owner_keys: dict[int, int]) -> tuple:
        """The state with each live and pending buffer named by `owner_keys[buffer]`: two states with equal
        signatures answer the same calls the same way."""

    def rename_live(self, renames: dict[int, int]) -> None:
        """Give live buffers new ids (old -> new), as if the new ones had been allocated instead."""

    def rename_pending(self, renames: dict[int, int]) -> None:
        """Give pending blocks new freed-buffer ids (old -> new), as if those buffers had been freed instead."""

    def counters(self) -> tuple:
        """A reading of the allocator's running counts (retries, cudaMalloc calls, OOMs, ...)."""

    def add_counters(self, before: tuple, after: tuple, times: int = 1) -> None:
        """Count again, `times` times, what happened between two `counters()` readings (a repeated window of
        calls)."""
