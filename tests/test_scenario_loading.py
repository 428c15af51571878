"""Loading scenarios (design.md §3): catalog / config.json / inline models, seq_len aliases, `--set` semantics,
DeepSpeed "auto" resolution as the HF Trainer does it, whole-number floats, frozen result. Loading only: fast."""

import copy
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sim import catalog
from sim.errors import ScenarioError
from sim.scenario import SEQ_LEN_ALIASES, ModelSpec, Scenario, build_scenario, load_scenario

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "scenarios" / "qwen7b_lora_1xa100.yaml"
DATA_OK = Path(__file__).resolve().parent / "data" / "ok"


def catalog_yaml(kind: str, name: str) -> dict:
    return yaml.safe_load((ROOT / kind / f"{name}.yaml").read_text())


def spec_fields(spec: ModelSpec) -> dict:
    """The typed ModelSpec fields (extras such as `architectures` left out)."""
    return {name: getattr(spec, name) for name in ModelSpec.model_fields}


def base(**changes) -> dict:
    data = {
        "name": "t",
        "model": "qwen1.5-0.5b",
        "hardware": {"device": "a100-sxm4-80gb"},
        "training": {"per_device_train_batch_size": 1, "seq_len": 32},
    }
    data.update(changes)
    return data


# --------------------------------------------------------------------------------------------------------------
# Shipped scenarios


SCENARIO_FILES = sorted((ROOT / "scenarios").glob("*.yaml")) + sorted((ROOT / "scenarios").glob("*.yml"))


def test_there_are_shipped_scenarios():
    assert SCENARIO_FILES


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[p.name for p in SCENARIO_FILES])
def test_shipped_scenario_loads(path):
    scenario = load_scenario(path)
    assert isinstance(scenario, Scenario)
    assert scenario.name
    assert scenario.training.seq_len > 0


def test_shipped_scenario_values():
    scenario = load_scenario(SHIPPED)
    assert scenario.model_name == "qwen1.5-7b"
    assert scenario.hardware.device_name == "a100-sxm4-80gb"
    assert scenario.hardware.gpus == 1
    assert scenario.training.seq_len == 4096
    assert scenario.training.bf16 is True
    assert scenario.lora is not None and scenario.lora.r == 64
    assert scenario.deepspeed is None


def test_design_section3_example_loads():
    scenario = load_scenario(DATA_OK / "design_section3_example.yaml")
    zero = scenario.deepspeed.zero_optimization
    assert zero.stage3_max_live_parameters == zero.stage3_max_reuse_distance == zero.sub_group_size == 10**9


def test_default_name_is_file_stem(tmp_path):
    raw = base()
    del raw["name"]
    path = tmp_path / "my_scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_scenario(path).name == "my_scenario"


# --------------------------------------------------------------------------------------------------------------
# model: catalog name | path to a HF config.json | inline mapping


HF_EXTRA_KEYS = {
    "_name_or_path": "Qwen/Qwen1.5-0.5B",
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "transformers_version": "4.37.0",
    "use_cache": True,
    "rope_scaling": None,
    "quantization_config": None,
}


def write_config_json(directory: Path) -> Path:
    config = {**catalog_yaml("models", "qwen1.5-0.5b"), **HF_EXTRA_KEYS}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def test_model_by_name_path_and_inline_agree(tmp_path):
    config = write_config_json(tmp_path / "Qwen1.5-0.5B")
    by_name = build_scenario(base(model="qwen1.5-0.5b"))
    by_path = build_scenario(base(model=str(config)))
    by_inline = build_scenario(base(model=catalog_yaml("models", "qwen1.5-0.5b")))
    assert by_name.model_name == "qwen1.5-0.5b"
    expected = spec_fields(by_name.model)
    assert expected["hidden_size"] == 1024 and expected["tie_word_embeddings"] is True
    assert spec_fields(by_path.model) == expected
    assert spec_fields(by_inline.model) == expected


