"""CUDA-only allocations inside a step (issue #13, deliverable 2): each case is a tiny scenario or a single primitive
whose bytes are derived by hand from the kernel source the modelling code cites."""

import pytest

from sim.ops import Schedule
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.tape import Tape
from tests.conftest import tiny_raw

# The tiny qwen2 of tests/conftest.py (h 64, i 128, 2 layers, 4 heads, 4 kv heads, V 1000, bf16), untied head:
#   per layer: q/k/v 3·(64·64 + 64) = 12,480; o 4,096; gate/up/down 3·64·128 = 24,576; 2 norms 128 → 41,280
#   decay group (every weight, no bias, no norm): 2·(3·4,096 + 4,096 + 24,576) + embed 64,000 + lm_head 64,000
#     = 2·40,960 + 128,000 = 209,920 elements
#   no-decay group: 2·(3·64 + 128) + final norm 64 = 704 elements
DECAY_NUMEL = 209_920
NO_DECAY_NUMEL = 704


def live_during(schedule: Schedule, op_name: str) -> int:
    """Bytes allocated while the first op named `op_name` runs (allocs at its start, frees at its end)."""
    schedule = schedule.expand()
    sizes = schedule.buffer_sizes()
    live = int(sum(int(sizes[b]) for b in schedule.persistent))
    for op in schedule.ops:
        live += sum(int(sizes[b]) for b in op.allocs)
        if op.name == op_name:
            return live
        live -= sum(int(sizes[b]) for b in op.frees)
    raise AssertionError(f"no op named {op_name}")


def _full_ft(torch: str) -> Schedule:
    raw = tiny_raw()
    raw["software"]["torch"] = torch
    return build_schedule(resolve_plan(build_scenario(raw))).schedule


def test_foreach_adamw_before_torch_2_1_keeps_denom_beside_exp_avg_sq_sqrt() -> None:
    # torch 2.0.1 _multi_tensor_adamw: exp_avg_sq_sqrt = _foreach_sqrt(...), denom = _foreach_add(exp_avg_sq_sqrt,
    # eps): at the decay group's addcdiv_ both lists are alive, 2 · 209,920 · 2 B = 839,680 B of temporaries;
    # torch 2.1.0 adds eps in place, so only exp_avg_sq_sqrt (419,840 B) is. Everything else alive is the same.
    old, new = _full_ft("2.0.1"), _full_ft("2.1.0")
    addcdiv = "optimizer.group0.adamw.foreach_addcdiv_"
    assert live_during(old, addcdiv) - live_during(new, addcdiv) == DECAY_NUMEL * 2
    names = [b.name for b in old.buffers]
    assert sum(old.buffer_sizes()[i] for i, n in enumerate(names) if n.endswith(".denom")) == \
        (DECAY_NUMEL + NO_DECAY_NUMEL) * 2
    assert not any(b.name.endswith(".denom") for b in new.buffers)


def _lora(peft: str, torch_dtype: str = "bfloat16") -> Schedule:
    raw = tiny_raw()
    raw["model"]["torch_dtype"] = torch_dtype
    raw["software"]["peft"] = peft
    raw["lora"] = {"r": 4, "target_modules": ["q_proj"]}
    return build_schedule(resolve_plan(build_scenario(raw))).schedule


def test_peft_before_0_9_adds_the_lora_output_in_place() -> None:
    # bf16 weights and (0.6 - 0.11) bf16 adapters. PEFT 0.9.0: result = result + lora_B(...) * scaling makes a new
    # (b·s, out) bf16 tensor, 2 · 16 · 64 · 2 B = 4,096 B, beside result and the scaled adapter output;
    # 0.8.2: result += ... writes into result, nothing new. Everything before layer 0's q_proj is the same.
    q = "model.layers.0.self_attn.q_proj"
    old, new = _lora("0.8.2"), _lora("0.9.0")
    assert live_during(new, f"{q}.lora_add") - live_during(old, f"{q}.lora_add_") == 2 * 16 * 64 * 2
    assert not any(b.name == f"{q}.lora_add.out" for b in old.buffers)


def test_peft_before_0_9_casts_the_sum_to_the_input_dtype() -> None:
    # fp32 weights under bf16 autocast: q_proj's input (RMSNorm's weight · x) is fp32, the base and adapter GEMMs
    # run in bf16. 0.8.2 ends with result.to(previous_dtype = x.dtype): an fp32 copy of the bf16 sum,
    # 2 · 16 · 64 · 4 B = 8,192 B per q_proj; 0.9.0 keeps the bf16 result's dtype, so no copy.
    cast = "model.layers.0.self_attn.q_proj.lora_result_cast.out"
    old, new = _lora("0.8.2", "float32"), _lora("0.9.0", "float32")
    assert [b.size_bytes for b in old.buffers if b.name == cast][:1] == [2 * 16 * 64 * 4]
    assert not any(b.name == cast for b in new.buffers)


def _embedding_backward_buffers(tokens: int) -> dict[str, int]:
    """The buffers (name → bytes) the CUDA backward of a bf16 embedding (vocab 1000, hidden 64) over `tokens`
    indices allocates, by running the primitive alone on a tape."""
    tp = Tape()
    tp.op("init")
    weight = tp.parameter("wte.weight", 1000 * 64, DType.BFLOAT16, True)
    ids = tp.empty("ids", tokens, DType.INT64)
    out = P.embedding(tp, "wte", ids, weight, 1000, 64)
    tp.op("grad_out")
    grad = tp.empty("grad_out", tokens * 64, DType.BFLOAT16)
    start = len(tp.storages)
    tp.backward(out, grad)
    return {st.name: st.size_bytes for st in tp.storages[start:]}


