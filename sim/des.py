"""The timeline as a discrete-event simulation in simpy: one process for the host thread, one per CUDA stream (and
one for the host CPU's own work, Stream.CPU), and the GPU's links as shared resources: to its peers (NVLink and the
network, the collectives') and to the host (PCIe, one link per direction: its copy engines run both at once). The
semantics are sim/timeline.py's; what this adds is the links: transfers running at once on different streams
(ZeRO-3's all-gather of the next layers while the reduce-scatter of the last ones runs; gradients copied to the host
while offloaded parameters come in) share their link's bandwidth, each at 1/k of it while k run (processor sharing),
where the recurrence gives each the whole link. Where no two transfers on one link overlap, both give the same times
(checked by tests/test_des.py), and the engine takes the recurrence (sim/engine.py).

Processes:
- host: issues ops in program order; before op i it waits for the ops in `op.host_waits` and for op
  i-1-queue_depth to end, then spends host_us[i] and launches the kernel;
- one per stream: runs its ops in order, each once launched and once every op it depends on has ended;
- each link (SharedLink): advances every transfer on it at 1/k of the rate while k are on it.
Only the link needs the simulated clock: every other time is a max of known times plus a duration, final as soon as
its inputs are known. So the host and the streams compute ahead of the clock and wait (simpy events) only for a time
not yet known, and a stream goes to the clock only to put a transfer on the link at its start: every time a
process learns is at or after the clock's reading, so transfers join the link in time order. This is the recurrence
wherever no transfers overlap, with simpy events only where processes wait. A transfer that ends between whole µs
ends at the next whole µs (the clock's unit).
"""

import math
from enum import Enum

import numpy as np
import simpy

from sim.ops import STREAMS, OpKind, Schedule
from sim.timeline import HostModel, OpTimes

COLLECTIVES = (OpKind.ALL_GATHER, OpKind.REDUCE_SCATTER, OpKind.ALL_REDUCE)
_DONE_US = 1e-6  # work left below this is float rounding: the transfer is done
_LAUNCH, _END = 0, 1  # the two columns of op times processes wait on


class Link(Enum):
    """The GPU's links that transfers share: to its peers (NVLink inside the node, the network across), and PCIe to
    the host in each direction."""

    PEERS = "peers"
    HOST_TO_DEVICE = "host_to_device"
    DEVICE_TO_HOST = "device_to_host"


_PCIE = {OpKind.HOST_TO_DEVICE: Link.HOST_TO_DEVICE, OpKind.DEVICE_TO_HOST: Link.DEVICE_TO_HOST}


def link_of(op) -> Link | None:
    """The link an op moves its bytes over: a collective with bytes on the wire, its peers'; a host copy, PCIe's
    in its direction; else none."""
    if op.kind in COLLECTIVES:
        return Link.PEERS if op.wire_bytes > 0 else None
    return _PCIE.get(op.kind) if op.bytes_moved > 0 else None


class SharedLink:
    """A link shared by the transfers on it: each of k transfers progresses at 1/k of the link's rate (processor
    sharing), so a transfer of `work_us` alone takes work_us, and two that start together end together at 2·work_us.
    `busy_us`: how long at least one transfer was on it."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._active: dict[int, list] = {}  # transfer -> [work left at the full rate (µs), its completion event]
        self._updated_at = 0.0
        self._generation = 0  # completions scheduled before the latest change are stale
        self._next = 0
        self.busy_us = 0.0

    def transfer(self, work_us: float) -> simpy.Event:
        """Start a transfer now; the event succeeds when it has moved all its work."""
        done = self.env.event()
        self._advance()
        self._active[self._next] = [float(work_us), done]
        self._next += 1
        self._schedule()
        return done

    def _advance(self) -> None:
        """Take the time since the last change off every transfer's work, at 1/k each."""
        now = self.env.now
        elapsed = now - self._updated_at
        if self._active and elapsed > 0:
            share = elapsed / len(self._active)
            for entry in self._active.values():
                entry[0] -= share
            self.busy_us += elapsed
        self._updated_at = now

    def _schedule(self) -> None:
        """A wake-up when the transfer with the least work left would end at the present sharing."""
        self._generation += 1
        if not self._active:
            return
        least = min(entry[0] for entry in self._active.values())
        wake = self.env.timeout(max(least, 0.0) * len(self._active))
        generation = self._generation
        wake.callbacks.append(lambda _event: self._complete(generation))

    def _complete(self, generation: int) -> None:
        """End the transfers whose work is done, unless a later change has rescheduled the wake-up."""
        if generation != self._generation:
            return
        self._advance()
        for key in [key for key, entry in self._active.items() if entry[0] <= _DONE_US]:
            self._active.pop(key)[1].succeed()
        self._schedule()


