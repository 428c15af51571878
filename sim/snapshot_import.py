"""A real PyTorch memory snapshot in (torch.cuda.memory._dump_snapshot / _snapshot(), pickled): read with an
unpickler that builds builtins only, summarised, and its allocations replayed through the caching allocator model
under other PYTORCH_CUDA_ALLOC_CONF settings (what expandable_segments would have saved, say).

The pickle comes from elsewhere, so it is never unpickled with the plain unpickler: a snapshot holds dicts, lists,
tuples, strings, numbers, booleans and None (torch/csrc/cuda/memory_snapshot.cpp writes nothing else), none of which
needs a global, so any pickle naming a global (a class, a function: the way a pickle runs code) is refused before
anything is built from it."""

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.base import OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.errors import MAX_TENSOR_BYTES, ScenarioError
from sim.ingest.files import read_regular_file, shown

# Snapshots of long runs reach hundreds of MB (PyTorch keeps up to max_entries trace entries, 1,000,000 by default in
# torch/cuda/memory.py _record_memory_history); the cap keeps a wrong file from being read for minutes.
MAX_SNAPSHOT_BYTES = 2 * 2**30
LARGEST_SHOWN = 10  # allocations listed in the summary
# The replay's device: 1 PiB, above any GPU's memory (so no OOM), and small enough for the expandable segments'
# virtual reservations (one device's size per stream) to fit the model's synthetic address space
REPLAY_CAPACITY_BYTES = 1 << 50


class _BuiltinsOnly(pickle.Unpickler):
    """Refuses every global a pickle names: the only way a pickle calls code (GLOBAL, STACK_GLOBAL, INST, OBJ,
    the extension registry) goes through find_class, and a snapshot needs none."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and a memory snapshot holds builtins only: refused, "
                                     "nothing of it was run")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which a memory snapshot never does")


def read_snapshot(path: Path) -> dict:
    """The snapshot dict of a pickle file: a regular file under MAX_SNAPSHOT_BYTES, builtins only, a mapping with a
    `segments` list (and `device_traces`, lists of trace entries, where the torch version recorded them)."""
    name = shown(str(path))
    data = read_regular_file(path, MAX_SNAPSHOT_BYTES, what="a snapshot")
    try:
        snapshot = _BuiltinsOnly(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ScenarioError(f"{name}: not a memory snapshot pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError, RecursionError,
            OverflowError, UnicodeDecodeError) as exc:
        reason = "it ends early (truncated?)" if isinstance(exc, EOFError) else f"{type(exc).__name__}: {exc}"
        raise ScenarioError(f"{name}: not a memory snapshot pickle: {shown(reason)}") from None
    _check_shape(snapshot, name)
    return snapshot


def _check_shape(snapshot, name: str) -> None:
    """The keys the summary and the replay read, with their types, each refusal naming the path."""
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("segments"), list):
        raise ScenarioError(f"{name}: not a memory snapshot: no 'segments' list at the top")
    for i, segment in enumerate(snapshot["segments"]):
        for key in ("address", "total_size", "blocks"):
            if not isinstance(segment, dict) or key not in segment:
                raise ScenarioError(f"{name}: segments[{i}] has no {key!r}")
        for j, block in enumerate(segment["blocks"]):
            if not isinstance(block, dict) or not _sizes_ok(block, ("address", "size")) or \
                    block.get("state") not in ("active_allocated", "active_pending_free", "inactive"):
                raise ScenarioError(f"{name}: segments[{i}].blocks[{j}] is not a block (address, size, state)")
    traces = snapshot.get("device_traces", [])
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise ScenarioError(f"{name}: device_traces is not a list of lists")
    for d, trace in enumerate(traces):
        for k, entry in enumerate(trace):
            if not isinstance(entry, dict) or not isinstance(entry.get("action"), str) or \
                    not _sizes_ok(entry, ("size",)) or ("addr" not in entry and entry["action"] != "oom"):
                raise ScenarioError(f"{name}: device_traces[{d}][{k}] is not a trace entry (action, addr, size)")


def _sizes_ok(item: dict, keys: tuple[str, ...]) -> bool:
    """Whether each key holds a whole number of bytes a device could address."""
    return all(isinstance(item.get(k), int) and not isinstance(item.get(k), bool) and 0 <= item[k] <= MAX_TENSOR_BYTES
               for k in keys)


def _frame_name(frames) -> str:
    """The innermost frame's name, or '?' (frames are recorded only with context='all' or 'alloc')."""
    if isinstance(frames, list) and frames and isinstance(frames[0], dict):
        return str(frames[0].get("name", "?"))
    return "?"


