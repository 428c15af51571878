"""Sliding-window masks under SDPA (transformers >= 4.53 masking_utils): the model-level bool mask that
create_sliding_window_causal_mask materialises once seq_len reaches the window, and the additive copy SDPA makes of
it in every sliding layer; the paths transformers refuses stay refused."""

import pytest

from sim.errors import ScenarioError
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from tests.conftest import tiny_raw


def _raw(model_type: str, seq: int, window: int, **model) -> dict:
    """tiny_raw (b 2, bf16, sdpa, hidden 64, 4 heads) as `model_type` with `sliding_window`, on transformers 5.24."""
    raw = tiny_raw(seq_len=seq)
    raw["model"].update(model_type=model_type, sliding_window=window, num_key_value_heads=2, **model)
    raw["software"] = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    return raw


def _sizes(raw: dict, fragment: str, overrides: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Buffer sizes of the first micro-batch whose name contains `fragment`, by name."""
    out: dict[str, list[int]] = {}
    for buffer in build_schedule(resolve_plan(build_scenario(raw, overrides=list(overrides)))).schedule.buffers:
        if fragment in buffer.name:
            out.setdefault(buffer.name, []).append(buffer.size_bytes)
    return out


def test_mistral_sdpa_mask_once_seq_reaches_the_window() -> None:
    # b 2, s 16, window 8: one model-level bool (2, 1, 16, 16) mask = 2·16·16 = 512 B; each of the 2 layers' SDPA
    # converts it to a bf16 additive (2, 1, 16, 16) = 512·2 = 1024 B; the (s, s) bool temporaries are 16·16 = 256 B
    # and the padding gather (b, 1, 1, s) 2·16 = 32 B.
    sizes = _sizes(_raw("mistral", 16, 8), "mask")
    assert sizes["sliding_mask"] == [512]
    assert sizes["sliding_mask.and_outer"] == [256]
    assert sizes["sliding_mask.padding_gather"] == [32]
    assert sizes["model.layers.0.self_attn.sdpa.mask_additive"] == [1024]
    assert sizes["model.layers.1.self_attn.sdpa.mask_additive"] == [1024]
    # with a mask, k and v are repeated to all 4 heads (use_gqa_in_sdpa needs no mask): 2·16·4·16 bf16 = 4096 B
    assert _sizes(_raw("mistral", 16, 8), "repeat_kv.k")["model.layers.0.self_attn.repeat_kv.k.out"] == [4096]
    # s == window: kv_length >= local_size still materialises it; s < window: is_causal, no mask and no repeat
    assert _sizes(_raw("mistral", 16, 16), "sliding_mask")["sliding_mask"] == [512]
    assert _sizes(_raw("mistral", 16, 17), "sliding_mask") == _sizes(_raw("mistral", 16, 17), "mask_additive") == {}
    assert _sizes(_raw("mistral", 16, 17), "repeat_kv") == {}


def test_a_mistral_config_without_the_key_has_mistralconfigs_window() -> None:
    # MistralConfig's default sliding_window is 4096 (configuration_mistral.py): a config.json that leaves the key out
    # gets the bool (2, 1, 4096, 4096) mask at 4096 tokens, 2·4096² = 33,554,432 B; `sliding_window: null` none
    absent = _raw("mistral", 4096, 8, max_position_embeddings=4096)
    del absent["model"]["sliding_window"]
    assert _sizes(absent, "sliding_mask")["sliding_mask"] == [33_554_432]
    null = _raw("mistral", 4096, 8, max_position_embeddings=4096)
    null["model"]["sliding_window"] = None
    assert _sizes(null, "sliding_mask") == {}


def test_gemma3_sdpa_mask_only_in_the_sliding_layers() -> None:
    # 7 layers, sliding_window_pattern 6: layers 0-4 and 6 slide, layer 5 is full (create_causal_mask: None under
    # sdpa). fp32 here: the additive copy is 2·1·16·16·4 = 2048 B per sliding layer.
    raw = _raw("gemma3_text", 16, 8, num_hidden_layers=7, head_dim=16, hidden_act="gelu_pytorch_tanh",
               torch_dtype="float32")
    raw["training"]["bf16"] = False
    sizes = _sizes(raw, "mask_additive")
    assert sorted(sizes) == [f"model.layers.{i}.self_attn.sdpa.mask_additive" for i in (0, 1, 2, 3, 4, 6)]
    assert all(v == [2048] for v in sizes.values())


def test_phi3_catalog_model_runs_sdpa_past_its_window() -> None:
    # Phi-3-mini-4k: sliding_window 2047, once refused under sdpa at seq_len >= 2047; the mask is 1·2048² = 4 MiB
    raw = tiny_raw(seq_len=2048, per_device_train_batch_size=1)
    raw["model"] = "phi-3-mini-4k"
    raw["software"] = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    sizes = _sizes(raw, "sliding_mask", ("model.num_hidden_layers=1",))
    assert sizes["sliding_mask"] == [2048 * 2048]


@pytest.mark.parametrize("model_type, model, attn, message", [
    ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None}, "sdpa",
     r"training.attn_implementation: sdpa is refused by transformers for model_type gemma2 "
     r"\(Gemma2PreTrainedModel._supports_sdpa = False\)"),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}, "eager",
     r"model.use_sliding_window: true with 2 layers > max_window_layers 1 gives Qwen2 a second, sliding-window mask "
     r"under eager on transformers >= 4.53"),
])
def test_sliding_paths_that_stay_refused(model_type: str, model: dict, attn: str, message: str) -> None:
    raw = _raw(model_type, 16, 8, **model)
    raw["training"]["attn_implementation"] = attn
    with pytest.raises(ScenarioError, match=message):
        resolve_plan(build_scenario(raw))
    raw["training"]["attn_implementation"] = "flash_attention_2"  # no mask tensors at all
    assert resolve_plan(build_scenario(raw)).model.sliding_window == 8


def _gemma_457(model_type: str, **training) -> dict:
    """tiny_raw as a Gemma family (head_dim 16, gelu) on transformers 4.57.1, bf16."""
    raw = tiny_raw(**training)
    raw["model"].update(model_type=model_type, head_dim=16, hidden_act="gelu_pytorch_tanh")
    raw["software"] = {"torch": "2.13.0", "transformers": "4.57.1", "peft": "0.17.1"}
    return raw


def test_gemma_on_4x_scales_by_a_normalizer_tensor_and_gemma3_by_its_buffer() -> None:
    # 4.53 - 4.57 GemmaModel.forward: torch.tensor(hidden**0.5, dtype=bf16), a 0-dim tensor of 2 B, per forward; no
    # embed_scale buffer. Gemma 3 registers its 0-dim embed_scale buffer (2 B in bf16) from 4.50.
    gemma = _sizes(_gemma_457("gemma"), "normalizer") | _sizes(_gemma_457("gemma"), "embed_scale")
    # the product and, in backward, grad · normalizer: b·s·h bf16 = 2·16·64·2 = 4096 B each
    assert gemma == {"model.normalizer": [2], "model.normalizer.mul.out": [4096],
                     "model.normalizer.mul.backward.out": [4096]}
    gemma3 = _sizes(_gemma_457("gemma3_text"), "normalizer") | _sizes(_gemma_457("gemma3_text"), "embed_scale")
    assert "model.normalizer" not in gemma3 and gemma3["model.embed_tokens.embed_scale"] == [2]


def test_gemma2_sdpa_runs_on_4x_and_use_cache_false_drops_the_cache() -> None:
    # 4.57.1: Gemma2 _supports_sdpa = True and sdpa_attention_forward ignores the softcap kwarg: plain SDPA
    raw = _gemma_457("gemma2")
    assert resolve_plan(build_scenario(raw)).model.attn_logit_softcapping == 50.0
    # no checkpointing on 4.x: config.json's use_cache (absent: true) fills a DynamicCache, torch.cat copies of
    # k and v per layer (4.56+): b·s·kv·d = 2·16·4·16 bf16 = 4096 B each; use_cache false in config.json: none
    assert _sizes(raw, "cache.keys")["model.layers.0.self_attn.cache.keys.out"] == [4096]
    raw["model"]["use_cache"] = False
    assert _sizes(raw, "cache.") == {}


def test_gemma3_on_4x_computes_both_rotaries_whatever_the_layers() -> None:
    # 2 layers, pattern 6: both slide. 4.57.1 Gemma3TextModel builds and runs rotary_emb and rotary_emb_local (d/2 = 8
    # fp32 inv_freq = 32 B each; cos/sin (1, s, d) bf16 = 16·16·2 = 512 B each, two pairs); 5.24 only the sliding
    # layers' pair.
    old = _sizes(_gemma_457("gemma3_text"), "rotary_emb")
    assert old["model.rotary_emb.inv_freq"] == old["model.rotary_emb_local.inv_freq"] == [32]
    assert old["model.rotary_emb.cos.to.out"] == old["model.rotary_emb_local.cos.to.out"] == [512]
    raw = _gemma_457("gemma3_text")
    raw["software"] = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    new = _sizes(raw, "rotary")
    assert [k for k in new if k.endswith("inv_freq")] == ["model.rotary_emb.inv_freq"]  # one module, one type
    assert new["model.rotary_emb.sliding_attention.cos.to.out"] == [512] and "model.rotary_emb.cos.to.out" not in new


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("transformers", ["4.57.1", "5.24.0"])
def test_gemma_checkpointed_layers_keep_their_mask_and_cos_sin(model_type: str, transformers: str) -> None:
    # reentrant checkpointing: each layer's checkpoint keeps its mask and the cos/sin it is called with; eager
    # masks are (b, 1, s, s) bf16 = 2·16·16·2 = 1024 B, one per layer type present
    raw = _gemma_457(model_type, gradient_checkpointing=True, attn_implementation="eager")
    raw["software"]["transformers"] = transformers
    raw["training"]["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    sizes = _sizes(raw, "causal_mask")
    assert sizes["causal_mask"] == [1024] * (1 if model_type == "gemma" else 2)
