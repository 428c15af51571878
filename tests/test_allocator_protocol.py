"""The allocator protocol (sim/allocator/base.py) is written down whole: the engine's roles use nothing on an
allocator that it does not declare, and every backend implements all of it, with the declared signatures."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

from sim.allocator import CachingAllocator, ExactAllocator
from sim.allocator.base import Allocator
from sim.drivers import StepwiseDriver, VectorisedReplay
from sim.event_order import order_events
from sim.ops import Stream
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.timeline import ListTimeline
from tests.conftest import synchronous_host, tiny_raw

SIM = Path(__file__).resolve().parent.parent / "sim"
ENGINE_MODULES = ["engine.py", "timeline.py", "event_order.py", "drivers.py", "steady.py"]


def protocol_members() -> set[str]:
    """Every attribute and method Allocator declares."""
    methods = {name for name, value in vars(Allocator).items() if not name.startswith("_") and callable(value)}
    return methods | set(Allocator.__annotations__)


def allocator_accesses(source: str) -> set[str]:
    """Every attribute read or called on the allocator in `source`: on a name `allocator`, a parameter annotated
    `Allocator`, or `self.allocator`."""
    tree = ast.parse(source)
    names = {"allocator"} | {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)
                             and isinstance(node.annotation, ast.Name) and node.annotation.id == "Allocator"}

    def is_allocator(node: ast.expr) -> bool:
        """Whether `node` is the allocator: one of `names`, or self.allocator."""
        if isinstance(node, ast.Name):
            return node.id in names
        return (isinstance(node, ast.Attribute) and node.attr == "allocator" and isinstance(node.value, ast.Name)
                and node.value.id == "self")

    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and is_allocator(node.value)}


def test_the_engine_uses_only_what_the_protocol_declares() -> None:
    used = set().union(*(allocator_accesses((SIM / module).read_text()) for module in ENGINE_MODULES))
    assert used - protocol_members() == set()
    assert {"malloc", "free", "can_repeat", "replay_compiled", "replay_vectorised", "state_signature"} <= used


def test_the_access_collector_sees_every_way_in() -> None:
    # the check above can fail: a call through a parameter, an alias and self.allocator are all seen
    source = ("def f(a: Allocator, allocator):\n    a.snapshot()\n    grab = allocator.memory_stats\n"
              "    self.allocator.segments()\n")
    assert allocator_accesses(source) == {"snapshot", "memory_stats", "segments"}


@pytest.mark.parametrize("backend", [ExactAllocator(1000), CachingAllocator(10**9)], ids=type)
def test_every_backend_implements_the_protocol(backend) -> None:
    for name in protocol_members():
        assert hasattr(backend, name), name
        if callable(getattr(Allocator, name, None)):  # the declared parameters first, any others optional
            declared = list(inspect.signature(getattr(Allocator, name)).parameters)[1:]  # without self
            actual = list(inspect.signature(getattr(backend, name)).parameters.values())
            assert [p.name for p in actual[:len(declared)]] == declared, name
            assert all(p.default is not inspect.Parameter.empty for p in actual[len(declared):]), name


def test_exact_refuses_the_compiled_path_and_caching_the_vectorised_one() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert not ExactAllocator(1000).can_replay_compiled()
    with pytest.raises(NotImplementedError):
        ExactAllocator(1000).replay_compiled(empty, empty, empty)
    assert not CachingAllocator(10**9).can_replay_vectorised()
    with pytest.raises(NotImplementedError):
        CachingAllocator(10**9).replay_vectorised(empty, empty)


def test_exact_stepwise_with_repeated_windows_is_its_vectorised_replay() -> None:
    # The exact allocator honours the whole protocol: driven event by event with repeated windows skipped, it
    # gives the vectorised pass's bytes, OOM and end state (capacity 1 MB: the tiny run goes over it)
    raw = tiny_raw(gradient_accumulation_steps=4)
    raw["simulation"]["steps"] = 2
    schedule = build_schedule(resolve_plan(build_scenario(raw))).schedule
    durations = np.ones(len(schedule.ops), dtype=np.int64)
    events = order_events(schedule, ListTimeline().op_times(schedule, durations, synchronous_host(schedule)))
    vectorised, stepwise = ExactAllocator(10**6), ExactAllocator(10**6)
    fast = VectorisedReplay().drive(vectorised, events)
    slow = StepwiseDriver(events.windows(schedule.window_first_ops()), True).drive(stepwise, events)
    assert slow.repeated_events > 0 and fast.oom is not None
    assert np.array_equal(fast.allocated_bytes, slow.allocated_bytes)
    assert np.array_equal(fast.reserved_bytes, slow.reserved_bytes)
    assert (fast.oom, fast.largest_free_block_at_peak_bytes) == (slow.oom, slow.largest_free_block_at_peak_bytes)
    assert sorted(vectorised.live_buffer_ids()) == sorted(stepwise.live_buffer_ids())
    identity = {b: b for b in stepwise.live_buffer_ids()}
    assert vectorised.state_signature(identity) == stepwise.state_signature(identity)
    for allocator in (vectorised, stepwise):  # the end state goes on as malloc/free would have left it
        for buffer_id in allocator.live_buffer_ids():
            allocator.free(buffer_id)
        allocator.malloc(10**9, 5, Stream.COMPUTE)
        assert allocator.allocated_bytes == 5
