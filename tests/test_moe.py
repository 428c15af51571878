"""The mixture-of-experts families (sim/workload/moe.py) at tiny shapes: parameters, the router's and the grouped_mm
experts' buffers byte by byte, the sparse/dense layer pattern of Qwen2-MoE, and what is refused."""

import copy

import pytest

from sim.errors import ScenarioError
from sim.report import summarize
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.simulate import run_scenario

# h 64, dense/expert intermediate 96, 2 layers, 4 heads of 16 (kv 2), V 1000, 4 experts, top 2
TINY_MOE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}


def moe_raw(model_type: str, **model) -> dict:
    """A tiny MoE model, b 2, s 16 (N = 32 tokens, S = N·k = 64 routed pairs), bf16, sdpa, on an A100."""
    keys = {"num_local_experts": 4} if model_type == "mixtral" else {"num_experts": 4, "moe_intermediate_size": 96}
    keys["num_experts_per_tok"] = 2
    return {"name": "tiny moe", "model": {"model_type": model_type, **TINY_MOE, **keys, **model},
            "hardware": {"device": "a100-sxm4-80gb"},
            "software": {"torch": "2.13.0", "transformers": "5.24.0"},
            "training": {"per_device_train_batch_size": 2, "seq_len": 16, "bf16": True,
                         "attn_implementation": "sdpa"},
            "allocator": {"backend": "exact"}, "simulation": {"steps": 1}}


def buffer_sizes(raw: dict) -> dict[str, int]:
    """{buffer name: size in bytes} of one simulated step (one size per name: every layer makes the same)."""
    run = run_scenario(build_scenario(raw))
    return {b.name: b.size_bytes for b in run.schedule.buffers}


def test_mixtral_parameters_count_router_and_3d_experts() -> None:
    # embed 1000·64 = 64,000 and lm_head 64,000; norm 64. Per layer: 2 norms 128, q/o 2·64·64 = 8,192,
    # k/v 2·64·32 = 4,096, router 4·64 = 256, gate_up_proj 4·(2·96)·64 = 49,152, down_proj 4·64·96 = 24,576:
    # 86,400; two layers 172,800. Total 128,064 + 172,800 = 300,864.
    model = summarize(run_scenario(build_scenario(moe_raw("mixtral"))))["model"]
    assert model["parameters"] == model["trainable_parameters"] == 300_864


def test_mixtral_attention_has_no_biases_whatever_the_config_says() -> None:
    # MixtralAttention.__init__ hard-codes bias=False: attention_bias true adds nothing to the 300,864 above
    model = summarize(run_scenario(build_scenario(moe_raw("mixtral", attention_bias=True))))["model"]
    assert model["parameters"] == 300_864


def test_mixtral_router_and_expert_buffers_are_sized_by_the_routed_pairs() -> None:
    sizes = buffer_sizes(moe_raw("mixtral"))
    layer = "model.layers.0.mlp"
    # router: logits (N, E) bf16 = 32·4·2 = 256; .float() copy and softmax (N, E) fp32 = 512 each; topk values (N, k)
    # fp32 = 256 and int64 indices = 512; the renormalising sum (N, 1) fp32 = 128 and div_'s saved clone 256
    assert [sizes[f"{layer}.gate.{n}"] for n in ("out", "float.out", "softmax.out", "topk.values", "topk.indices",
                                                  "topk_sum.out", "renormalise.original_self")] == \
        [256, 512, 512, 256, 512, 128, 256]
    experts = f"{layer}.experts"
    # experts (S = 64 pairs): sort values and permutation int64 64·8 = 512 each; routed hidden rows (S, h) bf16
    # 64·64·2 = 8,192; routed weights (S,) fp32 256; histc input on CUDA .int() 64·4 = 256; histc and offsets
    # (E,) 4 bytes each = 16
    assert [sizes[f"{experts}.{n}"] for n in ("sort.out", "sort.indices", "index_hidden.out", "index_weights.out",
                                               "histc_input.out", "histc.out", "cumsum.out")] == \
        [512, 512, 8_192, 256, 256, 16, 16]
    # gate_up (S, 2i) bf16 = 64·192·2 = 24,576; act and product (S, i) = 12,288; down (S, h) = 8,192; weighted by
    # Mixtral's fp32 top-k weights the rows promote to fp32, 64·64·4 = 16,384, as does their reordered copy; the sum
    # over k (N, h) fp32 = 8,192, cast back to bf16 4,096
    assert [sizes[f"{experts}.{n}"] for n in ("gate_up_proj.out", "act_fn.out", "mul.out", "down_proj.out",
                                               "routing_weights.out", "restore_order.out", "sum.out", "to.out")] == \
        [24_576, 12_288, 12_288, 8_192, 16_384, 16_384, 8_192, 4_096]
    # backward: the grad of the whole gate_up_proj, every expert, 4·192·64·2 = 98,304 bytes
    assert sizes[f"{experts}.gate_up_proj.backward.weight.out"] == 98_304


def test_qwen_routers_cast_the_weights_so_the_weighted_rows_stay_bf16() -> None:
    # Qwen3MoeTopKRouter: softmax(dtype=float) (no .float() copy), then .to(router_logits.dtype): (N, k) bf16 = 128;
    # the weighted rows are bf16, 64·64·2 = 8,192
    sizes = buffer_sizes(moe_raw("qwen3_moe", head_dim=16, norm_topk_prob=True))
    assert sizes["model.layers.0.mlp.gate.to.out"] == 128
    assert "model.layers.0.mlp.gate.float.out" not in sizes
    assert sizes["model.layers.0.mlp.experts.routing_weights.out"] == 8_192


