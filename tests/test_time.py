"""The clock as a model of the machine: collectives against the compute they overlap, devices and topologies."""

import math

import numpy as np
import pytest

from sim.allocator import ExactAllocator
from sim.cost import NCCL_BASE_LATENCY_US, CostModel
from sim.engine import Engine
from sim.ops import Buffer, Category, Op, OpKind, Phase, Schedule, Stream
from sim.report import summarize
from sim.resolve import device_plan
from sim.scenario import DeviceSpec, build_scenario
from sim.vocab import DType
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

# bf16 at 1e6 FLOP/s (1 FLOP = 1 µs); NVLink 2e6 B/s both ways = 1e6 B/s per direction: 1 wire byte = 1 µs.
TOY = DeviceSpec(name="toy", capacity_bytes=10**6, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12,
                 intra_node_bytes_per_s=2e6)


def overlap_log(wire_bytes: int) -> tuple[list[int], list[int]]:
    """An all-gather of `wire_bytes` (2 ranks) beside a 50 µs compute op; the consumer needs both."""
    ops = [
        Op("gather", Stream.ALLGATHER, Phase.FORWARD, None, (0,), (), 0.0, 0, (), wire_bytes, OpKind.ALL_GATHER),
        Op("compute", Stream.COMPUTE, Phase.FORWARD, None, (1,), (1,), 50.0, 0, (), 0, OpKind.GEMM),
        Op("use", Stream.COMPUTE, Phase.FORWARD, None, (), (0,), 10.0, 0, (-2,), 0, OpKind.GEMM),
    ]
    schedule = Schedule([Buffer(0, "gathered", 100, Category.PARAMETERS),
                         Buffer(1, "act", 10, Category.ACTIVATIONS)], [], ops)
    result = Engine(schedule, ExactAllocator(10**6), CostModel(device_plan(TOY), DType.BFLOAT16, gpus_per_node=2)).run()
    t = result.trace
    return result.op_start_us, [int(x) for x, b in zip(t.time_us, t.buffer_id) if b == 0]


def test_a_slower_collective_delays_the_consumer_not_the_hosts_allocations() -> None:
    # The all-gather takes 8.4 µs (NCCL base latency) + wire µs, rounded up: 20 B -> 29 µs, 80 B -> 89 µs. Each op
    # costs the host 7 µs: gather launched at 7, compute at 14 (runs 14-64), the consumer at 21. The consumer's
    # kernel starts at max(64, gather end): 64 with the fast gather (7-36), 96 with the slow one (7-96). The
    # allocator is called from the host, which does not wait: the gathered buffer lives from 0 (the gather's issue)
    # to 21 (the consumer's launch) in both.
    fast_starts, fast_life = overlap_log(20)
    slow_starts, slow_life = overlap_log(80)
    assert math.ceil(NCCL_BASE_LATENCY_US + 20) == 29 and math.ceil(NCCL_BASE_LATENCY_US + 80) == 89
    assert fast_starts == [7, 14, 64] and slow_starts == [7, 14, 96]
    assert fast_life == slow_life == [0, 21]


def test_collective_cost_follows_nccl_ring_and_tree() -> None:
    # 8 ranks on one node: ring all-gather = base + 7 steps × intra latency + wire / bus bandwidth.
    device = TOY.model_copy(update={"intra_node_latency_us": 2.0, "inter_node_latency_us": 10.0,
                                    "inter_node_bytes_per_s": 1e5})
    one_node = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=1)
    assert one_node.collective_latency_us(OpKind.ALL_GATHER) == pytest.approx(8.4 + 7 * 2.0)
    assert one_node.collective_latency_us(OpKind.ALL_REDUCE) == pytest.approx(8.4 + 14 * 2.0)
    # 4 nodes × 8: the ring crosses the network 3 times (all-gather) or 2·4 times (all-reduce): 62 steps in all.
    four_nodes = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=4)
    assert four_nodes.collective_latency_us(OpKind.ALL_GATHER) == pytest.approx(8.4 + 28 * 2.0 + 3 * 10.0)
    assert four_nodes.collective_latency_us(OpKind.ALL_REDUCE) == pytest.approx(8.4 + 54 * 2.0 + 8 * 10.0)
    # the slower link sets the bandwidth: the node's 8 NICs together (8 × 1e5 B/s = 0.8 B/µs) against NVLink's
    # 1e6 B/s per direction
    gather = Op("g", Stream.ALLGATHER, Phase.FORWARD, None, wire_bytes=8 * 10**5, kind=OpKind.ALL_GATHER)
    assert one_node.durations_us([gather]) == [math.ceil(8.4 + 14 + 8 * 10**5)]
    assert four_nodes.durations_us([gather]) == [math.ceil(8.4 + 86 + 10**6)]
    # NCCL 2.23 counts 2(nodes-1) network steps for an all-reduce ring instead of 2·nodes: 56 + 6 of its 62
    newer = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=4, nccl_version=(2, 23, 4))
    assert newer.collective_latency_us(OpKind.ALL_REDUCE) == pytest.approx(8.4 + 56 * 2.0 + 6 * 10.0)


