"""Whole-log tests of the engine on toy schedules: exact times, order and byte counts of every event."""

from sim.allocator import ExactAllocator
from sim.cost import CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, Phase, Schedule, Stream
from sim.scenario import DeviceSpec, DType

# 1 FLOP/s and 1 byte/s with bf16 peak 1e6 FLOP/s: an op of F flops takes F µs.
DEVICE = DeviceSpec(name="toy", capacity_bytes=1000, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12)


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
