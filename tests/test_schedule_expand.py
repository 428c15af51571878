"""Schedule.expand: the compact form (shared ops, moved spans) and the expanded one (every op its own, final ids) are
the same schedule: the engine gives both the same trace, op times, OOM and allocator end state, and the expanded
form is what building every micro-batch op by op gives."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.allocator import ExactAllocator, make_allocator
from sim.cost import CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, Phase, ReplicaSpan, Schedule, Stream
from sim.report import Run, allocator_summary, format_summary, summarize
from sim.resolve import resolve_plan
from sim.scenario import build_scenario, load_scenario
from sim.schedule import build_schedule
from sim.simulate import run_built
from sim.vocab import DType
from tests.conftest import synchronous_host, tiny_raw
from tests.golden_record import ROOT, case_paths
from tests.test_properties import scenarios
from tests.test_engine import DEVICE
from tests.test_zero3 import zero_raw

TRACE_COLUMNS = ("time_us", "op_index", "buffer_id", "delta_bytes", "category", "allocated_bytes", "reserved_bytes")


# ---- a hand-built schedule with one moved span ---------------------------------------------------------------------

def _tiny_periodic() -> Schedule:
    """Buffer 0 is a weight alive from t=0. A prologue allocates 1; the template ops 1-2 allocate [2, 4) and free 1
    (what the op before left alive), leaving 2 alive; ops 3-4 repeat them (the same Op objects) with the span's
    buffers moved by +2 and the free of 1 pointed at 2; an epilogue frees what the repetition left alive."""
    def compute(name, allocs=(), frees=(), deps=(), stream=Stream.COMPUTE) -> Op:
        """A 2 µs forward op with list buffers, as the tape records them."""
        return Op(name, stream, Phase.FORWARD, None, list(allocs), list(frees), 2.0, 0, tuple(deps))

    buffers = [Buffer(0, "weight", 100, Category.PARAMETERS), Buffer(1, "gathered", 8, Category.PARAMETERS),
               Buffer(2, "gathered", 8, Category.PARAMETERS), Buffer(3, "tmp", 4, Category.TEMPORARIES),
               Buffer(4, "gathered", 8, Category.PARAMETERS), Buffer(5, "tmp", 4, Category.TEMPORARIES)]
    x = compute("x", allocs=[2, 3], frees=[1])
    y = compute("y", frees=[3], deps=[-1], stream=Stream.REDUCE)  # waits for the op just before it
    ops = [compute("prologue", allocs=[1]), x, y, x, y, compute("epilogue", frees=[4])]
    return Schedule(buffers, [0], ops, [0] * 6, [0, 0, 0, 1, 1, 1],
                    moved_spans=[(3, 5, ReplicaSpan(shift=2, low=2, high=4, entry={1: 2}))],
                    op_source=[0, 1, 2, 1, 2, 5])


def _run_exact(schedule: Schedule):
    """The engine on a toy device (an op of F flops takes F µs) with a live-bytes allocator."""
    return Engine(schedule, ExactAllocator(1000), CostModel(DEVICE, DType.BFLOAT16)).run()


def _assert_same_engine_result(a, b) -> None:
    """Every trace column, the op times, the OOM, busy times and repeated windows of two engine results agree."""
    for column in TRACE_COLUMNS:
        assert np.array_equal(getattr(a.trace, column), getattr(b.trace, column)), column
    assert (a.op_start_us, a.op_end_us, a.end_time_us) == (b.op_start_us, b.op_end_us, b.end_time_us)
    assert (a.oom, a.busy_us, a.repeated_events) == (b.oom, b.busy_us, b.repeated_events)
    assert a.largest_free_block_at_peak_bytes == b.largest_free_block_at_peak_bytes


def test_expanding_a_hand_built_moved_span() -> None:
    compact = _tiny_periodic()
    expanded = compact.expand()
    # Position 3 is x again with every allocation moved by +2 (2, 3 -> 4, 5) and its free of 1, outside the span's
    # own ids [2, 4), taken from the entry map (1 -> 2: the gathered buffer the template left alive). Position 4 is y
    # again: its free of 3 lies in [2, 4), so it frees 5; its dep stays -1 (position 3, the moved x).
    assert [(op.name, op.allocs, op.frees, op.deps) for op in expanded.ops] == [
        ("prologue", (1,), (), ()),
        ("x", (2, 3), (1,), ()),
        ("y", (), (3,), (-1,)),
        ("x", (4, 5), (2,), ()),
        ("y", (), (5,), (-1,)),
        ("epilogue", (), (4,), ()),
    ]
    assert len({id(op) for op in expanded.ops}) == 6 and all(type(op) is Op for op in expanded.ops)
    assert expanded.is_expanded and not compact.is_expanded
    assert compact.repeated_runs() == [(3, 1, 2)] and expanded.repeated_runs() == []  # positions 3-4 repeat 1-2
    assert (expanded.op_source, expanded.moved_spans) == (None, [])
    assert (expanded.buffers, expanded.persistent) == (compact.buffers, compact.persistent)
    assert (expanded.op_step, expanded.op_micro_batch) == (compact.op_step, compact.op_micro_batch)
    # the compact ops are left as they were
    assert (compact.ops[3].allocs, compact.ops[3].frees) == ([2, 3], [1]) and compact.ops[3] is compact.ops[1]
    assert expanded.expand() is expanded

    compact_run, expanded_run = _run_exact(compact), _run_exact(expanded)
    _assert_same_engine_result(compact_run, expanded_run)
    # Every op takes 2 µs and 7 µs of host time (cost.HOST_US_PER_KERNEL): op i is issued at 7i and launched at
    # 7i + 7, allocating at issue and freeing at launch, in program order. (Kernels: prologue 7-9, x 14-16, y on
    # the reduce stream 21-23, the repeated x 28-30, its y 35-37, the epilogue 42-44.)
    t = compact_run.trace
    assert list(zip(t.time_us.tolist(), t.op_index.tolist(), t.buffer_id.tolist(), t.delta_bytes.tolist(),
                    t.allocated_bytes.tolist())) == [
        (0, -1, 0, 100, 100),  # the weight, before the first op
        (0, 0, 1, 8, 108),     # prologue
        (7, 1, 2, 8, 116),     # x allocates the span's own 2 and 3
        (7, 1, 3, 4, 120),
        (14, 1, 1, -8, 112),   # x frees what the prologue left alive
        (21, 2, 3, -4, 108),   # y frees 3
        (21, 3, 4, 8, 116),    # the repeated x: 2, 3 moved to 4, 5
        (21, 3, 5, 4, 120),
        (28, 3, 2, -8, 112),   # the repeated x frees 1 -> entry 2: what x left alive
        (35, 4, 5, -4, 108),   # the repeated y frees 3 moved to 5
        (42, 5, 4, -8, 100),   # the epilogue frees 4: only the weight is left
    ]
    assert compact_run.op_start_us == [7, 14, 21, 28, 35, 42] and compact_run.end_time_us == 44
    # the comparison sees the moves: the same ops without them give another trace
    unmoved = Schedule(compact.buffers, [0], [op.with_buffers(op.allocs, op.frees) for op in compact.ops],
                       compact.op_step, compact.op_micro_batch)
    assert not np.array_equal(_run_exact(unmoved).trace.buffer_id, compact_run.trace.buffer_id)


@st.composite
def periodic_schedules(draw) -> tuple[Schedule, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A prologue allocating buffer 0, a template of k ops allocating ids [1, 1 + m) repeated r times with its ids
    moved, and an epilogue; with every position's final (allocs, frees), derived here without ReplicaSpan."""
    k, m, r = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    alloc_at = [draw(st.integers(0, k - 1)) for _ in range(m)]  # template op allocating id 1 + i
    # id 1 outlives the template (the next repetition frees it); the others are freed inside it, at or after
    # their allocation; one template op frees what the ops before the span left alive (id 0 for the template)
    free_at = {1 + i: draw(st.integers(alloc_at[i], k - 1)) for i in range(1, m)}
    carry_free_at = draw(st.integers(0, k - 1))
    sizes = [draw(st.integers(1, 50)) for _ in range(m)]
    template = []
    for t in range(k):
        allocs = [1 + i for i in range(m) if alloc_at[i] == t]
        frees = [b for b, at in free_at.items() if at == t] + ([0] if carry_free_at == t else [])
        deps = tuple(-d for d in draw(st.lists(st.integers(1, t + 1), max_size=2, unique=True)))
        template.append(Op(f"t{t}", draw(st.sampled_from(list(Stream))), Phase.FORWARD, None, allocs, frees,
                           float(draw(st.integers(0, 9))), 0, deps))
    last = 1 + r * m  # what the last repetition leaves alive
    prologue = Op("prologue", Stream.COMPUTE, Phase.FORWARD, None, [0], [], 1.0)
    epilogue = Op("epilogue", Stream.COMPUTE, Phase.FORWARD, None, [], [last], 1.0)
    ops = [prologue] + template * (r + 1) + [epilogue]
    spans = [(1 + j * k, 1 + (j + 1) * k, ReplicaSpan(j * m, 1, 1 + m, {0: 1 + (j - 1) * m})) for j in range(1, r + 1)]
    row_sizes = [sizes[0]] + sizes * (r + 1)
    buffers = [Buffer(b, f"b{b}", size, Category.TEMPORARIES) for b, size in enumerate(row_sizes)]
    schedule = Schedule(buffers, [], ops, [0] * len(ops), [0] + [j for j in range(r + 1) for _ in range(k)] + [r],
                        spans, [0] + list(range(1, k + 1)) * (r + 1) + [len(ops) - 1])
    # repetition j >= 1 allocates and frees its own ids j·m higher, and frees the id the one before left alive
    expected = [((0,), ())] + [
        (tuple(a + j * m for a in op.allocs), tuple(f + j * m if f or not j else 1 + (j - 1) * m for f in op.frees))
        for j in range(r + 1) for op in template] + [((), (last,))]
    return schedule, expected


