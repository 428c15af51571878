"""Qwen1's remote-code revisions (software.qwen_remote_code): the 2023-10 code registers one (P, P) bool
registered_causal_mask on QWenModel; the final revision (the default) registers none (sim/workload/behaviour.py _qwen1
cites the code)."""

import pytest

from sim.errors import ScenarioError
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

MASK = "transformer.registered_causal_mask"


def qwen1_raw(revision: str | None, attn: str = "flash_attention_2") -> dict:
    """A 2-layer, hidden-64 Qwen1 with max_position_embeddings 64, LoRA on c_attn, batch 1 of 16 tokens."""
    raw = tiny_raw(per_device_train_batch_size=1, attn_implementation=attn)
    raw["model"] = {"model_type": "qwen", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 64,
                    "torch_dtype": "bfloat16"}
    raw["lora"] = {"r": 4, "target_modules": ["c_attn"]}
    if revision is not None:
        raw["software"]["qwen_remote_code"] = revision
    return raw


def held_bytes(raw: dict) -> dict[str, int]:
    """Bytes of every buffer held for the whole run, by name."""
    run = run_scenario(build_scenario(raw))
    return {run.schedule.buffers[b].name: run.schedule.buffers[b].size_bytes for b in run.schedule.persistent}


def test_october_2023_holds_one_causal_mask_for_the_model() -> None:
    # tril(ones((64, 64), bool)): 64 · 64 · 1 B = 4096 B, once for the model (not per layer: 2 layers would be 8192 B)
    october = held_bytes(qwen1_raw("2023-10"))
    assert october[MASK] == 64 * 64
    assert [name for name in october if "causal_mask" in name] == [MASK]


def test_the_final_revision_is_the_default_and_holds_no_mask() -> None:
    # absent key = the newest revision: the same buffers as naming 2023-12, none of them a registered mask
    default, final = held_bytes(qwen1_raw(None)), held_bytes(qwen1_raw("2023-12"))
    assert default == final
    assert MASK not in default


def test_the_mask_is_all_that_the_october_revision_adds() -> None:
    # every other held buffer (weights, adapters, logn_tensor, masked_bias, inv_freq, rotary cache) is the same
    october, final = held_bytes(qwen1_raw("2023-10")), held_bytes(qwen1_raw("2023-12"))
    assert {k: v for k, v in october.items() if k != MASK} == final


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_october_2023_without_flash_attn_is_refused(attn: str) -> None:
    # that revision's non-flash path is eager QWenAttention._attn, which is not modelled
    with pytest.raises(ScenarioError, match=f"software.qwen_remote_code: .*flash_attention_2 only .*'{attn}'"):
        run_scenario(build_scenario(qwen1_raw("2023-10", attn)))


def test_unknown_revision_names_the_key_and_value() -> None:
    with pytest.raises(ScenarioError, match=r"software.qwen_remote_code: .* \(got '2023-08'\)"):
        build_scenario(qwen1_raw("2023-08"))


def test_a_qwen1_revision_on_another_model_type_is_refused() -> None:
    raw = tiny_raw()
    raw["software"]["qwen_remote_code"] = "2023-10"
    with pytest.raises(ScenarioError, match="software.qwen_remote_code: only for model_type qwen"):
        run_scenario(build_scenario(raw))