def all_reduce(message_bytes: int, ranks: int) -> Op:
    """An all-reduce as the data-parallel code issues it: each rank sends 2(n-1)/n of the message."""
    return Op("ar", Stream.REDUCE, Phase.BACKWARD, None, wire_bytes=2 * (ranks - 1) * message_bytes // ranks,
              kind=OpKind.ALL_REDUCE)


def test_all_reduce_runs_as_the_faster_of_ring_and_tree() -> None:
    # 16 nodes × 8 ranks, NVLink 1000 B/µs per direction and NICs as fast, link latencies 2 and 10 µs, sm80, 24
    # channels, NCCL 2.19 (tuning.cc):
    #   ring latency = 8.4 + (254 - 32) × 2 + 32 × 10 = 772.4 µs (× 1.4 once each rank's share per channel,
    #   message / (24 × 128), reaches 64 B); ring bandwidth: 2·127/128 of the message at 1000 B/µs;
    #   tree latency = 0 + 2 × (7 × 28 + log2(16) × 28) = 616 µs; tree bandwidth = 0.5 × 0.92 × 1000 B/µs × the
    #   correction for message/64 = 2^k (k = 9: 0.6, k = 19: 0.7).
    device = TOY.model_copy(update={"intra_node_bytes_per_s": 2e9, "inter_node_bytes_per_s": 1e9 / 8,
                                    "intra_node_latency_us": 2.0, "inter_node_latency_us": 10.0,
                                    "compute_capability": "8.0"})
    cost = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=16)
    assert cost.bus_bytes_per_s == pytest.approx(1e9)
    assert cost.tree_latency_us() == pytest.approx(616.0)
    small, large = 64_000, 64_000_000
    ring_small = 772.4 + 127_000 / 1000  # 64000 / 3072 < 64: no plateau
    tree_small = 616 + small / (460 * 0.6)
    ring_large = 772.4 * 1.4 + 127_000_000 / 1000
    tree_large = 616 + large / (460 * 0.7)
    assert tree_small < ring_small and ring_large < tree_large
    assert cost.durations_us([all_reduce(small, 128), all_reduce(large, 128)]) == [math.ceil(tree_small),
                                                                                   math.ceil(ring_large)]
    # From NCCL 2.23 a tree hop is costed at 4 µs over NVLink and 14 µs over the network, plus 8.4 µs base.
    newer = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=16, nccl_version=(2, 23, 4))
    assert newer.tree_latency_us() == pytest.approx(8.4 + 2 * (7 * 4.0 + 4 * 14.0))
    # One node: the tree's hops cost 2 × 7 × 28 = 392 µs and its bandwidth is below the ring's (0.46 vs 8/14 of
    # the bus): the ring always wins.
    one_node = CostModel(device_plan(device), DType.BFLOAT16, gpus_per_node=8, nodes=1)
    for message in (64, 64_000, 64_000_000):
        ring = 8.4 + 14 * 2.0 + 2 * 7 * message / 8 / 1000
        assert one_node.durations_us([all_reduce(message, 8)]) == [math.ceil(ring)]


