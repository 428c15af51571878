"""The discrete-event engine (sim/des.py) against the recurrence (sim/timeline.py), and whole-log tests of what time
decides: the host running ahead, the launch queue, host waits (DeepSpeed's fetch throttle), two collectives sharing
the link to the peers, two copies sharing PCIe, the host CPU's own work (blocking the host when called
synchronously, overlapping the GPU when not), and a record_stream'ed block that is reused only once its stream has
passed its free."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.allocator import CachingAllocator, ExactAllocator
from sim.cost import CostModel
from sim.des import Link, SharedLink, SimpyTimeline, link_of, links_overlap
from sim.engine import Engine
from sim.event_order import order_events
from sim.ops import CATEGORIES, Buffer, BufferTable, Category, Op, OpKind, Phase, Schedule, Stream
from sim.resolve import device_plan
from sim.scenario import DeviceSpec
from sim.timeline import HostModel, ListTimeline
from sim.vocab import DType

import simpy

# 1 FLOP/s per µs: with bf16 peak 1e6 FLOP/s an op of F flops takes F µs (tests/test_engine.py's toy device)
DEVICE = device_plan(DeviceSpec(name="toy", capacity_bytes=1 << 40, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12))
STREAMS = list(Stream)  # the codes BufferTable's recorded bits use (sim.ops.STREAMS)


def op(name: str, allocs=(), frees=(), deps=(), stream=Stream.COMPUTE, kind=OpKind.MEMORY, wire=0,
       host_waits=(), flops=0.0, moved=0) -> Op:
    return Op(name, stream, Phase.FORWARD, None, tuple(allocs), tuple(frees), flops, moved, tuple(deps), wire, kind,
              tuple(host_waits))


def buffers(*sizes: int) -> list[Buffer]:
    return [Buffer(i, f"b{i}", size, Category.TEMPORARIES) for i, size in enumerate(sizes)]


def recorded_buffers(sizes: list[int], recorded: dict[int, Stream]) -> BufferTable:
    """Buffers of these sizes, buffer i record_stream'ed on recorded[i] (as Tape.record_stream marks them)."""
    count = len(sizes)
    return BufferTable([f"b{i}" for i in range(count)], list(sizes), [CATEGORIES.index(Category.TEMPORARIES)] * count,
                       list(range(count)), [1 << STREAMS.index(recorded[i]) if i in recorded else 0
                                            for i in range(count)])


def host(host_us: list[int], depth: int | None = None) -> HostModel:
    return HostModel(np.asarray(host_us, dtype=np.int64), depth)


def both(schedule: Schedule, durations: list[int], host_model: HostModel):
    """The recurrence's and simpy's times of the same run."""
    d = np.asarray(durations, dtype=np.int64)
    return ListTimeline().op_times(schedule, d, host_model), SimpyTimeline().op_times(schedule, d, host_model)


# ---- the two timelines agree wherever no two collectives overlap ------------------------------------------------

@st.composite
def random_runs(draw):
    """A random schedule on the streams (collectives and host copies among its ops), durations, host costs and queue
    depth."""
    count = draw(st.integers(1, 30))
    ops = []
    for index in range(count):
        deps = draw(st.lists(st.integers(1, index), max_size=2, unique=True)) if index else []
        waits = draw(st.lists(st.integers(1, index), max_size=1, unique=True)) if index else []
        kind = draw(st.sampled_from([OpKind.MEMORY, OpKind.ALL_GATHER, OpKind.HOST_TO_DEVICE, OpKind.DEVICE_TO_HOST]))
        ops.append(op(f"o{index}", deps=[-d for d in deps], stream=draw(st.sampled_from(STREAMS)), kind=kind,
                      wire=8 if kind is OpKind.ALL_GATHER else 0, moved=8, host_waits=[-w for w in waits]))
    durations = draw(st.lists(st.integers(0, 20), min_size=count, max_size=count))
    host_us = draw(st.lists(st.integers(0, 6), min_size=count, max_size=count))
    depth = draw(st.one_of(st.none(), st.integers(0, 4)))
    return Schedule(buffers(*[1] * count), [], ops), durations, host(host_us, depth)


