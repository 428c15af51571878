"""How the engine drives an allocator through a run's events: one driver per path (a vectorised pass for live
bytes, the caching allocator's compiled core, or malloc/free event by event with repeated windows skipped). Every
path gives what calling malloc and free for each event would."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.allocator.base import Allocator, OutOfMemory
from sim.event_order import AllocatorEvents
from sim.ops import STREAMS


@dataclass(frozen=True, slots=True)
class OomEvent:
    """The first allocation that did not fit."""

    time_us: int
    op_index: int
    requested_bytes: int
    message: str
    event_index: int  # the failing allocation's position among the run's events (its trace row)

    @classmethod
    def at(cls, events: AllocatorEvents, index: int, exc: OutOfMemory) -> "OomEvent":
        """The OOM `exc` raised at event `index`, placed in time and op."""
        return cls(int(events.time_us[index]), int(events.op_index[index]), exc.requested_bytes, str(exc), index)


@dataclass(frozen=True, slots=True)
class AllocatorRun:
    """What driving the allocator through a run's events gave."""

    allocated_bytes: np.ndarray  # int64 after each event
    reserved_bytes: np.ndarray  # int64 after each event
    oom: OomEvent | None  # the first allocation that did not fit
    repeated_events: int  # events whose results were copied from an identical earlier window
    largest_free_block_at_peak_bytes: int | None  # at the first event with the most reserved; None: no cache


