"""The caching allocator's event log (sim/allocator/event_log.py): whole logs of hand-derived cases against
CUDACachingAllocator.cpp's record_trace calls, placing entries in time by their events, and properties over random
runs (the log balances the reserved bytes, each entry names the call that made it, and keeping it changes nothing
the allocator does)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.allocator import caching
from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.base import OutOfMemory
from sim.allocator.caching import CachingAllocator
from sim.allocator.event_log import AllocatorAction, AllocatorEventLog
from sim.ops import STREAMS, Stream

MiB = 1024 * 1024
C, AG = Stream.COMPUTE, Stream.ALLGATHER
A = AllocatorAction


def logged(capacity_bytes: int, conf: str = "") -> tuple[CachingAllocator, AllocatorEventLog]:
    """A caching allocator writing a fresh log."""
    log = AllocatorEventLog()
    return CachingAllocator(capacity_bytes, parse_alloc_conf(conf), event_log=log), log


def rows(log: AllocatorEventLog, base: int, column: str = "event_index") -> list[tuple]:
    """The log as (event index or time, action, address - base, size, stream) rows (OOM rows keep the device's
    free bytes)."""
    c = log.columns()
    return [(t, A(a), addr if a == A.OOM else addr - base, size, stream) for t, a, addr, size, stream in
            zip(c[column].tolist(), c["action"].tolist(), c["address"].tolist(), c["size_bytes"].tolist(),
                c["stream_code"].tolist())]


def test_whole_log_of_segments_frees_and_a_pending_free() -> None:
    a, log = logged(64 * MiB)
    a.malloc(1, 3 * MiB, C)  # event 0: large pool, below 10 MiB: a 20 MiB segment (kLargeBuffer), 3 MiB handed out
    base = a.block_of(1)[0]
    a.free(1)  # event 1: requested and completed at once: no other stream used it
    a.malloc(2, 2 * MiB, C)  # event 2: cached (above 1 MiB: the large pool): the segment's front again
    a.free(2, pending_on=[AG])  # event 3: record_stream'ed on the all-gather stream: only requested
    a.stream_passed(AG)  # no allocator event: the free completes at the next malloc
    a.malloc(3, 4 * MiB, C)  # event 4: the pending free completes first (process_events), then the block is reused
    a.free(3)  # event 5
    a.empty_cache()  # event 6: the whole segment back to the device
    assert log.events == 7
    assert rows(log, base) == [
        (0, A.SEGMENT_ALLOC, 0, 20 * MiB, 0),
        (0, A.ALLOC, 0, 3 * MiB, 0),
        (1, A.FREE_REQUESTED, 0, 3 * MiB, 0),
        (1, A.FREE_COMPLETED, 0, 3 * MiB, 0),
        (2, A.ALLOC, 0, 2 * MiB, 0),
        (3, A.FREE_REQUESTED, 0, 2 * MiB, 0),
        (4, A.FREE_COMPLETED, 0, 2 * MiB, 0),
        (4, A.ALLOC, 0, 4 * MiB, 0),
        (5, A.FREE_REQUESTED, 0, 4 * MiB, 0),
        (5, A.FREE_COMPLETED, 0, 4 * MiB, 0),
        (6, A.SEGMENT_FREE, 0, 20 * MiB, 0),
    ]
    # placed in time: each entry takes its event's time (events 2 and 3 both at 7 us, 5 and 6 at 12 us)
    log.place_in_time(np.array([0, 5, 7, 7, 9, 12, 12]))
    assert [row[0] for row in rows(log, base, "time_us")] == [0, 0, 5, 5, 7, 7, 9, 9, 12, 12, 12]


def test_a_log_is_placed_in_time_for_all_its_events_and_no_others() -> None:
    """Entries are at 0 until placed; a placement gives one time per event so far, and an event after it has no
    time (the log refuses to guess one)."""
    a, log = logged(64 * MiB)
    assert log.columns()["time_us"].tolist() == []
    a.malloc(1, 512, C)
    assert log.columns()["time_us"].tolist() == [0, 0]  # not placed yet
    with pytest.raises(ValueError, match="2 event times for a log of 1 allocator events"):
        log.place_in_time(np.array([3, 4]))
    log.place_in_time(np.array([3]))
    assert log.columns()["time_us"].tolist() == [3, 3]
    a.free(1)
    with pytest.raises(ValueError, match="placed in time at 1 allocator events, and 2 happened"):
        log.columns()


def test_whole_log_of_an_oom_and_its_over_commit() -> None:
    # 40 MiB segments (>= 10 MiB: rounded to 2 MiB) in 64 MiB: the second finds 24 MiB free on the device; the
    # OOM entry holds that and the rounded size, then the model over-commits the segment and hands it out
    a, log = logged(64 * MiB)
    a.malloc(1, 40 * MiB, AG)
    base = a.block_of(1)[0]
    with pytest.raises(OutOfMemory):
        a.malloc(2, 40 * MiB - 100, AG)
    second = a.block_of(2)[0] - base
    assert second >= 40 * MiB
    assert rows(log, base) == [
        (0, A.SEGMENT_ALLOC, 0, 40 * MiB, 1),
        (0, A.ALLOC, 0, 40 * MiB, 1),
        (1, A.OOM, 24 * MiB, 40 * MiB, 1),
        (1, A.SEGMENT_ALLOC, second, 40 * MiB, 1),
        (1, A.ALLOC, second, 40 * MiB - 100, 1),
    ]


def test_whole_log_of_an_expandable_segment() -> None:
    # a large pool's expandable segment maps 20 MiB pages (kLargeBuffer): 3 MiB maps one; empty_cache unmaps it
    a, log = logged(64 * MiB, "expandable_segments:True")
    a.malloc(1, 3 * MiB, C)
    base = a.block_of(1)[0]
    a.free(1)
    a.empty_cache()
    assert rows(log, base) == [
        (0, A.SEGMENT_MAP, 0, 20 * MiB, 0),
        (0, A.ALLOC, 0, 3 * MiB, 0),
        (1, A.FREE_REQUESTED, 0, 3 * MiB, 0),
        (1, A.FREE_COMPLETED, 0, 3 * MiB, 0),
        (2, A.SEGMENT_UNMAP, 0, 20 * MiB, 0),
    ]


def test_empty_cache_returns_segments_in_pytorchs_order() -> None:
    """release_blocks walks large_blocks, then small_blocks, each ordered by (stream, size, address): a small
    segment freed first on the compute stream still goes back after every large one."""
    a, log = logged(256 * MiB)
    for buffer_id, size, stream in ((1, 512, C), (2, 40 * MiB, AG), (3, 12 * MiB, AG), (4, 30 * MiB, C)):
        a.malloc(buffer_id, size, stream)
    addresses = {buffer_id: a.block_of(buffer_id)[0] for buffer_id in range(1, 5)}
    for buffer_id in range(1, 5):
        a.free(buffer_id)
    a.empty_cache()
    c = log.columns()
    freed = c["address"][c["action"] == A.SEGMENT_FREE].tolist()
    assert freed == [addresses[4], addresses[3], addresses[2], addresses[1]]


def test_a_logging_allocator_repeats_no_window() -> None:
    """A repeated window skips calls the log must see; the compiled core writes the log itself."""
    a, _ = logged(64 * MiB)
    assert not a.can_repeat()
    assert a.can_replay_compiled() == (caching._sim_caching is not None)


def test_the_snapshot_carries_the_log_as_pytorch_names_it() -> None:
    a, log = logged(64 * MiB)
    a.malloc(1, 512, C)
    (trace,) = a.snapshot()["device_traces"]
    assert [entry["action"] for entry in trace] == ["segment_alloc", "alloc"]
    assert trace[1] == {"action": "alloc", "addr": a.block_of(1)[0], "size": 512, "stream": 0, "time_us": 0,
                        "frames": []}


SIZES = st.one_of(st.integers(0, 4096), st.integers(4097, MiB), st.integers(MiB + 1, 10 * MiB),
                  st.integers(10 * MiB, 90 * MiB))


@st.composite
def calls(draw) -> list[tuple]:
    """malloc (id, size, stream), free (~id, pending streams) and empty_cache (None) calls."""
    out: list[tuple] = []
    live: list[int] = []
    for next_id in range(draw(st.integers(1, 120))):
        choice = draw(st.integers(0, 9))
        if live and choice < 4:
            pending = draw(st.lists(st.sampled_from(STREAMS), max_size=2))
            out.append((~live.pop(draw(st.integers(0, len(live) - 1))), pending))
        elif choice == 9:
            out.append((None,))
        else:
            out.append((next_id, draw(SIZES), draw(st.sampled_from(STREAMS))))
            live.append(next_id)
    return out


def run_calls(allocator: CachingAllocator, sequence: list[tuple]) -> None:
    """Make the calls; a pending free's streams pass at the next call (their events complete)."""
    pending: set = set()
    for call in sequence:
        for stream in pending:
            allocator.stream_passed(stream)
        pending = set()
        if call[0] is None:
            allocator.empty_cache()
        elif call[0] < 0:
            allocator.free(~call[0], pending_on=call[1])
            pending = set(call[1])
        else:
            try:
                allocator.malloc(*call)
            except OutOfMemory:
                pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(), st.sampled_from(["", "max_split_size_mb:40", "expandable_segments:True"]), st.integers(30, 300))