def test_model_catalog_name_is_case_insensitive():
    assert spec_fields(build_scenario(base(model="Qwen1.5-0.5B")).model) == spec_fields(
        build_scenario(base(model="qwen1.5-0.5b")).model
    )


def test_config_json_extra_keys_are_accepted_and_kept(tmp_path):
    config = write_config_json(tmp_path / "m")
    spec = build_scenario(base(model=str(config))).model
    assert spec.model_extra["transformers_version"] == "4.37.0"
    assert spec.model_extra["architectures"] == ["Qwen2ForCausalLM"]


def test_config_json_relative_to_scenario_file(tmp_path):
    write_config_json(tmp_path / "models" / "qwen")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base(model="models/qwen/config.json")))
    assert spec_fields(load_scenario(path).model) == spec_fields(build_scenario(base()).model)


def test_model_path_to_directory_reads_its_config_json(tmp_path):
    config = write_config_json(tmp_path / "Qwen1.5-0.5B")
    scenario = build_scenario(base(model=str(config.parent)))
    assert spec_fields(scenario.model) == spec_fields(build_scenario(base()).model)


# --------------------------------------------------------------------------------------------------------------
# seq_len aliases


@pytest.mark.parametrize("alias", ["model_max_length", "cutoff_len", "max_seq_length"])
def test_seq_len_alias(alias):
    assert alias in SEQ_LEN_ALIASES
    scenario = build_scenario(base(training={"per_device_train_batch_size": 1, alias: 512}))
    assert scenario.training.seq_len == 512


@pytest.mark.parametrize("alias", ["model_max_length", "cutoff_len", "max_seq_length"])
def test_seq_len_alias_equal_to_seq_len_is_fine(alias):
    scenario = build_scenario(base(training={"seq_len": 512, alias: 512}))
    assert scenario.training.seq_len == 512


@pytest.mark.parametrize("alias", ["model_max_length", "cutoff_len", "max_seq_length"])
def test_seq_len_alias_conflict_is_an_error(alias):
    with pytest.raises(ScenarioError) as info:
        build_scenario(base(training={"seq_len": 512, alias: 1024}))
    message = str(info.value)
    assert f"training.{alias}" in message and "512" in message and "1024" in message