class AllocatorDriver(Protocol):
    """One way to run every event of a run through an allocator; the engine picks the one the allocator's
    capabilities allow."""

    def drive(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorRun:
        """Bytes after each event, the first OOM and the largest free block at the peak, leaving the allocator
        in the state the events leave."""


class VectorisedReplay:
    """Live bytes in one vectorised pass (allocator.can_replay_vectorised: the exact backend)."""

    def drive(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorRun:
        """The whole run through allocator.replay_vectorised; reserved equals allocated."""
        allocated, first_oom = allocator.replay_vectorised(events.signed_id, events.size_bytes)
        oom = None if first_oom is None else OomEvent.at(events, *first_oom)
        return AllocatorRun(allocated, allocated.copy(), oom, 0, allocator.largest_free_block_bytes())


class CompiledReplay:
    """The caching allocator's algorithm in its compiled core, in one call (allocator.can_replay_compiled), pending
    frees included (released where StepwiseDriver releases them)."""

    def drive(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorRun:
        """The whole run through allocator.replay_compiled."""
        allocated, reserved, first_oom, largest = allocator.replay_compiled(events.signed_id, events.size_bytes,
                                                                            events.stream_code, events.release_at)
        oom = None if first_oom is None else OomEvent.at(events, *first_oom)
        return AllocatorRun(allocated, reserved, oom, 0, largest)


class StepwiseDriver:
    """malloc/free event by event, window by window (`windows`: [start, end) event ranges, one per micro-batch
    and optimizer step); with `repeat`, a window that repeats the one before is copied, not called (_StepwiseRun).
    A pending free (AllocatorEvents.release_at) is freed pending on the stream it waits on, and its block released
    at the start of the malloc where that stream has passed it."""

    def __init__(self, windows: list[tuple[int, int]], repeat: bool) -> None:
        """`windows` cover every event in order; `repeat=False` calls the allocator for every event (checking)."""
        self.windows, self.repeat = windows, repeat

    def drive(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorRun:
        """The run event by event, repeated windows skipped where the allocator can repeat."""
        return _StepwiseRun(allocator, events, self.windows, self.repeat).run()


class _StepwiseRun:
    """One stepwise run. A run repeats itself: micro-batches after the first few issue the same events as the one
    before. Where a window of events is the same as the last window run event by event, at the same relative
    positions, and the allocator starts it in the same state up to buffer names and synthetic addresses, the
    allocator would do exactly what it did then; its results are copied and its state renamed instead
    (tests/test_engine.py checks both ways give the same trace and statistics)."""

    def __init__(self, allocator: Allocator, events: AllocatorEvents, windows: list[tuple[int, int]],
                 repeat: bool) -> None:
        """Pairs every allocation with its free once, so windows can name buffers by position."""
        self.allocator, self.events, self.windows, self.repeat = allocator, events, windows, repeat
        self.n = n = len(events)
        self.releases = events.releases()
        signed = events.signed_id
        ids = np.where(signed < 0, ~signed, signed)
        # A buffer id can be allocated and freed many times (repeated micro-batches reuse ids): pair each
        # allocation with its free by sorting the events by (buffer, position) (stable: positions stay in order).
        order = np.argsort(ids, kind="stable")
        self._key = ids[order] * (n + 1) + order  # sorted: buffer-major, then position
        self._position = order
        is_alloc = signed[order] >= 0
        pair = is_alloc[:-1] & ~is_alloc[1:] & (ids[order][:-1] == ids[order][1:])
        self.partner = np.full(n, n, dtype=np.int64)  # allocation -> its free (n: never), free -> its allocation
        self.partner[order[:-1][pair]] = order[1:][pair]
        self.partner[order[1:][pair]] = order[:-1][pair]
        # the most reserved so far and the largest free block then: a repeated window never passes the maximum
        # (its values are those of its reference), so the peak is always seen stepwise
        self.most_reserved, self.largest_at_peak = -1, None

    def run(self) -> AllocatorRun:
        """Every window: copied from the reference window where it repeats it, else called event by event."""
        allocated = [0] * self.n
        reserved = [0] * self.n
        oom: OomEvent | None = None
        repeated = 0
        reference = None  # (start, end, state signature, counters before, counters after) of the last real window
        allocator = self.allocator
        for start, end in self.windows:
            signature = self._signature(start, end) if self.repeat and allocator.can_repeat() else None
            if reference is not None and signature is not None and self._same_window(reference, start, end, signature):
                ref_start, ref_end, _, before, after = reference
                allocated[start:end] = allocated[ref_start:ref_end]
                reserved[start:end] = reserved[ref_start:ref_end]
                self._rename_live(start, end - start)
                allocator.add_counters(before, after)
                repeated += end - start
                continue
            before = allocator.counters()
            window_oom = self._step(start, end, allocated, reserved)
            oom = oom or window_oom
            reference = None if signature is None else (start, end, signature, before, allocator.counters())
        return AllocatorRun(np.asarray(allocated, dtype=np.int64), np.asarray(reserved, dtype=np.int64), oom,
                            repeated, self.largest_at_peak)

    def _step(self, start: int, end: int, allocated: list[int], reserved: list[int]) -> OomEvent | None:
        """Call malloc/free for events [start, end), recording the bytes after each; the window's first OOM."""
        events, allocator, releases = self.events, self.allocator, self.releases
        malloc, free = allocator.malloc, allocator.free
        signed = events.signed_id[start:end].tolist()
        sizes = events.size_bytes[start:end].tolist()
        streams = [STREAMS[c] for c in events.stream_code[start:end].tolist()]
        pending = (events.release_at[start:end] >= 0).tolist()
        oom = None
        most = self.most_reserved
        at = start
        for buffer_id, size, stream, waits in zip(signed, sizes, streams, pending):
            if buffer_id >= 0:
                for released in releases.get(at, ()):
                    allocator.release_pending(released)
                try:
                    malloc(buffer_id, size, stream)
                except OutOfMemory as exc:
                    oom = oom or OomEvent.at(events, at, exc)
            elif waits:
                free(~buffer_id, (stream,))
            else:
                free(~buffer_id)
            allocated[at] = allocator.allocated_bytes
            reserved[at] = now = allocator.reserved_bytes
            if now > most:
                most = self.most_reserved = now
                self.largest_at_peak = allocator.largest_free_block_bytes()
            at += 1
        return oom

    def _live_allocations(self, at: int) -> tuple[list[int], np.ndarray]:
        """The allocator's live buffers before event `at`, and the position of the allocation each lives from."""
        live = self.allocator.live_buffer_ids()
        index = np.searchsorted(self._key, np.asarray(live, dtype=np.int64) * (self.n + 1) + at) - 1
        return live, self._position[index]

    def _pending_frees(self, at: int) -> tuple[list[int], np.ndarray]:
        """The allocator's pending buffers before event `at`, and the position of the free each is pending from
        (a pending buffer's latest event is its free)."""
        pending = self.allocator.pending_buffer_ids()
        index = np.searchsorted(self._key, np.asarray(pending, dtype=np.int64) * (self.n + 1) + at) - 1
        return pending, self._position[index]

    def _owner_keys(self, start: int, end: int) -> dict[int, int]:
        """How a live buffer is named relative to the window [start, end): by the position of its free inside
        the window (>= 0), else by itself (~id: it outlives the window untouched); a pending one by the position
        of its release inside the window, past the window's length (else by itself)."""
        live, allocations = self._live_allocations(start)
        frees = self.partner[allocations].tolist()
        keys = {b: (free - start if free < end else ~b) for b, free in zip(live, frees)}
        pending, freed = self._pending_frees(start)
        released = self.events.release_at[freed].tolist()
        keys.update({b: (end - start + at - start if at < end else ~b) for b, at in zip(pending, released)})
        return keys

    def _signature(self, start: int, end: int) -> tuple:
        """The allocator's state on entering [start, end), live buffers named relative to the window."""
        return self.allocator.state_signature(self._owner_keys(start, end))

    def _same_window(self, reference: tuple, start: int, end: int, signature: tuple) -> bool:
        """Whether [start, end) issues the reference window's events at the same relative positions (sizes,
        streams, allocations vs frees, which buffer each free releases, and where each pending one returns within
        the window) from an identical state."""
        ref_start, ref_end, ref_signature, _, _ = reference
        if end - start != ref_end - ref_start or signature != ref_signature:
            return False
        events = self.events
        here, there = slice(start, end), slice(ref_start, ref_end)
        if not (np.array_equal(events.size_bytes[here], events.size_bytes[there])
                and np.array_equal(events.stream_code[here], events.stream_code[there])
                and np.array_equal(self._releases_within(start, end), self._releases_within(ref_start, ref_end))):
            return False
        signed_here, signed_there = events.signed_id[here], events.signed_id[there]
        if not np.array_equal(signed_here < 0, signed_there < 0):
            return False
        return np.array_equal(self._free_names(signed_here, start), self._free_names(signed_there, ref_start))

    def _releases_within(self, start: int, end: int) -> np.ndarray:
        """Per event of [start, end): where its pending block returns, relative to the window, the window's end
        standing for any later point (-1: not pending). Blocks still pending at the end are renamed with the
        window (_rename_live) and named by their release in the next window's signature."""
        release_at = self.events.release_at[start:end]
        return np.where(release_at >= 0, np.minimum(release_at, end) - start, -1)

    def _free_names(self, signed: np.ndarray, start: int) -> np.ndarray:
        """Per free in a window: the freed buffer's allocation position relative to the window when it was
        allocated inside it, else -1 (a buffer live at the window's start: the state signature names it)."""
        frees = start + np.nonzero(signed < 0)[0]
        relative = self.partner[frees] - start
        return np.where(relative >= 0, relative, -1)

    def _rename_live(self, start: int, length: int) -> None:
        """Skipping [start, start + length): buffers the window before it (the reference or a repetition of it, of
        the same length) allocated and left alive become the ones allocated at the same relative positions of the
        skipped window, and those it freed pending the ones freed there; buffers older than that outlive both
        windows unchanged (the signature checked that)."""
        signed = self.events.signed_id
        live, allocations = self._live_allocations(start)
        renames = {b: int(signed[p + length]) for b, p in zip(live, allocations.tolist())
                   if start - length <= p < start}
        self.allocator.rename_live(renames)
        pending, freed = self._pending_frees(start)  # those the window before freed: those freed there now
        self.allocator.rename_pending({b: ~int(signed[p + length]) for b, p in zip(pending, freed.tolist())
                                       if start - length <= p < start})
