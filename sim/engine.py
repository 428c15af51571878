"""The engine: the host issues ops in program order, streams run their kernels in order, cross-stream dependencies
delay the ops that wait on them, and the allocator sees every allocation (when the host issues an op) and free (when
the host is done with it) in program order, a block freed after use on another stream returning to the cache only
once that stream has passed it.

It knows ops, streams and bytes; nothing about models, frameworks, steps or micro-batches. Nothing waits for memory
(an OOM is recorded and the run goes on), so the clock does not depend on the allocator: the engine lays out the
timeline (sim/timeline.py), orders the allocator events (sim/event_order.py), then drives the allocator through
them along the path its capabilities allow (sim/drivers.py). An allocator that keeps an event log has its entries
placed in time afterwards, each at its event's time.
"""

from dataclasses import dataclass

import numpy as np

from sim.allocator.base import Allocator
from sim.cost import CostModel
from sim.drivers import AllocatorDriver, AllocatorRun, CompiledReplay, OomEvent, StepwiseDriver, VectorisedReplay
from sim.errors import MAX_CLOCK_US, ClockOverflow
from sim.event_order import AllocatorEvents, order_events
from sim.ops import STREAMS, Schedule, Stream
from sim.des import SimpyTimeline, links_overlap
from sim.timeline import HostModel, ListTimeline, OpTimes, Timeline
from sim.trace import Trace


@dataclass(frozen=True, slots=True)
class EngineResult:
    """What a run gives: the trace (on the host's clock), every op's times, the first OOM and how busy each stream
    was."""

    trace: Trace
    op_issue_us: list[int]  # when the host issues each op (its allocations)
    op_launch_us: list[int]  # when the host is done with it (its frees; its kernel launched)
    op_start_us: list[int]  # when each op's kernel starts on its stream
    op_end_us: list[int]  # when it ends
    end_time_us: int
    oom: OomEvent | None
    busy_us: dict[Stream, int]
    release_at: np.ndarray  # per trace row: AllocatorEvents.release_at
    stream_code: np.ndarray  # per trace row: AllocatorEvents.stream_code
    shared_link: bool = False  # transfers overlapped on a link: the simpy timeline laid the run out
    repeated_events: int = 0  # events whose allocator results were repeated from an identical earlier window
    largest_free_block_at_peak_bytes: int | None = None  # the caching allocator's largest cached free block there


class Engine:
    """One rank's schedule run against one allocator: timeline, event order, allocator driver, trace."""

    def __init__(self, schedule: Schedule, allocator: Allocator, cost: CostModel, repeat: bool = True,
                 compiled: bool = True, timeline: Timeline | None = None, host: HostModel | None = None) -> None:
        """`repeat=False`: call the allocator for every event even where a window repeats; `compiled=False`: run
        the caching allocator's Python model even where its compiled core applies (both for checking);
        `timeline`: what lays out op times (default: the recurrence, ListTimeline, unless collectives overlap
        there, when they share the link: the simpy timeline, sim/des.py); `host`: the host's costs and queue depth
        (default: the cost model's)."""
        self.schedule = schedule
        self.repeat, self.compiled = repeat, compiled
        self.allocator = allocator
        self.timeline = timeline
        distinct = schedule.distinct_ops()
        by_position = np.zeros(len(schedule.ops), dtype=np.int64)
        by_position[distinct] = cost.durations_us([schedule.ops[i] for i in distinct.tolist()])
        self._durations = by_position[schedule.sources()]
        if host is None:
            by_position[distinct] = cost.host_us([schedule.ops[i] for i in distinct.tolist()])
            host = HostModel(by_position[schedule.sources()], cost.queue_depth)
        self.host = host
        total_us = float(self._durations.sum(dtype=np.float64))
        if total_us > MAX_CLOCK_US:
            raise ClockOverflow(f"the run's ops would run for {total_us / 1e6:.3e} s in all, more than the 2^62 µs "
                                "the simulated clock counts")

    def run(self) -> EngineResult:
        """Timeline, then events in time order (persistent buffers at t=0 first), then the allocator; its event
        log, if it keeps one (every path calls it, or its core, once per event), placed in the events' times."""
        times, shared = self._times()
        starts, ends = times.start_us, times.end_us
        events = order_events(self.schedule, times)
        driven = self.replay(self.allocator, events)
        if self.allocator.event_log is not None:
            self.allocator.event_log.place_in_time(events.time_us)
        is_free = events.signed_id < 0
        ids = np.where(is_free, ~events.signed_id, events.signed_id)
        categories = self.schedule.buffer_categories()
        trace = Trace(events.time_us, events.op_index, ids, np.where(is_free, -events.size_bytes, events.size_bytes),
                      categories[ids], driven.allocated_bytes, driven.reserved_bytes)
        stream_code = self.schedule.stream_codes()
        ran_us = np.asarray(ends, dtype=np.int64) - np.asarray(starts, dtype=np.int64)  # a shared link stretches
        busy_by_code = np.bincount(stream_code, weights=ran_us, minlength=len(STREAMS))
        busy = {stream: int(busy_by_code[code]) for code, stream in enumerate(STREAMS) if (stream_code == code).any()}
        end = max(ends) if ends else 0
        return EngineResult(trace, times.issue_us, times.launch_us, starts, ends, end, driven.oom, busy,
                            events.release_at, events.stream_code, shared, driven.repeated_events,
                            driven.largest_free_block_at_peak_bytes)

    def _times(self) -> tuple[OpTimes, bool]:
        """Every op's times, and whether transfers share a link in them: the given timeline's, else the
        recurrence's where no two transfers on one link overlap in it (sharing would change nothing), else
        simpy's."""
        if self.timeline is not None:
            return self.timeline.op_times(self.schedule, self._durations, self.host), False
        times = ListTimeline().op_times(self.schedule, self._durations, self.host)
        if not links_overlap(self.schedule, times):
            return times, False
        return SimpyTimeline().op_times(self.schedule, self._durations, self.host), True

    def replay(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorRun:
        """Drive `allocator` through `events` (this schedule's, or their head) along the fastest path it allows."""
        return self._driver(allocator, events).drive(allocator, events)

    def _driver(self, allocator: Allocator, events: AllocatorEvents) -> AllocatorDriver:
        """The fastest path the allocator declares it can take: a vectorised pass, its compiled core (unless
        `compiled=False`; pending frees included), else event by event in the schedule's repetition windows
        (mapped here from the ops where each window begins to the events where it does)."""
        if allocator.can_replay_vectorised():
            return VectorisedReplay()
        if self.compiled and allocator.can_replay_compiled():
            return CompiledReplay()
        return StepwiseDriver(events.windows(self.schedule.window_first_ops()), self.repeat)
