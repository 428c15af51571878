"""DDP and DeepSpeed ZeRO-1/2/3 model states per GPU, and their ordering."""

import math

from hypothesis import given
from hypothesis import strategies as st

from sim.parallel.data_parallel import Zero12, ddp_buckets
from sim.report import summarize
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.vocab import DType
from sim.schedule import _context, modelling_code
from sim.simulate import run_scenario
from sim.workload.tape import Tape
from tests.conftest import tiny_raw


def raw_for(stage: int | None, gpus: int, layers: int = 2, accumulation: int = 2) -> dict:
    """Mixed precision both ways: DDP trains fp32 weights under bf16 autocast (fp32 Adam), DeepSpeed trains the
    bf16 model with fp32 master partitions."""
    raw = tiny_raw(gradient_accumulation_steps=accumulation)
    raw["model"]["num_hidden_layers"] = layers
    raw["hardware"]["gpus_per_node"] = gpus
    if stage is None:
        raw["model"]["torch_dtype"] = "float32"
    else:
        raw["deepspeed"] = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 4096,
                                                  "stage3_param_persistence_threshold": 0}}
    return raw


def states(raw: dict) -> dict:
    return summarize(run_scenario(build_scenario(raw)))["model_states_bytes"]


def numels(raw: dict) -> list[int]:
    plan = resolve_plan(build_scenario(raw))
    ctx = _context(plan, Tape())
    ctx.tape.op("init")
    return [p.tensor.numel for p in modelling_code(plan).build_model(ctx, None).params()]


def test_ddp_model_states_and_buckets() -> None:
    # fp32 weights, fp32 grads, fp32 Adam moments: 4 + 4 + 8 bytes per parameter on every GPU.
    raw = raw_for(None, 4)
    total = sum(numels(raw))
    assert states(raw) == {"parameters": 4 * total, "gradients": 4 * total, "optimizer_states": 8 * total}


