"""Whole-log tests of the engine on toy schedules (exact times, order and byte counts of every event), its timeline
against a simpy model, and repeated windows against calling the allocator for every event."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sim.allocator import ExactAllocator, caching, make_allocator
from sim.cost import CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, Phase, Schedule, Stream
from sim.resolve import device_plan, resolve_plan
from sim.scenario import DeviceSpec, build_scenario
from sim.des import SimpyTimeline
from sim.timeline import HostModel
from sim.vocab import DType
from sim.schedule import build_schedule
from tests.conftest import synchronous_host, tiny_raw
from tests.test_zero3 import zero_raw

ROOT = Path(__file__).resolve().parent.parent

# 1 FLOP/s and 1 byte/s with bf16 peak 1e6 FLOP/s: an op of F flops takes F µs.
DEVICE = device_plan(DeviceSpec(name="toy", capacity_bytes=1000, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12))


def op(name: str, allocs=(), frees=(), flops=0.0, deps=(), stream=Stream.COMPUTE) -> Op:
    return Op(name, stream, Phase.FORWARD, None, tuple(allocs), tuple(frees), flops, 0, tuple(deps))


def log(schedule: Schedule, capacity: int = 1000) -> list[tuple]:
    result = Engine(schedule, ExactAllocator(capacity), CostModel(DEVICE, DType.BFLOAT16)).run()
    t = result.trace
    return [(int(t.time_us[i]), int(t.op_index[i]), int(t.buffer_id[i]), int(t.delta_bytes[i]),
             int(t.allocated_bytes[i])) for i in range(len(t))], result


def buffers(*sizes: int) -> list[Buffer]:
    return [Buffer(i, f"b{i}", size, Category.TEMPORARIES) for i, size in enumerate(sizes)]


def test_single_stream_whole_log() -> None:
    # weights (100 B) live from t=0; op0 allocates 10 B and runs 5 µs; op1 allocates 20 B, runs 3 µs and frees both.
    # Each op costs the host 7 µs (cost.HOST_US_PER_KERNEL): op0 issued at 0, launched at 7, runs 7-12; op1 issued
    # at 7, launched at 14, runs 14-17. Allocations happen at issue, frees when the host is done with the op.
    schedule = Schedule(buffers(100, 10, 20), [0], [op("a", [1], flops=5), op("b", [2], [1, 2], flops=3)])
    events, result = log(schedule)
    assert events == [
        (0, -1, 0, 100, 100),   # persistent, before the first op
        (0, 0, 1, 10, 110),     # op0 issued at 0
        (7, 1, 2, 20, 130),     # op1 issued when the host is done with op0
        (14, 1, 1, -10, 120),   # op1's frees when the host is done with it, in order
        (14, 1, 2, -20, 100),
    ]
    assert result.op_issue_us == [0, 7] and result.op_launch_us == [7, 14]
    assert result.end_time_us == 17 and result.op_start_us == [7, 14] and result.oom is None


def test_cross_stream_dependency_delays_consumer() -> None:
    # A 30 µs collective on another stream (launched at 7: runs 7-37); the compute op that needs it, launched at
    # 21, waits for it: it runs 37-38 although its stream was free from 16. Its allocation happens when the host
    # issues it (14), not when it runs: memory follows the host.
    schedule = Schedule(buffers(8, 4), [], [
        op("gather", [0], flops=30, stream=Stream.ALLGATHER),
        op("short", flops=2),
        op("use", [1], [0, 1], flops=1, deps=[-2]),  # relative: the op two before
    ])
    events, result = log(schedule)
    assert events == [(0, 0, 0, 8, 8), (14, 2, 1, 4, 12), (21, 2, 0, -8, 4), (21, 2, 1, -4, 0)]
    assert result.op_start_us == [7, 14, 37] and result.end_time_us == 38
    assert result.busy_us == {Stream.COMPUTE: 3, Stream.ALLGATHER: 30}


def test_oom_is_recorded_once_and_simulation_continues() -> None:
    schedule = Schedule(buffers(60, 60, 60), [], [op("x", [0]), op("y", [1]), op("z", [2], [0, 1, 2])])
    events, result = log(schedule, capacity=100)
    assert result.oom is not None and result.oom.op_index == 1 and result.oom.requested_bytes == 60
    assert max(e[4] for e in events) == 180  # the whole demand is still shown
    assert events[-1][4] == 0


# ---- the timeline against the discrete-event engine (sim/des.py) --------------------------------------------------

STREAMS = list(Stream)


def simpy_times(schedule: Schedule, durations: list[int]):
    """Every op's times in the simpy engine, with the cost model's host."""
    cost = CostModel(DEVICE, DType.BFLOAT16)
    host = HostModel(np.asarray(cost.host_us(schedule.ops), dtype=np.int64), cost.queue_depth)
    return SimpyTimeline().op_times(schedule, np.asarray(durations, dtype=np.int64), host)


@st.composite
def random_schedules(draw) -> tuple[Schedule, list[int]]:
    count = draw(st.integers(1, 40))
    ops = []
    for index in range(count):
        deps = draw(st.lists(st.integers(1, index), max_size=3, unique=True)) if index else []
        ops.append(op(f"o{index}", [index], [index], flops=draw(st.integers(0, 20)), deps=[-d for d in deps],
                      stream=draw(st.sampled_from(STREAMS))))
    schedule = Schedule(buffers(*[1] * count), [], ops)
    return schedule, CostModel(DEVICE, DType.BFLOAT16).durations_us(ops)


@given(random_schedules())
def test_timeline_is_the_simpy_model(case) -> None:
    # no collectives here: the recurrence and the simpy engine give the same times, behind the same seam
    schedule, durations = case
    cost = CostModel(DEVICE, DType.BFLOAT16)
    result = Engine(schedule, ExactAllocator(1000), cost).run()
    plugged = Engine(schedule, ExactAllocator(1000), cost, timeline=SimpyTimeline()).run()
    assert (plugged.op_start_us, plugged.op_end_us) == (result.op_start_us, result.op_end_us)
    assert np.array_equal(plugged.trace.time_us, result.trace.time_us)
    assert result.op_start_us == simpy_times(schedule, durations).start_us
    assert result.end_time_us == max(s + d for s, d in zip(result.op_start_us, durations))
    assert sum(result.busy_us.values()) == sum(durations)
    # every op runs once, on its own stream: its buffer is allocated when the host issues it and freed when the
    # host is done with it, in program order
    t = result.trace
    assert t.op_index.tolist() == [i for i in range(len(schedule.ops)) for _ in (1, -1)]
    assert t.time_us.tolist() == [time for i in range(len(schedule.ops))
                                  for time in (result.op_issue_us[i], result.op_launch_us[i])]
    for stream in STREAMS:  # and the ops of one stream never overlap
        mine = [i for i, o in enumerate(schedule.ops) if o.stream is stream]
        assert all(result.op_end_us[a] <= result.op_start_us[b] for a, b in zip(mine, mine[1:]))


@st.composite
def repeated_schedules(draw) -> tuple[Schedule, Schedule]:
    """A prefix, then a template of ops repeated (the same Op objects, as Tape.schedule repeats micro-batches);
    deps reach back into the instance before. Returns it with and without the repetition recorded (op_source)."""
    prefix, size, repeats = draw(st.integers(0, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
    ops = []
    for index in range(prefix + size):
        deps = draw(st.lists(st.integers(1, index), max_size=2, unique=True)) if index else []
        ops.append(op(f"o{index}", [index], [index], flops=draw(st.integers(0, 9)), deps=[-d for d in deps],
                      stream=draw(st.sampled_from(STREAMS))))
    ops += ops[prefix:] * repeats
    sources = list(range(prefix + size)) + [prefix + i for _ in range(repeats) for i in range(size)]
    return (Schedule(buffers(*[1] * (prefix + size)), [], ops, op_source=sources),
            Schedule(buffers(*[1] * (prefix + size)), [], list(ops)))


@given(repeated_schedules())
def test_repeated_spans_keep_the_timeline(case) -> None:
    # a repeated span shifted in time from the instance before it must land where op-by-op timing puts it
    repeated, plain = case
    cost = CostModel(DEVICE, DType.BFLOAT16)
    shifted = Engine(repeated, ExactAllocator(1000), cost).run()
    assert shifted.op_start_us == Engine(plain, ExactAllocator(1000), cost).run().op_start_us
    assert shifted.op_start_us == simpy_times(plain, cost.durations_us(plain.ops)).start_us


def test_events_keep_program_order_whatever_the_streams_do() -> None:
    # The collective (op 0, 40 µs) runs long on its stream; compute op 1 (4 µs) and op 2 (needs both) follow. The
    # kernels end out of program order, but the allocator, called from the host, sees op 0's allocation, op 0's
    # free, op 1's, then op 2's: at 0, 7 (0's host time), 7, 14, 14, 21.
    schedule = Schedule(buffers(8, 4, 2), [], [
        op("gather", [0], [0], flops=40, stream=Stream.ALLGATHER),
        op("compute", [1], [1], flops=4),
        op("use", [2], [2], flops=1, deps=[-2]),
    ])
    events, result = log(schedule)
    assert events == [(0, 0, 0, 8, 8), (7, 0, 0, -8, 0), (7, 1, 1, 4, 4), (14, 1, 1, -4, 0), (14, 2, 2, 2, 2),
                      (21, 2, 2, -2, 0)]
    assert result.op_end_us == [47, 18, 48]


# ---- repeated windows ----------------------------------------------------------------------------------------------

def _engine_pair(raw: dict, overrides: list[str] = (), first: dict | None = None, synchronous: bool = True):
    """(result, allocator) of the Python model with repeated windows (or the engine options `first`) and of the
    Python model called for every event. `synchronous`: a host that waits for each op (conftest.synchronous_host):
    record_stream'ed blocks then return before the next malloc and windows can repeat; else the cost model's host,
    which runs ahead and leaves blocks pending across windows."""
    plan = resolve_plan(build_scenario(raw, overrides=overrides))
    built = build_schedule(plan)
    device = plan.device
    results = []
    host = synchronous_host(built.schedule) if synchronous else None
    for options in (first or {"repeat": True, "compiled": False}, {"repeat": False, "compiled": False}):
        options = {**options, "host": host}
        allocator = make_allocator(plan.allocator.backend, plan.allocator.conf,
                                   device.capacity_bytes - device.cuda_context_bytes, device.capacity_bytes,
                                   plan.versions.torch)
        cost = CostModel(device, DType.BFLOAT16, plan.world.gpus_per_node, plan.world.nodes)
        results.append((Engine(built.schedule, allocator, cost, **options).run(), allocator))
    return results


def _assert_same_run(repeated, stepwise) -> None:
    (fast, fast_allocator), (slow, slow_allocator) = repeated, stepwise
    for column in ("time_us", "op_index", "buffer_id", "delta_bytes", "allocated_bytes", "reserved_bytes"):
        assert np.array_equal(getattr(fast.trace, column), getattr(slow.trace, column)), column
    assert fast.oom == slow.oom
    assert fast_allocator.memory_stats() == slow_allocator.memory_stats()
    assert fast_allocator.ooms == slow_allocator.ooms
    identity = {b: b for b in slow_allocator.live_buffer_ids()}
    assert fast_allocator.state_signature(identity) == slow_allocator.state_signature(identity)
    assert slow.repeated_events == 0


# 80 GB fits; 400 MiB of CUDA context + 24 MiB: an OOM after cache flushes, and the run goes on over capacity.
@pytest.mark.parametrize("capacity_bytes", [80 * 10**9, 419430400 + 24 * 2**20])
def test_repeated_windows_change_nothing_zero3(capacity_bytes: int) -> None:
    # ZeRO-3 on 2 GPUs, 6 micro-batches, 2 steps: later micro-batches repeat an earlier one exactly.
    raw = zero_raw(2)
    raw["training"]["gradient_accumulation_steps"] = 6
    raw["allocator"] = {"backend": "caching"}
    repeated, stepwise = _engine_pair(raw, [f"hardware.device.capacity_bytes={capacity_bytes}"])
    assert repeated[0].repeated_events > 0
    _assert_same_run(repeated, stepwise)
    # with the host running ahead, gathered parameters freed at the end of a micro-batch are pending into the next:
    # windows still repeat, pending blocks named by where they return and renamed with the window
    repeated, stepwise = _engine_pair(raw, [f"hardware.device.capacity_bytes={capacity_bytes}"], synchronous=False)
    assert repeated[0].release_at.max() >= 0 and repeated[0].repeated_events > 0
    _assert_same_run(repeated, stepwise)


@pytest.mark.skipif(caching._sim_caching is None, reason="the compiled core is not built")
@pytest.mark.parametrize("capacity_bytes", [80 * 10**9, 419430400 + 24 * 2**20])
def test_the_compiled_core_changes_nothing_zero3(capacity_bytes: int) -> None:
    # the same ZeRO-3 run through the compiled core: the same trace, OOM and final state, block addresses included
    raw = zero_raw(2)
    raw["training"]["gradient_accumulation_steps"] = 6
    raw["allocator"] = {"backend": "caching"}
    compiled, stepwise = _engine_pair(raw, [f"hardware.device.capacity_bytes={capacity_bytes}"], {"compiled": True})
    assert compiled[0].repeated_events == 0  # the core ran: the Python model would repeat windows here
    _assert_same_run(compiled, stepwise)
    assert compiled[1].segments() == stepwise[1].segments()
    assert compiled[0].largest_free_block_at_peak_bytes == stepwise[0].largest_free_block_at_peak_bytes


@pytest.mark.parametrize("gpus", [1, 2])
def test_repeated_windows_change_nothing_when_ids_are_reused(gpus: int) -> None:
    # One GPU and plain DDP: later micro-batches repeat with the very same buffer ids (each freed before the
    # span starts again), so allocations and frees are paired by position, not by id.
    raw = tiny_raw(gradient_accumulation_steps=6)
    raw["hardware"]["gpus_per_node"] = gpus
    raw["allocator"] = {"backend": "caching"}
    raw["simulation"]["steps"] = 2
    repeated, stepwise = _engine_pair(raw)
    assert repeated[0].repeated_events > 0
    _assert_same_run(repeated, stepwise)


@pytest.mark.slow
def test_repeated_windows_change_nothing_headline() -> None:
    # The headline (OOM, cache flushes every micro-batch): half its events are repeated windows.
    scenario = yaml.safe_load((ROOT / "scenarios" / "qwen32b_8xa800.yaml").read_text())
    repeated, stepwise = _engine_pair(scenario)
    assert repeated[0].repeated_events > len(repeated[0].trace) // 3
    _assert_same_run(repeated, stepwise)


# ---- repeated micro-batches in the build ---------------------------------------------------------------------------

def _canonical_run(scenario, repeat: bool) -> dict:
    """The timeline and trace of a build (`repeat`: later micro-batches repeated, not rebuilt), with buffer ids
    renamed by first appearance: the two builds number fresh buffers differently."""
    plan = resolve_plan(scenario)
    schedule = build_schedule(plan, repeat).schedule
    cost = CostModel(plan.device, DType.BFLOAT16, plan.world.gpus_per_node, plan.world.nodes)
    result = Engine(schedule, ExactAllocator(10**15), cost).run()
    first_seen: dict[int, int] = {}
    ids = [first_seen.setdefault(b, len(first_seen)) for b in result.trace.buffer_id.tolist()]
    return {"ops": [(op.name, op.stream, op.phase, op.layer) for op in schedule.ops],
            "step": list(schedule.op_step), "micro": list(schedule.op_micro_batch),
            "start": result.op_start_us, "end": result.op_end_us, "ids": ids,
            "time": result.trace.time_us.tolist(), "op_index": result.trace.op_index.tolist(),
            "delta": result.trace.delta_bytes.tolist(), "sources": schedule.sources()}


@pytest.mark.parametrize("overlap", [True, False])
def test_repeated_micro_batches_build_the_same_timeline_zero3(overlap: bool) -> None:
    # ZeRO-3, 2 steps of 4 micro-batches: (0,2), (0,3) repeat (0,1) after its instances, and (1,1)-(1,3) repeat it
    # after the built first micro-batch of step 1, whose pending reduce waits stand where (0,0)'s did.
    scenario = build_scenario(zero_raw(2, overlap_comm=overlap, reduce_bucket_size=5000),
                              overrides=["training.gradient_accumulation_steps=4"])
    repeated, built = _canonical_run(scenario, True), _canonical_run(scenario, False)
    sources = repeated.pop("sources")
    built.pop("sources")
    assert repeated == built
    step_1_micro_1 = [i for i, (s, m) in enumerate(zip(repeated["step"], repeated["micro"])) if (s, m) == (1, 1)]
    assert step_1_micro_1 and all(sources[i] < i for i in step_1_micro_1)  # repeated, not rebuilt


# ---- repetition windows --------------------------------------------------------------------------------------------

def test_repetition_windows_are_micro_batches_and_optimizer_steps() -> None:
    # 2 steps of 3 micro-batches: a window begins at each micro-batch's first op and at each optimizer step's,
    # and every op between two beginnings has the same step, micro-batch and (optimizer or not)
    raw = tiny_raw(gradient_accumulation_steps=3)
    raw["simulation"]["steps"] = 2
    schedule = build_schedule(resolve_plan(build_scenario(raw))).schedule
    first_ops = schedule.window_first_ops().tolist()
    group = [(step, micro, op.phase is Phase.OPTIMIZER)
             for step, micro, op in zip(schedule.op_step, schedule.op_micro_batch, schedule.ops)]
    assert [group[i] for i in first_ops] == [(0, 0, False), (0, 1, False), (0, 2, False), (0, 2, True),
                                             (1, 0, False), (1, 1, False), (1, 2, False), (1, 2, True)]
    for begin, end in zip(first_ops, first_ops[1:] + [len(group)]):
        assert set(group[begin:end]) == {group[begin]}
    # a schedule that records no steps is one window
    assert Schedule(buffers(1), [], [op("a", [0], [0])]).window_first_ops().tolist() == []
