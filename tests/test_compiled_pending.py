"""Pending (record_stream) frees in the caching allocator's compiled core (sim/allocator/caching_core.c) against
the Python model driven by StepwiseDriver (sim/drivers.py) in one window, event by event, end state and event log
included.

Skipped where the core is not built (`pip install .` builds it; sim then runs the Python model everywhere)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.allocator import caching
from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.caching import CachingAllocator
from sim.allocator.event_log import AllocatorEventLog
from sim.drivers import CompiledReplay, StepwiseDriver
from sim.event_order import AllocatorEvents
from sim.ops import STREAMS
from tests.test_compiled_caching import CONFS, SIZES, assert_same_log, assert_same_state, malloc_then_empty_cache

pytestmark = pytest.mark.skipif(caching._sim_caching is None, reason="the compiled core is not built")

MiB = 1024 * 1024


def events_of(rows: list[tuple[int, int, int, int]]) -> AllocatorEvents:
    """AllocatorEvents from (signed id, size, stream code, release_at) rows; event i at time i, op i."""
    signed, sizes, codes, release_at = (np.array(column, dtype=np.int64) for column in zip(*rows))
    order = np.arange(len(rows), dtype=np.int64)
    return AllocatorEvents(order, order, signed, sizes, codes, release_at)


@st.composite
def pending_runs(draw) -> AllocatorEvents:
    """Mallocs on the three streams and frees on any stream, some pending until a later malloc (or never); a freed
    id is sometimes allocated again, even while its block is still pending."""
    rows: list[list[int]] = []
    live: list[int] = []
    freed: list[int] = []
    next_id = 0
    for _ in range(draw(st.integers(1, 150))):
        if live and draw(st.booleans()):
            buffer_id = live.pop(draw(st.integers(0, len(live) - 1)))
            freed.append(buffer_id)
            rows.append([~buffer_id, 0, draw(st.integers(0, len(STREAMS) - 1)), -1])
        else:
            if freed and draw(st.integers(0, 2)) == 0:  # the latest freed id: its block may still be pending
                buffer_id = freed.pop()
            else:
                buffer_id, next_id = next_id, next_id + draw(st.integers(1, 3))
            rows.append([buffer_id, draw(SIZES), draw(st.integers(0, len(STREAMS) - 1)), -1])
            live.append(buffer_id)
    n = len(rows)
    mallocs = [at for at, row in enumerate(rows) if row[0] >= 0]
    for at, row in enumerate(rows):
        later = [m for m in mallocs if m > at]
        if row[0] < 0 and later and draw(st.booleans()):  # pending only where a malloc comes before its release
            row[3] = draw(st.sampled_from(later[1:] + [n]) if len(later) > 1 else st.just(n))
    return events_of([tuple(row) for row in rows])


def pending_state(allocator: CachingAllocator) -> tuple:
    """The record_stream bookkeeping: the streams waited on in order with their blocks' addresses in order, the
    pending buffers with their blocks' addresses, and whether any event is ready."""
    events = [(stream, [b.addr for b in blocks]) for stream, blocks in allocator._events.items()]
    return events, sorted((i, b.addr) for i, b in allocator._pending.items()), len(allocator._ready)


def assert_same_allocators(a: CachingAllocator, b: CachingAllocator) -> None:
    assert_same_state(a, b)
    assert a.counters() == b.counters()
    assert pending_state(a) == pending_state(b)


def run_result(run) -> tuple:
    oom = None if run.oom is None else (run.oom.event_index, run.oom.requested_bytes, run.oom.message)
    return run.allocated_bytes.tolist(), run.reserved_bytes.tolist(), oom, run.largest_free_block_at_peak_bytes


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pending_runs(), st.sampled_from(CONFS), st.integers(30, 400))
def test_compiled_pending_frees_run_as_pending_replay(events: AllocatorEvents, conf: str, capacity_mib: int) -> None:
    """Bytes after each event, first OOM, largest free block at the peak, counters, end state (pending blocks
    included) and event log: the same from the core as from StepwiseDriver, and again after both go on in Python."""
    # small capacities make the OOM retry path (which synchronises and frees every pending block) common
    logs = [AllocatorEventLog() for _ in range(2)]
    python, compiled = (CachingAllocator(capacity_mib * MiB, parse_alloc_conf(conf), event_log=log) for log in logs)
    assert compiled.can_replay_compiled()
    stepwise = StepwiseDriver([(0, len(events))], False)
    assert run_result(CompiledReplay().drive(compiled, events)) == run_result(stepwise.drive(python, events))
    assert_same_allocators(compiled, python)
    assert_same_log(*logs)
    # the adopted pending blocks go on in Python as the model's own: release some, allocate (a release point, and
    # a request large enough to take the OOM retry path, which synchronises the rest), then empty the cache
    raised = []
    for allocator in (python, compiled):
        for buffer_id in sorted(allocator.pending_buffer_ids())[::2]:
            allocator.release_pending(buffer_id)
        raised.append(malloc_then_empty_cache(
            allocator, ((10**6, 1000, STREAMS[2]), (10**6 + 1, 2 * capacity_mib * MiB, STREAMS[0]))))
    assert raised[0] == raised[1]
    assert_same_allocators(compiled, python)
    assert_same_log(*logs)


