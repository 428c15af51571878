"""When each op runs: the start and end (µs) of every op of a schedule, from its stream, its dependencies and its
duration. Nothing waits for memory, so the timeline does not depend on the allocator and is laid out first.

`Timeline` is the seam: the engine calls `op_times` and nothing else, so a discrete-event implementation (one simpy
process per stream, a completion event per op; tests/test_engine.py has one) plugs in behind it and is checked
against `ListTimeline`, the list scheduler the engine uses.
"""

from typing import Protocol

import numpy as np

from sim.ops import STREAMS, Schedule


class Timeline(Protocol):
    """Lays out a schedule's ops in time: what the engine needs before it can order allocator events."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray) -> tuple[list[int], list[int]]:
        """Start and end (µs) of every op, given every op's duration: an op starts when the previous op of its
        stream and every op it depends on (deps: relative offsets to earlier ops) have ended."""


class ListTimeline:
    """The list scheduler: ops in issue order, each at the later of its stream's previous end and its
    dependencies' ends. A repeated span (Schedule.repeated_runs) that meets the state its previous instance met on
    entry (the ready times of its streams and the ends of the earlier ops it waits for, relative to each other)
    runs as that instance did, shifted in time: most of a run's ops are copied, not scheduled."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray) -> tuple[list[int], list[int]]:
        """Start and end (µs) of every op (see Timeline.op_times)."""
        ops, codes, durations = schedule.ops, schedule.stream_codes().tolist(), durations_us.tolist()
        starts = [0] * len(ops)
        ends = [0] * len(ops)
        ready = [0] * len(STREAMS)
        runs = {first: (source, count) for first, source, count in schedule.repeated_runs()}
        templates = {key: _template_entry(schedule, *key, codes) for key in set(runs.values())}
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


def _template_entry(schedule: Schedule, source: int, count: int, codes: list[int]
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """What the timeline of ops[source:source+count] depends on: the offsets (from its start, negative) of the
    earlier ops it waits for, and its streams with the offset of its last op on each."""
    ops = schedule.ops
    last = {codes[source + i]: i for i in range(count)}
    outside = sorted({i + d for i in range(count) for d in ops[source + i].deps if i + d < 0})
    return outside, sorted(last.items())


def _shift(ready: list[int], earlier_ready: list[int], ends: list[int], position: int, earlier: int,
           streams: list[tuple[int, int]], outside: list[int]) -> int | None:
    """How much later a span starting at `position` runs than the same ops did at `earlier`, or None if the two
    met different states on entry (see ListTimeline). `streams`: (code, _) of the streams the span runs on."""
    anchor = streams[0][0]
    here, there = ready[anchor], earlier_ready[anchor]
    for code, _ in streams:
        if ready[code] - here != earlier_ready[code] - there:
            return None
    for offset in outside:
        if ends[position + offset] - here != ends[earlier + offset] - there:
            return None
    return here - there