def test_the_log_balances_and_changes_nothing(sequence, conf: str, capacity_mib: int) -> None:
    plain = CachingAllocator(capacity_mib * MiB, parse_alloc_conf(conf))
    with_log, log = logged(capacity_mib * MiB, conf)
    run_calls(plain, sequence)
    run_calls(with_log, sequence)
    assert with_log.memory_stats() == plain.memory_stats() and with_log.segments() == plain.segments()
    c = log.columns()
    action, size = c["action"], c["size_bytes"]

    def total(*actions: AllocatorAction) -> int:
        """The bytes the log's entries of `actions` add up to."""
        return int(size[np.isin(action, actions)].sum())

    # segments and mapped pages in minus out is what is reserved; every request is logged once
    assert total(A.SEGMENT_ALLOC, A.SEGMENT_MAP) - total(A.SEGMENT_FREE, A.SEGMENT_UNMAP) == plain.reserved_bytes
    assert (action == A.ALLOC).sum() == sum(1 for call in sequence if call[0] is not None and call[0] >= 0)
    assert (action == A.FREE_REQUESTED).sum() == sum(1 for call in sequence if call[0] is not None and call[0] < 0)
    assert (action == A.OOM).sum() == plain.num_ooms
    # every call is one event; a malloc's entries end with its alloc, a free's begin with its request
    event = c["event_index"]
    assert log.events == len(sequence) and (np.diff(event) >= 0).all()
    assert event[action == A.ALLOC].tolist() == [i for i, call in enumerate(sequence) if call[0] is not None
                                                  and call[0] >= 0]
    assert event[action == A.FREE_REQUESTED].tolist() == [i for i, call in enumerate(sequence)
                                                           if call[0] is not None and call[0] < 0]
    last_of_event = np.append(event[1:] != event[:-1], True)
    first_of_event = np.insert(event[1:] != event[:-1], 0, True)
    assert (last_of_event[action == A.ALLOC]).all() and (first_of_event[action == A.FREE_REQUESTED]).all()
    # a free completes at most once, after it was requested, and what has not completed is still pending
    requested = np.cumsum(action == A.FREE_REQUESTED)
    completed = np.cumsum(action == A.FREE_COMPLETED)
    assert (completed <= requested).all()
    pending = sum(b["state"] == "active_pending_free" for segment in plain.segments() for b in segment["blocks"])
    assert (requested[-1] - completed[-1] if len(action) else 0) == pending
