"""The discrete-event engine: one simpy process per stream runs its ops in order, waits on cross-stream
dependencies as events, drives the allocator and records every allocation and free on the simulated clock.

It knows ops, streams and bytes; nothing about models or frameworks.
"""

from dataclasses import dataclass

import simpy

from sim.allocator import Allocator, OutOfMemory
from sim.cost import CostModel
from sim.ops import CATEGORIES, Schedule, Stream
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
        self._category_index = {c: i for i, c in enumerate(CATEGORIES)}

    def run(self) -> EngineResult:
        """Allocate persistent buffers at t=0, start one process per stream, run to the end."""
        for buffer_id in self.schedule.persistent:
            self._malloc(buffer_id, -1, Stream.COMPUTE)
        for stream in Stream:
            indices = [i for i, op in enumerate(self.schedule.ops) if op.stream is stream]
            if indices:
                self.env.process(self._stream(stream, indices))
        self.env.run()
        return EngineResult(self.trace.freeze(), self.op_start_us, int(self.env.now), self.oom, self.busy_us)

    def _stream(self, stream: Stream, indices: list[int]):
        ops, env = self.schedule.ops, self.env
        busy = 0
        for index in indices:
            op = ops[index]
            if op.deps:
                yield simpy.AllOf(env, [self.done[d] for d in op.deps])
            self.op_start_us[index] = int(env.now)
            for buffer_id in op.allocs:
                self._malloc(buffer_id, index, stream)
            duration = self.cost.duration_us(op)
            if duration:
                busy += duration
                yield env.timeout(duration)
            for buffer_id in op.frees:
                self._free(buffer_id, index)
            if self.done is not None:
                self.done[index].succeed()
        self.busy_us[stream] = busy

    def _malloc(self, buffer_id: int, op_index: int, stream: Stream) -> None:
        buffer = self.schedule.buffers[buffer_id]
        try:
            self.allocator.malloc(buffer_id, buffer.size_bytes, stream)
        except OutOfMemory as exc:
            if self.oom is None:
                self.oom = OomEvent(int(self.env.now), op_index, exc.requested_bytes, str(exc))
        self._record(op_index, buffer_id, buffer.size_bytes, buffer.category)

    def _free(self, buffer_id: int, op_index: int) -> None:
        buffer = self.schedule.buffers[buffer_id]
        self.allocator.free(buffer_id)
        self._record(op_index, buffer_id, -buffer.size_bytes, buffer.category)

    def _record(self, op_index: int, buffer_id: int, delta: int, category) -> None:
        t = self.trace
        t.time_us.append(int(self.env.now))
        t.op_index.append(op_index)
        t.buffer_id.append(buffer_id)
        t.delta_bytes.append(delta)
        t.category.append(self._category_index[category])
        t.allocated_bytes.append(self.allocator.allocated_bytes)
        t.reserved_bytes.append(self.allocator.reserved_bytes)
