"""The device's clock beside the host's (sim/clocks.py): the memory the kernels hold, and the ops in flight at each
issue, on hand-derived runs; and where both reach the result JSON and the Chrome trace."""

import numpy as np

from sim.allocator import ExactAllocator
from sim.chrome_trace import chrome_trace
from sim.clocks import device_clock_memory, ops_in_flight
from sim.cost import CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, OpKind, Phase, Schedule, Stream
from sim.report import summarize
from sim.resolve import device_plan
from sim.scenario import DeviceSpec, build_scenario
from sim.simulate import run_scenario
from sim.timeline import HostModel
from sim.vocab import DType
from tests.conftest import tiny_raw

# bf16 at 1e6 FLOP/s: an op of F flops takes F µs
DEVICE = device_plan(DeviceSpec(name="toy", capacity_bytes=1 << 40, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12))
MIB = 1 << 20


def run(ops: list[Op], sizes: list[int], host_us: list[int]):
    schedule = Schedule([Buffer(i, f"b{i}", size, Category.TEMPORARIES) for i, size in enumerate(sizes)], [], ops)
    host = HostModel(np.asarray(host_us, dtype=np.int64), None)
    return Engine(schedule, ExactAllocator(1 << 40), CostModel(DEVICE, DType.BFLOAT16), host=host).run()


def kernel(name: str, allocs=(), frees=(), flops=10.0, stream=Stream.COMPUTE) -> Op:
    return Op(name, stream, Phase.FORWARD, None, tuple(allocs), tuple(frees), flops, 0, (), 0, OpKind.MEMORY)


def test_memory_on_the_device_clock_follows_the_kernels() -> None:
    # Three 10 µs kernels, 1 µs of host each: A issued at 0 runs 1-11, B issued at 1 runs 11-21, C issued at 2 runs
    # 21-31. A makes b0 (1 MiB), B makes b1 (2 MiB) and frees b0, C frees b1.
    # Host clock: b0 at 0, b1 at 1, b0 freed at B's launch 2, b1 at C's 3: 1, 3, 2, 0 MiB, the peak at 1.
    # Device clock: b0 from A's start 1, b1 from B's start 11, b0 until B's end 21, b1 until C's end 31.
    engine = run([kernel("A", [0]), kernel("B", [1], [0]), kernel("C", (), [1])], [MIB, 2 * MIB], [1, 1, 1])
    assert engine.trace.time_us.tolist() == [0, 1, 2, 3]
    on_device = device_clock_memory(engine)
    assert on_device.time_us.tolist() == [1, 11, 21, 31]
    assert on_device.allocated_bytes.tolist() == [MIB, 3 * MIB, 2 * MIB, 0]
    assert on_device.peak() == (3 * MIB, 11)
    assert ops_in_flight(engine).tolist() == [0, 1, 2]  # at B's issue A runs; at C's, A and B


def test_a_free_and_an_allocation_at_one_instant_do_not_stack() -> None:
    # A (10 µs, runs 1-11) makes and frees a 4 MiB temporary b0; B (runs 11-21) makes b1 (4 MiB), which C (no
    # work: 21-21) frees. On the device b0 is held 1-11 and b1 11-21: at 11 the free comes first, so the two never
    # stack and the peak is 4 MiB, first reached at 1.
    engine = run([kernel("A", [0], [0]), kernel("B", [1]), kernel("C", (), [1], flops=0)], [4 * MIB, 4 * MIB],
                 [1, 1, 0])
    on_device = device_clock_memory(engine)
    assert on_device.time_us.tolist() == [1, 11, 11, 21]
    assert on_device.allocated_bytes.tolist() == [4 * MIB, 0, 4 * MIB, 0]
    assert on_device.peak() == (4 * MIB, 1)


def test_an_op_that_ends_at_its_own_issue_is_not_in_flight() -> None:
    # A: 10 µs on the compute stream (issued 0, runs 1-11). Z: bookkeeping on the reduce stream, no host time, no
    # work: issued, launched, run and ended at 1. Y: issued at 1 too, runs 11-21. In flight at Z's issue: A; at Y's:
    # A only (Z ended at 1).
    engine = run([kernel("A"), kernel("Z", flops=0, stream=Stream.REDUCE), kernel("Y")], [], [1, 0, 1])
    assert engine.op_issue_us == [0, 1, 1] and engine.op_end_us == [11, 1, 21]
    assert ops_in_flight(engine).tolist() == [0, 1, 1]


def test_the_result_and_the_chrome_trace_carry_both_clocks() -> None:
    # The tiny model on one A100 (its kernels take a few µs, the host issues each in 7: it hardly runs ahead): the
    # same tensors are alive at the peak on both clocks; the result's run-ahead is the most ops in flight at an
    # issue in the last step.
    raw = tiny_raw()
    result_run = run_scenario(build_scenario(raw))
    result = summarize(result_run)
    peak_bytes, at_us = device_clock_memory(result_run.engine).peak()
    assert result["device_clock"] == {"allocated_peak_bytes": peak_bytes, "time_s": at_us / 1e6}
    assert peak_bytes == result["max_memory"]["allocated_bytes"]
    steps = np.asarray(result_run.schedule.op_step)
    last_step = int(np.searchsorted(steps, steps[-1]))
    assert result["host"]["run_ahead_max_ops"] == int(ops_in_flight(result_run.engine)[last_step:].max())
    counters = {event["name"] for event in chrome_trace(result_run)["traceEvents"] if event["ph"] == "C"}
    assert {"allocated bytes (device clock)", "host ops in flight"} <= counters
