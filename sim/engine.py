"""The discrete-event engine: one simpy process per stream runs its ops in order, waits on cross-stream
dependencies as events, drives the allocator and records every allocation and free on the simulated clock.

It knows ops, streams and bytes; nothing about models or frameworks.
"""

from dataclasses import dataclass

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
        self.done = [self.env.event() for _ in schedule.ops] if any(op.deps for op in schedule.ops) else None
        self.busy_us: dict[Stream, int] = {}
        self.op_start_us = [0] * len(schedule.ops)
        self._sizes = [b.size_bytes for b in schedule.buffers]
        self._streams = sorted({op.stream for op in schedule.ops}, key=list(Stream).index)

    def run(self) -> EngineResult:
        """Allocate persistent buffers at t=0, start one process per stream, run to the end."""
        for buffer_id in self.schedule.persistent:
            self._malloc(buffer_id, -1, Stream.COMPUTE, 0)
        for stream in self._streams:
            indices = [i for i, op in enumerate(self.schedule.ops) if op.stream is stream]
            self.env.process(self._stream(stream, indices))
        self.env.run()
        trace = self.trace.freeze(self.schedule.buffers)
        return EngineResult(trace, self.op_start_us, int(self.env.now), self.oom, self.busy_us)

    def _stream(self, stream: Stream, indices: list[int]):
        """Run one stream's ops in order. While it is the only stream, nothing can interleave with it, so the
        clock advances in one timeout per wait instead of one per op (same times, same order of events)."""
        ops, env, cost = self.schedule.ops, self.env, self.cost
        alone = self.done is None and len(self._streams) == 1
        busy = 0
        now = int(env.now)
        for index in indices:
            op = ops[index]
            if op.deps:
                yield env.timeout(now - env.now)
                yield simpy.AllOf(env, [self.done[d] for d in op.deps])
                now = int(env.now)
            self.op_start_us[index] = now
            for buffer_id in op.allocs:
                self._malloc(buffer_id, index, stream, now)
            duration = cost.duration_us(op)
            busy += duration
            now += duration
            if not alone and duration:
                yield env.timeout(duration)
            for buffer_id in op.frees:
                self._free(buffer_id, index, now)
            if self.done is not None:
                self.done[index].succeed()
        if alone:
            yield env.timeout(now - env.now)
        self.busy_us[stream] = busy

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