def test_embedding_backward_up_to_3072_tokens_allocates_only_the_zeros() -> None:
    # Embedding.cu: num_indices <= 3072 takes the feature kernel: grad_weight = zeros (1000, 64) bf16 = 128,000 B
    assert _embedding_backward_buffers(3072) == {"wte.backward.out": 1000 * 64 * 2}


def test_embedding_backward_sort_path_sizes() -> None:
    # 4096 tokens, vocab 1000, hidden 64: max_segments = min(4096, 1000) = 1000,
    # max_partial_segment = 4096 // 10 + 1000 = 1409
    #   sorted_indices, orig_indices, range, segment_offsets: 4096 · 8 = 32,768 B each
    #   partials_per_segment(_offset): 1000 · 8 = 8,000 B each; two int64 scalars 8 B each
    #   partial_segment_offset: 1409 · 8 = 11,272 B; grad_weight_per_segment: 1409 · 64 · 4 = 360,704 B (fp32)
    #   grad_weight zeros: 1000 · 64 · 2 = 128,000 B
    assert _embedding_backward_buffers(4096) == {
        "embedding_backward.sorted_indices": 32_768, "embedding_backward.orig_indices": 32_768,
        "embedding_backward.range": 32_768, "wte.backward.out": 128_000,
        "embedding_backward.segment_offsets": 32_768, "embedding_backward.num_of_segments": 8,
        "embedding_backward.partials_per_segment": 8_000, "embedding_backward.partials_per_segment_offset": 8_000,
        "embedding_backward.num_of_partial_segments": 8, "embedding_backward.partial_segment_offset": 11_272,
        "embedding_backward.grad_weight_per_segment": 360_704}


def test_clip_grad_norm_foreach_norm_scratch() -> None:
    # tiny qwen2 full fine-tune, 2 layers: 2·(3 q/k/v weights + 3 biases + o + gate/up/down + 2 norms) = 24, plus
    # embed, lm_head and the final norm: 27 bf16 grads. The largest has 64,000 elements (embed, lm_head):
    # ceil(64,000 / 65,536) = 1 chunk, so output_per_tensor holds 27 · 1 fp32 = 108 B; the stack of 27 bf16
    # norms is 54 B.
    sizes = {b.name: b.size_bytes for b in _full_ft("2.2.2").buffers}
    assert sizes["foreach_norm.output_per_tensor"] == 27 * 4
    assert sizes["grad_norm_stack"] == 27 * 2


def test_clip_grad_norm_chunks_per_tensor() -> None:
    # vocab 70,000: the embedding's 70,000 · 64 = 4,480,000 elements take ceil(4,480,000 / 65,536) = 69 chunks, so
    # output_per_tensor is 27 · 69 fp32 = 7,452 B, freed when _foreach_norm returns
    raw = tiny_raw()
    raw["model"]["vocab_size"] = 70_000
    schedule = build_schedule(resolve_plan(build_scenario(raw))).schedule
    assert [b.size_bytes for b in schedule.buffers if b.name == "foreach_norm.output_per_tensor"] == [27 * 69 * 4]


def test_efficient_backward_workspace_llama_7b() -> None:
    # Llama-2-7B, b 1, s 4096, 32 heads, d 128 on the 128 × 128 kernel: ceil(4096/128) · ceil(128/128) = 32 tiles
    # of 128 · 128 + 4 floats (the tile plus GradQTempStorage's lock, counter, pad[2]) = 524,416 floats per (b, h);
    # · 32 heads · 4 B = 67,125,248 B (64 MiB + 16 KiB)
    assert P.efficient_backward_workspace_bytes(1, 32, 4096, 128) == 67_125_248


@pytest.mark.parametrize("on_host", [False, True])
def test_efficient_backward_allocates_the_workspace_with_delta(on_host: bool) -> None:
    # b 2, 4 heads, s 16, d 16: one tile per (b, h), padded to 128 × 128: 2 · 4 · (16,384 + 4) · 4 B = 524,416 B
    # on CUDA only (attention_backward.cu); delta 2 · 4 · 16 fp32 = 512 B; grads of q, k, v 2 · 16 · 4 · 16 · 2 B =
    # 4,096 B each
    tp = Tape()
    tp.op("init")
    q, k, v = (tp.empty(n, 2 * 16 * 4 * 16, DType.BFLOAT16) for n in "qkv")
    for t in (q, k, v):
        t.requires_grad = True
    mask = tp.empty("mask", 2 * 16 * 16, DType.BFLOAT16)
    out = P.efficient_attention(tp, "sdpa", q, k, v, mask, 2, 4, 16, 16, 1.0, on_host=on_host)
    tp.op("grad_out")
    grad = tp.empty("grad_out", out.numel, DType.BFLOAT16)
    start = len(tp.storages)
    tp.backward(out, grad)
    made = {st.name: st.size_bytes for st in tp.storages[start:]}
    assert made.get("sdpa.workspace") == (None if on_host else 524_416) and made["sdpa.delta"] == 512
    assert [size for name, size in made.items() if name == "sdpa.grad"] == [4_096]  # one name, three tensors
    assert sum(1 for st in tp.storages[start:] if st.name == "sdpa.grad") == 3
