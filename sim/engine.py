"""The discrete-event engine: streams run their ops in order, cross-stream dependencies delay the ops that wait
on them, and the allocator sees every allocation (at an op's start) and free (at its end) in time order.

It knows ops, streams and bytes; nothing about models or frameworks. Nothing waits for memory (an OOM is recorded
and the run goes on), so the clock does not depend on the allocator: the engine first lays out the timeline, then
drives the allocator through the time-ordered events. The timeline is what a discrete-event simulation with one
process per stream and a completion event per op gives (tests/test_engine.py checks it against such a simpy model):
an op starts when the previous op of its stream and every op it depends on have ended.
"""

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from sim.allocator import Allocator, CachingAllocator, OutOfMemory
from sim.cost import CostModel
from sim.ops import STREAMS, Schedule, Stream
from sim.trace import Trace


@dataclass(frozen=True, slots=True)
class OomEvent:
    """The first allocation that did not fit."""

    time_us: int
    op_index: int
    requested_bytes: int
    message: str


@dataclass(frozen=True, slots=True)
class EngineResult:
    trace: Trace
    op_start_us: list[int]  # start time of each op
    op_end_us: list[int]  # end time of each op
    end_time_us: int
    oom: OomEvent | None
    busy_us: dict[Stream, int]
    repeated_events: int = 0  # events whose allocator results were repeated from an identical earlier window
    largest_free_block_at_peak_bytes: int | None = None  # the caching allocator's largest cached free block there


@dataclass(frozen=True, slots=True)
class _Events:
    """Every allocator event of a run in the order it happens (columns; row = event)."""

    time_us: np.ndarray
    op_index: np.ndarray  # -1: a persistent buffer, allocated before the first op
    signed_id: np.ndarray  # buffer id for an allocation, ~id for a free
    size_bytes: np.ndarray
    stream_code: np.ndarray  # index into STREAMS