@settings(max_examples=300, deadline=None)
@given(random_runs())
def test_simpy_is_the_recurrence_where_no_transfers_on_one_link_overlap(case) -> None:
    schedule, durations, host_model = case
    recurrence, simulated = both(schedule, durations, host_model)
    if not links_overlap(schedule, recurrence):
        assert simulated == recurrence
    # in both: the host issues in program order, no kernel starts before its launch or its stream's previous end
    for times in (recurrence, simulated):
        assert times.issue_us == sorted(times.issue_us)
        assert all(s >= launch for s, launch in zip(times.start_us, times.launch_us))
        for stream in STREAMS:
            mine = [i for i, o in enumerate(schedule.ops) if o.stream is stream]
            assert all(times.end_us[a] <= times.start_us[b] for a, b in zip(mine, mine[1:]))


@settings(max_examples=200, deadline=None)
@given(random_runs())
def test_sharing_the_link_never_speeds_anything_up(case) -> None:
    # Processor sharing only slows transfers down, and a slower op only delays what follows: no op starts or ends
    # earlier than in the recurrence, where every transfer has the whole link.
    schedule, durations, host_model = case
    recurrence, simulated = both(schedule, durations, host_model)
    assert all(a >= b for a, b in zip(simulated.end_us, recurrence.end_us))
    assert all(a >= b for a, b in zip(simulated.start_us, recurrence.start_us))


# ---- whole logs ----------------------------------------------------------------------------------------------------

def test_two_transfers_share_the_link_at_half_speed() -> None:
    # A 10 µs all-gather and a 10 µs reduce-scatter launched together run at half the rate each: both end at 20.
    # Alone on the link (the recurrence), each would end at 10.
    schedule = Schedule(buffers(1, 1), [], [
        op("gather", stream=Stream.ALLGATHER, kind=OpKind.ALL_GATHER, wire=8),
        op("reduce", stream=Stream.REDUCE, kind=OpKind.REDUCE_SCATTER, wire=8)])
    recurrence, simulated = both(schedule, [10, 10], host([0, 0]))
    assert (recurrence.start_us, recurrence.end_us) == ([0, 0], [10, 10])
    assert links_overlap(schedule, recurrence)
    assert (simulated.start_us, simulated.end_us) == ([0, 0], [20, 20])


def test_two_copies_to_the_device_share_pcie_at_half_speed() -> None:
    # Two 10 µs host-to-device copies on two streams, launched together: PCIe's host-to-device direction carries
    # both at half the rate: both end at 20. Alone (the recurrence), each would end at 10.
    schedule = Schedule(buffers(1, 1), [], [
        op("param_in", stream=Stream.ALLGATHER, kind=OpKind.HOST_TO_DEVICE, moved=8),
        op("activation_in", kind=OpKind.HOST_TO_DEVICE, moved=8)])
    recurrence, simulated = both(schedule, [10, 10], host([0, 0]))
    assert recurrence.end_us == [10, 10] and links_overlap(schedule, recurrence)
    assert (simulated.start_us, simulated.end_us) == ([0, 0], [20, 20])


def test_copies_in_opposite_directions_and_a_collective_each_have_their_own_link() -> None:
    # A copy to the device, one to the host and an all-gather, all at once: three links (PCIe's two directions run
    # on their own copy engines), so nothing is shared and simpy gives the recurrence's times.
    schedule = Schedule(buffers(1, 1, 1), [], [
        op("in", kind=OpKind.HOST_TO_DEVICE, moved=8),
        op("out", stream=Stream.REDUCE, kind=OpKind.DEVICE_TO_HOST, moved=8),
        op("gather", stream=Stream.ALLGATHER, kind=OpKind.ALL_GATHER, wire=8)])
    assert [link_of(o) for o in schedule.ops] == [Link.HOST_TO_DEVICE, Link.DEVICE_TO_HOST, Link.PEERS]
    recurrence, simulated = both(schedule, [10, 10, 10], host([0, 0, 0]))
    assert not links_overlap(schedule, recurrence)
    assert simulated == recurrence and simulated.end_us == [10, 10, 10]


