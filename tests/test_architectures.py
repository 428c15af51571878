"""The architecture registry: every model_type has an Architecture that implements the protocol, the LoRA names are
checked against the registered one, and a new family is one class plus one registry entry (shown with a test
family that puts a non-gated MLP into the decoder-layer skeleton)."""

import inspect

import pytest

from sim.errors import ScenarioError
from sim.report import summarize
from sim.plan import ModelShape
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.simulate import run_scenario
from sim.vocab import ModelType
from sim.workload import primitives as P
from sim.workload.architecture import ARCHITECTURES, Architecture
from sim.workload.context import RunContext
from sim.workload.decoder import DecoderLayer
from sim.workload.hf_decoder import HfDecoder, LinearShapes
from sim.workload.modules import apply_linear
from sim.workload.tape import Tensor
from tests.conftest import tiny_raw


class NonGatedMlpDecoder(HfDecoder):
    """A test family: the HF decoder with a non-gated MLP, down_proj(act_fn(up_proj(x))), in the MLP slot."""

    LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head")

    def mlp_shapes(self, m: ModelShape) -> LinearShapes:
        """up_proj and down_proj only: no gate_proj."""
        h, i = m.hidden_size, m.intermediate_size
        return {"up_proj": (h, i, m.mlp_bias), "down_proj": (i, h, m.mlp_bias)}

    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """down_proj(silu(up_proj(x)))."""
        tp, prefix = ctx.tape, f"{layer.prefix}.mlp"
        up = apply_linear(ctx, layer.linears["up_proj"], x)
        act = P.silu(tp, f"{prefix}.act_fn", up)
        tp.drop(up)
        out = apply_linear(ctx, layer.linears["down_proj"], act)
        tp.drop(act)
        return out


def test_registry_covers_every_model_type() -> None:
    assert set(ARCHITECTURES) == set(ModelType)


@pytest.mark.parametrize("model_type", list(ModelType), ids=lambda t: t.value)
def test_each_architecture_implements_the_protocol(model_type: ModelType) -> None:
    architecture = ARCHITECTURES[model_type]
    assert isinstance(architecture, Architecture)
    for name in ("build_model", "forward_loss"):
        wanted = list(inspect.signature(getattr(Architecture, name)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(architecture, name)).parameters) == wanted, name
    for names in (architecture.LINEAR_MODULES, architecture.SAVABLE_MODULES):
        assert isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)


def _lora_raw(model_type: str, **lora) -> dict:
    raw = tiny_raw()
    raw["model"]["model_type"] = model_type
    raw["lora"] = {"r": 4, "lora_alpha": 8, **lora}
    return raw


def test_lora_names_are_checked_against_the_registered_architecture() -> None:
    # c_attn is Qwen1's fused q/k/v projection: a linear module of qwen, not of qwen2
    build_schedule(resolve_plan(build_scenario(_lora_raw("qwen", target_modules=["c_attn"]))))
    with pytest.raises(ScenarioError, match=r"lora.target_modules: 'c_attn' is not a linear module of model_type "
                                            r"qwen2 \(it has: q_proj, k_proj, v_proj, o_proj, gate_proj"):
        build_schedule(resolve_plan(build_scenario(_lora_raw("qwen2", target_modules=["c_attn"]))))
    with pytest.raises(ScenarioError, match=r"lora.modules_to_save: 'wte' is not modelled for model_type qwen2 "
                                            r"\(modelled: embed_tokens, lm_head\)"):
        raw = _lora_raw("qwen2", target_modules=["q_proj"], modules_to_save=["wte"])
        build_schedule(resolve_plan(build_scenario(raw)))


def _mistral_run():
    raw = tiny_raw()
    raw["model"]["model_type"] = "mistral"
    return run_scenario(build_scenario(raw))