class Engine:
    def __init__(self, schedule: Schedule, allocator: Allocator, cost: CostModel, repeat: bool = True,
                 compiled: bool = True) -> None:
        """`repeat=False`: call the allocator for every event even where a window repeats; `compiled=False`: run
        the caching allocator's Python model even where its compiled core applies (both for checking)."""
        self.schedule = schedule
        self.repeat, self.compiled = repeat, compiled
        self.allocator = allocator
        self._sizes = schedule.buffer_sizes()
        self._sources = schedule.sources()
        distinct = schedule.distinct_ops()
        by_position = np.zeros(len(schedule.ops), dtype=np.int64)
        by_position[distinct] = cost.durations_us([schedule.ops[i] for i in distinct.tolist()])
        self._durations = by_position[self._sources]
        self._stream_code = schedule.stream_codes()

    def run(self) -> EngineResult:
        """Timeline, then events in time order (persistent buffers at t=0 first), then the allocator."""
        starts, ends = self._timeline()
        events = self._events(starts, ends)
        allocated, reserved, oom, repeated, largest = self._drive_allocator(events)
        is_free = events.signed_id < 0
        ids = np.where(is_free, ~events.signed_id, events.signed_id)
        categories = self.schedule.buffer_categories()
        trace = Trace(events.time_us, events.op_index, ids, np.where(is_free, -events.size_bytes, events.size_bytes),
                      categories[ids], allocated, reserved)
        busy_by_code = np.bincount(self._stream_code, weights=self._durations, minlength=len(STREAMS))
        busy = {stream: int(busy_by_code[code]) for code, stream in enumerate(STREAMS)
                if (self._stream_code == code).any()}
        end = max(ends) if ends else 0
        return EngineResult(trace, starts, ends, end, oom, busy, repeated, largest)

    def _timeline(self) -> tuple[list[int], list[int]]:
        """Start and end (µs) of every op: in issue order, an op starts at the later of its stream's previous end
        and the ends of the ops it depends on (deps: relative offsets to earlier ops). A repeated span that meets
        the state its previous instance met on entry (the ready times of its streams and the ends of the earlier
        ops it waits for, relative to each other) runs as that instance did, shifted in time."""
        ops, codes, durations = self.schedule.ops, self._stream_code.tolist(), self._durations.tolist()
        starts = [0] * len(ops)
        ends = [0] * len(ops)
        ready = [0] * len(STREAMS)
        runs = {first: (source, count) for first, source, count in self._repeated_runs()}
        templates = {key: self._template_entry(*key, codes) for key in set(runs.values())}
        latest = {}  # template -> (first op, ready times there) of its latest instance (itself at first)
        template_at = {}  # a template's first op -> the templates starting there
        for key in templates:
            template_at.setdefault(key[0], []).append(key)
        cuts = sorted({p for first, (template, count) in runs.items() for p in (first, first + count, template)}
                      | {len(ops)})  # the timeline goes op by op between cuts, or copies a whole repeated span
        position = 0
        for cut in cuts:
            if position in runs:  # a repeated span [position, cut)
                key = runs[position]
                outside, last = templates[key]
                previous, previous_ready = latest[key]
                latest[key] = (position, ready.copy())
                shift = _shift(ready, previous_ready, ends, position, previous, last, outside)
                if shift is not None:
                    starts[position:cut] = [t + shift for t in starts[previous:previous + cut - position]]
                    ends[position:cut] = [t + shift for t in ends[previous:previous + cut - position]]
                    for code, offset in last:
                        ready[code] = ends[position + offset]
                    position = cut
                    continue
            for key in template_at.get(position, ()):
                latest[key] = (position, ready.copy())
            for index in range(position, cut):
                op = ops[index]
                code = codes[index]
                start = ready[code]
                if op.deps:
                    for d in op.deps:
                        dep_end = ends[index + d]
                        if dep_end > start:
                            start = dep_end
                starts[index] = start
                ready[code] = ends[index] = start + durations[index]
            position = cut
        return starts, ends

    def _repeated_runs(self) -> list[tuple[int, int, int]]:
        """(first op, its template's first op, count) of every span of ops that repeats earlier ones."""
        sources = self._sources
        n = len(sources)
        repeated = sources != np.arange(n)
        follows = np.zeros(n, dtype=bool)  # repeats the op after the one the op before it repeats
        follows[1:] = repeated[1:] & repeated[:-1] & (sources[1:] == sources[:-1] + 1)
        firsts = np.flatnonzero(repeated & ~follows)
        breaks = np.append(np.flatnonzero(~follows), n)
        ends = breaks[np.searchsorted(breaks, firsts, side="right")]
        return [(first, int(sources[first]), end - first) for first, end in zip(firsts.tolist(), ends.tolist())]

    def _template_entry(self, source: int, count: int, codes: list[int]
                        ) -> tuple[list[int], list[tuple[int, int]]]:
        """What the timeline of ops[source:source+count] depends on: the offsets (from its start, negative) of the
        earlier ops it waits for, and its streams with the offset of its last op on each."""
        ops = self.schedule.ops
        last = {codes[source + i]: i for i in range(count)}
        outside = sorted({i + d for i in range(count) for d in ops[source + i].deps if i + d < 0})
        return outside, sorted(last.items())

    def _events(self, starts: list[int], ends: list[int]) -> _Events:
        """Allocations at each op's start and frees at its end, stably sorted by time: at equal times events
        keep issue order (an op's allocations before its frees, an earlier op's events first). The ids of each
        distinct op are flattened once and gathered for every op that repeats it."""
        ops, persistent, sources = self.schedule.ops, self.schedule.persistent, self._sources
        distinct = self.schedule.distinct_ops()
        distinct_ops = [ops[p] for p in distinct.tolist()]
        # per distinct op: its allocations, then its frees
        halves_ids = list(chain.from_iterable(map(attrgetter("allocs", "frees"), distinct_ops)))
        flat = np.fromiter(chain.from_iterable(halves_ids), dtype=np.int64)
        halves = np.fromiter(map(len, halves_ids), dtype=np.int64, count=len(halves_ids))
        flat_free = np.repeat(np.tile(np.array([False, True]), len(distinct_ops)), halves)
        count = np.zeros(len(ops), dtype=np.int64)
        count[distinct] = halves[0::2] + halves[1::2]
        offset = np.zeros(len(ops), dtype=np.int64)
        offset[distinct] = np.cumsum(count[distinct]) - count[distinct]
        lengths = count[sources]
        total = int(lengths.sum())
        first = np.cumsum(lengths) - lengths  # each op's first event among all
        gather = np.repeat(offset[sources] - first, lengths) + np.arange(total, dtype=np.int64)
        op_index = np.repeat(np.arange(len(ops), dtype=np.int64), lengths)
        raw = flat[gather] if total else np.zeros(0, dtype=np.int64)
        is_free = flat_free[gather] if total else np.zeros(0, dtype=bool)
        self._move_replica_ids(raw, op_index, is_free)
        times = np.where(is_free, np.asarray(ends, dtype=np.int64)[op_index],
                         np.asarray(starts, dtype=np.int64)[op_index]) if total else np.zeros(0, dtype=np.int64)
        n_persistent = len(persistent)
        times = np.concatenate([np.zeros(n_persistent, dtype=np.int64), times])
        op_index = np.concatenate([np.full(n_persistent, -1, dtype=np.int64), op_index])
        raw = np.concatenate([np.asarray(persistent, dtype=np.int64), raw])
        is_free = np.concatenate([np.zeros(n_persistent, dtype=bool), is_free])
        order = np.argsort(times, kind="stable")
        raw, op_index, is_free = raw[order], op_index[order], is_free[order]
        sizes = self._sizes[raw]
        codes = np.append(self._stream_code, STREAMS.index(Stream.COMPUTE))[op_index]  # -1: persistent
        return _Events(times[order], op_index, np.where(is_free, ~raw, raw), sizes, codes)

    def _move_replica_ids(self, ids: np.ndarray, op_index: np.ndarray, is_free: np.ndarray) -> None:
        """Ops of a periodic repetition carry the template's buffer ids; move them (ReplicaSpan) in place: every
        allocation and every free inside [low, high) by the shift, other frees through the entry map."""
        for first_op, end_op, span in self.schedule.moved_spans:
            lo, hi = np.searchsorted(op_index, [first_op, end_op])  # events are still in op order here
            moved = ids[lo:hi]
            inside = (~is_free[lo:hi]) | ((moved >= span.low) & (moved < span.high))
            moved[inside] += span.shift
            outside = np.nonzero(~inside)[0]
            moved[outside] = [span.entry[b] for b in moved[outside].tolist()]

    def _drive_allocator(self, events: _Events) -> tuple[np.ndarray, np.ndarray, OomEvent | None, int, int | None]:
        """allocated and reserved bytes after each event, the first OOM, how many events were repeated, and the
        largest free block at the first event with the most reserved (None without a cache)."""
        allocator = self.allocator
        if hasattr(allocator, "replay"):  # the exact count: one vectorised pass
            allocated, exc, at = allocator.replay(np.where(events.signed_id < 0, -events.size_bytes,
                                                           events.size_bytes))
            oom = None if exc is None else OomEvent(int(events.time_us[at]), int(events.op_index[at]),
                                                    exc.requested_bytes, str(exc))
            return allocated, allocated.copy(), oom, 0, None
        if self.compiled and isinstance(allocator, CachingAllocator) and allocator.can_replay_compiled():
            allocated, reserved, at, largest = allocator.replay_compiled(events.signed_id, events.size_bytes,
                                                                         events.stream_code)
            oom = None if at is None else OomEvent(int(events.time_us[at]), int(events.op_index[at]),
                                                   allocator.ooms[0].requested_bytes, allocator.ooms[0].message)
            return allocated, reserved, oom, 0, largest
        return _StepwiseDriver(allocator, events, self.schedule, self.repeat).run()


