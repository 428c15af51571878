"""The event-order rule: in which order the allocator sees a run's allocations and frees.

The caching allocator is called from the host thread, so it sees events in program order: persistent buffers first,
at t=0, then each op's allocations when the host issues it and its frees when the host is done with it
(sim/timeline.py), op after op. A free is immediate for the allocator's statistics, but the block of a tensor
record_stream'ed on another stream than its own (DeepSpeed's gathered parameters and the gradients it copies on its
reduce stream) only returns to the cache once that stream has passed the free: free() records an event there
(insert_events) and the allocator checks its events at the start of each malloc (process_events,
c10/cuda/CUDACachingAllocator.cpp), so the block is reusable from the first malloc issued after the latest op on
that stream at the free has ended. Such a free is *pending* where a malloc comes between it and that point;
elsewhere it is the same as an immediate one.
"""

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from sim.ops import STREAMS, Schedule, Stream
from sim.timeline import OpTimes


@dataclass(frozen=True, slots=True)
class AllocatorEvents:
    """Every allocator event of a run in the order it happens (columns; row = event)."""

    time_us: np.ndarray
    op_index: np.ndarray  # -1: a persistent buffer, allocated before the first op
    signed_id: np.ndarray  # buffer id for an allocation, ~id for a free
    size_bytes: np.ndarray
    # index into STREAMS: a malloc's and a free's op's allocation stream (Op.alloc_stream, else its own), or the one a
    # pending free waits on
    stream_code: np.ndarray
    # per event: for a pending free (module docstring), the index of the malloc at whose start its block returns to
    # the cache (len(self): not within the run); -1 for every other event
    release_at: np.ndarray

    def __len__(self) -> int:
        """The number of events."""
        return len(self.signed_id)

    def head(self, count: int) -> "AllocatorEvents":
        """The first `count` events."""
        return AllocatorEvents(self.time_us[:count], self.op_index[:count], self.signed_id[:count],
                               self.size_bytes[:count], self.stream_code[:count], self.release_at[:count])

    def releases(self) -> dict[int, list[int]]:
        """Malloc event index -> the buffer ids whose pending blocks return to the cache at its start, in the order
        they were freed."""
        pending = np.flatnonzero(self.release_at >= 0)
        released: dict[int, list[int]] = {}
        for free, at in zip(pending.tolist(), self.release_at[pending].tolist()):
            released.setdefault(at, []).append(~int(self.signed_id[free]))
        return released

    def windows(self, first_ops: np.ndarray) -> list[tuple[int, int]]:
        """[start, end) event ranges of the op windows that begin at `first_ops` (ascending op indices; the
        persistent buffers form a window of their own before them): from the first event of a window's ops to the
        first event of the next window's. Without first ops (or events) the whole run is one window."""
        n = len(self)
        if not len(first_ops) or not n:
            return [(0, n)]
        window = np.searchsorted(first_ops, self.op_index, side="right")  # 0: the persistent buffers (op -1)
        first = np.full(len(first_ops) + 1, n, dtype=np.int64)  # each window's first event
        np.minimum.at(first, window, np.arange(n, dtype=np.int64))
        bounds = sorted(set(first[first < n].tolist()) | {0, n})
        return list(zip(bounds, bounds[1:]))


def order_events(schedule: Schedule, times: OpTimes) -> AllocatorEvents:
    """Every allocation and free of the schedule in the order the allocator sees it (module docstring), given every
    op's times. The ids of each distinct op are flattened once and gathered for every op that repeats it, then
    moved where the schedule gives a repetition fresh ids."""
    ops, persistent, sources = schedule.ops, schedule.persistent, schedule.sources()
    distinct = schedule.distinct_ops()
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
    _move_replica_ids(schedule, raw, op_index, is_free)
    event_times = np.where(is_free, np.asarray(times.launch_us, dtype=np.int64)[op_index],
                           np.asarray(times.issue_us, dtype=np.int64)[op_index]) if total else \
        np.zeros(0, dtype=np.int64)
    n_persistent = len(persistent)
    event_times = np.concatenate([np.zeros(n_persistent, dtype=np.int64), event_times])
    op_index = np.concatenate([np.full(n_persistent, -1, dtype=np.int64), op_index])
    raw = np.concatenate([np.asarray(persistent, dtype=np.int64), raw])
    is_free = np.concatenate([np.zeros(n_persistent, dtype=bool), is_free])
    sizes = schedule.buffer_sizes()[raw]
    # a malloc's pool: the stream its op allocates on (a collective's caller's, not ProcessGroupNCCL's)
    codes = np.append(schedule.alloc_stream_codes(), STREAMS.index(Stream.COMPUTE))[op_index]  # -1: persistent
    release_at = _pending_releases(schedule, raw, is_free, codes, op_index, event_times,
                                   np.asarray(times.end_us, dtype=np.int64))
    return AllocatorEvents(event_times, op_index, np.where(is_free, ~raw, raw), sizes, codes, release_at)