def test_a_registered_family_runs_through_the_normal_path(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = summarize(_mistral_run())["model"]
    monkeypatch.setitem(ARCHITECTURES, ModelType.MISTRAL, NonGatedMlpDecoder())  # the one registry entry
    run = _mistral_run()
    # tiny model: h = 64, i = 128, 2 layers, 4 heads of 16 (kv 4), V = 1000, untied, no biases (mistral):
    # embed_tokens 1000·64 = 64,000; per layer 2 norms 2·64 = 128, q/k/v/o 4·64·64 = 16,384,
    # up_proj 64·128 = 8,192, down_proj 128·64 = 8,192: 32,896, two layers 65,792; norm 64; lm_head 64,000.
    # 64,000 + 65,792 + 64 + 64,000 = 193,856; the shipped gated MLP adds gate_proj 64·128 per layer: +16,384.
    assert summarize(run)["model"] == {**shipped, "parameters": 193_856, "trainable_parameters": 193_856}
    assert shipped["parameters"] == 193_856 + 16_384
    names = {op.name for op in run.schedule.ops}
    assert "model.layers.1.mlp.act_fn" in names
    assert not any("gate_proj" in name for name in names)
    with pytest.raises(ScenarioError, match=r"'gate_proj' is not a linear module of model_type mistral"):
        build_schedule(resolve_plan(build_scenario(_lora_raw("mistral", target_modules=["gate_proj"]))))


@pytest.mark.parametrize("key, value", [("num_local_experts", 8), ("num_experts", 60), ("n_routed_experts", 64),
                                        ("kv_lora_rank", 512), ("moe_intermediate_size", 1408)])
def test_a_relabelled_moe_or_mla_config_is_refused_not_run_dense(key: str, value: int) -> None:
    # A Mixtral config.json relabelled `mistral`: MistralForCausalLM never reads num_local_experts and would build
    # a dense MLP, so the run is refused with the key rather than simulated as a dense 7B.
    raw = tiny_raw()
    raw["model"].update(model_type="mistral", **{key: value})
    with pytest.raises(ScenarioError, match=rf"model.{key}: {value} configures .* model_type mistral does not run"):
        resolve_plan(build_scenario(raw))


def test_an_absent_or_null_architecture_key_is_not_refused() -> None:
    # Dense configs may carry the keys as null or 0 (a config class default dumped): nothing to refuse.
    raw = tiny_raw()
    raw["model"].update(num_local_experts=None, num_experts=0)
    assert resolve_plan(build_scenario(raw)).model.model_type is ModelType.QWEN2


def test_llama3_rope_scaling_needs_the_transformers_that_added_it() -> None:
    # Llama 3.1/3.2 configs carry rope_scaling {rope_type: llama3}: 4.42's LlamaConfig refuses it at load.
    raw = tiny_raw()
    raw["model"].update(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ScenarioError, match=r"model.rope_scaling: rope_type 'llama3' needs transformers >= 4.43 "
                                            r"\(got 4.42.4\)"):
        resolve_plan(build_scenario(raw, overrides=["software.transformers=4.42.4"]))
    assert resolve_plan(build_scenario(raw, overrides=["software.transformers=4.43.0"])).model.vocab_size == 1000


def test_qwen3_needs_the_transformers_that_added_it_and_its_norms_are_not_linears() -> None:
    # models/qwen3 first ships in transformers 4.51.0; q_norm/k_norm are RMSNorms, not LoRA targets.
    raw = _lora_raw("qwen3", target_modules=["q_proj", "k_proj"])
    with pytest.raises(ScenarioError, match=r"software.transformers: model_type qwen3 needs transformers >= 4.51.0 "
                                            r"\(got 4.39.3\)"):
        resolve_plan(build_scenario(raw))
    raw["software"]["transformers"] = "4.51.3"
    names = {op.name for op in run_scenario(build_scenario(raw)).schedule.ops}
    assert {"model.layers.1.self_attn.q_norm.rsqrt", "model.layers.1.self_attn.k_norm.weight_mul"} <= names
    raw["lora"]["target_modules"] = ["q_norm"]
    with pytest.raises(ScenarioError, match=r"'q_norm' is not a linear module of model_type qwen3"):
        build_schedule(resolve_plan(build_scenario(raw)))


@pytest.mark.parametrize("model_type, training, software, message", [
    ("gemma2", {}, "5.24.0", r"training.attn_implementation: sdpa does not support attention soft-capping "
                             r"\(model.attn_logit_softcapping 50.0\)"),
    ("gemma", {}, "4.52.4", r"software.transformers: model_type gemma is modelled for transformers >= 4.53.0 "
                            r"\(got 4.52.4; before 4.53 its model builds its masks in its own _update_causal_mask"),
])
def test_gemma_paths_that_are_refused(model_type: str, training: dict, software: str, message: str) -> None:
    raw = tiny_raw(**training)
    raw["model"].update(model_type=model_type, max_position_embeddings=8192)
    raw["software"]["transformers"] = software
    with pytest.raises(ScenarioError, match=message):
        resolve_plan(build_scenario(raw))


def test_gelu_is_refused_outside_the_gemma_families() -> None:
    raw = tiny_raw()
    raw["model"]["hidden_act"] = "gelu"
    with pytest.raises(ScenarioError, match=r"model.hidden_act: 'gelu' is modelled for the Gemma families only"):
        resolve_plan(build_scenario(raw))


def test_gemma_configs_tie_their_embeddings_by_default() -> None:
    # GemmaConfig's tie_word_embeddings defaults to True (Qwen2Config's to False) when config.json leaves it out.
    raw = tiny_raw()
    raw["model"].update(model_type="gemma", hidden_act="gelu")
    raw["software"]["transformers"] = "5.24.0"
    assert resolve_plan(build_scenario(raw)).model.tie_word_embeddings
    assert not resolve_plan(build_scenario(tiny_raw())).model.tie_word_embeddings


def test_phi3_fused_projections_are_its_lora_targets_and_unmodelled_keys_are_refused() -> None:
    raw = _lora_raw("phi3", target_modules=["qkv_proj", "gate_up_proj"])
    raw["software"]["transformers"] = "5.24.0"
    run_scenario(build_scenario(raw))
    raw["lora"]["target_modules"] = ["q_proj"]
    with pytest.raises(ScenarioError, match=r"'q_proj' is not a linear module of model_type phi3 \(it has: qkv_proj"):
        build_schedule(resolve_plan(build_scenario(raw)))
    raw["lora"]["target_modules"] = ["qkv_proj"]
    raw["model"]["partial_rotary_factor"] = 0.75  # Phi-4-mini's: a partly rotated head, not modelled yet
    with pytest.raises(ScenarioError, match=r"model.partial_rotary_factor: 0.75 is not modelled yet for model_type phi3"):
        resolve_plan(build_scenario(raw))
