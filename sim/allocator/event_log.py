"""The caching allocator's own event log: what PyTorch records as trace entries when memory history is on
(torch.cuda.memory._record_memory_history; the snapshot's `device_traces`), one row per entry, as columns."""

from array import array
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
    """Log entries in the order the allocator makes them, as typed columns (a run makes millions). Each entry is
    stamped with `now_us`, the simulated time the caller driving the allocator sets."""

    __slots__ = ("now_us", "_action", "_address", "_size_bytes", "_stream_code", "_time_us")

    def __init__(self) -> None:
        """An empty log at time 0."""
        self.now_us = 0
        self._action = array("b")
        self._address = array("q")
        self._size_bytes = array("q")
        self._stream_code = array("q")
        self._time_us = array("q")

    def record(self, action: AllocatorAction, address: int, size_bytes: int, stream_code: int) -> None:
        """Append one entry at `now_us` (`stream_code`: the stream's index in the allocator's registration order,
        which is STREAMS order for the simulator's streams)."""
        self._action.append(action)
        self._address.append(address)
        self._size_bytes.append(size_bytes)
        self._stream_code.append(stream_code)
        self._time_us.append(self.now_us)

    def __len__(self) -> int:
        """The number of entries."""
        return len(self._action)

    def columns(self) -> dict[str, np.ndarray]:
        """Copies of the columns: action (int8 AllocatorAction codes), address, size_bytes, stream_code, time_us
        (int64)."""
        return {"action": np.array(self._action, dtype=np.int8), "address": np.array(self._address, dtype=np.int64),
                "size_bytes": np.array(self._size_bytes, dtype=np.int64),
                "stream_code": np.array(self._stream_code, dtype=np.int64),
                "time_us": np.array(self._time_us, dtype=np.int64)}

    def device_trace(self) -> list[dict]:
        """The entries as one device's `device_traces` list of a PyTorch memory snapshot (what memory_viz reads):
        action, addr (device_free for an OOM), size, stream, time_us; no frames are recorded."""
        return [{"action": AllocatorAction(action).name.lower(),
                 ("device_free" if action == AllocatorAction.OOM else "addr"): address, "size": size,
                 "stream": stream, "time_us": time_us, "frames": []}
                for action, address, size, stream, time_us in zip(self._action, self._address, self._size_bytes,
                                                                  self._stream_code, self._time_us)]