def test_ddp_buckets_follow_reverse_order_and_caps() -> None:
    # 1 MiB first bucket, 25 MiB after, parameters in reverse order.
    class P:
        def __init__(self, name, size):
            self.name, self.tensor = name, type("T", (), {"size_bytes": size, "numel": size // 4})()

    params = [P(f"p{i}", 600 * 1024) for i in range(5)]
    buckets = ddp_buckets(params)
    assert [[p.name for p in b] for b in buckets] == [["p4", "p3"], ["p2", "p1", "p0"]]


def test_zero12_model_states() -> None:
    # ZeRO-1/2 keep the whole bf16 model; the flat group is padded to a multiple of 2·P elements and split:
    # fp32 master + Adam = 12 B per partition element; at the step both stages hold the bf16 gradient partition
    # (averaged_gradients; ZeRO-1's full gradients are freed by then, stage_1_and_2.py step).
    for stage in (1, 2):
        raw = raw_for(stage, 3)
        total = sum(numels(raw))
        partition = math.ceil(total / 6) * 6 // 3
        assert states(raw) == {"parameters": 2 * total, "gradients": 2 * partition,
                               "optimizer_states": 12 * partition}


@given(st.integers(2, 8), st.integers(1, 3), st.integers(1, 3))
def test_zero3_le_zero2_le_zero1_le_ddp(gpus: int, layers: int, accumulation: int) -> None:
    totals = [sum(states(raw_for(stage, gpus, layers, accumulation)).values()) for stage in (3, 2, 1, None)]
    assert totals == sorted(totals)


def test_deepspeed_zero2_estimator_formula() -> None:
    # estimate_zero2_model_states_mem_needs without offload: 2·N + int(18·N/P) bytes per GPU (18 = 2 fp16 grads +
    # 4 fp32 grads + 4 fp32 params + 8 Adam), CPU N·4·gpus_per_node·1.5. The simulator's ZeRO-2 states are
    # 2·N (bf16 model) + 2·N/P (bf16 gradient partition) + 12·N/P: the estimator's fp32 gradient copy is the
    # transient fp32 cast of the step (sim/parallel/data_parallel.py Zero12.step), not a persistent state.
    from sim.parallel.partition import estimate_zero2_model_states

    gpu, cpu = estimate_zero2_model_states(7_000_000_000, 8, 1, cpu_offload=False)
    assert gpu == 2 * 7_000_000_000 + int(18 * 7_000_000_000 / 8)
    assert cpu == 7_000_000_000 * 4 * 8 * 1.5


def offload_raw(stage: int, accumulation: int = 2, deepspeed: str = "0.14.0") -> dict:
    raw = raw_for(stage, 2, accumulation=accumulation)
    raw["deepspeed"]["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    raw["software"]["deepspeed"] = deepspeed
    return raw


def test_zero12_cpu_offload_model_states_and_host_bytes() -> None:
    # offload_optimizer cpu: fp32 master, its fp32 gradient and the Adam moments on the host (16 B per partition
    # element); the GPU keeps the bf16 model and, at the step, no gradients (ZeRO-1's full ones are freed).
    # Host also: the staging buffer of the largest parameter (bf16) and, with accumulation, a bf16 copy of every
    # parameter with elements in rank 0's partition (accumulated_grads_in_cpu holds whole parameters).
    shapes = numels(offload_raw(2))
    total = sum(shapes)
    partition = math.ceil(total / 4) * 4 // 2
    offsets = [sum(shapes[:i]) for i in range(len(shapes))]
    whole = sum(n for n, o in zip(shapes, offsets) if o < partition)
    for stage in (1, 2):
        run = run_scenario(build_scenario(offload_raw(stage)))
        assert summarize(run)["model_states_bytes"] == {"parameters": 2 * total, "gradients": 0,
                                                       "optimizer_states": 0}
        assert run.built.model_states.host_bytes == 16 * partition + 2 * max(shapes) + 2 * whole
    single = run_scenario(build_scenario(offload_raw(2, accumulation=1)))
    assert single.built.model_states.host_bytes == 16 * partition + 2 * max(shapes)


def test_zero2_cpu_offload_boundary_transients() -> None:
    # At the accumulation boundary, for each gradient with elements in rank 0's partition (the flat group's
    # first half: the embedding, then layer 0's weights in order): a fp64 slice of its partition elements, the
    # inf/nan check over the whole gradient (fp32, 3 bool, fp32) and a fp32 slice for the host copy; the GPU
    # staging buffer is the largest parameter (the 1000×64 embedding) in bf16, from t=0.
    raw = offload_raw(2)
    shapes = numels(raw)
    partition = math.ceil(sum(shapes) / 4) * 4 // 2
    run = run_scenario(build_scenario(raw))
    schedule, trace = run.schedule, run.engine.trace
    sizes = {}
    for buffer_id, delta in zip(trace.buffer_id.tolist(), trace.delta_bytes.tolist()):
        name = schedule.buffers[buffer_id].name
        if delta > 0 and name.startswith("zero.offload."):
            sizes.setdefault(name, []).append(delta)
    staging = [b for b in schedule.buffers if b.name == "zero.temp_grad_buffer_for_gpu_offload"]
    assert len(staging) == 1 and staging[0].size_bytes == 2 * max(shapes)
    inside = []
    for numel, offset in zip(shapes, [sum(shapes[:i]) for i in range(len(shapes))]):
        if offset < partition:
            inside.append((numel, min(offset + numel, partition) - offset))
    # one simulated step with two micro-batches: one boundary
    assert sorted(sizes["zero.offload.grad_fp64_slice"]) == sorted(8 * n for _, n in inside)
    check = sorted(sizes["zero.offload.inf_nan_check"])
    assert check == sorted(size * whole for whole, _ in inside for size in (4, 1, 1, 1, 4))
    assert sorted(sizes["zero.offload.grad_fp32_slice"]) == sorted(4 * n for _, n in inside)
    assert sorted(sizes["zero.offload.norm_for_param_grads"]) == [8] * len(inside)


def test_zero12_offload_step_copy_back_by_deepspeed_version() -> None:
    # 0.14.0 casts the fp32 partition on the host (blocking copy); from 0.14.1 it goes to the GPU in fp32 first;
    # from 0.17.0 (DeepSpeed #7309) it is cast on the host into a pinned bf16 buffer (2 B per partition element of
    # host memory) and copied without blocking.
    def temporaries(version: str) -> list[int]:
        run = run_scenario(build_scenario(offload_raw(2, deepspeed=version)))
        return [b.size_bytes for b in run.schedule.buffers if b.name == "zero.step.fp32_partition"]

    def host_bytes(version: str) -> int:
        return run_scenario(build_scenario(offload_raw(2, deepspeed=version))).built.model_states.host_bytes

    total = sum(numels(offload_raw(2)))
    partition = math.ceil(total / 4) * 4 // 2
    assert temporaries("0.14.0") == []
    assert set(temporaries("0.14.1")) == {4 * partition}
    assert temporaries("0.17.0") == []
    assert host_bytes("0.17.0") - host_bytes("0.16.9") == 2 * partition


@given(st.sampled_from([1, 2]), st.integers(2, 4))
def test_optimizer_offload_never_raises_gpu_model_states(stage: int, gpus: int) -> None:
    plain = raw_for(stage, gpus)
    offloaded = raw_for(stage, gpus)
    offloaded["deepspeed"]["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert sum(states(offloaded).values()) < sum(states(plain).values())


@given(st.sampled_from([1, 2]), st.booleans(), st.integers(1, 4))
def test_ipg_buffers_never_doubled(stage: int, overlap: bool, accumulation: int) -> None:
    # optimizer.backward makes a fresh IPG list every backward after dropping the old one (ZeRO-1 keeps it
    # between micro-batches): never more than 1 (2 with overlap_comm) alive at once.
    raw = raw_for(stage, 2, accumulation=accumulation)
    raw["deepspeed"]["zero_optimization"]["overlap_comm"] = overlap
    run = run_scenario(build_scenario(raw))
    alive = most = 0
    for buffer_id, delta in zip(run.engine.trace.buffer_id.tolist(), run.engine.trace.delta_bytes.tolist()):
        if run.schedule.buffers[buffer_id].name.startswith("zero.ipg_buffer"):
            alive += 1 if delta > 0 else -1
            most = max(most, alive)
    assert most == (2 if overlap else 1)


def zero_reduces(raw: dict) -> list[tuple[int, list[tuple[str, int]], int]]:
    """Per ZeRO-1/2 reduction op: how many slices it all-reduces, what it allocates (name, bytes), its wire bytes."""
    schedule = run_scenario(build_scenario(raw)).schedule
    out = []
    for op in schedule.ops:
        if op.name.startswith("zero.reduce["):
            slices = int(op.name.removesuffix(" slices]").rsplit(", ", 1)[1])
            out.append((slices, [(schedule.buffers[b].name, schedule.buffers[b].size_bytes) for b in op.allocs],
                        op.wire_bytes))
    return out


def test_zero2_fp32_communication_data_type_all_reduces_an_fp32_copy() -> None:
    # allreduce_bucket (stage_1_and_2.py): the bucket's slices are flattened into a new bf16 tensor (one slice is
    # only viewed), cast to communication_data_type, all-reduced and copied back: for n elements, n × 2 B flat
    # when there are several slices and n × 4 B fp32 copy; the wire carries 2(P-1)/P × 4 B instead of × 2 B.
    raw = raw_for(2, 2)
    plain = zero_reduces(raw)
    raw["deepspeed"]["communication_data_type"] = "fp32"
    fp32 = zero_reduces(raw)
    assert plain and len(plain) == len(fp32)
    counts = {slices for slices, _, _ in plain}
    assert 1 in counts and max(counts) > 1  # the bucket across the partition boundary has several
    for (slices, plain_allocs, plain_wire), (_, allocs, wire) in zip(plain, fp32, strict=True):
        numel = plain_wire // 2  # 2(P-1)/P × 2 B with P = 2
        flat = [("zero.allreduce_bucket_flat", 2 * numel)] if slices > 1 else []
        assert plain_allocs == flat
        assert allocs == flat + [("zero.allreduce_bucket_comm", 4 * numel)]
        assert wire == 2 * plain_wire


def test_zero12_average_tensor_slices() -> None:
    # Three gradients of 6, 4, 6 elements on 2 ranks: the flat group (16, a multiple of 2·2) splits at 8, so the
    # middle one straddles it. average_tensor lists, in bucket (backward) order, each gradient's part per rank and
    # merges a part into the previous slice when both go to the same rank:
    #   [p2, p1, p0]: p2 → rank 1 (6); p1 → rank 0 (2), rank 1 (2); p0 → rank 0 (6): [6, 2, 2, 6]
    #   [p1, p0]: [2, 2, 6];  [p2]: [6];  [p0, ...] in forward order would merge: [p0, p1] → [6 + 2, 2]
    tape = Tape()
    params = [tape.parameter(f"p{i}", n, DType.BFLOAT16, True) for i, n in enumerate((6, 4, 6))]
    zero = Zero12(tape, resolve_plan(build_scenario(raw_for(2, 2))).zero, 2, params, DType.BFLOAT16,
                  (0, 14, 0))
    cases = [([2, 1, 0], [6, 2, 2, 6]), ([1, 0], [2, 2, 6]), ([2], [6]), ([0, 1], [8, 2])]
    for order, expected in cases:
        zero.bucket = [(params[i], None) for i in order]
        assert zero._slices() == expected


def test_zero2_gradient_larger_than_the_bucket_is_reduced_in_place() -> None:
    # extra_large_param_to_reduce: a gradient of more than reduce_bucket_size elements (the 64,000-element embedding
    # and LM head against 4096) is not copied into the IPG buffer; it stays alive until its reduction, which
    # frees it (outside the partition: the embedding for the simulated last rank) or copies it into
    # grads_in_partition (the LM head, in the last rank's partition).
    run = run_scenario(build_scenario(raw_for(2, 2)))
    names = {op.name for op in run.schedule.ops}
    assert "zero.copy_grad_to_ipg[lm_head.weight]" not in names
    assert "zero.copy_grad_to_ipg[model.layers.0.self_attn.q_proj.weight]" in names
    trace, schedule = run.engine.trace, run.schedule

    def lifetime(name: str) -> list[tuple[bool, str]]:
        rows = [i for i in range(len(trace)) if schedule.buffers[int(trace.buffer_id[i])].name == name]
        return [(int(trace.delta_bytes[i]) > 0, schedule.ops[int(trace.op_index[i])].name) for i in rows]

    # two micro-batches each: made by the backward that computes it, freed by its reduction or the copy after it
    assert lifetime("lm_head.backward.weight.out") == [(True, "lm_head.backward.weight"),
                                                       (False, "zero.copy_grads_in_partition")] * 2
    assert lifetime("model.embed_tokens.backward.out") == [(True, "model.embed_tokens.backward"),
                                                           (False, "zero.reduce[1 grads, 1 slices]")] * 2


def test_zero2_grads_in_partition_per_backward() -> None:
    # copy_grads_in_partition makes grads_in_partition (whole parameters with elements in the last rank's partition,
    # the simulated one) at
    # the first copy of every backward; _release_ipg_buffers drops it at the epilogue, but the first one of an
    # accumulation lives on in averaged_gradients' views until the step: 3 micro-batches make 3 per step, one of
    # them alive at the step.
    raw = raw_for(2, 2, accumulation=3)
    run = run_scenario(build_scenario(raw))
    schedule, trace = run.schedule, run.engine.trace
    total = sum(numels(raw))
    partition = math.ceil(total / 4) * 4 // 2
    shapes, offset, whole = numels(raw), 0, 0
    for numel in shapes:
        whole += numel if offset + numel > partition else 0
        offset += numel
    made = [(i, int(trace.buffer_id[i])) for i in range(len(trace))
            if schedule.buffers[int(trace.buffer_id[i])].name == "zero.grads_in_partition" and trace.delta_bytes[i] > 0]
    assert len(made) == 3 and all(schedule.buffers[b].size_bytes == 2 * whole for _, b in made)
    freed_by = {int(trace.buffer_id[i]): schedule.ops[int(trace.op_index[i])].name for i in range(len(trace))
                if trace.delta_bytes[i] < 0}
    assert [freed_by[b] for _, b in made] == ["zero.step.grad_to_fp32", "zero.release_ipg_buffers",
                                              "zero.release_ipg_buffers"]


def test_zero12_adam_states_are_made_at_the_first_step() -> None:
    # initialize_optimizer_states (0.14) does not step; torch's AdamW makes exp_avg and exp_avg_sq at its first
    # step(): the peak of the first forward has only the fp32 master partition.
    for stage in (1, 2):
        run = run_scenario(build_scenario(raw_for(stage, 2)))
        trace, schedule = run.engine.trace, run.schedule
        for name in ("zero.exp_avg", "zero.exp_avg_sq"):
            rows = [i for i in range(len(trace)) if schedule.buffers[int(trace.buffer_id[i])].name == name]
            assert len(rows) == 1
            assert schedule.ops[int(trace.op_index[rows[0]])].name == "zero.step.optimizer_step"


def test_zero12_engine_init_transients_by_deepspeed_version() -> None:
    # stage_1_and_2.py: the fp32 master is partition.clone().float() (a bf16 clone, freed after the cast);
    # initialize_optimizer_states gives it a zero fp32 gradient and drops it; before 0.13.2 (#5104) an optimizer
    # step on that gradient makes the Adam states at init (with foreach AdamW's one fp32 temporary).
    # 2 GPUs: the flat group is padded to a multiple of 2·2 elements, and each partition is half of it.
    for version in ("0.14.0", "0.13.1"):
        raw = raw_for(2, 2)
        raw["software"] = {**raw.get("software", {}), "deepspeed": version}
        partition = math.ceil(sum(numels(raw)) / 4) * 4 // 2
        run = run_scenario(build_scenario(raw))
        trace, schedule = run.engine.trace, run.schedule
        events = [(schedule.ops[int(trace.op_index[i])].name.removeprefix("zero.init."),
                   schedule.buffers[int(trace.buffer_id[i])].name, int(trace.delta_bytes[i]))
                  for i in range(len(trace)) if trace.op_index[i] >= 0
                  and schedule.ops[int(trace.op_index[i])].name.startswith("zero.init.")]
        fp32, bf16 = 4 * partition, 2 * partition
        expected = [("create_fp32_partition", "zero.init.bf16_clone", bf16),
                    ("create_fp32_partition", "zero.single_partition_of_fp32_groups", fp32),
                    ("create_fp32_partition", "zero.init.bf16_clone", -bf16),
                    ("initialize_optimizer_states", "zero.init.fp32_gradient_partition", fp32)]
        if version == "0.13.1":
            expected += [("optimizer_step", "zero.exp_avg", fp32), ("optimizer_step", "zero.exp_avg_sq", fp32),
                         ("optimizer_step", "zero.optimizer_temp", fp32),
                         ("optimizer_step", "zero.optimizer_temp", -fp32),
                         ("optimizer_step", "zero.init.fp32_gradient_partition", -fp32)]
        else:
            expected += [("initialize_optimizer_states", "zero.init.fp32_gradient_partition", -fp32)]
        assert events == expected


def test_zero1_with_overlap_comm_reduces_in_the_hooks_at_the_boundary() -> None:
    # stage_1_and_2.py registers the gradient hooks for ZeRO-1 too when overlap_comm is set; they reduce only in
    # the accumulation's last micro-batch (reduce_ready_partitions_and_remove_grads), during backward and in its
    # order, on the reduction stream. Without overlap_comm the epilogue reduces every gradient in model order.
    for overlap in (False, True):
        raw = raw_for(1, 2, accumulation=3)
        raw["deepspeed"]["zero_optimization"]["overlap_comm"] = overlap
        schedule = run_scenario(build_scenario(raw)).schedule
        ops = [(op.name, op.stream.value, mb) for op, step, mb in
               zip(schedule.ops, schedule.op_step, schedule.op_micro_batch) if step == 0]
        epilogue = next(i for i, (name, _, mb) in enumerate(ops) if name == "zero.backward_epilogue" and mb == 2)
        reduces = [i for i, (name, _, _) in enumerate(ops) if name.startswith("zero.reduce[")]
        copies = [name for name, _, _ in ops if name.startswith("zero.copy_grad_to_ipg[")]
        assert {ops[i][2] for i in reduces} == {2}  # only the boundary micro-batch reduces
        # with overlap_comm issued from the reduction stream, run on the data-parallel group's NCCL stream
        assert {ops[i][1] for i in reduces} == {"nccl_dp" if overlap else "compute"}
        if overlap:  # the epilogue reduces only the bucket left at the end of backward
            assert sum(i > epilogue for i in reduces) == 1 and copies[0] == "zero.copy_grad_to_ipg[model.norm.weight]"
        else:
            assert min(reduces) > epilogue
            assert copies[0] == "zero.copy_grad_to_ipg[model.layers.0.input_layernorm.weight]"


def test_zero2_offload_accumulation_goes_through_the_host_by_deepspeed_version() -> None:
    # async_accumulate_grad_in_cpu_via_gpu with 3 micro-batches, per bucket with gradients in rank 0's partition:
    # from the second micro-batch the host's sum comes to the GPU and is added there (the boundary's too); the
    # gradient goes back to the host before the boundary in 0.14, only in the first micro-batch from 0.15.2 (#6550).
    def ops_by_micro_batch(version: str) -> dict[str, list[int]]:
        schedule = run_scenario(build_scenario(offload_raw(2, accumulation=3, deepspeed=version))).schedule
        found: dict[str, list[int]] = {}
        for op, step, micro in zip(schedule.ops, schedule.op_step, schedule.op_micro_batch):
            if step == 0 and op.name in ("zero.offload.accumulated_grad_to_gpu", "zero.offload.copy_gradients_to_cpu"):
                found.setdefault(op.name, []).append(micro)
        return {name: sorted(set(micros)) for name, micros in found.items()}

    assert ops_by_micro_batch("0.14.0") == {"zero.offload.copy_gradients_to_cpu": [0, 1],
                                            "zero.offload.accumulated_grad_to_gpu": [1, 2]}
    assert ops_by_micro_batch("0.15.2") == {"zero.offload.copy_gradients_to_cpu": [0],
                                            "zero.offload.accumulated_grad_to_gpu": [1, 2]}
