"""Allocator backends behind one seam: `exact` (live bytes) and `caching` (PyTorch's CUDACachingAllocator)."""

from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.base import Allocator, OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.allocator.exact import ExactAllocator
from sim.errors import ScenarioError
from sim.scenario import Allocator as AllocatorSpec
from sim.vocab import AllocatorBackend


def make_allocator(spec: AllocatorSpec, capacity_bytes: int, device_total_bytes: int,
                   torch_version: tuple[int, int, int]) -> Allocator:
    """The backend the scenario names; `capacity_bytes` is what cudaMalloc can still get after non-PyTorch
    memory, `device_total_bytes` the card's total as torch reports it (for the OOM message)."""
    if spec.backend is AllocatorBackend.EXACT:
        if spec.conf:
            raise ScenarioError(f"allocator.conf: only meaningful with backend caching (got {spec.conf!r})")
        return ExactAllocator(capacity_bytes)
    return CachingAllocator(capacity_bytes, parse_alloc_conf(spec.conf), torch_version,
                            device_total_bytes=device_total_bytes)


__all__ = ["Allocator", "CachingAllocator", "ExactAllocator", "OutOfMemory", "make_allocator"]