def test_kernels_run_at_their_units_achievable_rates() -> None:
    # A100 bf16: GEMMs at 0.869 × 312 TFLOP/s, FA2 at 0.575 × 312, elementwise at the fp32 19.5 TFLOP/s or the
    # HBM at 0.834 × 2039 GB/s, whichever is slower.
    a100 = build_scenario(small_zero3("a100-sxm4-80gb")).hardware.device
    cost = CostModel(device_plan(a100), DType.BFLOAT16)
    gemm = Op("mm", Stream.COMPUTE, Phase.FORWARD, None, flops=0.869 * 312e12 * 1e-3, kind=OpKind.GEMM)
    attention = Op("fa", Stream.COMPUTE, Phase.FORWARD, None, flops=0.575 * 312e12 * 1e-3, kind=OpKind.ATTENTION)
    copy = Op("copy", Stream.COMPUTE, Phase.FORWARD, None, flops=1e6, bytes_moved=int(0.834 * 2039e9 * 1e-3))
    assert cost.durations_us([gemm, attention, copy]) == [1000, 1000, 1000]


def test_host_copies_run_at_pcie_and_host_work_at_the_ranks_share_of_host_memory() -> None:
    # A100 on a DGX A100 host: PCIe Gen4 x16 64 GB/s both ways, 32 GB/s a direction at the measured 0.821: a copy of
    # 0.821 × 32e9 × 1e-3 bytes takes 1000 µs either way. The host's 409.6 GB/s of DRAM is shared by 8 ranks:
    # 51.2 GB/s each, so DeepSpeedCPUAdam's 28 B per element over 51.2e9 × 1e-3 / 28 elements takes 1000 µs. The
    # host issues neither a kernel nor a launch for its own work (0 µs), but 7 µs for a copy.
    a100 = build_scenario(small_zero3("a100-sxm4-80gb")).hardware.device
    cost = CostModel(device_plan(a100), DType.BFLOAT16, gpus_per_node=8)
    moved = int(0.821 * 32e9 * 1e-3)
    to_device = Op("in", Stream.COMPUTE, Phase.OPTIMIZER, None, bytes_moved=moved, kind=OpKind.HOST_TO_DEVICE)
    to_host = Op("out", Stream.REDUCE, Phase.BACKWARD, None, bytes_moved=moved, kind=OpKind.DEVICE_TO_HOST)
    adam = Op("cpu_adam", Stream.CPU, Phase.OPTIMIZER, None, bytes_moved=int(51.2e9 * 1e-3), kind=OpKind.HOST_MEMORY)
    assert cost.durations_us([to_device, to_host, adam]) == [1000, 1000, 1000]
    assert cost.host_us([to_device, to_host, adam]) == [7, 7, 0]


def test_offloaded_adam_blocks_the_host_and_the_gpu_waits() -> None:
    # ZeRO-2 with offload_optimizer: the host waits for the GPU, runs DeepSpeedCPUAdam on the rank's partition, and
    # issues nothing else until it is done: the next op is issued at Adam's end, and no GPU kernel runs meanwhile.
    raw = small_zero3("a100-sxm4-80gb")
    raw["deepspeed"] = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    run = run_scenario(build_scenario(raw))
    ops, engine = run.schedule.ops, run.engine
    adams = [i for i, o in enumerate(ops) if o.name == "zero.step.cpu_adam"]
    assert adams and all(ops[i].stream is Stream.CPU for i in adams)
    for i in adams:
        assert engine.op_end_us[i] - engine.op_start_us[i] > 0
        assert engine.op_issue_us[i + 1] >= engine.op_end_us[i]
        gpu = [j for j, o in enumerate(ops) if o.stream is not Stream.CPU]
        assert not any(engine.op_start_us[j] < engine.op_end_us[i] and engine.op_end_us[j] > engine.op_start_us[i]
                       and engine.op_end_us[j] > engine.op_start_us[j] for j in gpu)
    copies = {o.kind for o in ops if o.kind in (OpKind.HOST_TO_DEVICE, OpKind.DEVICE_TO_HOST)}
    assert copies == {OpKind.HOST_TO_DEVICE, OpKind.DEVICE_TO_HOST}


def small_zero3(device: str, nodes: int = 1) -> dict:
    raw = tiny_raw(seq_len=256, gradient_accumulation_steps=2)
    raw["model"].update({"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "vocab_size": 32000})
    raw["hardware"] = {"device": device, "gpus_per_node": 8, "nodes": nodes}
    raw["allocator"] = {"backend": "caching"}
    raw["deepspeed"] = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 10**6}}
    raw["simulation"]["steps"] = 2
    return raw


