"""ZeRO-3: partition arithmetic, the gather/release log on a toy model, and its invariants."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.ops import STREAMS, Stream
from sim.parallel.partition import estimate_zero3_model_states, padded_partition_numel
from sim.report import summarize
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import parameter_counts
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

ZERO = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 4096,
        "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 64,
        "stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 0, "sub_group_size": 10**9}


def zero_raw(gpus: int = 2, **zero) -> dict:
    raw = tiny_raw(gradient_checkpointing=False)
    raw["hardware"]["gpus_per_node"] = gpus
    raw["deepspeed"] = {"zero_optimization": {**ZERO, **zero}}
    raw["simulation"]["steps"] = 2  # the module trace is complete from the second step on
    return raw


def tiny_param_shapes() -> list[int]:
    # The tiny qwen2 of conftest: V=1000, h=64, i=128, 2 layers, MHA with q/k/v bias.
    layer = [64, 64 * 64, 64, 64 * 64, 64, 64 * 64, 64, 64 * 64, 64, 128 * 64, 128 * 64, 64 * 128]
    return [1000 * 64] + layer * 2 + [64, 1000 * 64]


def test_partition_pads_to_the_world_size() -> None:
    # _partition_param: numel + (P - numel % P) % P, divided by P.
    assert padded_partition_numel(10, 4) == 3  # 12 / 4
    assert padded_partition_numel(12, 4) == 3
    assert padded_partition_numel(1, 8) == 1


@pytest.mark.parametrize("gpus", [2, 3, 8])
def test_model_states_match_deepspeed_partition_arithmetic(gpus: int) -> None:
    # Per GPU: bf16 partitions (2 B) of every param, bf16 gradient partitions (2 B), fp32 master + Adam moments
    # (12 B) per partitioned element; params of <= 64 elements (persistence threshold) are also kept whole.
    shapes = tiny_param_shapes()
    partitions = sum(math.ceil(n / gpus) for n in shapes)
    persistent = sum(n for n in shapes if n <= 64)
    states = summarize(run_scenario(build_scenario(zero_raw(gpus))))["model_states_bytes"]
    assert sum(shapes) == parameter_counts(resolve_plan(build_scenario(zero_raw(gpus))))[0]
    assert states == {"parameters": 2 * partitions + 2 * persistent, "gradients": 2 * partitions,
                      "optimizer_states": 12 * partitions}


def test_headline_model_states() -> None:
    # Qwen1.5-32B over 8 GPUs: 16 bytes per partitioned element (2 bf16 param, 2 bf16 grad, 4 fp32 master,
    # 8 Adam), plus whole copies of params of at most 10·hidden = 51,200 elements (norms, biases).
    raw = {"model": "qwen1.5-32b", "hardware": {"device": "a800-sxm4-80gb", "gpus_per_node": 8},
           "training": {"seq_len": 16, "bf16": True}, "deepspeed": {"zero_optimization": {
               "stage": 3, "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto",
               "stage3_prefetch_bucket_size": "auto"}}}
    plan = resolve_plan(build_scenario(raw))
    from sim.schedule import _context, modelling_code
    from sim.workload.tape import Tape

    ctx = _context(plan, Tape())
    ctx.tape.op("init")
    numels = [p.tensor.numel for p in modelling_code(plan).build_model(ctx, None).params()]
    partitions = sum(math.ceil(n / 8) for n in numels)
    persistent = sum(n for n in numels if n <= 51_200)
    assert persistent == 64 * (2 * 5120 + 5120 + 2 * 1024) + 5120  # norms, q/k/v biases, final norm
    scenario = build_scenario(raw, overrides=["model.num_hidden_layers=64", "simulation.steps=1"])
    states = summarize(run_scenario(scenario))["model_states_bytes"]
    assert states["parameters"] == 2 * partitions + 2 * persistent
    assert states["gradients"] == 2 * partitions
    assert states["optimizer_states"] == 12 * partitions


def test_deepspeed_estimator_formula() -> None:
    # estimate_zero3_model_states_mem_needs without offload: 4·largest_layer + int(18·N/P) bytes per GPU;
    # 18 = 2 (16-bit params) + 4 (fp32 grads) + 4 (fp32 params) + 8 (Adam). CPU: largest·4·gpn·1.5.
    gpu, cpu = estimate_zero3_model_states(32_512_218_112, 778_567_680, 8, 1, cpu_offload=False,
                                           cpu_offload_params=False)
    assert gpu == 4 * 778_567_680 + int(18 * 32_512_218_112 / 8)
    assert cpu == 778_567_680 * 4 * 8 * 1.5
    # With bf16 gradient accumulation (DeepSpeed's default: the model dtype) the simulator's partitioned state
    # is 16 B/element: the estimator's 18 minus the 4-byte fp32 gradient partition plus the 2-byte bf16 one.


def gather_log(raw: dict, step: int) -> list[tuple[str, str]]:
    """(event, name) of every allgather op and every free of a gathered parameter in `step`, in order."""
    run = run_scenario(build_scenario(raw))
    schedule, trace = run.schedule, run.engine.trace
    log = []
    for i in range(len(trace)):
        op_index = int(trace.op_index[i])
        if op_index < 0 or schedule.op_step[op_index] != step or schedule.op_micro_batch[op_index] != 0:
            continue
        name = schedule.buffers[int(trace.buffer_id[i])].name
        if name.endswith(".gathered"):
            log.append(("gather" if trace.delta_bytes[i] > 0 else "release", name.removesuffix(".gathered")))
    return log


def test_without_prefetch_or_reuse_each_module_is_gathered_and_released_around_its_use() -> None:
    # Prefetch 0 and reuse distance 0: the embedding and each linear/norm are gathered right before their
    # forward and partitioned right after (norm weights, 64 elements, are persistent: gathered once, kept).
    raw = zero_raw(2)
    log = gather_log(raw, step=1)
    forward = log[: log.index(("release", "lm_head.weight")) + 1]
    assert forward[:4] == [("gather", "model.embed_tokens.weight"), ("release", "model.embed_tokens.weight"),
                           ("gather", "model.layers.0.self_attn.q_proj.weight"),
                           ("release", "model.layers.0.self_attn.q_proj.weight")]
    assert all(a == "gather" and b == "release" and x == y
               for (a, x), (b, y) in zip(forward[0::2], forward[1::2], strict=True))
    assert not any("norm" in name for _, name in log)


def test_reuse_distance_keeps_params_across_the_forward_backward_turn() -> None:
    # With a reuse distance covering the whole model (trace complete from the second step), release_sub_module
    # keeps every param whose module comes again later in the trace: nothing is released in forward, and in
    # backward each module is released after its own backward, in reverse order, as nothing after it uses it.
    raw = zero_raw(2, stage3_max_reuse_distance=10**9)
    log = gather_log(raw, step=1)
    gathers = [name for event, name in log if event == "gather"]
    releases = [name for event, name in log if event == "release"]
    last_gather = max(i for i, (event, _) in enumerate(log) if event == "gather")
    assert all(event == "gather" for event, _ in log[: last_gather + 1])
    assert releases == gathers[::-1]


@given(st.integers(1, 3), st.integers(2, 4), st.booleans())
def test_more_gpus_never_raise_model_states(layers: int, gpus: int, checkpointing: bool) -> None:
    def states(world: int) -> int:
        raw = zero_raw(world)
        raw["model"]["num_hidden_layers"] = layers
        raw["training"]["gradient_checkpointing"] = checkpointing
        return sum(summarize(run_scenario(build_scenario(raw)))["model_states_bytes"].values())
    assert states(gpus * 2) <= states(gpus)


@given(st.integers(0, 10**6), st.integers(0, 10**9), st.sampled_from([0, 64, 10**6]), st.booleans())
def test_every_gathered_param_is_released_or_persistent_at_step_end(prefetch: int, reuse: int, persist: int,
                                                                    checkpointing: bool) -> None:
    raw = zero_raw(2, stage3_prefetch_bucket_size=prefetch, stage3_max_reuse_distance=reuse,
                   stage3_param_persistence_threshold=persist)
    raw["training"]["gradient_checkpointing"] = checkpointing
    raw["training"]["gradient_accumulation_steps"] = 2
    raw["simulation"]["steps"] = 2
    run = run_scenario(build_scenario(raw))
    schedule, trace = run.schedule, run.engine.trace
    optimizer_ops = [i for i, op in enumerate(schedule.ops) if op.name.startswith("zero3.step")]
    for step in (0, 1):
        first_step_op = min(i for i in optimizer_ops if schedule.op_step[i] == step)
        upto = int(np.nonzero(trace.op_index <= first_step_op)[0].max())
        alive: dict[int, str] = {}
        for i in range(upto + 1):
            name = schedule.buffers[int(trace.buffer_id[i])].name
            if name.endswith(".gathered"):
                if trace.delta_bytes[i] > 0:
                    alive[int(trace.buffer_id[i])] = name
                else:
                    alive.pop(int(trace.buffer_id[i]), None)
        sizes = {schedule.buffers[b].size_bytes // 2 for b in alive}
        assert all(size <= persist for size in sizes), sorted(alive.values())


def test_prefetch_gathers_the_next_module_before_releasing_the_current_one() -> None:
    # Trace complete (second step), prefetch bucket of 4096 elements, no reuse distance: when a module is
    # fetched, the next non-available parameters in the trace are gathered up to the budget (one 64×64 weight),
    # so in forward each linear weight is gathered before the previous one is released. The q/k/v biases and
    # norm weights (64 elements) are persistent and never gathered again.
    raw = zero_raw(2, stage3_prefetch_bucket_size=4096)
    log = gather_log(raw, step=1)
    forward = log[: log.index(("gather", "lm_head.weight")) + 1]
    gathered = [name for event, name in forward if event == "gather"]
    assert gathered[:4] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                            "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    attention = [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkvo"]
    for previous, following in zip(attention, attention[1:]):
        assert forward.index(("gather", following)) < forward.index(("release", previous))
    # without prefetch the release comes first (see the test above)
    plain = gather_log(zero_raw(2), step=1)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert plain.index(("release", q)) < plain.index(("gather", k))


def test_cpu_offload_moves_model_states_to_the_host() -> None:
    # offload_optimizer: fp32 master, Adam moments and fp32 gradient partitions (16 B per partition element)
    # live on the host; offload_param: the bf16 partitions too (2 B). Only whole persistent params stay.
    from sim.schedule import build_schedule

    shapes = tiny_param_shapes()
    partitions = sum(math.ceil(n / 2) for n in shapes)
    persistent = sum(n for n in shapes if n <= 64)
    raw = zero_raw(2, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    states = build_schedule(resolve_plan(build_scenario(raw))).model_states
    assert (states.parameters_bytes, states.gradients_bytes, states.optimizer_states_bytes) == (2 * persistent, 0, 0)
    assert states.host_bytes == 2 * partitions + 16 * partitions
    gpu = summarize(run_scenario(build_scenario(raw)))["peak"]["allocated_bytes"]
    assert gpu < summarize(run_scenario(build_scenario(zero_raw(2))))["peak"]["allocated_bytes"]


@given(st.sampled_from([0, 2048, 4096, 20000]), st.sampled_from([8192, 30000, 10**9]))
def test_prefetch_never_exceeds_its_budget(prefetch: int, max_live: int) -> None:
    # fetch_sub_module's prefetch loop adds parameters while the elements chosen so far are below
    # min(max_live_parameters - available, prefetch_bucket_size): only the last one may cross the budget.
    from sim.parallel.zero3 import Zero3

    budgets, choices, inside = [], [], []
    original_prefetch, original_gather = Zero3._prefetch, Zero3._all_gather

    def prefetch_spy(self, params):
        budgets.append(min(self.config.stage3_max_live_parameters - self.available_numel,
                           self.config.stage3_prefetch_bucket_size))
        inside.append(True)
        try:
            original_prefetch(self, params)
        finally:
            inside.pop()

    def gather_spy(self, params):
        if inside:
            choices.append((budgets[-1], [p.tensor.numel for p in params]))
        original_gather(self, params)

    raw = zero_raw(2, stage3_prefetch_bucket_size=prefetch, stage3_max_live_parameters=max_live)
    Zero3._prefetch, Zero3._all_gather = prefetch_spy, gather_spy
    try:
        run_scenario(build_scenario(raw))
    finally:
        Zero3._prefetch, Zero3._all_gather = original_prefetch, original_gather
    assert budgets  # the trace completed and prefetching was considered
    for budget, numels in choices:
        assert sum(numels[:-1]) < budget
    if prefetch == 0:
        assert choices == []
    if prefetch >= 4096 and max_live == 10**9:  # a 64×64 weight fits the bucket: something is prefetched
        assert choices


def reduce_buckets(raw: dict) -> list[tuple[int, list[tuple[str, int]], int]]:
    """Per distinct reduce-scatter op: how many gradients its bucket holds, what it allocates (name, bytes), and
    the bytes it sends."""
    run = run_scenario(build_scenario(raw))
    schedule = run.schedule
    out = []
    for position in schedule.distinct_ops().tolist():
        op = schedule.ops[position]
        if op.name.startswith("zero3.reduce_scatter["):
            count = int(op.name.removesuffix("]").rsplit("+", 1)[1]) + 1
            allocs = [(schedule.buffers[b].name, schedule.buffers[b].size_bytes) for b in op.allocs]
            out.append((count, allocs, op.wire_bytes))
    return out


def test_reduce_scatter_of_one_unpadded_gradient_allocates_nothing() -> None:
    # reduce_scatter_coalesced (comm/coalesced_collectives.py) concatenates the per-rank chunks of a bucket's
    # gradients, padded to the world size, into a new flat buffer; a single gradient that needs no padding is
    # reduced in place instead. On 2 GPUs every tiny gradient has an even numel: single-gradient buckets allocate
    # nothing. On 3 GPUs none divides (64, 4096, 8192, 64000 mod 3 = 1, 1, 2, 1): every bucket has its flat buffer,
    # padded to a multiple of 3 bf16 elements.
    two = reduce_buckets(zero_raw(2))
    assert {count for count, _, _ in two} > {1}  # both kinds of bucket occur
    for count, allocs, _ in two:
        assert [name for name, _ in allocs] == ([] if count == 1 else ["zero3.reduce_scatter_flat"])
    for _, allocs, wire in reduce_buckets(zero_raw(3)):
        assert [name for name, _ in allocs] == ["zero3.reduce_scatter_flat"]
        assert allocs[0][1] % (3 * 2) == 0
        assert wire == 2 * allocs[0][1] // 3  # (P-1)/P of the padded bucket


def test_fp32_communication_data_type_casts_around_the_reduce_scatter() -> None:
    # communication_data_type fp32 on a bf16 model (stage3.py __avg_scatter_grads): each gradient is cast to fp32
    # (4 B per element), the flat buffer is fp32, the wire carries fp32, and the rank's partition of each gradient
    # (ceil(n/2) elements) is cast back to bf16 before partition_grads.
    raw = zero_raw(2)
    raw["deepspeed"]["communication_data_type"] = "fp32"
    buckets = reduce_buckets(raw)
    assert buckets
    for count, allocs, wire in buckets:
        casts = [size // 4 for name, size in allocs if name == "zero3.grad_to_communication_dtype"]
        back = [size for name, size in allocs if name == "zero3.grad_partition_to_dtype"]
        flat = [size for name, size in allocs if name == "zero3.reduce_scatter_flat"]
        assert len(casts) == count
        assert back == [2 * math.ceil(n / 2) for n in casts]
        padded = sum(math.ceil(n / 2) * 2 for n in casts)
        assert flat == ([] if count == 1 else [4 * padded])
        assert wire == padded // 2 * 4
    # DeepSpeed's name for bf16 is "bfp16" up to 0.14.0 and "bf16" from 0.14.1; the model dtype itself casts nothing
    raw["deepspeed"]["communication_data_type"] = "bfp16"
    raw["software"]["deepspeed"] = "0.14.0"
    assert reduce_buckets(raw) == reduce_buckets(zero_raw(2))


def test_coalesced_gathers_copy_params_out_in_ds_id_order() -> None:
    # all_gather_coalesced sorts its params by ds_id (creation order) and the handle's wait() cats them out in
    # that order. Prefetching for backward walks the trace in reverse (o_proj, v_proj, k_proj of layer 0 with a
    # 12,000-element bucket): the gathered copies are still allocated in creation order.
    raw = zero_raw(2, stage3_prefetch_bucket_size=12000, stage3_max_live_parameters=10**9)
    schedule = run_scenario(build_scenario(raw)).schedule
    created = {b.name: b.buffer_id for b in schedule.buffers if b.category.value == "parameters"
               and not b.name.endswith(".gathered")}
    waits = [op for op in schedule.ops if op.name.startswith("zero3.allgather_wait[")]
    assert any(len(op.allocs) > 2 for op in waits)
    for op in waits:
        order = [created[schedule.buffers[b].name.removesuffix(".gathered")] for b in op.allocs]
        assert len(order) > 1 and order == sorted(order)


def test_coalesced_copies_are_made_when_the_first_parameter_is_fetched() -> None:
    # fetch_sub_module calls the handle's wait() (AllGatherCoalescedHandle: torch.cat of each param's slices) for
    # the params the module needs, not when the gather completes: layer 0's q, k and v weights, prefetched when
    # embed_tokens was fetched, are copied out at q_proj's fetch, after embed_tokens and the input layernorm ran.
    raw = zero_raw(2, stage3_prefetch_bucket_size=12000, stage3_max_live_parameters=10**9)
    schedule = run_scenario(build_scenario(raw)).schedule
    label = "model.layers.0.self_attn.q_proj.weight+2"
    names = [op.name for op in schedule.ops]
    first = schedule.op_step.index(1)  # the second step: the trace is complete, so the group is prefetched
    gather = names.index(f"zero3.allgather[{label}]", first)
    wait = names.index(f"zero3.allgather_wait[{label}]", first)
    between = [name for op, name in zip(schedule.ops[gather + 1:wait], names[gather + 1:wait])
               if op.stream.value == "compute"]
    assert "model.embed_tokens" in between and "model.layers.0.input_layernorm.weight_mul" in between
    after = next(name for op, name in zip(schedule.ops[wait:], names[wait:]) if op.stream.value == "compute")
    assert after == "model.layers.0.self_attn.q_proj"
    copies = {schedule.buffers[b].name for b in schedule.ops[wait].allocs}  # the biases are persistent
    assert copies == {f"model.layers.0.self_attn.{m}_proj.weight.gathered" for m in "qkv"}


def test_engine_init_transients_and_when_adam_states_are_made() -> None:
    # DeepSpeedZeroOptimizer_Stage3.__init__ (0.14): per sub-group a bf16 clone then the fp32 master (the clone
    # freed); initialize_optimizer_states' zero fp32 gradient of the largest sub-group (freed); the IPG bucket and
    # the gradient partitions; then each non-persistent trainable parameter gathered whole (padded to P) for its
    # gradient hook and partitioned again. Adam's moments: at each sub-group's first step from 0.13.2 (#5104), by
    # an init step on the zero gradient before.
    def lifetimes(version: str) -> dict[str, list[tuple[str, str, int]]]:
        raw = zero_raw(2)
        raw["software"]["deepspeed"] = version
        run = run_scenario(build_scenario(raw))
        trace, schedule = run.engine.trace, run.schedule
        out: dict[str, list] = {}
        born: dict[int, str] = {}
        for i in range(len(trace)):
            buffer = schedule.buffers[int(trace.buffer_id[i])]
            op = schedule.ops[int(trace.op_index[i])].name if trace.op_index[i] >= 0 else "t=0"
            if trace.delta_bytes[i] > 0:
                born[buffer.buffer_id] = op
            elif op.startswith("zero3.init.") or born.get(buffer.buffer_id, "").startswith("zero3.init."):
                out.setdefault(buffer.name, []).append((born.pop(buffer.buffer_id), op, buffer.size_bytes))
        out["made"] = [(buffer, op) for buffer, op in born.items()]
        out["_schedule"] = schedule
        return out

    shapes = tiny_param_shapes()
    new = lifetimes("0.14.0")
    group = sum(padded_partition_numel(n, 2) for n in shapes)  # one sub-group: sub_group_size 1e9
    assert new["zero3.init.group0.bf16_clone"] == [("zero3.init.create_fp32_partition[0]",) * 2 + (2 * group,)]
    assert new["zero3.init.gradient_buffer"] == [("zero3.init.initialize_optimizer_states",) * 2 + (4 * group,)]
    hooks = [(born, size) for born, freed, size in new["model.layers.0.self_attn.q_proj.weight.gathered"]
             if born == freed and born.startswith("zero3.init.gradient_hook")]
    assert hooks == [("zero3.init.gradient_hook[model.layers.0.self_attn.q_proj.weight]", 2 * 64 * 64)]
    schedule = new["_schedule"]
    made = {schedule.buffers[b].name: op for b, op in new["made"]}
    assert made["zero3.group0.exp_avg"] == made["zero3.group0.exp_avg_sq"] == "zero3.step.group0.optimizer_step"
    assert made["zero3.ipg_bucket"] == made["zero3.grad_partitions_flat_buffer"] == \
        "zero3.init.ipg_bucket_and_gradient_partitions"
    old = lifetimes("0.13.1")
    schedule = old["_schedule"]
    made = {schedule.buffers[b].name: op for b, op in old["made"]}
    assert made["zero3.group0.exp_avg"] == "zero3.init.optimizer_step[0]"


def test_step_computes_the_gradient_norm_in_fp64_per_partition() -> None:
    # get_grad_norm_direct (stage3.py): g.double().norm(2) for each gradient partition, one at a time, the
    # one-element norms kept until summed: per step one fp64 copy of each trainable parameter's padded partition.
    raw = zero_raw(2)
    run = run_scenario(build_scenario(raw))
    sizes = sorted(b.size_bytes for b in run.schedule.buffers if b.name == "zero3.step.grad_fp64")
    per_step = sorted(8 * padded_partition_numel(n, 2) for n in tiny_param_shapes())
    assert sizes == sorted(per_step * 2)  # two steps


def test_coalesced_flat_buffer_lives_until_its_last_parameter_is_fetched() -> None:
    # AllGatherCoalescedHandle keeps views of the flat buffer and the in-flight registry holds the handle for each
    # of its parameters until that one is fetched: the flat buffer is freed after the last fetch of its group (for
    # layer 0's prefetched {q, k, v} with their biases: at v_proj's fetch), not when the copies are made.
    raw = zero_raw(2, stage3_prefetch_bucket_size=12000, stage3_max_live_parameters=10**9)
    run = run_scenario(build_scenario(raw))
    trace, schedule = run.engine.trace, run.schedule
    born: dict[int, int] = {}
    lives = []
    for i in range(len(trace)):
        buffer_id = int(trace.buffer_id[i])
        if schedule.buffers[buffer_id].name != "zero3.allgather_flat":
            continue
        if trace.delta_bytes[i] > 0:
            born[buffer_id] = i
        else:
            lives.append((schedule.ops[int(trace.op_index[born.pop(buffer_id)])].name,
                          schedule.ops[int(trace.op_index[i])].name, int(trace.op_index[i])))
    assert lives and not born
    assert all(made.startswith("zero3.allgather[") and freed == "zero3.allgather_flat_freed" for made, freed, _ in lives)
    names = [op.name for op in schedule.ops]
    wait = names.index("zero3.allgather_wait[model.layers.0.self_attn.q_proj.weight+2]")
    freed = names.index("zero3.allgather_flat_freed", wait)
    between = names[wait:freed]
    assert any(n.startswith("model.layers.0.self_attn.q_proj") for n in between)  # q and k ran with it alive
    assert any(n.startswith("model.layers.0.self_attn.k_proj") for n in between)
    assert not any(n.startswith("model.layers.0.self_attn.v_proj") for n in between)  # freed at v's fetch


def test_gathers_run_on_the_default_groups_nccl_stream_and_record_there_before_torch_2_8() -> None:
    # The gathers run on the default group's NCCL stream, their buffers allocated from DeepSpeed's allgather stream's
    # pool; the reduce-scatters, synchronous, on DeepSpeed's reduce stream. Before torch 2.8 ProcessGroupNCCL
    # recordStream's what an asynchronous collective writes: a parameter gathered alone and the flat buffer of a
    # coalesced gather (not the copies its wait() makes) carry that stream's bit; from 2.8 (stashed on the Work
    # object) none does. Nothing of the synchronous reduce-scatter is recorded there (from 2.2, #111431).
    def recorded(torch: str) -> tuple[set, set]:
        raw = zero_raw()
        raw["software"] = {"torch": torch}
        schedule = run_scenario(build_scenario(raw)).schedule
        gathers = [op for op in schedule.ops if op.name.startswith("zero3.allgather[")]
        reduces = [op for op in schedule.ops if op.name.startswith("zero3.reduce_scatter[")]
        assert {(op.stream, op.alloc_stream) for op in gathers} == {(Stream.NCCL_WORLD, Stream.ALLGATHER)}
        assert {(op.stream, op.alloc_stream) for op in reduces} == {(Stream.REDUCE, None)}
        masks = schedule.buffer_recorded_masks()
        return ({int(masks[b]) for op in gathers for b in op.allocs},
                {int(masks[b]) for op in reduces for b in op.allocs})

    world = 1 << STREAMS.index(Stream.NCCL_WORLD)
    gathered, reduced = recorded("2.2.2")
    assert gathered and all(mask & world for mask in gathered)
    assert not any(mask & world for mask in reduced)
    gathered, reduced = recorded("2.8.0")
    assert not any(mask & world for mask in gathered | reduced)
