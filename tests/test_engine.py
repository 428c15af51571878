"""Whole-log tests of the engine on toy schedules (exact times, order and byte counts of every event), its timeline
against a simpy model, and repeated windows against calling the allocator for every event."""

from pathlib import Path

import numpy as np
import pytest
import simpy
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sim.allocator import ExactAllocator, caching, make_allocator
from sim.cost import CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, Phase, Schedule, Stream
from sim.resolve import device_plan, resolve_plan
from sim.scenario import DeviceSpec, build_scenario
from sim.timeline import ListTimeline
from sim.vocab import DType
from sim.schedule import build_schedule
from tests.conftest import tiny_raw
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
    # weights (100 B) live from t=0; op0 allocates 10 B for 5 µs; op1 allocates 20 B for 3 µs and frees both.
    schedule = Schedule(buffers(100, 10, 20), [0], [op("a", [1], flops=5), op("b", [2], [1, 2], flops=3)])
    events, result = log(schedule)
    assert events == [
        (0, -1, 0, 100, 100),   # persistent, before the first op
        (0, 0, 1, 10, 110),     # op0 starts at 0
        (5, 1, 2, 20, 130),     # op1 starts when op0 ends
        (8, 1, 1, -10, 120),    # op1's frees at its end, in order
        (8, 1, 2, -20, 100),
    ]
    assert result.end_time_us == 8 and result.op_start_us == [0, 5] and result.oom is None


def test_cross_stream_dependency_delays_consumer() -> None:
    # A 10 µs collective on another stream; the compute op that needs it waits, so its buffer is allocated at
    # t=10 although the compute stream was free at t=2.
    schedule = Schedule(buffers(8, 4), [], [
        op("gather", [0], flops=10, stream=Stream.ALLGATHER),
        op("short", flops=2),
        op("use", [1], [0, 1], flops=1, deps=[-2]),  # relative: the op two before
    ])
    events, result = log(schedule)
    assert events == [(0, 0, 0, 8, 8), (10, 2, 1, 4, 12), (11, 2, 0, -8, 4), (11, 2, 1, -4, 0)]
    assert result.busy_us == {Stream.COMPUTE: 3, Stream.ALLGATHER: 10}


def test_oom_is_recorded_once_and_simulation_continues() -> None:
    schedule = Schedule(buffers(60, 60, 60), [], [op("x", [0]), op("y", [1]), op("z", [2], [0, 1, 2])])
    events, result = log(schedule, capacity=100)
    assert result.oom is not None and result.oom.op_index == 1 and result.oom.requested_bytes == 60
    assert max(e[4] for e in events) == 180  # the whole demand is still shown
    assert events[-1][4] == 0


# ---- the timeline against a discrete-event model in simpy -------------------------------------------------------

STREAMS = list(Stream)


class SimpyTimeline:
    """The reference semantics behind the Timeline seam: one simpy process per stream runs its ops in order; each
    op waits for the completion events of the ops it depends on, takes its duration, then signals its own
    completion."""

    def op_times(self, schedule: Schedule, durations_us: np.ndarray) -> tuple[list[int], list[int]]:
        """Start and end of every op, as the simpy clock reads them."""
        env = simpy.Environment()
        done = [env.event() for _ in schedule.ops]
        starts, ends = [-1] * len(schedule.ops), [-1] * len(schedule.ops)

        def stream_process(indices: list[int]):
            """One stream: its ops in order, each after its dependencies' completion events."""
            for index in indices:
                op = schedule.ops[index]
                if op.deps:
                    yield simpy.AllOf(env, [done[index + d] for d in op.deps])
                starts[index] = int(env.now)
                yield env.timeout(int(durations_us[index]))
                ends[index] = int(env.now)
                done[index].succeed()

        for stream in STREAMS:
            env.process(stream_process([i for i, op in enumerate(schedule.ops) if op.stream is stream]))
        env.run()
        return starts, ends


def simpy_op_starts(schedule: Schedule, durations: list[int]) -> list[int]:
    """Every op's start in the simpy model."""
    return SimpyTimeline().op_times(schedule, np.asarray(durations, dtype=np.int64))[0]


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
    schedule, durations = case
    cost = CostModel(DEVICE, DType.BFLOAT16)
    assert ListTimeline().op_times(schedule, np.asarray(durations)) == \
        SimpyTimeline().op_times(schedule, np.asarray(durations))
    result = Engine(schedule, ExactAllocator(1000), cost).run()
    plugged = Engine(schedule, ExactAllocator(1000), cost, timeline=SimpyTimeline()).run()  # behind the same seam
    assert (plugged.op_start_us, plugged.op_end_us) == (result.op_start_us, result.op_end_us)
    assert np.array_equal(plugged.trace.time_us, result.trace.time_us)
    assert result.op_start_us == simpy_op_starts(schedule, durations)
    assert result.end_time_us == max(s + d for s, d in zip(result.op_start_us, durations))
    assert sum(result.busy_us.values()) == sum(durations)
    # every op runs once, on its own stream: its buffer is allocated at its start and freed at its end, once
    t = result.trace
    events = sorted(zip(t.op_index.tolist(), t.delta_bytes.tolist(), t.time_us.tolist()))
    expected = sorted((i, d, result.op_start_us[i] if d > 0 else result.op_end_us[i])
                      for i in range(len(schedule.ops)) for d in (1, -1))
    assert events == expected
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
    assert shifted.op_start_us == simpy_op_starts(plain, cost.durations_us(plain.ops))


def test_same_time_events_keep_issue_order() -> None:
    # The collective (op 0, 4 µs) and the compute op 1 (4 µs) both end at t=4; op 2 starts at 4 and needs both.
    # At t=4: op 0's free, op 1's free, then op 2's allocation (issue order; allocations before frees within an op).
    schedule = Schedule(buffers(8, 4, 2), [], [
        op("gather", [0], [0], flops=4, stream=Stream.ALLGATHER),
        op("compute", [1], [1], flops=4),
        op("use", [2], [2], flops=0, deps=[-2]),
    ])
    events, _ = log(schedule)
    assert events == [(0, 0, 0, 8, 8), (0, 1, 1, 4, 12), (4, 0, 0, -8, 4), (4, 1, 1, -4, 0), (4, 2, 2, 2, 2),
                      (4, 2, 2, -2, 0)]


# ---- repeated windows ----------------------------------------------------------------------------------------------

def _engine_pair(raw: dict, overrides: list[str] = (), first: dict | None = None):
    """(result, allocator) of the Python model with repeated windows (or the engine options `first`) and of the
    Python model called for every event."""
    plan = resolve_plan(build_scenario(raw, overrides=overrides))
    built = build_schedule(plan)
    device = plan.device
    results = []
    for options in (first or {"repeat": True, "compiled": False}, {"repeat": False, "compiled": False}):
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
