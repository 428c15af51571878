"""Parameter counts of catalog models against their published counts (model cards' safetensors totals)."""

import pytest

from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import parameter_counts

# Published totals: the HF model pages' "Model size" from safetensors metadata, exact where the page gives
# the full count (Llama/Mistral), else the rounded figure the vendor prints (Qwen, Yi).
EXACT = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "codellama-34b": 33_743_970_304,
    # Llama 3.1 keeps Llama 3's shapes; 3.2 ties lm_head to embed_tokens (counted once, as the safetensors hold it)
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    # Qwen2.5 (model_type qwen2): the HF pages' safetensors totals ("Model size"); 0.5B-3B tie their embeddings
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    # Qwen3: q_norm/k_norm add 2·128 per layer; 4B ties its embeddings and stores lm_head once
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
    # Gemma (tied, head_dim 256, 256k vocabulary); Gemma 2 adds the two feed-forward norms per layer; Gemma 3 1B
    # adds q_norm/k_norm (262k vocabulary)
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-1b": 999_885_952,
    # Phi-3: fused qkv_proj (h → (a + 2k)·d) and gate_up_proj (h → 2i), untied, 32064 vocabulary
    "phi-3-mini-4k": 3_821_079_552,
    "phi-3-medium-4k": 13_960_238_080,
    # MoE (3-D expert weights gate_up_proj (E, 2i, h) and down_proj (E, h, i), router gate.weight (E, h) per sparse
    # layer): the safetensors totals, the HF pages' "Model size" (HF API safetensors.total; model.safetensors.index.json
    # total_size / 2 in bf16: 93,405,585,408, 28,631,568,384 and 61,064,245,248 bytes); also keras-team/keras-hub's
    # presets (mixtral_8_7b_en params 46702792704, qwen1.5_moe_2.7b_en 14315784192).
    # Mixtral: 32·(2·4096 + attention 4096·(4096 + 2·1024 + 4096) + router 8·4096 + experts 8·3·4096·14336) + norm
    # 4096 + 2·32000·4096 = 46,702,792,704
    "mixtral-8x7b": 46_702_792_704,
    # Qwen2-MoE: q/k/v biases; per layer a shared expert (3·h·5632) and its (1, h) gate besides 60 experts of 1408
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    "qwen2-57b-a14b": 57_408_658_944,
    # Qwen3-MoE: q_norm/k_norm (2·128 per layer), 128 experts of 768, no shared expert
    "qwen3-30b-a3b": 30_532_122_624,
}
# Tied models whose safetensors also store lm_head.weight (the HF page's total counts it twice, the loaded model
# once): (safetensors total, its vocab × hidden, the model card's rounded "Number of Parameters" in billions).
STORED_TWICE = {
    "qwen3-0.6b": (751_632_384, 151936 * 1024, 0.6),
    "qwen3-1.7b": (2_031_739_904, 151936 * 2048, 1.7),
}
ROUNDED_BILLIONS = {  # (model, published count in billions, digits printed)
    "qwen1.5-0.5b": (0.46, 2), "qwen1.5-7b": (7.72, 2), "qwen1.5-14b": (14.17, 2), "qwen1.5-32b": (32.51, 2),
    "qwen1.5-72b": (72.29, 2), "qwen1.5-110b": (111.21, 2), "yi-34b": (34.39, 2), "yi-6b": (6.06, 2),
}


def _count(name: str, overrides: tuple[str, ...] = (), **extra) -> tuple[int, int]:
    # eager: the one attention every family runs (Gemma 2 refuses sdpa)
    raw = {"model": name, "hardware": {"device": "a100-sxm4-80gb"},
           "training": {"seq_len": 16, "attn_implementation": "eager"}, **extra}
    return parameter_counts(resolve_plan(build_scenario(raw, overrides=list(overrides))))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_counts(name: str) -> None:
    assert _count(name) == (EXACT[name], EXACT[name])


@pytest.mark.parametrize("name", sorted(ROUNDED_BILLIONS))
def test_rounded_counts(name: str) -> None:
    billions, digits = ROUNDED_BILLIONS[name]
    assert round(_count(name)[0] / 1e9, digits) == billions


@pytest.mark.parametrize("name", sorted(STORED_TWICE))
def test_tied_counts_with_a_stored_lm_head(name: str) -> None:
    total, lm_head, billions = STORED_TWICE[name]
    assert _count(name)[0] == total - lm_head
    assert round(_count(name)[0] / 1e9, 1) == billions


def test_qwen3_8b_by_hand() -> None:
    # per layer: q 4096·32·128, k/v 2·4096·8·128, o 32·128·4096, MLP 3·4096·12288, norms 2·4096 + q/k norms 2·128;
    # embed and lm_head 2·151936·4096, final norm 4096
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert _count("qwen3-8b")[0] == 2 * 151936 * 4096 + 4096 + 36 * per_layer == 8_190_735_360


def test_llama2_7b_by_hand() -> None:
    # embed 32000·4096 + lm_head 32000·4096 + norm 4096
    # + 32 × (4·4096² attention + 3·4096·11008 MLP + 2·4096 norms)
    expected = 2 * 32000 * 4096 + 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    assert _count("llama-2-7b")[0] == expected == 6_738_415_616


def test_tied_embeddings_count_once() -> None:
    # qwen1.5-0.5b ties lm_head to embed_tokens: untying adds one more 151936 × 1024 matrix.
    tied, _ = _count("qwen1.5-0.5b")
    untied, _ = _count("qwen1.5-0.5b", ("model.tie_word_embeddings=false",))
    assert tied == 463_987_712
    assert untied - tied == 151936 * 1024


def test_lora_adds_adapters_and_freezes_the_base() -> None:
    # r=8 on q_proj and v_proj of Llama-2-7B: per layer A (8·4096) + B (4096·8) for each of the 2 modules.
    total, trainable = _count("llama-2-7b", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    adapters = 32 * 2 * (8 * 4096 + 4096 * 8)
    assert trainable == adapters == 4_194_304
    assert total == EXACT["llama-2-7b"] + adapters


def test_llama_3_2_1b_by_hand() -> None:
    # tied: embed 128256·2048 once + norm 2048 + 16 × (q 2048·32·64 + k, v 2·2048·8·64 + o 32·64·2048
    # + MLP 3·2048·8192 + 2 norms 2·2048)
    per_layer = 2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    assert _count("llama-3.2-1b")[0] == 128256 * 2048 + 2048 + 16 * per_layer == 1_235_814_400


def test_gemma_2_2b_by_hand() -> None:
    # tied embed 256000·2304 + final norm 2304 + 26 × (q 2304·8·256, k/v 2·2304·4·256, o 8·256·2304,
    # GeGLU 3·2304·9216, four norms 4·2304)
    per_layer = 2304 * 2048 + 2 * 2304 * 1024 + 2048 * 2304 + 3 * 2304 * 9216 + 4 * 2304
    assert _count("gemma-2-2b")[0] == 256000 * 2304 + 2304 + 26 * per_layer == 2_614_341_888


def test_phi3_mini_by_hand() -> None:
    # embed + lm_head 2·32064·3072 + norm 3072 + 32 × (qkv 3072·(32 + 2·32)·96 + o 3072·3072
    # + gate_up 3072·2·8192 + down 8192·3072 + 2 norms 2·3072)
    per_layer = 3072 * 9216 + 3072 * 3072 + 3072 * 16384 + 8192 * 3072 + 2 * 3072
    assert _count("phi-3-mini-4k")[0] == 2 * 32064 * 3072 + 3072 + 32 * per_layer == 3_821_079_552
