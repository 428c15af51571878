"""A run as a Chrome trace (the Trace Event Format that Perfetto and chrome://tracing open): one slice per op on
its stream's track, one per op the host spends time issuing on a host track, counter tracks of allocated bytes by
category and of reserved bytes (on the host's clock, when the allocator sees each event), of allocated bytes on the
device's clock (sim/clocks.py) and of the ops in flight at each issue (the host's run-ahead), in simulated µs."""

import gzip
import json

import numpy as np

from sim.clocks import device_clock_memory, ops_in_flight
from sim.ops import CATEGORIES, STREAMS
from sim.report import Run

_PID = 0  # one simulated rank: one process
_HOST_TID = len(STREAMS)  # the host thread's track, after the streams'


def chrome_trace(run: Run) -> dict:
    """The trace: thread names per stream, 'X' (complete) events per op with its step, micro-batch, phase and layer,
    and 'C' (counter) events after the last allocator event of each distinct time."""
    schedule, engine, trace = run.schedule, run.engine, run.engine.trace
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": _PID, "args": {"name": run.scenario.name}}]
    codes = schedule.stream_codes()
    used = sorted(set(codes.tolist()))
    events += [{"name": "thread_name", "ph": "M", "pid": _PID, "tid": code, "args": {"name": STREAMS[code].value}}
               for code in used]
    events.append({"name": "thread_name", "ph": "M", "pid": _PID, "tid": _HOST_TID, "args": {"name": "host"}})
    starts, ends = engine.op_start_us, engine.op_end_us
    issues, launches = engine.op_issue_us, engine.op_launch_us
    steps, micro_batches = schedule.op_step, schedule.op_micro_batch
    for index, op in enumerate(schedule.ops):
        where = {"step": steps[index], "micro_batch": micro_batches[index], "layer": op.layer}
        events.append({"name": op.name, "cat": op.phase.value, "ph": "X", "ts": starts[index],
                       "dur": ends[index] - starts[index], "pid": _PID, "tid": int(codes[index]), "args": where})
        if launches[index] > issues[index]:  # the host issuing it: how far ahead of its kernel it runs
            events.append({"name": op.name, "cat": "host", "ph": "X", "ts": issues[index],
                           "dur": launches[index] - issues[index], "pid": _PID, "tid": _HOST_TID, "args": where})
    if len(trace):
        deltas = np.zeros((len(CATEGORIES), len(trace)), dtype=np.int64)
        deltas[trace.category.astype(np.int64), np.arange(len(trace))] = trace.allocated_delta()
        by_category = np.cumsum(deltas, axis=1)
        times = trace.time_us
        last_at_time = np.flatnonzero(np.append(times[1:] != times[:-1], True))
        names = [c.value for c in CATEGORIES]
        for i in last_at_time.tolist():
            t = int(times[i])
            events.append({"name": "allocated bytes", "ph": "C", "ts": t, "pid": _PID,
                           "args": dict(zip(names, by_category[:, i].tolist()))})
            events.append({"name": "reserved bytes", "ph": "C", "ts": t, "pid": _PID,
                           "args": {"reserved": int(trace.reserved_bytes[i])}})
    on_device = device_clock_memory(engine)
    events += _counter("allocated bytes (device clock)", "allocated", on_device.time_us, on_device.allocated_bytes)
    events += _counter("host ops in flight", "ops", np.asarray(engine.op_issue_us, dtype=np.int64),
                       ops_in_flight(engine))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"scenario": run.scenario.name, "clock": "simulated µs from the run's start"}}


def _counter(name: str, key: str, times: np.ndarray, values: np.ndarray) -> list[dict]:
    """'C' events of one counter track: the last value at each distinct time."""
    if not len(times):
        return []
    last = np.flatnonzero(np.append(times[1:] != times[:-1], True))
    return [{"name": name, "ph": "C", "ts": int(times[i]), "pid": _PID, "args": {key: int(values[i])}}
            for i in last.tolist()]


def chrome_trace_bytes(run: Run, gzipped: bool = False) -> bytes:
    """The trace as the JSON file Perfetto loads, gzip-compressed if asked (Perfetto opens .json.gz as well)."""
    data = json.dumps(chrome_trace(run), separators=(",", ":")).encode()
    return gzip.compress(data, compresslevel=6) if gzipped else data
