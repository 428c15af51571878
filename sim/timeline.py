"""When each op runs: when the host issues it (its allocations happen then, as the caching allocator is called from
the host thread) and when its kernel runs on its stream (µs). Nothing waits for memory, so the timeline does not
depend on the allocator and is laid out first.

The host thread issues ops in program order. Issuing op i takes `host_us[i]` (Python, dispatch and launch); the
kernel is launched at the end of that and runs once its stream is free and every op it depends on has ended. The
host blocks only where the real code blocks: before op i it waits for the ops named in `op.host_waits` to end (an
event synchronize), and for op i-1-queue_depth to end (the launch queue is full; 0: a synchronous device, where the
host is the device). Every op frees what it frees when the host has issued it (the end of its host time).

`Timeline` is the seam: the engine calls `op_times` and nothing else. `ListTimeline` computes it by a recurrence;
sim/des.py has the same semantics as simpy processes (host, streams, shared links) and is checked against it.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.ops import STREAMS, Schedule

HOST = len(STREAMS)  # the host thread's slot after the streams' in a timeline's ready times


@dataclass(frozen=True, slots=True)
class HostModel:
    """What the host thread spends on each op and how far it may run ahead of the device."""

    host_us: np.ndarray  # int64 per op: Python, dispatch and launch time on the host thread
    queue_depth: int | None  # ops that may be issued and unfinished before the host blocks (None: unbounded)


@dataclass(frozen=True, slots=True)
class OpTimes:
    """Every op's times (µs): host issue (its allocations), host done (its frees; its kernel launched), and its
    kernel's start and end on its stream."""

    issue_us: list[int]
    launch_us: list[int]
    start_us: list[int]
    end_us: list[int]


class Timeline(Protocol):
    """Lays out a schedule's ops in time: what the engine needs before it can order allocator events."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray, host: HostModel) -> OpTimes:
        """Every op's host and device times, given every op's duration and the host's costs (module docstring)."""


class ListTimeline:
    """The recurrence: ops in issue order, each issued when the host is free and done waiting, its kernel at the
    later of its launch, its stream's previous end and its dependencies' ends. A repeated span
    (Schedule.repeated_runs) that meets the state its previous instance met on entry (the host's and its streams'
    ready times and the ends of the earlier ops it waits for, relative to each other) runs as that instance did,
    shifted in time: most of a run's ops are copied, not scheduled."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray, host: HostModel) -> OpTimes:
        """Every op's times (see Timeline.op_times)."""
        ops, codes, durations = schedule.ops, schedule.stream_codes().tolist(), durations_us.tolist()
        host_us, depth = host.host_us.tolist(), host.queue_depth
        issues, launches = [0] * len(ops), [0] * len(ops)
        starts = [0] * len(ops)
        ends = [0] * len(ops)
        ready = [0] * (len(STREAMS) + 1)  # each stream's, then the host's (HOST)
        runs = {first: (source, count) for first, source, count in schedule.repeated_runs()}
        templates = {key: _template_entry(schedule, *key, codes, depth) for key in set(runs.values())}
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
                    span = cut - position
                    for column in (issues, launches, starts, ends):
                        column[position:cut] = [t + shift for t in column[previous:previous + span]]
                    for code, offset in last:
                        ready[code] = launches[position + offset] if code == HOST else ends[position + offset]
                    position = cut
                    continue
            for key in template_at.get(position, ()):
                latest[key] = (position, ready.copy())
            at = ready[HOST]
            for index in range(position, cut):
                op = ops[index]
                if op.host_waits:
                    for d in op.host_waits:
                        if ends[index + d] > at:
                            at = ends[index + d]
                if depth is not None and index > depth and ends[index - 1 - depth] > at:
                    at = ends[index - 1 - depth]
                issues[index] = at
                at += host_us[index]
                launches[index] = at
                code = codes[index]
                start = ready[code] if ready[code] > at else at
                if op.deps:
                    for d in op.deps:
                        dep_end = ends[index + d]
                        if dep_end > start:
                            start = dep_end
                starts[index] = start
                ready[code] = ends[index] = start + durations[index]
            ready[HOST] = at
            position = cut
        return OpTimes(issues, launches, starts, ends)


def _template_entry(schedule: Schedule, source: int, count: int, codes: list[int], depth: int | None
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """What the timeline of ops[source:source+count] depends on: the offsets (from its start, negative) of the
    earlier ops it waits for (dependencies, host waits and the launch queue), and the streams and host it runs on
    with the offset of its last op on each."""
    ops = schedule.ops
    last = {codes[source + i]: i for i in range(count)}
    last[HOST] = count - 1
    waits = {i + d for i in range(count) for d in (*ops[source + i].deps, *ops[source + i].host_waits)}
    if depth is not None:  # only the first depth + 1 ops reach before the span
        waits |= {i - 1 - depth for i in range(min(count, depth + 1))}
    outside = sorted(w for w in waits if w < 0)
    return outside, sorted(last.items())


def _shift(ready: list[int], earlier_ready: list[int], ends: list[int], position: int, earlier: int,
           streams: list[tuple[int, int]], outside: list[int]) -> int | None:
    """How much later a span starting at `position` runs than the same ops did at `earlier`, or None if the two
    met different states on entry (see ListTimeline). `streams`: (code, _) of the streams (and HOST) the span runs
    on."""
    anchor = streams[0][0]
    here, there = ready[anchor], earlier_ready[anchor]
    for code, _ in streams:
        if ready[code] - here != earlier_ready[code] - there:
            return None
    for offset in outside:
        if position + offset < 0:  # neither instance has such an op to wait for (the launch queue's first ops)
            continue
        if earlier + offset < 0:  # only this one has
            return None
        if ends[position + offset] - here != ends[earlier + offset] - there:
            return None
    return here - there
