"""The caching allocator's compiled core (sim/allocator/caching_core.c) against its Python model, event by event,
event log included.

Skipped where the core is not built (`pip install .` builds it; sim then runs the Python model everywhere)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.allocator import caching
from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.base import OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.allocator.event_log import AllocatorEventLog
from sim.ops import STREAMS

pytestmark = pytest.mark.skipif(caching._sim_caching is None, reason="the compiled core is not built")

MiB = 1024 * 1024
CONFS = ["", "max_split_size_mb:40", "max_split_size_mb:21,max_non_split_rounding_mb:40",
         "roundup_power2_divisions:4", "roundup_power2_divisions:[1:2,2:8,>:1],max_split_size_mb:64"]
# sizes that reach every pool and rounding: tiny, small-pool, below kMinLargeAlloc, large; and whole 2 MiB
# multiples, which meet segment sizes and the max_split rules' boundaries exactly
SIZES = st.one_of(st.integers(0, 4096), st.integers(4097, MiB), st.integers(MiB + 1, 10 * MiB),
                  st.integers(10 * MiB, 90 * MiB), st.integers(1, 45).map(lambda k: k * 2 * MiB))


@st.composite
def runs(draw) -> list[tuple[int, int, int]]:
    """(signed id, size, stream code) events: a malloc of a new id, or ~id to free a live one."""
    events: list[tuple[int, int, int]] = []
    live: list[int] = []
    next_id = 0
    for _ in range(draw(st.integers(1, 200))):
        if live and draw(st.booleans()):
            buffer_id = live.pop(draw(st.integers(0, len(live) - 1)))
            events.append((~buffer_id, 0, 0))
        else:
            events.append((next_id, draw(SIZES), draw(st.integers(0, len(STREAMS) - 1))))
            live.append(next_id)
            next_id += draw(st.integers(1, 3))  # ids need not be dense
    return events


def python_run(allocator: CachingAllocator, events: list[tuple[int, int, int]]):
    """What the engine's stepwise driver records: bytes after each event, the first OOM (its event, requested
    bytes and message), and the largest free block at the first event with the most reserved."""
    allocated, reserved, first_oom, most, largest = [], [], None, -1, 0
    for at, (signed, size, code) in enumerate(events):
        if signed >= 0:
            try:
                allocator.malloc(signed, size, STREAMS[code])
            except OutOfMemory as exc:
                first_oom = first_oom or (at, exc.requested_bytes, str(exc))
        else:
            allocator.free(~signed)
        allocated.append(allocator.allocated_bytes)
        reserved.append(allocator.reserved_bytes)
        if allocator.reserved_bytes > most:
            most, largest = allocator.reserved_bytes, allocator.largest_free_block_bytes()
    return allocated, reserved, first_oom, largest


def compiled_run(allocator: CachingAllocator, events: list[tuple[int, int, int]]):
    signed, sizes, codes = (np.array(column, dtype=np.int64) for column in zip(*events))
    assert allocator.can_replay_compiled()
    allocated, reserved, first_oom, largest = allocator.replay_compiled(signed, sizes, codes)
    if first_oom is not None:
        at, exc = first_oom
        first_oom = at, exc.requested_bytes, str(exc)
    return allocated.tolist(), reserved.tolist(), first_oom, largest


def malloc_then_empty_cache(allocator: CachingAllocator, requests) -> list[int]:
    """malloc each (buffer id, size, stream) of `requests`, then torch.cuda.empty_cache(); the ids that raised OOM."""
    raised = []
    for buffer_id, size, stream in requests:
        try:
            allocator.malloc(buffer_id, size, stream)
        except OutOfMemory:
            raised.append(buffer_id)
    allocator.empty_cache()
    return raised


def assert_same_log(a: AllocatorEventLog, b: AllocatorEventLog) -> None:
    """Every column of the two logs, entry for entry, and the events they count."""
    columns_a, columns_b = a.columns(), b.columns()
    assert columns_a.keys() == columns_b.keys()
    for name, column in columns_a.items():
        assert column.dtype == columns_b[name].dtype and column.tolist() == columns_b[name].tolist(), name
    assert a.events == b.events


def assert_same_state(a: CachingAllocator, b: CachingAllocator) -> None:
    a.check_invariants()
    assert a.memory_stats() == b.memory_stats()
    assert a.segments() == b.segments()  # every block: address, size, requested size, state
    assert a.ooms == b.ooms
    assert (a.retries_before_first_oom, a.unlimited, a._next_va) == (b.retries_before_first_oom, b.unlimited,
                                                                      b._next_va)
    assert sorted(a.live_buffer_ids()) == sorted(b.live_buffer_ids())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.sampled_from(CONFS), st.integers(30, 400),
       st.one_of(st.integers(-20 * MiB, 20 * MiB), st.integers(0, 2**40)), st.integers(0, 2))
def test_compiled_core_runs_the_python_model(events, conf: str, capacity_mib: int, beyond_bytes: int,
                                             earlier_events: int) -> None:
    """Bytes after each event, first OOM, end state and event log: the same from the core (with and without a
    log) as from the Python model, and the same again after both go on in Python."""
    # small capacities make the cudaMalloc-failure path (release, retry, OOM, over-commit) common; the device's
    # total beyond the capacity (non-PyTorch memory; or below it) only shows in the OOM message and log entry;
    # a log that already counts events (of calls made before, elsewhere) numbers this run's after them
    logs = [AllocatorEventLog() for _ in range(2)]
    for log in logs:
        for _ in range(earlier_events):
            log.end_event()
    python, compiled = (CachingAllocator(capacity_mib * MiB, parse_alloc_conf(conf), event_log=log,
                                         device_total_bytes=capacity_mib * MiB + beyond_bytes) for log in logs)
    unlogged = CachingAllocator(capacity_mib * MiB, parse_alloc_conf(conf),
                                device_total_bytes=capacity_mib * MiB + beyond_bytes)
    results = python_run(python, events)
    assert compiled_run(compiled, events) == results
    assert compiled_run(unlogged, events) == results  # keeping a log changes nothing the core does
    assert_same_state(compiled, python)
    assert_same_state(unlogged, python)
    assert_same_log(*logs)
    # the adopted state goes on in Python as the model's own: free everything, then allocate again, then
    # empty the cache; the log goes on from the core's last event
    raised = []
    for allocator in (python, compiled):
        for buffer_id in sorted(allocator.live_buffer_ids()):
            allocator.free(buffer_id)
        raised.append(malloc_then_empty_cache(allocator, ((10**6, 30 * MiB, STREAMS[0]),
                                                          (10**6 + 1, 1000, STREAMS[1]))))
    assert raised[0] == raised[1]
    assert_same_state(compiled, python)
    assert_same_log(*logs)


def test_compiled_core_is_left_out_where_it_does_not_apply() -> None:
    # expandable segments, garbage collection and an allocator already in use run in Python
    assert not CachingAllocator(MiB * 100, parse_alloc_conf("expandable_segments:True")).can_replay_compiled()
    gc = CachingAllocator(MiB * 100, parse_alloc_conf("garbage_collection_threshold:0.5"), memory_fraction=0.5)
    assert not gc.can_replay_compiled()
    used = CachingAllocator(MiB * 100)
    used.malloc(0, 512, STREAMS[0])
    assert not used.can_replay_compiled()
    emptied = CachingAllocator(MiB * 100)  # empty_cache synchronised the streams: the core would not count it
    emptied.empty_cache()
    assert not emptied.can_replay_compiled()


def test_compiled_core_on_no_events_changes_nothing() -> None:
    log = AllocatorEventLog()
    allocator = CachingAllocator(MiB * 100, event_log=log)
    empty = np.zeros(0, dtype=np.int64)
    allocated, reserved, first_oom, largest = allocator.replay_compiled(empty, empty, empty)
    assert (len(allocated), len(reserved), first_oom, largest) == (0, 0, None, None)
    assert allocator.memory_stats() == CachingAllocator(MiB * 100).memory_stats()
    assert (len(log), log.events) == (0, 0)


def test_compiled_core_refuses_a_double_allocation_and_an_unknown_free() -> None:
    allocator = CachingAllocator(MiB * 100)
    with pytest.raises(AssertionError, match="buffer 3 allocated twice"):
        compiled_run(allocator, [(3, 512, 0), (3, 512, 0)])
    with pytest.raises(KeyError):
        compiled_run(CachingAllocator(MiB * 100), [(3, 512, 0), (~4, 0, 0)])


def test_a_far_out_of_memory_run_has_addresses_for_everything() -> None:
    """A job hundreds of TiB over an 80 GiB device (issue #19: 64 x 65,536 tokens with eager attention) over-commits
    after its OOM; its segments need more addresses than the 2^48 - 0x7F00_0000_0000 (129 TiB) the synthetic
    address space once had. Eight 32 TiB tensors live at once: 256 TiB of segments, each at its own address, the
    same in the core and the Python model."""
    tib = 2**40
    events = [(i, 32 * tib, 0) for i in range(8)] + [(~i, 0, 0) for i in range(8)] + [(8, 32 * tib + 1, 0)]
    python, compiled = (CachingAllocator(80 * 1024 * MiB, parse_alloc_conf("")) for _ in range(2))
    results = python_run(python, events)
    assert compiled_run(compiled, events) == results
    assert_same_state(compiled, python)
    allocated, reserved, first_oom, _ = results
    assert first_oom[0] == 0 and max(allocated) == 8 * 32 * tib
    # the ninth request (2 MiB larger after rounding) fits no cached block: the OOM path releases the eight
    # cached segments and retries, still over capacity, so it over-commits one new segment. Its address lies past
    # the 8 · 32 TiB handed out before: 288 TiB of addresses in all, more than the old 129 TiB
    assert reserved[-1] == 32 * tib + 2 * MiB
    assert python._next_va - caching._VA_BASE >= 9 * 32 * tib > 2**48 - caching._VA_BASE
