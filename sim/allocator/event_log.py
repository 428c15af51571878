"""The caching allocator's own event log: what PyTorch records as trace entries when memory history is on
(torch.cuda.memory._record_memory_history; the snapshot's `device_traces`), one row per entry, as columns.

Entries carry no clock: each holds the index of the allocator event (its malloc, free or empty_cache call, counted
from 0; one engine event each when the engine drives it) that made it. Whoever knows when those events happened
places the log in time once, after the run (`place_in_time`: one gather), so keeping a log costs nothing per event
beyond the entries themselves."""

from array import array
from collections.abc import Callable
from enum import IntEnum

import numpy as np


class AllocatorAction(IntEnum):
    """What a log entry records (c10/cuda/CUDACachingAllocator.h TraceEntry::Action); the value is the code
    stored in the log, the lower-case name PyTorch's string for it."""

    ALLOC = 0  # a block handed out (alloc_found_block): address, requested size
    FREE_REQUESTED = 1  # the caller freed it (free): address, requested size
    FREE_COMPLETED = 2  # it went back to the cache (free_block; later than FREE_REQUESTED after record_stream)
    SEGMENT_ALLOC = 3  # cudaMalloc of a segment (alloc_block): address, segment size
    SEGMENT_FREE = 4  # cudaFree of a segment (release_block)
    SEGMENT_MAP = 5  # pages mapped into an expandable segment (map_block): address, mapped size
    SEGMENT_UNMAP = 6  # pages unmapped from one (unmap_block)
    OOM = 7  # no memory found: address = the device's free bytes (the model logs the first; it then over-commits)


class AllocatorEventLog:
    """Log entries in the order the allocator makes them, as typed columns (a run makes millions), each with the
    index of the allocator event that made it; `place_in_time` gives them times."""

    __slots__ = ("events", "_action", "_address", "_size_bytes", "_stream_code", "_event_index", "_event_time_us")

    def __init__(self) -> None:
        """An empty log, before the allocator's first event, not yet placed in time."""
        self.events = 0  # allocator events so far: the index the next one gets
        self._action = array("b")
        self._address = array("q")
        self._size_bytes = array("q")
        self._stream_code = array("b")
        self._event_index = array("q")
        self._event_time_us: np.ndarray | None = None

    def record(self, action: AllocatorAction, address: int, size_bytes: int, stream_code: int) -> None:
        """Append one entry of the current event (`stream_code`: the stream's index in the allocator's
        registration order, which is STREAMS order for the simulator's streams)."""
        self._action.append(action)
        self._address.append(address)
        self._size_bytes.append(size_bytes)
        self._stream_code.append(stream_code)
        self._event_index.append(self.events)

    def end_event(self) -> None:
        """The current allocator event is over: later entries belong to the next one."""
        self.events += 1

    def extend(self, action: bytes, address: bytes, size_bytes: bytes, stream_code: bytes, event_index: bytes,
               events: int) -> None:
        """Append the entries of `events` whole allocator events at once, as raw native-endian columns (int8
        action and stream codes, int64 the rest; the compiled core's output), event indices already counted from
        `self.events`."""
        self._action.frombytes(action)
        self._address.frombytes(address)
        self._size_bytes.frombytes(size_bytes)
        self._stream_code.frombytes(stream_code)
        self._event_index.frombytes(event_index)
        self.events += events

    def place_in_time(self, event_time_us: np.ndarray) -> None:
        """Give every entry the time of its event: `event_time_us[i]` is when allocator event i happened (one
        per event so far)."""
        if len(event_time_us) != self.events:
            raise ValueError(f"{len(event_time_us)} event times for a log of {self.events} allocator events")
        self._event_time_us = np.asarray(event_time_us, dtype=np.int64)

    def __len__(self) -> int:
        """The number of entries."""
        return len(self._action)

    def columns(self) -> dict[str, np.ndarray]:
        """Copies of the columns: action (int8 AllocatorAction codes), address, size_bytes (int64), stream_code
        (int8), event_index and time_us (int64; 0 until the log is placed in time)."""
        event_index = np.array(self._event_index, dtype=np.int64)
        placed = self._event_time_us
        if placed is not None and len(placed) != self.events:
            raise ValueError(f"placed in time at {len(placed)} allocator events, and {self.events} happened")
        return {"action": np.array(self._action, dtype=np.int8), "address": np.array(self._address, dtype=np.int64),
                "size_bytes": np.array(self._size_bytes, dtype=np.int64),
                "stream_code": np.array(self._stream_code, dtype=np.int8), "event_index": event_index,
                "time_us": np.zeros_like(event_index) if placed is None else placed[event_index]}

    def device_trace(self, frames_of_event: Callable[[int], list[dict]] | None = None) -> list[dict]:
        """The entries as one device's `device_traces` list of a PyTorch memory snapshot (what memory_viz reads):
        action, addr (device_free for an OOM), size, stream, time_us, and the frames `frames_of_event` gives the
        allocator event that made the entry (default: none recorded)."""
        c = self.columns()
        names = [action.name.lower() for action in AllocatorAction]
        return [{"action": names[action], ("device_free" if action == AllocatorAction.OOM else "addr"): address,
                 "size": size, "stream": stream, "time_us": time_us,
                 "frames": frames_of_event(event) if frames_of_event is not None else []}
                for action, address, size, stream, time_us, event in zip(
                    c["action"].tolist(), c["address"].tolist(), c["size_bytes"].tolist(),
                    c["stream_code"].tolist(), c["time_us"].tolist(), c["event_index"].tolist())]
