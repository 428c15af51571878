"""A run as a PyTorch memory snapshot: the dict torch.cuda.memory._snapshot() returns (segments, device_traces,
allocator_settings; schema of torch/csrc/cuda/memory_snapshot.cpp, ../shared/reference/runtime-semantics.md §2),
pickled as pytorch.org/memory_viz and `python -m torch.cuda._memory_viz` read it. Every trace entry and allocated
block names the tensor and the op that made it in its frames, where PyTorch would name the Python stack."""

import pickle

from sim.errors import ScenarioError
from sim.report import Run
from sim.vocab import AllocatorBackend

# MemoryViz.js's unpickler reads protocols 2 to 4 only (its PROTO opcode check), and Python 3.14 defaults to 5
PICKLE_PROTOCOL = 4


def check_exportable(run_backend: AllocatorBackend) -> None:
    """A snapshot needs block addresses: refused for the exact backend, which counts live bytes only."""
    if run_backend is not AllocatorBackend.CACHING:
        raise ScenarioError("--snapshot: allocator.backend exact keeps no addresses or segments; a memory snapshot "
                            "needs allocator.backend caching")


def memory_snapshot(run: Run) -> dict:
    """The snapshot of a run simulated with its event log (run_scenario(event_log=True)) on the caching allocator:
    the final segments with each allocated block's tensor, and every trace entry with the tensor and op of the
    malloc or free that made it, at its simulated time (µs from the run's start)."""
    if run.event_log is None:
        raise ValueError("the run kept no event log: simulate it with run_scenario(event_log=True)")
    frames = _Frames(run)
    return run.allocator.snapshot(frames.of_buffer, frames.of_event)


def snapshot_bytes(snapshot: dict) -> bytes:
    """The pickle memory_viz opens: protocol 4, builtins only."""
    return pickle.dumps(snapshot, protocol=PICKLE_PROTOCOL)


class _Frames:
    """Frames naming what made an allocation: [tensor, op], each {'name', 'filename', 'line'} as PyTorch's
    Frame. The tensor frame is the buffer's name, in the file of its category; the op frame names the op, with the
    step, micro-batch and phase as its file and the layer (or 0) as its line. One list per (op, buffer), shared, so
    the pickle stores each once (pickle's memo)."""

    def __init__(self, run: Run) -> None:
        schedule = run.schedule
        self._buffers = schedule.buffers
        self._ops, self._steps, self._micro_batches = schedule.ops, schedule.op_step, schedule.op_micro_batch
        trace = run.engine.trace
        self._event_op, self._event_buffer = trace.op_index.tolist(), trace.buffer_id.tolist()
        self._allocated_by: dict[int, int] = {}  # buffer id -> the op of its latest allocation
        for op_index, buffer_id, delta in zip(self._event_op, self._event_buffer, trace.delta_bytes.tolist()):
            if delta >= 0:
                self._allocated_by[buffer_id] = op_index
        self._cache: dict[tuple[int, int], list[dict]] = {}

    def of_event(self, event_index: int) -> list[dict]:
        """The frames of allocator event `event_index` (one engine event each)."""
        return self._frames(self._event_op[event_index], self._event_buffer[event_index])

    def of_buffer(self, buffer_id: int) -> list[dict]:
        """The frames of a buffer alive at the end: the op that allocated it."""
        return self._frames(self._allocated_by.get(buffer_id, -1), buffer_id)

    def _frames(self, op_index: int, buffer_id: int) -> list[dict]:
        key = (op_index, buffer_id)
        cached = self._cache.get(key)
        if cached is None:
            buffer = self._buffers[buffer_id]
            tensor = {"name": buffer.name, "filename": buffer.category.value, "line": 0}
            if op_index < 0:
                where = {"name": "model.init", "filename": "before the first op", "line": 0}
            else:
                op = self._ops[op_index]
                where = {"name": op.name, "line": op.layer if op.layer is not None else 0,
                         "filename": f"step {self._steps[op_index]} micro-batch {self._micro_batches[op_index]} "
                                     f"{op.phase.value}"}
            cached = self._cache[key] = [tensor, where]
        return cached