def test_synchronous_host_work_blocks_the_host() -> None:
    # DeepSpeedCPUAdam as DeepSpeed calls it (Tape.host_work): the host waits for the backward's last kernel
    # (30 µs), runs Adam on its CPU (50 µs), and only then issues the next forward: issued at 30 + 50 = 80, and its
    # 4 MiB activation is allocated then. The GPU idles 30-80.
    mib = 1 << 20
    schedule = Schedule(buffers(mib, 4 * mib), [], [
        op("backward", [0], [0], flops=30),
        op("cpu_adam", stream=Stream.CPU, kind=OpKind.HOST_MEMORY, host_waits=[-1]),
        op("forward", [1], [1], flops=10, host_waits=[-1])])
    durations = [30, 50, 10]
    recurrence, simulated = both(schedule, durations, host([0, 0, 0]))
    assert recurrence == simulated
    assert (recurrence.issue_us, recurrence.start_us, recurrence.end_us) == ([0, 30, 80], [0, 30, 80], [30, 80, 90])
    result = Engine(schedule, ExactAllocator(1 << 40), CostModel(DEVICE, DType.BFLOAT16), host=host([0, 0, 0]),
                    timeline=_Fixed(durations)).run()
    assert result.trace.time_us.tolist() == [0, 0, 80, 80]  # backward's buffer at 0, the forward's at 80
    assert result.trace.delta_bytes.tolist() == [mib, -mib, 4 * mib, -4 * mib]


def test_host_work_the_host_does_not_wait_for_overlaps_the_next_forward() -> None:
    # The CPU optimizer overlapping the next forward (ZeRO-Offload's delayed parameter update; DeepSpeed's
    # ZenFlow with overlap_step): the host issues Adam (50 µs on its CPU) and goes on issuing the forward's kernels
    # (1 µs each), which run on the GPU meanwhile: 10 µs each, ending at 11, 21, 31. The next parameter update's
    # copy to the device needs Adam's result: it starts at 50.
    schedule = Schedule(buffers(1, 1, 1, 1, 1), [], [
        op("cpu_adam", stream=Stream.CPU, kind=OpKind.HOST_MEMORY),
        op("forward.0", flops=10), op("forward.1", flops=10), op("forward.2", flops=10),
        op("params_in", kind=OpKind.HOST_TO_DEVICE, moved=8, deps=[-4])])
    recurrence, simulated = both(schedule, [50, 10, 10, 10, 5], host([0, 1, 1, 1, 1]))
    assert recurrence == simulated
    assert recurrence.issue_us == [0, 0, 1, 2, 3]
    assert recurrence.end_us == [50, 11, 21, 31, 55]


class _Fixed:
    """A timeline that gives the recurrence's times for fixed durations (whatever the cost model says)."""

    def __init__(self, durations: list[int]) -> None:
        self.durations = np.asarray(durations, dtype=np.int64)

    def op_times(self, schedule: Schedule, durations_us: np.ndarray, host_model: HostModel):
        return ListTimeline().op_times(schedule, self.durations, host_model)


def test_a_transfer_joining_later_shares_only_while_both_run() -> None:
    # gather: 10 µs of work from t=0; reduce: 10 µs from t=5 (its launch waits 5 µs of host time).
    # 0-5: gather alone, 5 left. 5-15: both at half rate, 5 each: gather done at 15, reduce has 5 left.
    # 15-20: reduce alone: done at 20.
    schedule = Schedule(buffers(1, 1), [], [
        op("gather", stream=Stream.ALLGATHER, kind=OpKind.ALL_GATHER, wire=8),
        op("reduce", stream=Stream.REDUCE, kind=OpKind.REDUCE_SCATTER, wire=8)])
    _, simulated = both(schedule, [10, 10], host([5, 0]))
    assert simulated.launch_us == [5, 5] and simulated.start_us == [5, 5]
    schedule = Schedule(buffers(1, 1, 1), [], [
        op("gather", stream=Stream.ALLGATHER, kind=OpKind.ALL_GATHER, wire=8),
        op("pause"),
        op("reduce", stream=Stream.REDUCE, kind=OpKind.REDUCE_SCATTER, wire=8)])
    _, simulated = both(schedule, [10, 0, 10], host([0, 5, 0]))
    assert simulated.start_us == [0, 5, 5]
    assert simulated.end_us == [15, 5, 20]


