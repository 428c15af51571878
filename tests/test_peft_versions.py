"""LoRA adapters' dtype by PEFT version on bf16 weights (sim/workload/behaviour.py _peft_adapters_fp32 cites the code):
PEFT 0.5 leaves nn.Linear's default fp32, 0.6 - 0.11 move them to the weights' dtype, 0.12 upcasts them again."""

import pytest

from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from sim.vocab import DType
from tests.conftest import tiny_raw


def lora_raw(peft: str, torch_dtype: str = "bfloat16") -> dict:
    raw = tiny_raw(seq_len=8)
    raw["model"]["torch_dtype"] = torch_dtype
    raw["software"]["peft"] = peft
    raw["lora"] = {"r": 4, "target_modules": ["q_proj"]}
    return raw


@pytest.mark.parametrize("peft, adapters", [("0.5.0", DType.FLOAT32), ("0.6.0", DType.BFLOAT16),
                                            ("0.11.1", DType.BFLOAT16), ("0.12.0", DType.FLOAT32)])
def test_adapter_dtype_by_peft_version(peft: str, adapters: DType) -> None:
    assert resolve_plan(build_scenario(lora_raw(peft))).lora.adapter_dtype is adapters


def test_fp32_adapters_hold_two_more_bytes_per_element() -> None:
    # q_proj's adapters on 2 layers of hidden 64, r 4: 2 · 4 · (64 + 64) = 1024 elements, 4 B instead of 2 B each
    fp32, bf16 = (run_scenario(build_scenario(lora_raw(peft))).built.model_states for peft in ("0.5.0", "0.6.0"))
    assert fp32.trainable_parameters == bf16.trainable_parameters == 1024
    assert fp32.parameters_bytes - bf16.parameters_bytes == 1024 * (4 - 2)


def test_fp32_weights_keep_fp32_adapters_in_every_version() -> None:
    for peft in ("0.5.0", "0.6.0", "0.12.0"):
        assert resolve_plan(build_scenario(lora_raw(peft, "float32"))).lora.adapter_dtype is DType.FLOAT32


def test_qwen1_modules_to_save_keeps_the_original_beside_the_trained_copy() -> None:
    # PEFT's ModulesToSaveWrapper on Qwen1's wte: the original (1000 × 64 bf16, frozen) stays on the device and a copy
    # of it trains, as for the HF families: 64,000 more trainable parameters, and both weights held from the start
    raw = lora_raw("0.10.0")
    raw["model"] = {"model_type": "qwen", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256,
                    "torch_dtype": "bfloat16"}
    raw["lora"]["target_modules"] = ["c_attn"]
    plain = run_scenario(build_scenario(raw))
    raw["lora"]["modules_to_save"] = ["wte"]
    saved = run_scenario(build_scenario(raw))
    trainable = saved.built.model_states.trainable_parameters - plain.built.model_states.trainable_parameters
    assert trainable == 1000 * 64
    held = {saved.schedule.buffers[b].name: saved.schedule.buffers[b].size_bytes for b in saved.schedule.persistent}
    assert held["transformer.wte.weight"] == held["transformer.wte.modules_to_save.default.weight"] == 1000 * 64 * 2
