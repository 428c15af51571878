"""config.json of any transformers version: `dtype` (written from 4.56, the only spelling in 5.x) and `torch_dtype`
load the same weights; a conflict and a quantization_config are one-line errors naming the file."""

import json
from pathlib import Path

import pytest

from sim.resolve import resolve_plan
from sim.scenario import build_scenario, load_scenario
from sim.vocab import DType
from tests.test_bad_input import assert_mentions, assert_one_line_error, run_main, write_yaml

DATA = Path(__file__).resolve().parent / "data"
# What transformers 5.24.0's Qwen2Config.save_pretrained writes for Qwen2.5-7B (dtype=torch.bfloat16): `dtype`,
# no `torch_dtype`, rope_parameters, layer_types; shapes of Qwen/Qwen2.5-7B's config.json.
QWEN25_T5 = DATA / "qwen2.5-7b-transformers5" / "config.json"


def scenario_with(model, **training) -> dict:
    """A one-GPU LoRA scenario around `model` (a path or a mapping)."""
    return {"model": model, "hardware": {"device": "a100-sxm4-80gb"},
            "training": {"per_device_train_batch_size": 1, "seq_len": 64, "bf16": True, **training},
            "lora": {"r": 8, "target_modules": "all-linear"}, "allocator": {"backend": "exact"},
            "simulation": {"steps": 1}}


def test_transformers5_config_loads_bf16():
    """The file says only "dtype": "bfloat16": the weights are bf16, 2 bytes each."""
    scenario = build_scenario(scenario_with(str(QWEN25_T5)))
    plan = resolve_plan(scenario)
    assert plan.model.weights_dtype is DType.BFLOAT16
    assert scenario.model_name == "qwen2.5-7b-transformers5"


def test_dtype_and_torch_dtype_spellings_give_the_same_plan():
    """The same config under the 4.x spelling resolves to the same plan as under the 5.x one."""
    config = json.loads(QWEN25_T5.read_text())
    old = {k: v for k, v in config.items() if k != "dtype"} | {"torch_dtype": "bfloat16"}
    both = config | {"torch_dtype": "bfloat16"}  # 4.56 - 4.57 write both; equal values are one dtype
    plans = [resolve_plan(build_scenario(scenario_with(m))) for m in (config, old, both)]
    assert plans[0].model == plans[1].model == plans[2].model


def test_set_dtype_replaces_either_spelling():
    """--set model.dtype on a file that says torch_dtype (and the reverse) replaces it, no conflict."""
    config = json.loads(QWEN25_T5.read_text())
    old = {k: v for k, v in config.items() if k != "dtype"} | {"torch_dtype": "bfloat16"}
    assert build_scenario(scenario_with(old), overrides=["model.dtype=float32"]).model.torch_dtype is DType.FLOAT32
    assert build_scenario(scenario_with(config),
                          overrides=["model.torch_dtype=float16"]).model.torch_dtype is DType.FLOAT16


def test_dtype_conflict_is_one_line_error_naming_the_file(tmp_path, capsys):
    config = json.loads(QWEN25_T5.read_text()) | {"torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = write_yaml(tmp_path / "s.yaml", scenario_with("config.json"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert_mentions(message, "model.dtype", "'bfloat16'", "model.torch_dtype", "'float32'", "config.json")


def test_quantization_config_is_refused_as_not_modelled(tmp_path, capsys):
    config = json.loads(QWEN25_T5.read_text()) | {
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = write_yaml(tmp_path / "s.yaml", scenario_with("config.json"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path), "--json", str(tmp_path / "r.json")]))
    assert_mentions(message, "model.quantization_config", "'bitsandbytes'", "not modelled", "config.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_dtype_not_floating_or_unknown_is_refused(capsys, tmp_path, dtype):
    config = json.loads(QWEN25_T5.read_text()) | {"dtype": dtype}
    path = write_yaml(tmp_path / "s.yaml", scenario_with(config))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert_mentions(message, "model.torch_dtype", dtype)


def test_load_scenario_from_file_reads_transformers5_config(tmp_path):
    """A scenario file naming the config.json beside it."""
    (tmp_path / "config.json").write_text(QWEN25_T5.read_text())
    path = write_yaml(tmp_path / "s.yaml", scenario_with("config.json"))
    assert load_scenario(path).model.torch_dtype is DType.BFLOAT16


@pytest.mark.parametrize("hub_id, entry, differing", [
    # Qwen2.5-7B-Instruct's config.json: max_position_embeddings 32768 (the base 131072), the base's shapes
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b", {"max_position_embeddings": 32768}),
    ("google/gemma-2-9b-it", "gemma-2-9b", {"torch_dtype": DType.BFLOAT16}),  # the base's is float32
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b", {"sliding_window": None}),  # v0.1 slides over 4096
    ("meta-llama/llama-3.1-8b-instruct", "llama-3.1-8b", {}),  # hub ids are matched case-insensitively
    ("Qwen/Qwen2.5-7B", "qwen2.5-7b", {}),  # a catalog entry's own hub id (its first line)
])
def test_instruct_hub_ids_resolve_to_the_catalog_entry_of_their_base(hub_id, entry, differing):
    scenario = build_scenario(scenario_with(hub_id))
    base = build_scenario(scenario_with(entry))
    assert scenario.model_name == hub_id
    shapes = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "kv_heads", "head_size", "vocab_size", "tie_word_embeddings")
    assert all(getattr(scenario.model, key) == getattr(base.model, key) for key in shapes)
    for key, value in differing.items():
        fields = type(scenario.model).model_fields
        got = getattr(scenario.model, key) if key in fields else (scenario.model.model_extra or {}).get(key, "absent")
        assert got == value, key


def test_unknown_hub_id_keeps_the_path_error(tmp_path, capsys):
    """Qwen/Qwen1.5-32B-Chat is not aliased (its config.json was not found to compare): one line, as any path."""
    path = write_yaml(tmp_path / "s.yaml", scenario_with("Qwen/Qwen1.5-32B-Chat"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert message == "model: file not found: 'Qwen/Qwen1.5-32B-Chat'"
