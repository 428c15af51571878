"""Allocator backends behind one seam: `exact` (live bytes) and `caching` (PyTorch's CUDACachingAllocator)."""

from sim.allocator.alloc_conf import AllocConf, parse_alloc_conf
from sim.allocator.base import Allocator, OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.allocator.exact import ExactAllocator
from sim.vocab import AllocatorBackend


def make_allocator(backend: AllocatorBackend, conf: AllocConf, capacity_bytes: int, device_total_bytes: int,
                   torch_version: tuple[int, int, int]) -> Allocator:
    """The named backend; `capacity_bytes` is what cudaMalloc can still get after non-PyTorch memory,
    `device_total_bytes` the card's total as torch reports it (for the OOM message)."""
    if backend is AllocatorBackend.EXACT:
        return ExactAllocator(capacity_bytes)
    return CachingAllocator(capacity_bytes, conf, torch_version, device_total_bytes=device_total_bytes)


__all__ = ["AllocConf", "Allocator", "CachingAllocator", "ExactAllocator", "OutOfMemory", "make_allocator",
           "parse_alloc_conf"]