def test_a_fractional_end_waits_for_the_next_whole_microsecond() -> None:
    # Three transfers of 1, 1 and 2 µs together: at rate 1/3 the two short ones end at 3, the long one has 1 left
    # and ends alone at 4.
    link_env = simpy.Environment()
    link = SharedLink(link_env)
    ends = {}

    def run(name: str, work: float):
        yield link.transfer(work)
        ends[name] = link_env.now

    for name, work in (("a", 1), ("b", 1), ("c", 2)):
        link_env.process(run(name, work))
    link_env.run()
    assert ends == {"a": 3, "b": 3, "c": 4} and link.busy_us == 4


def test_the_host_runs_ahead_and_allocates_at_issue() -> None:
    # Three 10 µs kernels, 2 µs of host time each: issued at 0, 2, 4; launched at 2, 4, 6; the kernels run 2-12,
    # 12-22, 22-32. Each allocates its buffer when issued and frees it when the host is done with it.
    schedule = Schedule(buffers(4, 4, 4), [], [op(f"k{i}", [i], [i]) for i in range(3)])
    times = ListTimeline().op_times(schedule, np.array([10, 10, 10]), host([2, 2, 2]))
    assert times.issue_us == [0, 2, 4] and times.launch_us == [2, 4, 6]
    assert times.start_us == [2, 12, 22] and times.end_us == [12, 22, 32]
    events = order_events(schedule, times)
    assert events.time_us.tolist() == [0, 2, 2, 4, 4, 6]
    assert events.signed_id.tolist() == [0, ~0, 1, ~1, 2, ~2]


def test_a_full_launch_queue_blocks_the_host() -> None:
    # Queue depth 1: op i is issued only once op i-2 has ended. Kernels of 10 µs, 1 µs of host time each.
    # k0: issued 0, runs 1-11. k1: issued 1, runs 11-21. k2: waits for k0's end: issued 11, launched 12, runs
    # 21-31. k3: waits for k1: issued 21, launched 22, runs 31-41.
    schedule = Schedule(buffers(1, 1, 1, 1), [], [op(f"k{i}") for i in range(4)])
    recurrence, simulated = both(schedule, [10] * 4, host([1] * 4, depth=1))
    assert recurrence.issue_us == [0, 1, 11, 21] and recurrence.start_us == [1, 11, 21, 31]
    assert simulated == recurrence


def test_a_host_wait_binds_like_the_fetch_throttle() -> None:
    # DeepSpeed's fetch throttle: before its 4th fetch event the host synchronizes the 1st (host_waits). Gathers
    # g0..g3 of 10 µs on the allgather stream, 1 µs of host time each: g0 runs 1-11, g1 11-21, g2 21-31. g3 waits
    # for g0 (-3): issued at max(3, 11) = 11, launched 12, runs 31-41. Without the wait it is issued at 3.
    gathers = [op(f"g{i}", stream=Stream.ALLGATHER) for i in range(3)]
    throttled = Schedule(buffers(1), [], gathers + [op("g3", stream=Stream.ALLGATHER, host_waits=[-3])])
    free = Schedule(buffers(1), [], gathers + [op("g3", stream=Stream.ALLGATHER)])
    recurrence, simulated = both(throttled, [10] * 4, host([1] * 4))
    assert recurrence.issue_us == [0, 1, 2, 11] and recurrence.start_us == [1, 11, 21, 31]
    assert simulated == recurrence
    assert ListTimeline().op_times(free, np.array([10] * 4), host([1] * 4)).issue_us == [0, 1, 2, 3]


