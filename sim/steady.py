"""The steady-state shortcut: once a training step leaves the allocator, the clock and the schedule as the step
before it left them, every later step repeats it exactly, so a run of N steps is simulated for its first few and
the rest are counted as repeats (issue #19).

The argument, checked on the simulated prefix whose last two steps are k-1 and k:
1. step k issues the same ops as step k-1 (names, streams, durations), each exactly Δ µs later (on the host and
   on the device), and so does every step back to step j, the oldest that step k's ops or host wait for (the launch
   queue can reach several steps back): the recurrence then lays step k+1 out Δ after step k (max-plus algebra:
   the same ops waiting on the same relative ends);
2. the allocator events of steps k-1 and k are each contiguous and the same at the same relative positions (sizes,
   streams, allocation or free, which earlier allocation each free releases: one of the same step, one of the
   step before, or the same long-lived buffer; and where each pending free's block returns, those of step k
   returning in step k+1 where step k-1's return in step k), so by 1. step k+1's events are step k's again;
3. the allocator's state when step k begins and when it ends are the same up to buffer names and synthetic
   addresses (Allocator.state_signature; buffers allocated in the step before named by their position in it):
   the allocator, a deterministic function of its state and events, then answers step k+1 as it answered step k,
   and ends it in the same state again. By induction every later step repeats step k.
The schedule builder (sim/schedule.py) runs the same code for every step after the first, from the state the step
before left, which is what makes the later steps' ops the same as step k's; tests/test_steady.py checks the
shortcut against the full simulation on every shipped scenario. An allocator whose signature does not capture its
state (expandable segments, garbage collection, an event log) never takes it; blocks pending on record_stream events
at a step's edges are in the signature, named by their buffers.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim.allocator.base import Allocator
from sim.engine import Engine, EngineResult
from sim.event_order import AllocatorEvents
from sim.ops import Schedule

FIRST_PREFIX_STEPS = 3  # steps 1 and 2 compared: step 0 differs (lazily made optimizer states, first cudaMallocs)


@dataclass(frozen=True, slots=True)
class SteadyState:
    """Steps [first_repeat, steps) of the run repeat step first_repeat - 1 exactly and were not simulated."""

    first_repeat: int  # the first step not simulated (the prefix's length)
    steps: int  # all steps of the run
    events_per_step: int  # allocator events of the repeated step
    period_us: int  # how much later each repetition runs than the step it repeats

    @property
    def repeated_steps(self) -> int:
        return self.steps - self.first_repeat


@dataclass(frozen=True, slots=True)
class StepBounds:
    """Where the prefix's last two steps lie: op index ranges and event index ranges ([start, end))."""

    ops: tuple[tuple[int, int], tuple[int, int]]
    events: tuple[tuple[int, int], tuple[int, int]]
    before_events: int  # where the step before the first of the two begins (its events), for naming


def events_of(result: EngineResult) -> AllocatorEvents:
    """The allocator events a run's trace records, as the engine ordered them."""
    trace = result.trace
    signed = np.where(trace.delta_bytes < 0, ~trace.buffer_id, trace.buffer_id)
    return AllocatorEvents(trace.time_us, trace.op_index, signed, np.abs(trace.delta_bytes), result.stream_code,
                           result.release_at)


def last_two_steps(schedule: Schedule, events: AllocatorEvents) -> StepBounds | None:
    """The op and event ranges of the prefix's last two steps, or None where they are not each contiguous in event
    order (a step's events interleaved with the next one's) or the prefix has fewer than three steps."""
    steps = np.asarray(schedule.op_step, dtype=np.int64)
    if not len(steps) or steps[-1] < 2:
        return None
    last = int(steps[-1])
    op_first = np.searchsorted(steps, [last - 2, last - 1, last])
    event_step = np.append(steps, -1)[events.op_index]  # persistent buffers: -1
    if np.any(np.diff(event_step) < 0):
        return None
    event_first = np.searchsorted(event_step, [last - 2, last - 1, last])
    n_ops, n_events = len(steps), len(events)
    return StepBounds(((int(op_first[1]), int(op_first[2])), (int(op_first[2]), n_ops)),
                      ((int(event_first[1]), int(event_first[2])), (int(event_first[2]), n_events)),
                      int(event_first[0]))


def same_timeline(schedule: Schedule, times: tuple[list[int], ...], queue_depth: int | None,
                  bounds: StepBounds) -> int | None:
    """Δ where the last step runs the ops of the step before, each Δ later (host issue and launch, kernel start
    and end: `times`), and so does every step back to the oldest one it or its host waits on (dependencies, host
    waits, the launch queue), which is not step 0 (point 1 of the module docstring); None otherwise."""
    (_, _), (c, d) = bounds.ops
    ops = schedule.ops
    earliest = min((i + dep for i in range(c, d) for dep in (*ops[i].deps, *ops[i].host_waits)), default=c)
    if queue_depth is not None:  # the launch queue: op i is issued once op i-1-depth has ended
        earliest = min(earliest, c - 1 - queue_depth)
    steps = np.asarray(schedule.op_step, dtype=np.int64)
    oldest = min(int(steps[max(earliest, 0)]), int(steps[-1]) - 1)  # at least the step before the last
    if earliest < 0 or oldest < 1:
        return None
    first = np.searchsorted(steps, np.arange(oldest, steps[-1] + 2))  # each step's first op, and the end
    codes = schedule.stream_codes()
    period = None
    for a, b, d in zip(first[:-2], first[1:-1], first[2:]):  # each step [b, d) against the one before, [a, b)
        if b - a != d - b or any(ops[a + i].name != ops[b + i].name for i in range(b - a)) or \
                not np.array_equal(codes[a:b], codes[b:d]):
            return None
        shift = int(times[0][b] - times[0][a])
        if period is not None and shift != period:
            return None
        period = shift
        for column in times:
            values = np.asarray(column[a:d], dtype=np.int64)
            if not np.all(values[b - a:] - values[:b - a] == period):
                return None
    return period


