"""Allocator backends behind one seam: `exact` (live bytes) now; the CUDA caching allocator plugs in here."""

from sim.allocator.base import Allocator, AllocatorStats, OutOfMemory
from sim.allocator.exact import ExactAllocator
from sim.errors import ScenarioError
from sim.scenario import Allocator as AllocatorSpec
from sim.scenario import AllocatorBackend


def make_allocator(spec: AllocatorSpec, capacity_bytes: int) -> Allocator:
    """The backend the scenario names, for a device whose PyTorch-usable memory is `capacity_bytes`."""
    if spec.backend is AllocatorBackend.EXACT:
        if spec.conf:
            raise ScenarioError(f"allocator.conf: only meaningful with backend caching (got {spec.conf!r})")
        return ExactAllocator(capacity_bytes)
    raise ScenarioError(
        "allocator.backend: 'caching' (PyTorch's CUDACachingAllocator) is not modelled yet; use 'exact'"
    )


__all__ = ["Allocator", "AllocatorStats", "ExactAllocator", "OutOfMemory", "make_allocator"]