def _pending_releases(schedule: Schedule, ids: np.ndarray, is_free: np.ndarray, codes: np.ndarray,
                      op_index: np.ndarray, times: np.ndarray, ends_us: np.ndarray) -> np.ndarray:
    """release_at (AllocatorEvents) of every event, setting each pending free's stream code to the first stream it
    waits on: a free of a buffer record_stream'ed on streams other than its allocation stream waits for each of them
    to pass the latest op issued on it by then (the event CUDACachingAllocator's insert_events records there), and
    is pending where a malloc is issued before all have."""
    release_at = np.full(len(ids), -1, dtype=np.int64)
    recorded = schedule.buffer_recorded_masks()
    frees = np.flatnonzero(is_free)
    if not len(frees) or not recorded.any():
        return release_at
    allocated_on = np.zeros(len(recorded), dtype=np.int64)
    allocated_on[ids[~is_free]] = codes[~is_free]  # a buffer allocated again is allocated on the same stream
    waits_on = recorded[ids[frees]] & ~(1 << allocated_on[ids[frees]])
    frees, waits_on = frees[waits_on != 0], waits_on[waits_on != 0]
    if not len(frees):
        return release_at
    op_codes = schedule.stream_codes()
    positions = np.arange(len(op_codes), dtype=np.int64)
    ready_us = np.full(len(frees), -1, dtype=np.int64)
    for code in range(len(STREAMS)):
        on_stream = (waits_on >> code) & 1 == 1
        if on_stream.any():
            latest = np.maximum.accumulate(np.where(op_codes == code, positions, -1))[op_index[frees[on_stream]]]
            passed = np.where(latest >= 0, ends_us[np.maximum(latest, 0)], -1)
            ready_us[on_stream] = np.maximum(ready_us[on_stream], passed)
    mallocs = np.flatnonzero(~is_free)
    next_malloc = np.searchsorted(mallocs, frees, side="right")  # the first malloc after each free
    released = np.maximum(next_malloc, np.searchsorted(times[mallocs], ready_us, side="left"))
    # the allocator holds pending blocks by buffer id: one allocated again while its last block is pending (which no
    # modelled workload does: a repeated span's buffers get fresh ids) has that block returned at that malloc
    again = _next_allocation_of(ids, is_free, frees)
    released = np.minimum(released, np.searchsorted(mallocs, again))
    pending = released > next_malloc
    release_at[frees[pending]] = np.append(mallocs, len(ids))[released[pending]]
    lowest = waits_on & -waits_on  # a pending free's event names the first stream it waits on
    codes[frees[pending]] = np.log2(lowest[pending]).astype(np.int64)
    return release_at


def _next_allocation_of(ids: np.ndarray, is_free: np.ndarray, frees: np.ndarray) -> np.ndarray:
    """Per free (event index), the index of its buffer's next allocation (len(ids): none)."""
    order = np.lexsort((np.arange(len(ids)), ids))  # by buffer, then position
    following = np.full(len(ids), len(ids), dtype=np.int64)
    same = ids[order][1:] == ids[order][:-1]
    following[order[:-1][same]] = order[1:][same]  # each event's next event of the same buffer
    nxt = following[frees]
    found = nxt < len(ids)
    return np.where(found & ~is_free[np.minimum(nxt, len(ids) - 1)], nxt, len(ids))


def _move_replica_ids(schedule: Schedule, ids: np.ndarray, op_index: np.ndarray, is_free: np.ndarray) -> None:
    """Ops of a periodic repetition carry the template's buffer ids; move them in place (ReplicaSpan.final_ids,
    vectorised): every allocation and every free inside [low, high) by the shift, other frees through the entry
    map."""
    for first_op, end_op, span in schedule.moved_spans:
        lo, hi = np.searchsorted(op_index, [first_op, end_op])  # events are still in op order here
        moved = ids[lo:hi]
        inside = (~is_free[lo:hi]) | ((moved >= span.low) & (moved < span.high))
        moved[inside] += span.shift
        outside = np.nonzero(~inside)[0]
        moved[outside] = [span.entry[b] for b in moved[outside].tolist()]
