"""Allocator backends behind one seam: `exact` (live bytes) and `caching` (PyTorch's CUDACachingAllocator)."""

from sim.allocator.alloc_conf import AllocConf, parse_alloc_conf
from sim.allocator.base import Allocator, OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.allocator.event_log import AllocatorEventLog
from sim.allocator.exact import ExactAllocator
from sim.vocab import AllocatorBackend


def make_allocator(backend: AllocatorBackend, conf: AllocConf, capacity_bytes: int, device_total_bytes: int,
                   torch_version: tuple[int, int, int], event_log: AllocatorEventLog | None = None) -> Allocator:
    """The named backend; `capacity_bytes` is what cudaMalloc can still get after non-PyTorch memory,
    `device_total_bytes` the card's total as torch reports it (for the OOM message); `event_log`: where the
    caching backend records PyTorch's trace entries (the exact one has no blocks to record: ValueError)."""
    if backend is AllocatorBackend.EXACT:
        if event_log is not None:
            raise ValueError("the exact allocator keeps no event log: it counts live bytes, without the blocks, "
                             "segments and addresses PyTorch's trace entries describe")
        return ExactAllocator(capacity_bytes)
    return CachingAllocator(capacity_bytes, conf, torch_version, device_total_bytes=device_total_bytes,
                            event_log=event_log)


__all__ = ["AllocConf", "Allocator", "CachingAllocator", "ExactAllocator", "OutOfMemory", "make_allocator",
           "parse_alloc_conf"]