def summarize_snapshot(snapshot: dict) -> dict:
    """Per device (and in all): reserved, allocated and requested bytes held at the end, the fragmentation, the
    largest allocations alive, and the trace's length."""
    devices: dict[int, dict] = {}
    largest = []
    for segment in snapshot["segments"]:
        device = devices.setdefault(int(segment.get("device", 0)), {"segments": 0, "reserved_bytes": 0,
                                                                   "allocated_bytes": 0, "requested_bytes": 0})
        device["segments"] += 1
        device["reserved_bytes"] += segment["total_size"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                device["allocated_bytes"] += block["size"]
                device["requested_bytes"] += int(block.get("requested_size", block["size"]))
                largest.append((block["size"], block["address"], _frame_name(block.get("frames"))))
    for device in devices.values():
        reserved = device["reserved_bytes"]
        device["fragmentation_ratio"] = (reserved - device["allocated_bytes"]) / reserved if reserved else 0.0
    largest.sort(reverse=True)
    traces = snapshot.get("device_traces", [])
    return {"devices": {str(d): figures for d, figures in sorted(devices.items())},
            "largest_allocations": [{"size_bytes": size, "address": address, "frame": frame}
                                    for size, address, frame in largest[:LARGEST_SHOWN]],
            "trace_entries": sum(len(t) for t in traces)}


@dataclass(frozen=True, slots=True)
class Replay:
    """One device's trace replayed through the caching allocator model under one PYTORCH_CUDA_ALLOC_CONF."""

    conf: str
    allocations: int  # alloc entries replayed
    carried: int  # allocations alive before the trace begins (a ring buffer that lost its start), made first
    max_allocated_bytes: int
    max_reserved_bytes: int
    reserved_at_end_bytes: int
    segments_at_end: int
    cuda_mallocs: int


def replay_trace(snapshot: dict, conf: str, device: int = 0) -> tuple[Replay, CachingAllocator]:
    """Device `device`'s alloc and free_completed entries through a fresh caching allocator with `conf` (on a
    device too large to run out: the question is how much it reserves): the figures, and the allocator in the state
    the trace leaves it. Allocations alive before the trace's first entry (known from a free without its alloc, or an
    allocated block of the final state without one) are made first, in address order: exact when the trace starts
    from an empty cache (history recorded from the process's start)."""
    traces = snapshot.get("device_traces", [])
    trace = traces[device] if device < len(traces) else []
    allocator = CachingAllocator(REPLAY_CAPACITY_BYTES, parse_alloc_conf(conf))
    live: dict[int, int] = {}  # address -> buffer id of the replay
    before = _alive_before(snapshot, trace, device)
    next_id = 0
    most_allocated = most_reserved = allocations = 0
    for address, size, stream in before:
        allocator.malloc(next_id, size, stream)
        live[address], next_id = next_id, next_id + 1
    for entry in trace:
        action = entry["action"]
        if action == "alloc":
            address = entry["addr"]
            if address in live:  # an address alive twice: the entry before its free was lost; free it now
                allocator.free(live.pop(address))
            try:
                allocator.malloc(next_id, entry["size"], entry.get("stream", 0))
            except OutOfMemory:  # more than 1 PiB at once: the model over-commits and counts them on
                pass
            live[address], next_id = next_id, next_id + 1
            allocations += 1
        elif action == "free_completed" and entry["addr"] in live:
            allocator.free(live.pop(entry["addr"]))
        most_allocated = max(most_allocated, allocator.allocated_bytes)
        most_reserved = max(most_reserved, allocator.reserved_bytes)
    return Replay(conf, allocations, len(before), max(most_allocated, allocator.allocated_bytes),
                  max(most_reserved, allocator.reserved_bytes), allocator.reserved_bytes, allocator.num_segments,
                  allocator.num_device_alloc), allocator


def trace_series(snapshot: dict, device: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Device `device`'s memory as the trace records it: per entry its time (µs), the bytes its segments reserve
    (segment_alloc and segment_map add, segment_free and segment_unmap remove) and the requested bytes alive (alloc
    adds, free_completed removes), each counted back from the final state so that a trace missing its start still
    ends where the snapshot does."""
    traces = snapshot.get("device_traces", [])
    trace = traces[device] if device < len(traces) else []
    segments = [seg for seg in snapshot["segments"] if int(seg.get("device", 0)) == device]
    reserved_at_end = sum(seg["total_size"] for seg in segments)
    requested_at_end = sum(int(b.get("requested_size", b["size"])) for seg in segments for b in seg["blocks"]
                           if b["state"] == "active_allocated")
    sign = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}
    reserved_delta = np.array([sign.get(e["action"], 0) * e["size"] for e in trace], dtype=np.int64)
    requested_delta = np.array([e["size"] if e["action"] == "alloc" else -e["size"] if e["action"] ==
                                "free_completed" else 0 for e in trace], dtype=np.int64)
    times = np.array([int(e.get("time_us", 0)) for e in trace], dtype=np.int64)
    reserved = reserved_at_end - reserved_delta.sum() + np.cumsum(reserved_delta)
    requested = requested_at_end - requested_delta.sum() + np.cumsum(requested_delta)
    return times, reserved, requested


def _alive_before(snapshot: dict, trace: list[dict], device: int) -> list[tuple[int, int, int]]:
    """(address, requested size, stream) of the allocations alive when the trace begins, by address: those freed
    in it before any alloc at their address, and those alive at the end that no alloc of the trace made."""
    seen: set[int] = set()
    before: dict[int, tuple[int, int]] = {}
    for entry in trace:
        address = entry.get("addr")
        if entry["action"] == "alloc":
            seen.add(address)
        elif entry["action"] in ("free_requested", "free_completed") and address not in seen and \
                address not in before:
            before[address] = (entry["size"], entry.get("stream", 0))
    made_in_trace = {e["addr"] for e in trace if e["action"] == "alloc"}
    for segment in snapshot["segments"]:
        if int(segment.get("device", 0)) != device:
            continue
        for block in segment["blocks"]:
            address = block["address"]
            if block["state"] == "active_allocated" and address not in made_in_trace and address not in before:
                before[address] = (int(block.get("requested_size", block["size"])), segment.get("stream", 0))
    return [(address, size, stream) for address, (size, stream) in sorted(before.items())]