def _record_stream_run(recorded: bool = True):
    """g gathers a 20 MiB buffer on the allgather stream (10 µs), record_stream'ed on the compute stream (as
    DeepSpeed's free_param does); compute op u uses and frees it (20 µs); a1 and a2 each allocate and free 20 MiB on
    the allgather stream; 1 µs of host time per op. A 20 MiB request takes a whole 20 MiB segment of the large pool
    (CUDACachingAllocator.cpp: sizes over 10 MiB round to 2 MiB)."""
    mib = 1 << 20
    schedule = Schedule(recorded_buffers([20 * mib] * 3, {0: Stream.COMPUTE} if recorded else {}), [], [
        op("g", [0], stream=Stream.ALLGATHER, flops=10),
        op("u", frees=[0], deps=[-1], flops=20),
        op("a1", [1], [1], stream=Stream.ALLGATHER),
        op("a2", [2], [2], stream=Stream.ALLGATHER, host_waits=[-2]),
    ])
    engine = Engine(schedule, CachingAllocator(1 << 40), CostModel(DEVICE, DType.BFLOAT16), host=host([1] * 4))
    return engine.run()


def test_a_record_stream_block_returns_once_its_stream_has_passed_the_free() -> None:
    # g issued 0, runs 1-11; u issued 1, launched 2, runs 11-31 (after g) and frees g's buffer on the host at 2:
    # pending on the compute stream until u ends at 31. a1 (issued 2, before 31) cannot reuse it: a second
    # segment. a2 waits (host) for u, so it is issued at 31: the block has returned at the start of its malloc.
    mib = 1 << 20
    result = _record_stream_run()
    assert result.op_issue_us == [0, 1, 2, 31] and result.op_end_us[:2] == [11, 31]
    t = result.trace
    # events: g's malloc, u's free (pending), a1's malloc and free, a2's malloc and free
    assert t.time_us.tolist() == [0, 2, 2, 3, 31, 32]
    assert t.delta_bytes.tolist() == [20 * mib, -20 * mib, 20 * mib, -20 * mib, 20 * mib, -20 * mib]
    assert result.release_at.tolist() == [-1, 4, -1, -1, -1, -1]  # back at the start of a2's malloc
    assert t.allocated_bytes.tolist() == [20 * mib, 0, 20 * mib, 0, 20 * mib, 0]  # freed at once for the stats
    assert t.reserved_bytes.tolist() == [20 * mib, 20 * mib, 40 * mib, 40 * mib, 40 * mib, 40 * mib]


def _gather_prefetch_run(recorded_on: Stream):
    """g1 gathers b0 (20 MiB) on the default group's NCCL stream (allocated from the allgather stream's pool; 10 µs,
    1-11); g2, the next layer's prefetch, is queued behind it there (20 µs, 11-31); the layer uses b0 (5 µs, 11-16)
    and DeepSpeed frees it at use's launch (3); g3 waits (host) for use, so it is issued at 16 and allocates b2
    (20 MiB) from the allgather stream's pool too; b1 is g2's output."""
    mib = 1 << 20
    gather = dict(stream=Stream.NCCL_WORLD, kind=OpKind.ALL_GATHER, wire=8)
    ops = [op("g1", [0], **gather), op("g2", [1], **gather), op("use", frees=[0], deps=[-2]),
           op("g3", [2], [2], host_waits=[-1], **gather)]
    for gathered in (ops[0], ops[1], ops[3]):
        gathered.alloc_stream = Stream.ALLGATHER
    schedule = Schedule(recorded_buffers([20 * mib] * 3, {0: recorded_on}), [], ops)
    return Engine(schedule, CachingAllocator(1 << 40), CostModel(DEVICE, DType.BFLOAT16), host=host([1] * 4),
                  timeline=_Fixed([10, 20, 5, 1])).run()