class SimpyTimeline:
    """sim/timeline.py's Timeline as simpy processes, with transfers sharing their links (module docstring)."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray, host: HostModel) -> OpTimes:
        """Every op's times (see Timeline.op_times), transfers sharing their links."""
        ops = schedule.ops
        count = len(ops)
        env = simpy.Environment()
        links = {link: SharedLink(env) for link in Link}
        issues, starts = [0] * count, [0] * count
        launches: list[int | None] = [None] * count
        ends: list[int | None] = [None] * count
        columns = (launches, ends)
        waiters: dict[tuple[int, int], simpy.Event] = {}  # (column, op) -> the event a process waits on
        durations, host_us, depth = durations_us.tolist(), host.host_us.tolist(), host.queue_depth

        def known(column: int, index: int):
            """The value (a launch or an end) once it is known, waiting for it if it is not yet."""
            if columns[column][index] is None:
                key = (column, index)
                if key not in waiters:
                    waiters[key] = env.event()
                yield waiters[key]
            return columns[column][index]

        def record(column: int, index: int, value: int) -> None:
            columns[column][index] = value
            waiter = waiters.pop((column, index), None)
            if waiter is not None:
                waiter.succeed()

        def host_thread():
            at = 0
            for index, op in enumerate(ops):
                waits = [index + d for d in op.host_waits]
                if depth is not None and index > depth:
                    waits.append(index - 1 - depth)
                for other in waits:
                    end = ends[other]
                    if end is None:
                        end = yield from known(_END, other)
                    at = max(at, end)
                issues[index] = at
                at += host_us[index]
                record(_LAUNCH, index, at)

        def stream(indices: list[int]):
            ready = 0
            for index in indices:
                op = ops[index]
                start = launches[index]
                if start is None:
                    start = yield from known(_LAUNCH, index)
                start = max(start, ready)
                for d in op.deps:
                    end = ends[index + d]
                    if end is None:
                        end = yield from known(_END, index + d)
                    start = max(start, end)
                starts[index] = start
                link = link_of(op)
                if link is not None and durations[index]:  # the link is shared in simulated time: go there
                    assert start >= env.now, "a process learnt a time before the clock's reading"
                    if start > env.now:
                        yield env.timeout(start - env.now)
                    yield links[link].transfer(durations[index])
                    late = math.ceil(env.now - _DONE_US) - env.now  # to the next whole µs
                    if late > 0:
                        yield env.timeout(late)
                    ready = int(round(env.now))
                else:
                    ready = start + durations[index]
                record(_END, index, ready)

        codes = schedule.stream_codes()
        env.process(host_thread())
        for code in range(len(STREAMS)):
            indices = np.flatnonzero(codes == code).tolist()
            if indices:
                env.process(stream(indices))
        env.run()
        return OpTimes(issues, launches, starts, ends)


def links_overlap(schedule: Schedule, times: OpTimes) -> bool:
    """Whether two transfers on one link overlap in `times` (laid out with each having the whole link): only then
    does sharing a link change anything, so only then is the simpy timeline needed."""
    spans: dict[Link, list[tuple[int, int]]] = {}
    for i, op in enumerate(schedule.ops):
        link = link_of(op)
        if link is not None and times.end_us[i] > times.start_us[i]:
            spans.setdefault(link, []).append((times.start_us[i], times.end_us[i]))
    for on_link in spans.values():
        latest_end = -1
        for start, end in sorted(on_link):
            if start < latest_end:
                return True
            latest_end = max(latest_end, end)
    return False
