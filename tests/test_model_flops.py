"""MFU's numerator (sim/schedule.py _model_flops): model FLOPs that frozen weights and LoRA adapters get right, so
that MFU cannot pass 1 (issue #19, item 9a)."""

import copy

from hypothesis import given
from hypothesis import strategies as st

from sim.report import summarize
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

# A device where only tensor-core work takes time: elementwise kernels, HBM and links are all but free, so the step
# time is (almost) the GEMMs' and attention's FLOPs at the peak, the case where an overcounted numerator shows.
GEMM_BOUND = {"name": "gemm-bound", "capacity_bytes": 80 * 2**30, "cuda_context_bytes": 0,
              "peak_flops": {"bf16": 1.0e9, "fp32": 1.0e18}, "hbm_bytes_per_s": 1e18,
              "intra_node_bytes_per_s": 1e18, "inter_node_bytes_per_s": 1e18,
              "intra_node_latency_us": 0.0, "inter_node_latency_us": 0.0,
              "efficiency": {"gemm": 1.0, "attention": 1.0, "hbm": 1.0, "nvlink": 1.0, "network": 1.0}}


def one_layer(**training) -> dict:
    """tiny_raw with one layer and an untied lm_head (64 hidden, 128 intermediate, 4 heads of 16, vocab 1000)."""
    raw = tiny_raw(**training)
    raw["model"].update(num_hidden_layers=1, tie_word_embeddings=False)
    return raw


def model_flops(raw: dict) -> float:
    return build_schedule(resolve_plan(build_scenario(raw))).model_flops_per_step


def test_lora_counts_no_weight_gradient_for_frozen_weights() -> None:
    # b=2, s=16: 32 tokens. LoRA r=4 on v_proj only, no checkpointing (so no enable_input_require_grads): the
    # layer's input needs no gradient. Linear GEMMs, 2·tokens·in·out each:
    #   forward  q,k,v,o 4 × 2·32·64·64 = 1,048,576; lora_A, lora_B 2 × 2·32·64·4 = 32,768;
    #            gate,up,down 3 × 2·32·64·128 = 1,572,864; lm_head 2·32·64·1000 = 4,096,000      → 6,750,208
    #   backward lm_head input 4,096,000; gate,up,down input 1,572,864; o_proj input 262,144 (its input, the
    #            attention output, depends on v, which needs a gradient); lora_B input + weight 32,768;
    #            lora_A weight 16,384 (its input, dropout(x), needs none); q,k,v base weights: nothing  → 5,980,160
    #   attention, causal: forward 2·b·a·s²·d = 2·2·4·16²·16 = 65,536; backward twice that = 131,072 → 196,608
    # Total 12,926,976. The former 6·N·tokens (every non-embedding weight, norms and biases included) gave
    # 6·105,856·32 + 196,608 = 20,520,960.
    raw = one_layer()
    raw["lora"] = {"r": 4, "target_modules": ["v_proj"]}
    assert model_flops(raw) == 12_926_976


def test_full_fine_tune_counts_six_flops_per_linear_weight_and_token() -> None:
    # Every weight trainable and the embedding's output needing a gradient: each linear GEMM runs forward, input
    # gradient and weight gradient, 6·tokens·in·out. Linear weights: 4·64·64 + 3·64·128 + 64·1000 = 104,960
    # → 6·104,960·32 = 20,152,320, plus attention 196,608 = 20,348,928 (norms and biases run no GEMM).
    assert model_flops(one_layer()) == 20_348_928


def test_attention_implementation_leaves_model_flops_unchanged() -> None:
    # Model FLOPs are the model's, not the kernel's: eager's two full-s² matmuls and their backward ops, SDPA's
    # fused kernel and FlashAttention-2 count the same causal attention.
    for lora in (None, {"r": 4, "target_modules": ["v_proj"]}):
        counts = set()
        for attn in ("eager", "sdpa", "flash_attention_2"):
            raw = one_layer(attn_implementation=attn)
            if lora:
                raw["lora"] = lora
            counts.add(model_flops(raw))
        assert len(counts) == 1


def test_recomputation_is_not_model_flops() -> None:
    # PaLM's MFU leaves out the forward that gradient checkpointing reruns (its HFU would count it).
    assert model_flops(one_layer(gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": False})) == \
        model_flops(one_layer())


@st.composite
def gemm_bound_scenarios(draw) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    raw = tiny_raw(per_device_train_batch_size=draw(st.integers(1, 2)),
                   gradient_accumulation_steps=draw(st.integers(1, 2)), seq_len=draw(st.sampled_from([8, 32, 64])),
                   attn_implementation=draw(st.sampled_from(["eager", "sdpa", "flash_attention_2"])),
                   gradient_checkpointing=draw(st.booleans()))
    model_type = draw(st.sampled_from(["qwen2", "llama", "qwen"]))
    raw["model"].update(model_type=model_type, num_attention_heads=heads, num_key_value_heads=heads,
                        hidden_size=64 * heads, intermediate_size=draw(st.sampled_from([64, 512])),
                        num_hidden_layers=draw(st.integers(1, 2)), tie_word_embeddings=draw(st.booleans()))
    raw["hardware"] = {"device": copy.deepcopy(GEMM_BOUND)}
    lora = draw(st.sampled_from([None, "one", "all-linear"]))
    if lora is not None:
        one = ["c_attn"] if model_type == "qwen" else ["v_proj"]
        raw["lora"] = {"r": draw(st.sampled_from([1, 8])), "target_modules": one if lora == "one" else lora}
    return raw


@given(gemm_bound_scenarios())
def test_mfu_never_exceeds_one(raw: dict) -> None:
    # Every counted FLOP is one a GEMM or attention op of the step runs (eager and the fused kernels run at least
    # the causal count) at no more than the peak, on the one compute stream: MFU <= 1 by construction. Before the
    # fix LoRA runs on this device reached 1.5 (6·N counted, about 4·N run).
    result = summarize(run_scenario(build_scenario(raw)))
    assert 0 < result["mfu"] <= 1
