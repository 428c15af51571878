"""The event-order rule: in which order the allocator sees a run's allocations and frees.

Persistent buffers are allocated first, at t=0; each op allocates at its start and frees at its end; events are
stably sorted by time, so at equal times they keep issue order (an op's allocations before its frees, an earlier
op's events first).
"""

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from sim.ops import STREAMS, Schedule, Stream


@dataclass(frozen=True, slots=True)
class AllocatorEvents:
    """Every allocator event of a run in the order it happens (columns; row = event)."""

    time_us: np.ndarray
    op_index: np.ndarray  # -1: a persistent buffer, allocated before the first op
    signed_id: np.ndarray  # buffer id for an allocation, ~id for a free
    size_bytes: np.ndarray
    stream_code: np.ndarray  # index into STREAMS

    def __len__(self) -> int:
        """The number of events."""
        return len(self.signed_id)

    def head(self, count: int) -> "AllocatorEvents":
        """The first `count` events."""
        return AllocatorEvents(self.time_us[:count], self.op_index[:count], self.signed_id[:count],
                               self.size_bytes[:count], self.stream_code[:count])

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


def order_events(schedule: Schedule, starts_us: list[int], ends_us: list[int]) -> AllocatorEvents:
    """Every allocation and free of the schedule in the order the allocator sees it (module docstring), given
    each op's start and end. The ids of each distinct op are flattened once and gathered for every op that repeats
    it, then moved where the schedule gives a repetition fresh ids."""
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
    times = np.where(is_free, np.asarray(ends_us, dtype=np.int64)[op_index],
                     np.asarray(starts_us, dtype=np.int64)[op_index]) if total else np.zeros(0, dtype=np.int64)
    n_persistent = len(persistent)
    times = np.concatenate([np.zeros(n_persistent, dtype=np.int64), times])
    op_index = np.concatenate([np.full(n_persistent, -1, dtype=np.int64), op_index])
    raw = np.concatenate([np.asarray(persistent, dtype=np.int64), raw])
    is_free = np.concatenate([np.zeros(n_persistent, dtype=bool), is_free])
    order = np.argsort(times, kind="stable")
    raw, op_index, is_free = raw[order], op_index[order], is_free[order]
    sizes = schedule.buffer_sizes()[raw]
    codes = np.append(schedule.stream_codes(), STREAMS.index(Stream.COMPUTE))[op_index]  # -1: persistent
    return AllocatorEvents(times[order], op_index, np.where(is_free, ~raw, raw), sizes, codes)


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