@given(periodic_schedules())
def test_expanding_random_moved_spans(case) -> None:
    compact, expected = case
    expanded = compact.expand()
    assert [(op.allocs, op.frees) for op in expanded.ops] == expected
    assert [op.deps for op in expanded.ops] == [op.deps for op in compact.ops]
    _assert_same_engine_result(_run_exact(compact), _run_exact(expanded))


def test_a_schedule_without_repetition_is_built_expanded() -> None:
    # one step of one micro-batch: nothing repeats, so the tape records no op_source and no moved span
    schedule = build_schedule(resolve_plan(build_scenario(tiny_raw()))).schedule
    assert schedule.is_expanded and schedule.expand() is schedule
    assert len({id(op) for op in schedule.ops}) == len(schedule.ops)


# ---- built schedules: the engine on both forms ---------------------------------------------------------------------

def _with(raw: dict, gpus: int = 1, accumulation: int = 4, steps: int = 2, backend: str = "caching",
          **extra) -> dict:
    """`raw` on `gpus` GPUs with `accumulation` micro-batches per step, `steps` steps, the `backend` allocator."""
    raw["hardware"]["gpus_per_node"] = gpus
    raw["training"]["gradient_accumulation_steps"] = accumulation
    raw["simulation"]["steps"] = steps
    raw["allocator"] = {"backend": backend}
    raw.update(extra)
    return raw


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
CONFIGS = {
    "single_exact_accumulation_3": _with(tiny_raw(), accumulation=3, backend="exact"),
    "single_caching_accumulation_4": _with(tiny_raw()),
    "ddp": _with(tiny_raw(), gpus=2),
    "zero1": _with(zero_raw(2, stage=1), gpus=2),
    "zero2": _with(zero_raw(2, stage=2), gpus=2, accumulation=3),
    "zero3": _with(zero_raw(2), gpus=2),
    "zero3_no_overlap": _with(zero_raw(2, overlap_comm=False), gpus=2, accumulation=3),
    "lora": _with(tiny_raw(), accumulation=3, lora=LORA),
    "checkpointing": _with(tiny_raw(gradient_checkpointing=True), gpus=2),
    # the host's own work and host waits (CPU Adam), PCIe copies, collectives on ProcessGroupNCCL's streams
    "zero2_offload": _with(zero_raw(2, stage=2, offload_optimizer={"device": "cpu"}), gpus=2, accumulation=3),
    "zero3_offload": _with(zero_raw(2, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"}),
                           gpus=2, accumulation=3),
    "save_on_cpu": _with(tiny_raw(), accumulation=3, strategies=[{"kind": "save_on_cpu"}]),
}


def _assert_same_run(a: Run, b: Run) -> None:
    """Every trace column, op times, OOM, the allocator's end state and the printed result are the same."""
    _assert_same_engine_result(a.engine, b.engine)
    assert summarize(a) == summarize(b)
    assert format_summary(summarize(a), allocator_summary(a)) == format_summary(summarize(b), allocator_summary(b))
    assert a.allocator.live_buffer_ids() == b.allocator.live_buffer_ids()
    assert (a.allocator.allocated_bytes, a.allocator.reserved_bytes) == \
        (b.allocator.allocated_bytes, b.allocator.reserved_bytes)
    if hasattr(a.allocator, "segments"):
        assert a.allocator.memory_stats() == b.allocator.memory_stats()
        assert a.allocator.segments() == b.allocator.segments()


def _compact_and_expanded(scenario) -> tuple[Run, Run]:
    """The scenario run as built (compact) and with its schedule expanded."""
    plan = resolve_plan(scenario)
    built = build_schedule(plan)
    expanded = replace(built, schedule=built.schedule.expand())
    return run_built(scenario, plan, built), run_built(scenario, plan, expanded)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_engine_gives_both_forms_the_same_run(name: str) -> None:
    compact, expanded = _compact_and_expanded(build_scenario(CONFIGS[name]))
    assert not compact.schedule.is_expanded and expanded.schedule.is_expanded
    assert len(compact.schedule.distinct_ops()) < len(compact.schedule.ops)  # micro-batches were repeated
    ops = expanded.schedule.ops
    assert max(b for op in ops for b in (*op.allocs, *op.frees)) < len(expanded.schedule.buffers)  # a row per id
    _assert_same_run(compact, expanded)


@given(scenarios(), st.sampled_from([None, 1, 3]))
def test_the_engine_gives_both_forms_of_random_scenarios_the_same_run(raw: dict, zero_stage: int | None) -> None:
    # every architecture, attention kind, optimizer and allocator of the property tests, 3 micro-batches, 2 steps
    raw["training"]["gradient_accumulation_steps"] = 3
    raw["simulation"]["steps"] = 2
    if zero_stage is not None:
        raw["hardware"]["gpus_per_node"] = 2
        raw["deepspeed"] = {"zero_optimization": {"stage": zero_stage, "reduce_bucket_size": 5000,
                                                  "stage3_param_persistence_threshold": 100}}
    if zero_stage == 3:  # non-reentrant checkpointing (5.x's default) under ZeRO-3 is refused (sim/resolve.py)
        raw["training"]["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    _assert_same_run(*_compact_and_expanded(build_scenario(raw)))


@pytest.mark.parametrize("name", ["zero1", "zero3", "zero3_no_overlap"])
def test_zero_configurations_have_moved_spans_to_expand(name: str) -> None:
    # these exercise the id moves: buffers kept from one micro-batch to the next (ZeRO-1 IPG buffers, ZeRO-3
    # gathered parameters) make their repetitions periodic
    schedule = build_schedule(resolve_plan(build_scenario(CONFIGS[name]))).schedule
    assert schedule.moved_spans


@pytest.mark.parametrize("capacity_bytes", [80 * 10**9, 419430400 + 24 * 2**20])
def test_stepwise_repeated_windows_give_both_forms_the_same_run(capacity_bytes: int) -> None:
    # the caching allocator's Python model, windows repeated: the windows come from steps and micro-batches, not from
    # shared ops, so the expanded form repeats the same windows; 424 MiB: an OOM and cache flushes
    raw = _with(zero_raw(2), gpus=2, accumulation=6)
    plan = resolve_plan(build_scenario(raw, overrides=[f"hardware.device.capacity_bytes={capacity_bytes}"]))
    schedule = build_schedule(plan).schedule
    results = []
    for form in (schedule, schedule.expand()):
        device = plan.device
        allocator = make_allocator(plan.allocator.backend, plan.allocator.conf,
                                   device.capacity_bytes - device.cuda_context_bytes, device.capacity_bytes,
                                   plan.versions.torch)
        cost = CostModel(device, DType.BFLOAT16, plan.world.gpus_per_node, plan.world.nodes)
        # a host that waits for each op: no block is pending across windows, so windows repeat
        results.append((Engine(form, allocator, cost, compiled=False, host=synchronous_host(form)).run(), allocator))
    (compact, compact_allocator), (expanded, expanded_allocator) = results
    assert compact.repeated_events > 0
    _assert_same_engine_result(compact, expanded)
    assert compact_allocator.memory_stats() == expanded_allocator.memory_stats()
    assert compact_allocator.segments() == expanded_allocator.segments()
    assert compact_allocator.ooms == expanded_allocator.ooms


# ---- the expanded form is the op-by-op build -----------------------------------------------------------------------

def _canonical_ops(schedule: Schedule) -> list[tuple]:
    """Every op with its buffers named by allocation: the k-th allocation of the run is k whatever its id, a free
    names the allocation it frees (persistent buffers: ("persistent", i)), each with its size and category. The
    op-by-op build gives every micro-batch fresh ids; the repeated one reuses or moves them."""
    sizes, categories = schedule.buffer_sizes(), schedule.buffer_categories()
    recorded = schedule.buffer_recorded_masks()
    latest = {b: ("persistent", i) for i, b in enumerate(schedule.persistent)}
    count = 0
    canonical = []
    for op in schedule.ops:
        allocs = []
        for b in op.allocs:
            latest[b] = count
            allocs.append((count, int(sizes[b]), int(categories[b]), int(recorded[b])))
            count += 1
        frees = tuple(latest[b] for b in op.frees)
        canonical.append((op.name, op.stream, op.alloc_stream, op.phase, op.layer, op.deps, op.flops, op.bytes_moved,
                          op.wire_bytes, op.kind, op.host_waits, tuple(allocs), frees))
    return canonical


@pytest.mark.parametrize("name", ["single_caching_accumulation_4", "ddp", "zero3", "zero3_no_overlap", "zero2_offload",
                                  "zero3_offload", "save_on_cpu"])
def test_expanding_gives_what_building_op_by_op_gives(name: str) -> None:
    plan = resolve_plan(build_scenario(CONFIGS[name]))
    repeated, built = build_schedule(plan).schedule, build_schedule(plan, repeat=False).schedule
    expanded = repeated.expand()
    assert built.is_expanded and not repeated.is_expanded
    assert (expanded.op_step, expanded.op_micro_batch) == (built.op_step, built.op_micro_batch)
    assert _canonical_ops(expanded) == _canonical_ops(built)


# ---- the golden scenarios ------------------------------------------------------------------------------------------

CASES = case_paths()
SHIPPED = {name for name, path in CASES.items() if path.parent == ROOT / "scenarios"}  # full-size models: slow


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SHIPPED else name
                                  for name in sorted(CASES)])
def test_golden_scenarios_give_both_forms_the_same_run(name: str) -> None:
    compact, expanded = _compact_and_expanded(load_scenario(CASES[name]))
    _assert_same_run(compact, expanded)