def test_a_pending_block_is_reused_only_after_its_release_point() -> None:
    """A 20 MiB buffer freed on another stream: a malloc before its release point cannot take its block, one at
    the release point does."""
    a, b, c = 0, 1, 2
    rows = [(a, 20 * MiB, 0, -1),  # 20 MiB >= kMinLargeAlloc (10 MiB): a 20 MiB segment, unsplit
            (~a, 0, 1, 3),  # freed on the allgather stream, pending until event 3: allocated 0, reserved 20 MiB
            (b, 20 * MiB, 0, -1),  # the pool holds no free block: a second segment, reserved 40 MiB
            (c, 20 * MiB, 0, -1)]  # a's block returns to the pool first; c takes it: reserved stays 40 MiB
    allocator = CachingAllocator(1024 * MiB)
    allocated, reserved, oom, largest = allocator.replay_compiled(*(np.array(column, dtype=np.int64)
                                                                    for column in zip(*rows)))
    assert allocated.tolist() == [20 * MiB, 0, 20 * MiB, 40 * MiB]
    assert reserved.tolist() == [20 * MiB, 20 * MiB, 40 * MiB, 40 * MiB]
    # the first segment lies at the base address, the second 20 MiB above; c holds the first again
    assert allocator.block_of(c) == (caching._VA_BASE, 20 * MiB)
    assert allocator.block_of(b) == (caching._VA_BASE + 20 * MiB, 20 * MiB)
    # reserved first reaches 40 MiB at event 2, where a's block is pending (in no pool) and nothing else is free
    assert (oom, largest) == (None, 0)
    assert (allocator.num_device_alloc, allocator.num_sync_all_streams, allocator._pending) == (2, 0, {})


def test_an_oom_retry_frees_a_pending_block_before_its_release_point() -> None:
    """With 40 MiB, the third 20 MiB request finds no room: the retry path synchronises (freeing the pending
    block), releases its segment and allocates again, where without the pending block there was a cached one."""
    a, b, c = 0, 1, 2
    rows = [(a, 20 * MiB, 0, -1),  # a 20 MiB segment
            (~a, 0, 2, 4),  # freed on the reduce stream, pending past the run (4 = the number of events)
            (b, 20 * MiB, 0, -1),  # a second segment: reserved 40 MiB = the capacity
            (c, 20 * MiB, 0, -1)]  # no free block, 40 + 20 > 40 MiB: sync frees a's block, its segment is
    # released (reserved 20 MiB), and the retry's new segment fits (20 + 20 = 40 MiB): one retry, no OOM
    allocator = CachingAllocator(40 * MiB)
    allocated, reserved, oom, _ = allocator.replay_compiled(*(np.array(column, dtype=np.int64)
                                                              for column in zip(*rows)))
    assert allocated.tolist() == [20 * MiB, 0, 20 * MiB, 40 * MiB]
    assert reserved.tolist() == [20 * MiB, 20 * MiB, 40 * MiB, 40 * MiB]
    assert oom is None
    counters = dict(zip(CachingAllocator._COUNTERS, allocator.counters()))
    # three cudaMallocs (a, b, c's retry), one cudaFree (a's segment), one synchronisation; c's segment is the
    # third one carved: at 40 MiB above the base
    assert (counters["num_alloc_retries"], counters["num_device_alloc"], counters["num_device_free"],
            counters["num_sync_all_streams"]) == (1, 3, 1, 1)
    assert allocator.block_of(c) == (caching._VA_BASE + 40 * MiB, 20 * MiB)
    assert allocator._pending == {} and allocator._events == {}


def test_pending_blocks_left_at_the_end_are_adopted_as_pending() -> None:
    """A block still pending at the end stays active_pending_free (not cached), waiting on its stream, and its
    release makes it reusable at the next malloc."""
    rows = [(0, 3 * MiB, 0, -1), (~0, 0, 1, 3), (1, 512, 0, -1)]  # released at 3 = the number of events: never
    allocator = CachingAllocator(1024 * MiB)
    allocator.replay_compiled(*(np.array(column, dtype=np.int64) for column in zip(*rows)))
    states = [block["state"] for segment in allocator.segments() for block in segment["blocks"]]
    # the 3 MiB block of a 20 MiB segment pending, its 17 MiB rest free; the 512 B one in a small segment
    assert sorted(states) == ["active_allocated", "active_pending_free", "inactive", "inactive"]
    assert allocator.allocated_bytes == 512 and allocator.active_bytes == 3 * MiB + 512
    assert allocator.largest_free_block_bytes() == 17 * MiB
    allocator.release_pending(0)
    allocator.malloc(2, 20 * MiB, STREAMS[0])  # the block merges with its rest: one free 20 MiB block, reused
    assert allocator.block_of(2) == (caching._VA_BASE, 20 * MiB) and allocator.num_device_alloc == 2