def test_qwen2_moe_shared_expert_and_dense_layers() -> None:
    # 4 layers, decoder_sparse_step 2 → layers 1 and 3 sparse; mlp_only_layers [3] makes 3 dense: only layer 1 is
    # sparse.
    raw = moe_raw("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3],
                  shared_expert_intermediate_size=32)
    run = run_scenario(build_scenario(raw))
    names = {op.name for op in run.schedule.ops}
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(n.startswith(f"model.layers.{i}.mlp.experts") for n in names for i in (0, 2, 3))
    # per layer attention 12,288 + q/k/v biases 64 + 32 + 32 = 12,416, norms 128. Dense MLP 3·64·96 = 18,432;
    # sparse: router 256, experts 4·3·64·96 = 73,728, shared expert 3·64·32 = 6,144 and its gate 64: 80,192.
    # 3 dense layers (12,544 + 18,432) · 3 = 92,928, one sparse 12,544 + 80,192 = 92,736; + 128,064 = 313,728
    assert summarize(run)["model"]["parameters"] == 313_728
    sizes = {b.name: b.size_bytes for b in run.schedule.buffers}
    # sigmoid(shared_expert_gate(x)) (N, 1) bf16 = 64 bytes; times the shared output (N, h) bf16 = 4,096
    assert sizes["model.layers.1.mlp.shared_expert_gate.sigmoid.out"] == 64
    assert sizes["model.layers.1.mlp.shared_expert_scale.out"] == 4_096


def test_lora_targets_nn_linear_modules_only() -> None:
    # Qwen2-MoE all-linear: q/k/v/o, the shared expert's gate/up/down_proj and shared_expert_gate get adapters
    # (A r·in, B out·r, r 8). Per layer: q 8·64 + 64·8 = 1,024, k and v 8·64 + 32·8 = 768 each, o 1,024: 3,584;
    # shared expert (i 32) gate/up 8·64 + 32·8 = 768 each, down 8·32 + 64·8 = 768, shared_expert_gate 8·64 + 1·8 =
    # 520: 2,824. 6,408 per layer, 12,816 for two; the router and the 3-D experts stay frozen (measured: PEFT 0.21.2
    # wraps no Qwen2-MoE parameter).
    raw = moe_raw("qwen2_moe", shared_expert_intermediate_size=32)
    raw["lora"] = {"r": 8, "target_modules": "all-linear"}
    model = summarize(run_scenario(build_scenario(raw)))["model"]
    assert model["trainable_parameters"] == 12_816
    raw = moe_raw("mixtral")
    raw["lora"] = {"r": 8, "target_modules": ["gate_up_proj"]}
    with pytest.raises(ScenarioError, match=r"^lora.target_modules: 'gate_up_proj' is not a linear module of "
                                            r"model_type mixtral"):
        build_schedule(resolve_plan(build_scenario(raw)))


@pytest.mark.parametrize("model_type, key, message", [
    ("mixtral", {"num_experts_per_tok": 5},
     r"^model.num_experts_per_tok: 5 is more than model.num_local_experts \(4\)"),
    ("qwen3_moe", {"num_experts_per_tok": 0}, r"^model.num_experts_per_tok: 0 must be a positive integer$"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, r"^model.decoder_sparse_step: 0 must be a positive integer$"),
    ("qwen3_moe", {"mlp_only_layers": 3}, r"^model.mlp_only_layers: 3 must be a list of layer indices$"),
    ("mixtral", {"output_router_logits": True}, r"^model.output_router_logits: true \(the router aux loss\)"),
    ("mixtral", {"router_jitter_noise": 0.1}, r"^model.router_jitter_noise: 0.1 is not modelled yet"),
    ("mixtral", {"sliding_window": 4096}, r"^model.sliding_window: 4096: sliding-window attention"),
    ("qwen2_moe", {"use_sliding_window": True}, r"^model.use_sliding_window: True: sliding-window attention"),
])
def test_bad_or_unmodelled_moe_keys_get_one_line(model_type: str, key: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as raised:
        resolve_plan(build_scenario(moe_raw(model_type, **key)))
    assert "\n" not in str(raised.value)


def test_zero3_all_linear_lora_and_older_versions_are_refused_with_the_key() -> None:
    raw = moe_raw("mixtral")
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ScenarioError, match=r"^deepspeed.zero_optimization.stage: 3 with model_type mixtral"):
        resolve_plan(build_scenario(raw))
    raw = moe_raw("qwen3_moe", head_dim=16)
    raw["lora"] = {"r": 8, "target_modules": "all-linear"}
    with pytest.raises(ScenarioError, match=r"^lora.target_modules: 'all-linear' on model_type qwen3_moe also puts "
                                            r"PEFT's ParamWrapper adapters on the router and the experts"):
        resolve_plan(build_scenario(raw))
    raw = moe_raw("mixtral")
    raw["software"]["transformers"] = "5.23.0"
    with pytest.raises(ScenarioError, match=r"model_type mixtral is modelled for transformers >= 5.24.0 \(got "
                                            r"5.23.0; its earlier code"):
        resolve_plan(build_scenario(raw))
    raw = copy.deepcopy(moe_raw("mixtral"))
    raw["software"]["torch"] = "2.8.0"  # on an A100 (sm80) transformers runs its grouped_mm fallback loop
    with pytest.raises(ScenarioError, match=r"^software.torch: 2.8.0 on this device runs transformers' grouped_mm "
                                            r"fallback"):
        resolve_plan(build_scenario(raw))