def test_seq_len_alias_conflict_exit_2(tmp_path, capsys):
    from sim import cli

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base(training={"seq_len": 512, "cutoff_len": 1024})))
    assert cli.main(["run", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: training.cutoff_len") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------------
# --set (design.md §3): YAML scalars; a name replaces the entry, a key below it edits the resolved entry


def test_set_scalar_parsed_as_yaml():
    scenario = load_scenario(SHIPPED, ["training.seq_len=8192", "training.bf16=false", "name=my run"])
    assert scenario.training.seq_len == 8192 and type(scenario.training.seq_len) is int
    assert scenario.training.bf16 is False
    assert scenario.name == "my run"


def test_set_model_replaces_model():
    scenario = load_scenario(SHIPPED, ["model=yi-34b"])
    assert scenario.model_name == "yi-34b"
    assert spec_fields(scenario.model) == spec_fields(ModelSpec(**catalog.load_entry("models", "yi-34b", "model")))


def test_set_model_field_edits_resolved_catalog_entry():
    scenario = load_scenario(SHIPPED, ["model.num_hidden_layers=2"])
    original = load_scenario(SHIPPED).model
    assert scenario.model_name == "qwen1.5-7b"
    assert scenario.model.num_hidden_layers == 2
    expected = {**spec_fields(original), "num_hidden_layers": 2}
    assert spec_fields(scenario.model) == expected


def test_set_model_then_field_applies_in_order():
    scenario = load_scenario(SHIPPED, ["model=yi-34b", "model.num_hidden_layers=2"])
    assert scenario.model_name == "yi-34b"
    assert scenario.model.num_hidden_layers == 2
    assert scenario.model.hidden_size == catalog_yaml("models", "yi-34b")["hidden_size"]


def test_set_model_to_config_json(tmp_path):
    config = write_config_json(tmp_path / "Qwen1.5-0.5B")
    scenario = load_scenario(SHIPPED, [f"model={config}"])
    assert spec_fields(scenario.model) == spec_fields(build_scenario(base()).model)


def test_set_device_replaces_device():
    scenario = load_scenario(SHIPPED, ["hardware.device=a800-sxm4-80gb"])
    assert scenario.hardware.device_name == "a800-sxm4-80gb"
    a800 = catalog_yaml("hardware", "a800-sxm4-80gb")
    assert scenario.hardware.device.name == a800["name"]
    assert scenario.hardware.device.capacity_bytes == a800["capacity_bytes"]


def test_set_device_field_edits_resolved_device():
    scenario = load_scenario(SHIPPED, ["hardware.device.capacity_bytes=1000"])
    original = load_scenario(SHIPPED).hardware.device
    assert scenario.hardware.device_name == "a100-sxm4-80gb"
    assert scenario.hardware.device.capacity_bytes == 1000
    assert scenario.hardware.device.model_dump(exclude={"capacity_bytes"}) == original.model_dump(
        exclude={"capacity_bytes"}
    )


def test_set_hardware_count():
    scenario = load_scenario(SHIPPED, ["hardware.gpus_per_node=8"])
    assert scenario.hardware.gpus == 8
    assert scenario.hardware.device_name == "a100-sxm4-80gb"


def test_set_lora_null_means_full_fine_tuning():
    assert load_scenario(SHIPPED, ["lora=null"]).lora is None


def test_set_creates_missing_sections():
    scenario = load_scenario(SHIPPED, ["deepspeed.zero_optimization.stage=2", "allocator.backend=caching"])
    assert scenario.deepspeed.zero_optimization.stage == 2
    assert scenario.allocator.backend.value == "caching"


def test_set_value_splits_at_first_equals_sign():
    scenario = load_scenario(SHIPPED, ["allocator.conf=expandable_segments:True,max_split_size_mb:128", "name=a=b"])
    assert scenario.allocator.conf == "expandable_segments:True,max_split_size_mb:128"
    assert scenario.name == "a=b"


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed "auto" resolution (transformers integrations/deepspeed.py, HfTrainerDeepSpeedConfig)

AUTO_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}

MODEL_5120 = {
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def auto_raw(deepspeed) -> dict:
    return {
        "name": "zero3 auto",
        "model": dict(MODEL_5120),
        "hardware": {"device": "a800-sxm4-80gb", "gpus_per_node": 8, "nodes": 1},
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "seq_len": 4096,
                     "bf16": True},
        "deepspeed": deepspeed,
    }


def assert_auto_resolved(scenario: Scenario) -> None:
    zero = scenario.deepspeed.zero_optimization
    assert zero.stage == 3
    assert zero.reduce_bucket_size == 5120 * 5120
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 5120 * 5120)
    assert zero.stage3_param_persistence_threshold == 10 * 5120 == 51200
    ds = scenario.deepspeed.model_dump()
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 1 * 8 * 8 == 64
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_auto_inline():
    assert_auto_resolved(build_scenario(auto_raw(copy.deepcopy(AUTO_DEEPSPEED))))


def test_deepspeed_auto_from_json_file(tmp_path):
    (tmp_path / "ds_config_zero3.json").write_text(json.dumps(AUTO_DEEPSPEED, indent=2))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(auto_raw("ds_config_zero3.json"), sort_keys=False))  # relative to the scenario
    assert_auto_resolved(load_scenario(path))


def test_deepspeed_auto_follows_overrides():
    """`--set` is applied before "auto" is filled, so the filled values follow the overridden arguments."""
    scenario = build_scenario(
        auto_raw(copy.deepcopy(AUTO_DEEPSPEED)),
        overrides=["training.gradient_accumulation_steps=4", "hardware.gpus_per_node=2", "model.hidden_size=4096",
                   "model.num_attention_heads=32", "model.num_key_value_heads=32"],
    )
    ds = scenario.deepspeed.model_dump()
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 1 * 4 * 2
    assert scenario.deepspeed.zero_optimization.reduce_bucket_size == 4096 * 4096