def same_events(events: AllocatorEvents, bounds: StepBounds) -> bool:
    """Whether the last two steps issue the same events at the same relative positions (point 2)."""
    (a, b), (c, d) = bounds.events
    if b - a != d - c:
        return False
    if not (np.array_equal(events.size_bytes[a:b], events.size_bytes[c:d])
            and np.array_equal(events.stream_code[a:b], events.stream_code[c:d])
            and np.array_equal(events.signed_id[a:b] < 0, events.signed_id[c:d] < 0)):
        return False
    partner = _allocation_of_frees(events)
    if not np.array_equal(_free_names(events, partner, bounds.before_events, a, b),
                          _free_names(events, partner, a, c, d)):
        return False
    # pending frees return at the same places: those of step k-1 returning in step k match those of step k
    # returning in step k+1, past the prefix (release_at == len(events)), by point 1
    earlier, later = events.release_at[a:b], events.release_at[c:d]
    expected = np.where(earlier < c, earlier + (c - a), len(events))
    return np.array_equal(np.where(earlier >= 0, expected, -1), later)


def _allocation_of_frees(events: AllocatorEvents) -> np.ndarray:
    """Per event: for a free, the position of the allocation it releases (the same buffer's latest one before it);
    -1 elsewhere. Events of one buffer alternate allocation and free, so a stable sort by buffer pairs them."""
    signed = events.signed_id
    ids = np.where(signed < 0, ~signed, signed)
    order = np.argsort(ids, kind="stable")
    partner = np.full(len(signed), -1, dtype=np.int64)
    pair = (signed[order][1:] < 0) & (ids[order][1:] == ids[order][:-1])
    partner[order[1:][pair]] = order[:-1][pair]
    return partner


def _free_names(events: AllocatorEvents, partner: np.ndarray, before: int, start: int, end: int) -> np.ndarray:
    """Each free of window [start, end) named by what it releases: ('in', offset) an allocation of the window,
    ('before', offset) one of the window [before, start) just before it, else ('old', buffer id); as int pairs."""
    frees = start + np.flatnonzero(events.signed_id[start:end] < 0)
    allocation = partner[frees]
    kind = np.where(allocation >= start, 0, np.where(allocation >= before, 1, 2))
    value = np.where(kind == 0, allocation - start, np.where(kind == 1, allocation - before,
                                                             ~events.signed_id[frees]))
    return np.stack([kind, value])


def owner_keys(allocator: Allocator, events: AllocatorEvents, start: int, end: int) -> dict[int, int]:
    """The allocator's live and pending buffers after events [0, end) named for state_signature: by the position
    of their allocation in the window [start, end) (>= 0), else by themselves (~id: older than the window)."""
    signed = events.signed_id[start:end]
    allocations = np.flatnonzero(signed >= 0)
    offset = dict(zip(signed[allocations].tolist(), allocations.tolist()))  # the latest allocation of each id wins
    return {b: offset.get(b, ~b) for b in (*allocator.live_buffer_ids(), *allocator.pending_buffer_ids())}


def steady_state(engine: Engine, result: EngineResult, allocator: Allocator, new_allocator: Callable[[], Allocator],
                 steps_total: int) -> SteadyState | None:
    """Whether the simulated prefix's last step repeats the one before in ops, times and events, from the same
    allocator state up to names (points 1-3 of the module docstring), so that the run's later steps, up to
    `steps_total`, repeat it; if so the allocator's counters (retries, cudaMallocs, OOMs) count what those steps
    add. `allocator` ran the prefix; `new_allocator` makes a fresh one of its kind (to replay the events before the
    last step and read the state that step began from)."""
    schedule = engine.schedule
    events = events_of(result)
    bounds = last_two_steps(schedule, events)
    if bounds is None or not allocator.can_repeat():
        return None
    times = (result.op_issue_us, result.op_launch_us, result.op_start_us, result.op_end_us)
    period_us = same_timeline(schedule, times, engine.host.queue_depth, bounds)
    if period_us is None or not same_events(events, bounds):
        return None
    (before, start), (_, end) = bounds.events
    entered = new_allocator()
    engine.replay(entered, events.head(start))
    if not entered.can_repeat() or (entered.state_signature(owner_keys(entered, events, before, start))
                                    != allocator.state_signature(owner_keys(allocator, events, start, end))):
        return None
    counted_before, counted_after = entered.counters(), allocator.counters()
    simulated = int(schedule.op_step[-1]) + 1
    repeated = SteadyState(simulated, steps_total, end - start, period_us)
    allocator.add_counters(counted_before, counted_after, repeated.repeated_steps)
    return repeated
