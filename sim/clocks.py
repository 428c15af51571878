"""A run seen on the device's clock beside the host's (issue #15): the trace is on the host's clock (the caching
allocator is called as the host issues ops); on the device's, an allocation counts from the start of its op's kernel
and a free from the end of the kernel of the op that frees it, which is when the GPU's kernels hold the memory. And
the host's run-ahead: at each op's issue, how many ops issued before it have not finished on the device (what the
launch queue holds)."""

from dataclasses import dataclass

import numpy as np

from sim.engine import EngineResult


@dataclass(frozen=True, slots=True)
class DeviceClockMemory:
    """Allocated bytes after each allocator event, the events in the device's time order."""

    time_us: np.ndarray  # int64, non-decreasing
    allocated_bytes: np.ndarray  # int64

    def peak(self) -> tuple[int, int]:
        """The most allocated and the first time it is reached (µs); (0, 0) for an empty run."""
        if not len(self.allocated_bytes):
            return 0, 0
        at = int(np.argmax(self.allocated_bytes))
        return int(self.allocated_bytes[at]), int(self.time_us[at])


def device_clock_memory(engine: EngineResult) -> DeviceClockMemory:
    """The trace's allocated bytes re-timed on the device's clock: an allocation at its op's kernel start, a free at
    the end of its op's kernel (a buffer made before the first op, at 0). Where an allocation and a free fall on the
    same µs, the free comes first: a kernel that ends at t has released its memory when the next starts at t."""
    trace = engine.trace
    starts = np.append(np.asarray(engine.op_start_us, dtype=np.int64), 0)  # op -1: made before the first op
    ends = np.append(np.asarray(engine.op_end_us, dtype=np.int64), 0)
    delta = trace.allocated_delta()
    ops = trace.op_index.astype(np.int64)
    time = np.where(delta > 0, starts[ops], ends[ops])
    order = np.lexsort((delta > 0, time))
    return DeviceClockMemory(time[order], np.cumsum(delta[order]))


def ops_in_flight(engine: EngineResult) -> np.ndarray:
    """At each op's issue, the ops issued before it whose kernels have not ended (int64 per op). An op j after i
    ends no earlier than i's issue, and at it only when it takes no time at all from that same issue: those are
    taken off the count of ends up to i's issue."""
    issues = np.asarray(engine.op_issue_us, dtype=np.int64)
    ends = np.asarray(engine.op_end_us, dtype=np.int64)
    count = len(issues)
    if not count:
        return np.zeros(0, dtype=np.int64)
    ended_by_issue = np.searchsorted(np.sort(ends), issues, side="right")
    instant = np.concatenate([[0], np.cumsum(ends == issues)])  # ops ending at their own issue, before each index
    same_issue_end = np.searchsorted(issues, issues, side="right")  # one past the last op issued at the same µs
    later_instant = instant[same_issue_end] - instant[np.arange(count)]
    return np.arange(count) - (ended_by_issue - later_instant)