def gathered_lifetime_us(run) -> int:
    """Total time gathered parameters stay allocated (allocation to free), over the run."""
    trace, names = run.engine.trace, run.schedule.buffers
    born: dict[int, int] = {}
    total = 0
    for time, buffer_id, delta in zip(trace.time_us.tolist(), trace.buffer_id.tolist(), trace.delta_bytes.tolist()):
        if not names[buffer_id].name.endswith(".gathered"):
            continue
        if delta > 0:
            born[buffer_id] = time
        else:
            total += time - born.pop(buffer_id)
    return total


def test_a800_against_a100_same_states_slower_step_longer_gathers() -> None:
    # The A800 is an A100 with 8 NVLink links instead of 12 (400 vs 600 GB/s): same model states, and every
    # collective slower, so the step and the time gathered parameters stay alive can only grow.
    a800, a100 = (run_scenario(build_scenario(small_zero3(d))) for d in ("a800-sxm4-80gb", "a100-sxm4-80gb"))
    r800, r100 = summarize(a800), summarize(a100)
    assert r800["model_states_bytes"] == r100["model_states_bytes"]
    assert r800["step_time_s"] >= r100["step_time_s"]
    assert gathered_lifetime_us(a800) >= gathered_lifetime_us(a100)
    gathers = [i for i, op in enumerate(a800.schedule.ops) if op.kind is OpKind.ALL_GATHER]
    slower = [(a800.engine.op_end_us[i] - a800.engine.op_start_us[i]) - (a100.engine.op_end_us[i] -
                                                                          a100.engine.op_start_us[i]) for i in gathers]
    assert min(slower) >= 0 and max(slower) > 0  # latency-bound small gathers take the same time on both


def test_across_four_nodes_the_network_dominates_the_all_gather() -> None:
    # 32 GPUs: the ring's bandwidth is the node's eight 25 GB/s NICs × 0.96 = 192 GB/s, below NVLink's
    # 300 GB/s × 0.772 = 231.6 GB/s, and three of its 31 steps pay the network latency. Every all-gather takes
    # exactly that, and longer than the same bytes would over NVLink alone.
    run = run_scenario(build_scenario(small_zero3("a100-sxm4-80gb", nodes=4)))
    device = run.scenario.hardware.device
    cost = CostModel(device_plan(device), DType.BFLOAT16, 8, 4)
    assert cost.bus_bytes_per_s == pytest.approx(8 * 25e9 * 0.96)
    assert cost.bus_bytes_per_s < cost.intra_bus_bytes_per_s
    latency = cost.collective_latency_us(OpKind.ALL_GATHER)
    assert latency == pytest.approx(NCCL_BASE_LATENCY_US + 28 * device.intra_node_latency_us +
                                    3 * device.inter_node_latency_us)
    nvlink_only_latency = NCCL_BASE_LATENCY_US + 31 * device.intra_node_latency_us
    gathers = [i for i, op in enumerate(run.schedule.ops) if op.kind is OpKind.ALL_GATHER]
    assert gathers
    for i in gathers:
        wire = run.schedule.ops[i].wire_bytes
        duration = run.engine.op_end_us[i] - run.engine.op_start_us[i]
        assert duration == math.ceil(latency + wire / cost.bus_bytes_per_s * 1e6)
        assert duration > nvlink_only_latency + wire / cost.intra_bus_bytes_per_s * 1e6


def test_throughput_identities_on_the_headline_settings() -> None:
    result = summarize(run_scenario(build_scenario(small_zero3("a800-sxm4-80gb"))))
    tokens = 2 * 256 * 2 * 8  # micro-batch × seq × accumulation × GPUs
    assert result["tokens_per_s"] * result["step_time_s"] == pytest.approx(tokens)
    assert 0 < result["mfu"] < 1
    shares = result["stream_busy_share"]
    # ZeRO-3: the gathers on the default group's NCCL stream, the copies into the gradient bucket and the
    # (synchronous) reduce-scatters on DeepSpeed's reduce stream (no coalesced gather here: nothing on its allgather
    # stream)
    assert set(shares) == {"compute", "reduce", "nccl_world"} and all(0 < v <= 1 for v in shares.values())
    assert np.isclose(max(shares.values()), shares["compute"])