def test_a_gathered_block_waits_for_the_nccl_stream_to_pass_its_free() -> None:
    # torch before 2.8: ProcessGroupNCCL recordStream's the gather's output on its stream. At the free (t=3) the
    # latest op issued there is the prefetch g2, which ends at 31: b0's block is pending until then, so g3's
    # malloc at 16 cannot reuse it and takes a third segment. Recorded on the compute stream only (torch 2.8's
    # stash, DeepSpeed's own record_stream), the block is back once `use` has ended (16): g3 reuses it.
    mib = 1 << 20
    nccl = _gather_prefetch_run(Stream.NCCL_WORLD)
    assert nccl.op_issue_us == [0, 1, 2, 16] and nccl.op_end_us == [11, 31, 16, 32]
    assert nccl.trace.time_us.tolist() == [0, 1, 3, 16, 17]  # g1, g2 mallocs; b0's free; b2's malloc and free
    assert nccl.release_at.tolist() == [-1, -1, 5, -1, -1]  # not back within the run
    assert nccl.trace.reserved_bytes.tolist()[-1] == 60 * mib
    compute = _gather_prefetch_run(Stream.COMPUTE)
    assert compute.release_at.tolist() == [-1] * 5  # passed by the next malloc: not pending
    assert compute.trace.reserved_bytes.tolist()[-1] == 40 * mib


def test_a_free_on_another_stream_without_record_stream_is_immediate() -> None:
    # The same run without the record_stream: the allocator knows nothing of the compute stream's use, so the block
    # is back at once and a1 reuses it (what a program that forgets record_stream gets: one segment, a race).
    mib = 1 << 20
    result = _record_stream_run(recorded=False)
    assert result.release_at.tolist() == [-1] * 6
    assert result.trace.reserved_bytes.tolist() == [20 * mib] * 6


def test_a_block_whose_stream_passed_before_the_next_malloc_is_not_pending() -> None:
    # The same without a1: the next malloc (a's) is issued after u has ended (a waits for u on the host), so the
    # block has returned by then and the free is as good as immediate: nothing is pending, the compiled core
    # applies, and a reuses g's segment.
    mib = 1 << 20
    schedule = Schedule(recorded_buffers([20 * mib] * 2, {0: Stream.COMPUTE}), [], [
        op("g", [0], stream=Stream.ALLGATHER, flops=10),
        op("u", frees=[0], deps=[-1], flops=20),
        op("a", [1], [1], stream=Stream.ALLGATHER, host_waits=[-1]),
    ])
    result = Engine(schedule, CachingAllocator(1 << 40), CostModel(DEVICE, DType.BFLOAT16), host=host([1] * 3)).run()
    assert result.op_issue_us == [0, 1, 31]
    assert result.release_at.tolist() == [-1, -1, -1, -1]  # u's free: no malloc before its stream passed it
    assert result.trace.reserved_bytes.tolist() == [20 * mib] * 4  # a reuses g's segment


def test_the_engine_lays_out_overlapping_collectives_with_simpy() -> None:
    # Two 10 µs collectives launched together: the engine finds them overlapping in the recurrence and takes
    # simpy's times, where they share the link: both end at 20.
    schedule = Schedule(buffers(1, 1), [], [
        op("gather", [0], [0], stream=Stream.ALLGATHER, kind=OpKind.ALL_GATHER, wire=8, flops=10),
        op("reduce", [1], [1], stream=Stream.REDUCE, kind=OpKind.REDUCE_SCATTER, wire=8, flops=10)])
    cost = CostModel(DEVICE, DType.BFLOAT16)
    cost.bus_bytes_per_s = 8 / 10e-6  # 8 wire bytes in 10 µs; a single rank has no collective latency
    result = Engine(schedule, ExactAllocator(1 << 40), cost, host=host([0, 0])).run()
    assert result.shared_link and result.op_end_us == [20, 20]
    assert result.busy_us == {Stream.ALLGATHER: 20, Stream.REDUCE: 20}