class _StepwiseDriver:
    """Calls malloc/free event by event. A run repeats itself: micro-batches after the first few issue the same
    events as the one before. Where a window of events (one micro-batch's ops) is the same as the last window run
    event by event, at the same relative positions, and the allocator starts it in the same state up to buffer
    names and synthetic addresses, the allocator would do exactly what it did then; its results are copied and
    its state renamed instead (tests/test_engine.py checks both ways give the same trace and statistics)."""

    def __init__(self, allocator, events: _Events, schedule: Schedule, repeat: bool) -> None:
        self.allocator, self.events, self.repeat = allocator, events, repeat
        self.n = n = len(events.signed_id)
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
        self.windows = self._windows(schedule)
        # the most reserved so far and the largest free block then: a repeated window never passes the maximum
        # (its values are those of its reference), so the peak is always seen stepwise
        self.most_reserved, self.largest_at_peak = -1, None

    def _windows(self, schedule: Schedule) -> list[tuple[int, int]]:
        """[start, end) event ranges, one per repetition window of the schedule (Schedule.window_first_ops; the
        persistent buffers one of their own): from the first event of its ops to the first of the next."""
        first_ops = schedule.window_first_ops()
        if not len(first_ops) or not self.n:
            return [(0, self.n)]
        window = np.searchsorted(first_ops, self.events.op_index, side="right")  # 0: persistent buffers (op -1)
        first = np.full(len(first_ops) + 1, self.n, dtype=np.int64)  # each window's first event
        np.minimum.at(first, window, np.arange(self.n, dtype=np.int64))
        bounds = sorted(set(first[first < self.n].tolist()) | {0, self.n})
        return list(zip(bounds, bounds[1:]))

    def run(self) -> tuple[np.ndarray, np.ndarray, OomEvent | None, int, int | None]:
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
        return (np.asarray(allocated, dtype=np.int64), np.asarray(reserved, dtype=np.int64), oom, repeated,
                self.largest_at_peak)

    def _step(self, start: int, end: int, allocated: list[int], reserved: list[int]) -> OomEvent | None:
        events, allocator = self.events, self.allocator
        malloc, free = allocator.malloc, allocator.free
        signed = events.signed_id[start:end].tolist()
        sizes = events.size_bytes[start:end].tolist()
        streams = [STREAMS[c] for c in events.stream_code[start:end].tolist()]
        oom = None
        most = self.most_reserved
        at = start
        for buffer_id, size, stream in zip(signed, sizes, streams):
            if buffer_id >= 0:
                try:
                    malloc(buffer_id, size, stream)
                except OutOfMemory as exc:
                    oom = oom or OomEvent(int(events.time_us[at]), int(events.op_index[at]), exc.requested_bytes,
                                          str(exc))
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

    def _owner_keys(self, start: int, end: int) -> dict[int, int]:
        """How a live buffer is named relative to the window [start, end): by the position of its free inside
        the window (>= 0), else by itself (~id: it outlives the window untouched)."""
        live, allocations = self._live_allocations(start)
        frees = self.partner[allocations].tolist()
        return {b: (free - start if free < end else ~b) for b, free in zip(live, frees)}

    def _signature(self, start: int, end: int) -> tuple:
        return self.allocator.state_signature(self._owner_keys(start, end))

    def _same_window(self, reference: tuple, start: int, end: int, signature: tuple) -> bool:
        """Whether [start, end) issues the reference window's events at the same relative positions (sizes,
        streams, allocations vs frees, and which buffer each free releases) from an identical state."""
        ref_start, ref_end, ref_signature, _, _ = reference
        if end - start != ref_end - ref_start or signature != ref_signature:
            return False
        events = self.events
        here, there = slice(start, end), slice(ref_start, ref_end)
        if not (np.array_equal(events.size_bytes[here], events.size_bytes[there])
                and np.array_equal(events.stream_code[here], events.stream_code[there])):
            return False
        signed_here, signed_there = events.signed_id[here], events.signed_id[there]
        if not np.array_equal(signed_here < 0, signed_there < 0):
            return False
        return np.array_equal(self._free_names(signed_here, start), self._free_names(signed_there, ref_start))

    def _free_names(self, signed: np.ndarray, start: int) -> np.ndarray:
        """Per free in a window: the freed buffer's allocation position relative to the window when it was
        allocated inside it, else -1 (a buffer live at the window's start: the state signature names it)."""
        frees = start + np.nonzero(signed < 0)[0]
        relative = self.partner[frees] - start
        return np.where(relative >= 0, relative, -1)

    def _rename_live(self, start: int, length: int) -> None:
        """Skipping [start, start + length): buffers the window before it (the reference or a repetition of it, of
        the same length) allocated and left alive become the ones allocated at the same relative positions of the
        skipped window; buffers older than that outlive both windows unchanged (the signature checked that)."""
        signed = self.events.signed_id
        live, allocations = self._live_allocations(start)
        renames = {b: int(signed[p + length]) for b, p in zip(live, allocations.tolist()) if start - length <= p < start}
        self.allocator.rename_live(renames)


def _shift(ready: list[int], earlier_ready: list[int], ends: list[int], position: int, earlier: int,
           streams: list[tuple[int, int]], outside: list[int]) -> int | None:
    """How much later a span starting at `position` runs than the same ops did at `earlier`, or None if the two
    met different states on entry (see Engine._timeline). `streams`: (code, _) of the streams the span runs on."""
    anchor = streams[0][0]
    here, there = ready[anchor], earlier_ready[anchor]
    for code, _ in streams:
        if ready[code] - here != earlier_ready[code] - there:
            return None
    for offset in outside:
        if ends[position + offset] - here != ends[earlier + offset] - there:
            return None
    return here - there
