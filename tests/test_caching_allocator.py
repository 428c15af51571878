"""The caching backend (sim.allocator.caching): hand-derived cases from CUDACachingAllocator.cpp and a state machine."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from sim.allocator.alloc_conf import AllocConf, parse_alloc_conf
from sim.allocator.base import OutOfMemory
from sim.allocator.caching import (
    CachingAllocator,
    format_size,
    get_allocation_size,
    round_size,
    roundup_power2_next_division,
)
from sim.ops import Stream

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
C, AG, RS = Stream.COMPUTE, Stream.ALLGATHER, Stream.REDUCE


def make(capacity: int = 80 * GiB, conf: str = "", **kw: object) -> CachingAllocator:
    return CachingAllocator(capacity, parse_alloc_conf(conf), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sizes


def test_format_size_matches_c10() -> None:
    assert format_size(0) == "0 bytes"
    assert format_size(1024) == "1024 bytes"  # <= 1024 stays bytes
    assert format_size(1025) == "1.00 KiB"
    assert format_size(MiB) == "1024.00 KiB"  # <= 1 MiB stays KiB
    assert format_size(20 * MiB) == "20.00 MiB"
    assert format_size(GiB) == "1024.00 MiB"  # <= 1 GiB stays MiB
    assert format_size(80 * GiB) == "80.00 GiB"
    assert format_size(1536 * KiB) == "1.50 MiB"


def test_round_size_and_segment_size() -> None:
    conf = AllocConf()
    assert round_size(1, conf) == 512
    assert round_size(513, conf) == 1024
    assert get_allocation_size(512) == 2 * MiB  # small pool: 2 MiB segments
    assert get_allocation_size(MiB) == 2 * MiB  # 1 MiB is still small
    assert get_allocation_size(MiB + 512) == 20 * MiB  # (1 MiB, 10 MiB) -> 20 MiB
    assert get_allocation_size(10 * MiB - 512) == 20 * MiB
    assert get_allocation_size(10 * MiB) == 10 * MiB  # >= 10 MiB: round up to 2 MiB
    assert get_allocation_size(10 * MiB + 512) == 12 * MiB


def test_roundup_power2_divisions_rounding() -> None:
    conf = parse_alloc_conf("roundup_power2_divisions:4")
    # 1200 B: divisions 4 only apply above 512*4 = 2048 B, so plain 512 rounding -> 1536
    assert round_size(1200, conf) == 1536
    # 3 MiB + 1: floor 2 MiB, step 2 MiB / 4 = 512 KiB; 3 MiB + 1 -> next step 3.5 MiB
    assert round_size(3 * MiB + 1, conf) == 3 * MiB + 512 * KiB
    # 5 MiB: floor 4 MiB, step 1 MiB; already on a step
    assert round_size(5 * MiB, conf) == 5 * MiB
    # 5 MiB + 1 -> 6 MiB
    assert round_size(5 * MiB + 1, conf) == 6 * MiB
    # powers of two are kept
    assert round_size(64 * MiB, conf) == 64 * MiB
    # the C++ example: 1200 with 4 divisions -> 1280 (1024, 1280, 1536, 1792)
    assert roundup_power2_next_division(1200, 4) == 1280

    conf = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]")
    # 100 MiB: interval 6 filled by the first key (1) -> plain 512 rounding
    assert round_size(100 * MiB + 1, conf) == 100 * MiB + 512
    # 600 MiB: interval 9 -> 2 divisions: floor 512 MiB, step 256 MiB -> 768 MiB
    assert round_size(600 * MiB, conf) == 768 * MiB
    # 1.5 GiB + 1: interval 10 was overwritten by '>' (8): floor 1 GiB, step 128 MiB -> 1664 MiB
    assert round_size(1536 * MiB + 1, conf) == 1664 * MiB


def test_rounding_changes_what_is_allocated() -> None:
    a = make(conf="roundup_power2_divisions:4")
    a.malloc(1, 5 * MiB + 1, C)  # rounds to 6 MiB, segment 20 MiB, remainder 14 MiB split off
    assert a.allocated_bytes == 6 * MiB
    assert a.requested_bytes == 5 * MiB + 1
    assert a.reserved_bytes == 20 * MiB


# ---------------------------------------------------------------- pools, segments, splitting


def test_one_and_a_half_mib_creates_a_20_mib_segment() -> None:
    a = make()
    a.malloc(1, 1536 * KiB, C)
    assert a.reserved_bytes == 20 * MiB
    assert a.num_segments == 1
    # remainder 18.5 MiB > 1 MiB: split, so only the rounded request counts as allocated
    assert a.allocated_bytes == 1536 * KiB
    assert a.inactive_split_bytes == 20 * MiB - 1536 * KiB
    a.free(1)
    assert a.allocated_bytes == 0 and a.reserved_bytes == 20 * MiB and a.inactive_split_bytes == 0
    a.check_invariants()


def test_oom_reports_the_segment_size() -> None:
    a = make(capacity=10 * MiB)
    with pytest.raises(OutOfMemory) as info:
        a.malloc(1, 1536 * KiB, C)
    assert "Tried to allocate 20.00 MiB" in str(info.value)
    assert info.value.requested_bytes == 1536 * KiB
    assert a.num_ooms == 1 and a.num_alloc_retries == 1
    # the allocation still happened, over capacity, so the run goes on
    assert a.reserved_bytes == 20 * MiB and a.allocated_bytes == 1536 * KiB
    a.malloc(2, 30 * MiB, C)  # unlimited from now on: no second OOM
    assert a.num_ooms == 1 and a.reserved_bytes == 50 * MiB
    a.free(1)
    a.free(2)
    a.check_invariants()
    a.empty_cache()
    assert a.reserved_bytes == 0


def test_large_request_rounds_segment_to_2_mib() -> None:
    a = make()
    a.malloc(1, 10 * MiB + 1, C)  # rounded 10 MiB + 512, segment 12 MiB, remainder 2 MiB - 512 > 1 MiB: split
    assert a.reserved_bytes == 12 * MiB
    assert a.allocated_bytes == 10 * MiB + 512
    a.malloc(2, 50 * MiB - 100, C)  # rounded 50 MiB - 0: exactly 25 pages of 2 MiB -> 50 MiB segment
    assert a.reserved_bytes == 62 * MiB
    a.check_invariants()


def test_large_block_splits_only_when_more_than_1_mib_remains() -> None:
    a = make()
    a.malloc(1, 11 * MiB, C)  # segment 12 MiB, remainder exactly 1 MiB: not split, whole block handed out
    assert a.allocated_bytes == 12 * MiB
    assert a.requested_bytes == 11 * MiB
    assert a.largest_free_block_bytes() == 0
    a.malloc(2, 10 * MiB + 512 * KiB, C)  # segment 12 MiB, remainder 1.5 MiB > 1 MiB: split
    assert a.allocated_bytes == 12 * MiB + 10 * MiB + 512 * KiB
    assert a.largest_free_block_bytes() == 1536 * KiB
    a.check_invariants()


def test_small_pool_splits_any_remainder_of_512() -> None:
    a = make()
    a.malloc(1, MiB, C)  # small pool (<= 1 MiB), 2 MiB segment, remainder 1 MiB split off
    a.malloc(2, MiB - 512, C)  # from the 1 MiB remainder: 512 B remains and is still split off
    assert a.reserved_bytes == 2 * MiB and a.num_segments == 1
    assert a.allocated_bytes == 2 * MiB - 512
    assert a.largest_free_block_bytes() == 512
    a.malloc(3, 100, C)  # 512 B request takes the 512 B sliver, no new segment
    assert a.reserved_bytes == 2 * MiB and a.allocated_bytes == 2 * MiB
    a.check_invariants()


def test_small_and_large_pools_are_separate() -> None:
    a = make()
    a.malloc(1, 1536 * KiB, C)  # large pool: 20 MiB segment with 18.5 MiB free
    a.malloc(2, 4096, C)  # small request does not use the large pool's free block
    assert a.num_segments == 2 and a.reserved_bytes == 22 * MiB


def test_best_fit_takes_smallest_then_lowest_address() -> None:
    a = make()
    for i, size in enumerate([30 * MiB, 12 * MiB, 12 * MiB, 40 * MiB]):
        a.malloc(i, size, C)
    addrs = {i: a.block_of(i)[0] for i in range(4)}
    for i in range(4):
        a.free(i)
    a.malloc(10, 11 * MiB, C)  # two 12 MiB blocks fit best; the lower address wins
    assert a.block_of(10)[0] == min(addrs[1], addrs[2])
    a.malloc(11, 25 * MiB, C)  # 30 MiB is the smallest block >= 25 MiB
    assert a.block_of(11)[0] == addrs[0]


def test_coalescing_stays_within_a_segment() -> None:
    a = make()
    a.malloc(1, 2 * MiB, C)  # segment A (20 MiB): [1: 2 MiB][free 18 MiB]
    a.malloc(2, 2 * MiB, C)  # same segment: [1][2][free 16 MiB]
    a.free(1)
    a.free(2)  # merges with both neighbours back into one 20 MiB block
    assert a.largest_free_block_bytes() == 20 * MiB
    assert a.inactive_split_bytes == 0
    a.malloc(3, 20 * MiB, C)  # reuses the whole segment
    a.malloc(4, 20 * MiB, C)  # needs a second segment
    a.free(3)
    a.free(4)  # adjacent addresses but different segments: never merged
    assert a.largest_free_block_bytes() == 20 * MiB and a.num_segments == 2
    a.check_invariants()


# ---------------------------------------------------------------- streams


def test_blocks_are_not_shared_across_streams() -> None:
    a = make()
    a.malloc(1, 5 * MiB, C)
    a.free(1)
    a.malloc(2, 5 * MiB, AG)  # the compute stream's cached block is invisible to the allgather stream
    assert a.num_segments == 2 and a.reserved_bytes == 40 * MiB
    a.check_invariants()


def test_record_stream_block_not_reused_until_stream_passed() -> None:
    a = make()
    a.malloc(1, 12 * MiB, C)
    addr = a.block_of(1)[0]
    a.free(1, pending_on={AG})
    assert a.allocated_bytes == 0  # allocated drops at free ...
    assert a.active_bytes == 12 * MiB  # ... but the block stays active (pending free)
    a.malloc(2, 12 * MiB, C)  # cannot reuse it: a new segment
    assert a.reserved_bytes == 24 * MiB and a.block_of(2)[0] != addr
    a.check_invariants()
    a.stream_passed(RS)  # another stream passing changes nothing
    a.stream_passed(AG)
    a.malloc(3, 12 * MiB, C)  # process_events at this malloc frees it first, then it is reused
    assert a.block_of(3)[0] == addr and a.reserved_bytes == 24 * MiB
    a.check_invariants()


def test_record_stream_on_own_stream_is_ignored() -> None:
    a = make()
    a.malloc(1, 12 * MiB, C)
    a.free(1, pending_on={C})
    assert a.active_bytes == 0


def test_empty_cache_waits_for_pending_frees() -> None:
    a = make()
    a.malloc(1, 12 * MiB, C)
    a.free(1, pending_on={AG, RS})
    a.empty_cache()  # synchronize_and_free_events, then release
    assert a.reserved_bytes == 0 and a.active_bytes == 0 and a.num_sync_all_streams == 1


def test_snapshot_reports_pending_state() -> None:
    a = make()
    a.malloc(1, 1536 * KiB, C)
    a.malloc(2, 1536 * KiB, C)
    a.free(2, pending_on={AG})
    (seg,) = a.segments()
    assert seg["total_size"] == 20 * MiB and seg["segment_type"] == "large" and seg["stream"] == 0
    assert [b["state"] for b in seg["blocks"]] == ["active_allocated", "active_pending_free", "inactive"]
    assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
    assert seg["allocated_size"] == 1536 * KiB and seg["active_size"] == 3 * MiB
    snap = a.snapshot()
    assert snap["device_traces"] == [[]] and snap["allocator_settings"]["expandable_segments"] is False


# ---------------------------------------------------------------- OOM path, max_split_size, gc


def test_oom_path_releases_cached_segments_and_retries_once() -> None:
    a = make(capacity=64 * MiB)
    a.malloc(1, 20 * MiB, C)
    a.free(1)  # 20 MiB cached on the compute stream
    a.malloc(2, 40 * MiB, AG)  # 60 MiB reserved
    a.malloc(3, 24 * MiB, RS)  # 60 + 24 > 64: cudaMalloc fails, empty_cache frees the cached 20 MiB, retry fits
    assert a.num_alloc_retries == 1 and a.num_ooms == 0
    assert a.reserved_bytes == 64 * MiB and a.num_segments == 2
    a.check_invariants()


def test_split_segments_survive_release_and_oom_message() -> None:
    a = make(capacity=40 * MiB)
    a.malloc(1, 2 * MiB, C)  # 20 MiB segment: [1: 2 MiB][free 18 MiB], split so empty_cache cannot return it
    a.malloc(2, 19 * MiB, C)  # 18 MiB too small: second 20 MiB segment (40 MiB reserved); 1 MiB left: no split
    assert a.allocated_bytes == 22 * MiB and a.reserved_bytes == 40 * MiB
    with pytest.raises(OutOfMemory) as info:
        a.malloc(3, 19 * MiB, C)  # needs 20 MiB more: fails, release frees nothing, retry fails
    message = str(info.value)
    assert a.num_alloc_retries == 1 and a.num_ooms == 1
    assert "Tried to allocate 20.00 MiB" in message
    assert "GPU 0 has a total capacity of 40.00 MiB of which 0 bytes is free." in message
    assert "this process has 40.00 MiB memory in use." in message
    assert "Of the allocated memory 22.00 MiB is allocated by PyTorch, and 18.00 MiB is reserved" in message


def test_max_split_size_blocks_oversize_splitting() -> None:
    a = make(conf="max_split_size_mb:20")
    a.malloc(1, 100 * MiB, C)
    a.free(1)  # a 100 MiB oversize block is cached
    a.malloc(2, 50 * MiB, C)  # oversize request: 100 >= 50 + 20 -> not reused, a new 50 MiB segment
    assert a.reserved_bytes == 150 * MiB
    a.malloc(3, 5 * MiB, C)  # normal request never takes an oversize block: new 20 MiB segment
    assert a.reserved_bytes == 170 * MiB
    a.malloc(4, 90 * MiB, C)  # 100 < 90 + 20: reused whole, never split (size >= max_split)
    assert a.block_of(4)[1] == 100 * MiB and a.reserved_bytes == 170 * MiB
    a.check_invariants()


def test_without_max_split_size_a_big_block_is_split() -> None:
    a = make()
    a.malloc(1, 100 * MiB, C)
    a.free(1)
    a.malloc(2, 50 * MiB, C)  # best fit takes the 100 MiB block and splits it
    assert a.reserved_bytes == 100 * MiB and a.block_of(2)[1] == 50 * MiB


def test_release_available_cached_blocks_with_max_split_size() -> None:
    a = make(capacity=120 * MiB, conf="max_split_size_mb:20")
    a.malloc(1, 100 * MiB, C)
    a.free(1)
    a.malloc(2, 50 * MiB, C)  # 100 + 50 > 120: frees the single oversize 100 MiB block, no full empty_cache
    assert a.reserved_bytes == 50 * MiB
    assert a.num_alloc_retries == 0 and a.num_device_free == 1


def test_garbage_collection_needs_memory_fraction() -> None:
    def run(fraction: float | None) -> CachingAllocator:
        a = make(capacity=200 * MiB, conf="garbage_collection_threshold:0.5", memory_fraction=fraction)
        a.malloc(1, 30 * MiB, C)
        a.malloc(2, 30 * MiB, C)
        a.free(1)
        a.free(2)  # 60 MiB cached in two unsplit segments
        a.malloc(3, 40 * MiB, C)  # cache miss
        return a

    # no set_per_process_memory_fraction: gc inactive, the 60 MiB stay cached
    assert run(None).reserved_bytes == 100 * MiB
    # fraction 0.5 of 200 MiB: allowed 100 MiB, gc threshold 0.5 * 100 = 50 MiB < 60 reserved: the aged
    # blocks (age 1 >= mean age 1) are both freed before cudaMalloc
    a = run(0.5)
    assert a.reserved_bytes == 40 * MiB and a.num_device_free == 2
    a.check_invariants()


def test_memory_fraction_limits_cudamalloc() -> None:
    a = make(capacity=200 * MiB, memory_fraction=0.25)  # 50 MiB allowed
    a.malloc(1, 40 * MiB, C)
    with pytest.raises(OutOfMemory) as info:
        a.malloc(2, 20 * MiB, C)
    assert "50.00 MiB allowed; " in str(info.value)


# ---------------------------------------------------------------- expandable segments


def test_expandable_segments_grow_in_20_mib_pages_and_return_free_pages() -> None:
    a = make(conf="expandable_segments:True")
    a.malloc(1, 30 * MiB, C)  # maps 2 pages of 20 MiB
    assert a.reserved_bytes == 40 * MiB and a.num_segments == 1
    a.malloc(2, 30 * MiB, C)  # [30, 60) needs the 3rd page only: the segment grows contiguously
    assert a.reserved_bytes == 60 * MiB and a.num_segments == 1
    assert a.block_of(2)[0] == a.block_of(1)[0] + 30 * MiB
    a.free(1)
    assert a.reserved_bytes == 60 * MiB
    a.empty_cache()  # page [0, 20) is fully free and unmapped; page [20, 40) still holds part of buffer 2
    assert a.reserved_bytes == 40 * MiB
    a.check_invariants()
    (seg,) = a.segments()
    assert seg["is_expandable"] and seg["total_size"] == 40 * MiB
    a.free(2)
    a.empty_cache()
    assert a.reserved_bytes == 0 and a.num_segments == 0


def test_expandable_small_pool_uses_2_mib_pages_and_splits_small_remainders() -> None:
    a = make(conf="expandable_segments:True")
    a.malloc(1, 600 * KiB, C)
    assert a.reserved_bytes == 2 * MiB
    a.malloc(2, 11 * MiB, C)  # large pool: 20 MiB page; remainder 9 MiB split (any >= 512 B)
    assert a.reserved_bytes == 22 * MiB and a.allocated_bytes == 600 * KiB + 11 * MiB
    a.check_invariants()


def test_expandable_oom_reports_get_allocation_size() -> None:
    a = make(capacity=30 * MiB, conf="expandable_segments:True")
    with pytest.raises(OutOfMemory) as info:
        a.malloc(1, 30 * MiB, C)  # needs 2 pages = 40 MiB > 30 MiB
    assert "Tried to allocate 30.00 MiB" in str(info.value)
    assert a.reserved_bytes == 40 * MiB


# ---------------------------------------------------------------- OOM message per version


def _oom_state() -> CachingAllocator:
    a = make(capacity=1 * GiB, device_total_bytes=1 * GiB + 512 * MiB)
    a.malloc(1, 900 * MiB, C)
    return a


def test_oom_message_current_format() -> None:
    a = _oom_state()
    assert a.oom_message(200 * MiB, (2, 3)) == (
        "CUDA out of memory. Tried to allocate 200.00 MiB. GPU 0 has a total capacity of 1.50 GiB of which "
        "124.00 MiB is free. Including non-PyTorch memory, this process has 1.38 GiB memory in use. Of the "
        "allocated memory 900.00 MiB is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated. "
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
        "to avoid fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


def test_oom_message_2_1_format() -> None:
    message = _oom_state().oom_message(200 * MiB, (2, 1, 2))
    assert "GPU 0 has a total capacty of 1.50 GiB of which 124.00 MiB is free." in message
    assert message.endswith(
        "If reserved but unallocated memory is large try setting max_split_size_mb to avoid fragmentation.  "
        "See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
    )


def test_oom_message_2_0_format() -> None:
    assert _oom_state().oom_message(200 * MiB, (2, 0, 1)) == (
        "CUDA out of memory. Tried to allocate 200.00 MiB (GPU 0; 1.50 GiB total capacity; 900.00 MiB already "
        "allocated; 124.00 MiB free; 900.00 MiB reserved in total by PyTorch) If reserved memory is >> allocated "
        "memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management "
        "and PYTORCH_CUDA_ALLOC_CONF"
    )


# ---------------------------------------------------------------- state machine

SIZES = st.one_of(
    st.integers(1, 4096),
    st.integers(4096, MiB),
    st.integers(MiB, 12 * MiB),
    st.sampled_from([512, MiB, MiB + 1, 10 * MiB, 11 * MiB, 20 * MiB, 21 * MiB, 40 * MiB]),
    st.integers(12 * MiB, 70 * MiB),
)
CONFS = [
    "",
    "expandable_segments:True",
    "max_split_size_mb:20",
    "max_split_size_mb:32,max_non_split_rounding_mb:24,roundup_power2_divisions:4",
    "garbage_collection_threshold:0.6",
]


class AllocatorMachine(RuleBasedStateMachine):
    buffers = Bundle("buffers")

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 0

    @initialize(conf=st.sampled_from(CONFS), capacity_mb=st.sampled_from([60, 150, 400]))
    def setup(self, conf: str, capacity_mb: int) -> None:
        fraction = 0.8 if "garbage" in conf else None
        self.a = make(capacity=capacity_mb * MiB, conf=conf, memory_fraction=fraction)

    @rule(target=buffers, size=SIZES, stream=st.sampled_from([C, C, C, AG, RS]))
    def malloc(self, size: int, stream: Stream) -> int:
        bid = self.next_id
        self.next_id += 1
        ooms = self.a.num_ooms
        try:
            self.a.malloc(bid, size, stream)
        except OutOfMemory:
            assert self.a.num_ooms == ooms + 1
        return bid

    @rule(bid=consumes(buffers), pending=st.sets(st.sampled_from([C, AG, RS]), max_size=2))
    def free(self, bid: int, pending: set[Stream]) -> None:
        self.a.free(bid, pending_on=pending)

    @rule(stream=st.sampled_from([C, AG, RS]))
    def stream_passed(self, stream: Stream) -> None:
        self.a.stream_passed(stream)

    @rule()
    def empty_cache(self) -> None:
        self.a.empty_cache()
        assert self.a.reserved_bytes - self.a.allocated_bytes == self.a.cached_bytes

    @invariant()
    def structure(self) -> None:
        if hasattr(self, "a"):
            self.a.check_invariants()

    def teardown(self) -> None:
        if not hasattr(self, "a"):
            return
        for bid in list(self.a._live):
            self.a.free(bid)
        self.a.empty_cache()
        self.a.check_invariants()
        assert self.a.reserved_bytes == 0 and self.a.allocated_bytes == 0 and self.a.num_segments == 0
        assert self.a.active_bytes == 0 and self.a.requested_bytes == 0 and self.a.inactive_split_bytes == 0


AllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestAllocatorMachine = AllocatorMachine.TestCase
