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
