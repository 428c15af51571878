"""The discrete-event engine: one simpy process per stream runs its ops in order, waits on cross-stream
dependencies as events, drives the allocator and records every allocation and free on the simulated clock.

It knows ops, streams and bytes; nothing about models or frameworks.
"""

from dataclasses import dataclass

import numpy as np
import simpy

from sim.allocator import Allocator, OutOfMemory
from sim.cost import CostModel
from sim.ops import Schedule, Stream
from sim.trace import Trace, TraceBuilder


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
    end_time_us: int
    oom: OomEvent | None
    busy_us: dict[Stream, int]


class Engine:
    def __init__(self, schedule: Schedule, allocator: Allocator, cost: CostModel) -> None:
        self.schedule = schedule
        self.allocator = allocator
        self.cost = cost
        self.trace = TraceBuilder()
        self.oom: OomEvent | None = None
        self.env = simpy.Environment()
        targets = {i + d for i, op in enumerate(schedule.ops) if op.deps for d in op.deps}
        self.done = {i: self.env.event() for i in targets} if targets else None
        self.busy_us: dict[Stream, int] = {}
        self.op_start_us = [-1] * len(schedule.ops)
        self._sizes = schedule.buffer_sizes()
        self._spans = schedule.op_span or [None] * len(schedule.ops)
        self._durations = cost.durations_us(schedule.ops)
        self._side_ends: list[int] = []  # end times of running side-stream (collective) ops
        used = {op.stream._value_ for op in schedule.ops}
        self._streams = [stream for stream in Stream if stream.value in used]

    def run(self) -> EngineResult:
        """Allocate persistent buffers at t=0, start one process per stream, run to the end."""
        for buffer_id in self.schedule.persistent:
            self._malloc(buffer_id, -1, Stream.COMPUTE, 0)
        for stream in self._streams:
            indices = [i for i, op in enumerate(self.schedule.ops) if op.stream is stream]
            self.env.process(self._stream(stream, indices))
        self.env.run()
        unstarted = [i for i, start in enumerate(self.op_start_us) if start < 0]
        assert not unstarted, f"engine stalled before op {unstarted[0]} ({self.schedule.ops[unstarted[0]].name})"
        trace = self.trace.freeze(self._sizes, self.schedule.buffer_categories())
        return EngineResult(trace, self.op_start_us, int(self.env.now), self.oom, self.busy_us)

    def _stream(self, stream: Stream, indices: list[int]):
        """Run one stream's ops in order: allocate at the op's start, take its duration, free at its end."""
        if self.done is None and len(self._streams) == 1 and hasattr(self.allocator, "replay"):
            now = self._run_alone_bulk(stream, indices)
            yield self.env.timeout(now - self.env.now)
            return
        if stream is Stream.COMPUTE:  # alone, it never has to yield before its end
            yield from self._compute_with_lookahead(indices)
            return
        ops, env, durations = self.schedule.ops, self.env, self._durations
        busy = 0
        for index in indices:
            op = ops[index]
            if op.deps:
                yield simpy.AllOf(env, [self.done[index + d] for d in op.deps])
            now = int(env.now)
            self.op_start_us[index] = now
            span = self._spans[index]
            for buffer_id in (op.allocs if span is None else span.alloc_ids(op.allocs)):
                self._malloc(buffer_id, index, stream, now)
            duration = durations[index]
            busy += duration
            end = now + duration
            self._side_ends.append(end)
            if duration:
                yield env.timeout(duration)
            self._side_ends.remove(end)
            for buffer_id in (op.frees if span is None else span.free_ids(op.frees)):
                self._free(buffer_id, index, end)
            if self.done is not None and index in self.done:
                self.done[index].succeed()
        self.busy_us[stream] = busy

    def _compute_with_lookahead(self, indices: list[int]):
        """The compute stream beside side streams. It advances its clock arithmetically while no side-stream
        event can fall in between (conservative lookahead: up to the earliest end of a running collective),
        and hands control to simpy where it must: waits on other streams, ops others wait for, and any op
        that would cross the end of a running collective. Event times and order are those of one yield per op."""
        ops, env, durations, done = self.schedule.ops, self.env, self._durations, self.done or {}
        ends, spans, sizes, starts = self._side_ends, self._spans, self._sizes, self.op_start_us
        allocator, t, compute = self.allocator, self.trace, Stream.COMPUTE
        malloc, free = allocator.malloc, allocator.free
        times, op_ids, buffer_ids = t.time_us.append, t.op_index.append, t.buffer_id.append
        allocated, reserved = t.allocated_bytes.append, t.reserved_bytes.append
        busy = 0
        now = int(env.now)
        for index in indices:
            op = ops[index]
            if op.deps:
                if now > env.now:
                    yield env.timeout(now - env.now)
                yield simpy.AllOf(env, [done[index + d] for d in op.deps])
                now = int(env.now)
            elif ends and now >= min(ends):
                yield env.timeout(now - env.now)
            starts[index] = now
            span = spans[index]
            for buffer_id in (op.allocs if span is None else span.alloc_ids(op.allocs)):
                try:
                    malloc(buffer_id, sizes[buffer_id], compute)
                except OutOfMemory as exc:
                    if self.oom is None:
                        self.oom = OomEvent(now, index, exc.requested_bytes, str(exc))
                times(now)
                op_ids(index)
                buffer_ids(buffer_id)
                allocated(allocator.allocated_bytes)
                reserved(allocator.reserved_bytes)
            duration = durations[index]
            busy += duration
            end = now + duration
            if ends and end > min(ends):
                yield env.timeout(end - env.now)
            now = end
            for buffer_id in (op.frees if span is None else span.free_ids(op.frees)):
                free(buffer_id)
                times(now)
                op_ids(index)
                buffer_ids(~buffer_id)
                allocated(allocator.allocated_bytes)
                reserved(allocator.reserved_bytes)
            if index in done:
                if now > env.now:
                    yield env.timeout(now - env.now)
                done[index].succeed()
                yield env.timeout(0)  # let the streams waiting on it start at this instant, before going on
        if now > env.now:
            yield env.timeout(now - env.now)
        self.busy_us[Stream.COMPUTE] = busy

    def _run_alone_bulk(self, stream: Stream, indices: list[int]) -> int:
        """A lone stream with an allocator that can replay a whole event sequence at once (the exact count):
        the events, times and results of _compute_with_lookahead, gathered per op and expanded with numpy."""
        ops, spans = self.schedule.ops, self._spans
        ids: list[int] = []
        counts: list[int] = []  # per op: number of allocations, then number of frees
        extend, append = ids.extend, counts.append
        for index in indices:
            op = ops[index]
            span = spans[index]
            if span is None:
                allocs, frees = op.allocs, op.frees
            else:
                allocs, frees = span.alloc_ids(op.allocs), span.free_ids(op.frees)
            extend(allocs)
            extend(frees)
            append(len(allocs))
            append(len(frees))
        order = np.asarray(indices, dtype=np.int64)
        durations = np.asarray(self._durations, dtype=np.int64)[order]
        base = int(self.env.now)
        ends = base + np.cumsum(durations)
        starts = ends - durations
        for index, start in zip(indices, starts.tolist(), strict=True):
            self.op_start_us[index] = start
        per_segment = np.asarray(counts, dtype=np.int64)
        times = np.repeat(np.stack([starts, ends], axis=1).ravel(), per_segment)
        op_index = np.repeat(np.repeat(order, 2), per_segment)
        is_free = np.repeat(np.tile(np.array([False, True]), len(order)), per_segment)
        buffer_ids = np.asarray(ids, dtype=np.int64)
        sizes = np.asarray(self._sizes, dtype=np.int64)[buffer_ids]
        allocated, oom, at = self.allocator.replay(np.where(is_free, -sizes, sizes))
        if oom is not None and self.oom is None:
            self.oom = OomEvent(int(times[at]), int(op_index[at]), oom.requested_bytes, str(oom))
        t = self.trace
        t.time_us.extend(times.tolist())
        t.op_index.extend(op_index.tolist())
        t.buffer_id.extend(np.where(is_free, ~buffer_ids, buffer_ids).tolist())
        values = allocated.tolist()
        t.allocated_bytes.extend(values)
        t.reserved_bytes.extend(values)
        self.busy_us[stream] = int(durations.sum())
        return int(ends[-1]) if len(ends) else base

    def _malloc(self, buffer_id: int, op_index: int, stream: Stream, now: int) -> None:
        size = self._sizes[buffer_id]
        try:
            self.allocator.malloc(buffer_id, size, stream)
        except OutOfMemory as exc:
            if self.oom is None:
                self.oom = OomEvent(now, op_index, exc.requested_bytes, str(exc))
        self._record(now, op_index, buffer_id)

    def _free(self, buffer_id: int, op_index: int, now: int) -> None:
        self.allocator.free(buffer_id)
        self._record(now, op_index, ~buffer_id)

    def _record(self, now: int, op_index: int, signed_buffer_id: int) -> None:
        t = self.trace
        t.time_us.append(now)
        t.op_index.append(op_index)
        t.buffer_id.append(signed_buffer_id)
        t.allocated_bytes.append(self.allocator.allocated_bytes)
        t.reserved_bytes.append(self.allocator.reserved_bytes)