def test_deepspeed_explicit_values_are_kept():
    deepspeed = copy.deepcopy(AUTO_DEEPSPEED)
    deepspeed["zero_optimization"]["reduce_bucket_size"] = 12345
    deepspeed["gradient_clipping"] = 0.5
    raw = auto_raw(deepspeed)
    raw["training"]["max_grad_norm"] = 0.5  # HF's Trainer requires an explicit gradient_clipping to match it
    scenario = build_scenario(raw)
    assert scenario.deepspeed.zero_optimization.reduce_bucket_size == 12345
    assert scenario.deepspeed.model_dump()["gradient_clipping"] == 0.5


def test_build_scenario_does_not_mutate_its_input():
    raw = auto_raw(copy.deepcopy(AUTO_DEEPSPEED))
    snapshot = copy.deepcopy(raw)
    first = build_scenario(raw, overrides=["training.seq_len=1024"])
    assert raw == snapshot
    assert build_scenario(raw, overrides=["training.seq_len=1024"]) == first


# --------------------------------------------------------------------------------------------------------------
# Whole-number floats (DeepSpeed configs write 1e9, 5e8)


def zero_section(**fields) -> dict:
    return {"zero_optimization": {"stage": 3, **fields}}


def test_float_from_python_is_int():
    zero = build_scenario(base(deepspeed=zero_section(stage3_max_live_parameters=1e9, reduce_bucket_size=5e8)))
    zero = zero.deepspeed.zero_optimization
    assert zero.stage3_max_live_parameters == 10**9 and type(zero.stage3_max_live_parameters) is int
    assert zero.reduce_bucket_size == 5 * 10**8 and type(zero.reduce_bucket_size) is int


def test_yaml_float_with_dot_is_int(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base()) + "deepspeed:\n  zero_optimization: {stage: 3, sub_group_size: 1.0e+9}\n")
    zero = load_scenario(path).deepspeed.zero_optimization
    assert zero.sub_group_size == 10**9 and type(zero.sub_group_size) is int


def test_yaml_1e9_is_int(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(base())
        + "deepspeed:\n  zero_optimization: {stage: 3, stage3_max_live_parameters: 1e9, reduce_bucket_size: 5e8}\n"
    )
    zero = load_scenario(path).deepspeed.zero_optimization
    assert zero.stage3_max_live_parameters == 10**9 and type(zero.stage3_max_live_parameters) is int
    assert zero.reduce_bucket_size == 5 * 10**8


def test_json_1e9_is_int(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9, "sub_group_size": 5e8}}')
    zero = build_scenario(base(deepspeed=str(ds))).deepspeed.zero_optimization
    assert zero.stage3_max_live_parameters == 10**9
    assert zero.sub_group_size == 5 * 10**8


def test_fractional_float_is_rejected():
    with pytest.raises(ScenarioError) as info:
        build_scenario(base(deepspeed=zero_section(reduce_bucket_size=1.5)))
    assert "deepspeed.zero_optimization.reduce_bucket_size" in str(info.value)
    assert "1.5" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Frozen


@pytest.mark.parametrize(
    "target,attribute,value",
    [
        (lambda s: s, "name", "other"),
        (lambda s: s, "model_name", "other"),
        (lambda s: s.training, "seq_len", 1),
        (lambda s: s.model, "hidden_size", 1),
        (lambda s: s.hardware, "gpus_per_node", 2),
        (lambda s: s.hardware.device, "capacity_bytes", 1),
        (lambda s: s.lora, "r", 1),
    ],
    ids=["name", "model_name", "training.seq_len", "model.hidden_size", "hardware.gpus_per_node",
         "hardware.device.capacity_bytes", "lora.r"],
)
def test_scenario_is_frozen(target, attribute, value):
    scenario = load_scenario(SHIPPED)
    obj = target(scenario)
    before = getattr(obj, attribute)
    with pytest.raises((ValidationError, TypeError, AttributeError)):
        setattr(obj, attribute, value)
    assert getattr(obj, attribute) == before
