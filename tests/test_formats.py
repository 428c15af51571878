"""Files of the tools people launch with (LLaMA-Factory, axolotl, accelerate), run directly: each real example, as
its project ships it (tests/data/<tool>/), gives the result of the hand-written scenario that says the same, with
the tool's own defaults made explicit; bad input in them is one line naming the file, key and value."""

from pathlib import Path

import pytest

from sim.errors import ScenarioError
from sim.ingest.formats import Format, detect
from sim.report import summarize
from sim.scenario import build_scenario, load_scenario
from sim.simulate import run_scenario
from tests.test_bad_input import assert_mentions, assert_one_line_error, run_main, write_yaml

DATA = Path(__file__).parent / "data"
LF = DATA / "llamafactory"
ONE_A100 = ["model=llama-3-8b", "hardware.device=a100-sxm4-80gb", "simulation.steps=1"]


def result_of(scenario) -> dict:
    """The simulated result without what only names the inputs (the name, the settings' origins, ignored keys)."""
    result = summarize(run_scenario(scenario))
    return {k: v for k, v in result.items() if k not in ("scenario", "name", "settings", "ignored_keys")}


def hand_written(**sections) -> dict:
    """LLaMA-Factory's llama3 LoRA SFT example written as a scenario: its file's values and LLaMA-Factory 0.9.5's
    defaults (checkpointing on with use_reentrant, lora_alpha 2 x rank, lora_target all = every Linear but lm_head,
    flash_attn auto = HF's sdpa)."""
    data = {
        "model": "llama-3-8b",
        "hardware": {"device": "a100-sxm4-80gb"},
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "seq_len": 2048,
                     "bf16": True, "gradient_checkpointing": True,
                     "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "simulation": {"steps": 1},
    }
    data.update(sections)
    return data


def test_formats_are_detected_from_their_keys():
    assert detect({"model_name_or_path": "x", "stage": "sft"}) is Format.LLAMAFACTORY
    assert detect({"base_model": "x"}) is Format.AXOLOTL
    assert detect({"compute_environment": "LOCAL_MACHINE"}) is Format.ACCELERATE
    assert detect({"model": "qwen-7b"}) is Format.SCENARIO


def test_llamafactory_lora_example_equals_its_scenario():
    """examples/train_lora/llama3_lora_sft.yaml (LLaMA-Factory v0.9.3, verbatim); its hub id
    meta-llama/Meta-Llama-3-8B-Instruct is an alias of llama-3-8b, which --set names here as the hand-written one."""
    from_file = load_scenario(LF / "llama3_lora_sft.yaml", ONE_A100)
    assert from_file.training.gradient_checkpointing  # LLaMA-Factory's default, not HF's (off)
    assert from_file.origins["training.gradient_checkpointing"].startswith("default of LLaMA-Factory 0.9.5")
    assert from_file.origins["lora.lora_alpha"] == "default of LLaMA-Factory 0.9.5: lora_alpha = 2 x lora_rank"
    assert from_file.origins["training.per_device_train_batch_size"] == "llama3_lora_sft.yaml"
    assert any(item.path == "llamafactory.template" for item in from_file.ignored_keys)
    assert result_of(from_file) == result_of(build_scenario(hand_written()))


def test_llamafactory_deepspeed_path_is_followed():
    """examples/train_lora/llama3_lora_sft_ds3.yaml (v0.9.3) names examples/deepspeed/ds_z3_config.json (v0.9.5),
    found beside the file as in LLaMA-Factory's checkout; 8 GPUs: its ZeRO-3 with HF's "auto" filled."""
    eight = [*ONE_A100, "hardware.gpus_per_node=8"]
    from_file = load_scenario(LF / "llama3_lora_sft_ds3.yaml", eight)
    assert from_file.deepspeed.zero_optimization.stage == 3
    assert from_file.origins["deepspeed.zero_optimization.stage"] == "examples/deepspeed/ds_z3_config.json"
    training = hand_written()["training"] | {"gradient_accumulation_steps": 2}
    scenario = hand_written(hardware={"device": "a100-sxm4-80gb", "gpus_per_node": 8}, training=training,
                            deepspeed="examples/deepspeed/ds_z3_config.json")
    assert result_of(from_file) == result_of(build_scenario(scenario, base_dir=LF))


def test_llamafactory_full_tuning_upcasts_weights_to_float32(tmp_path):
    """Full fine-tuning without ZeRO-3: adapter.py casts every trainable parameter to float32 after loading."""
    raw = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "stage": "sft", "finetuning_type": "full", "bf16": True,
           "cutoff_len": 64, "per_device_train_batch_size": 1}
    scenario = load_scenario(write_yaml(tmp_path / "full.yaml", raw), ["hardware.device=a100-sxm4-80gb"])
    assert scenario.model.torch_dtype.value == "float32" and scenario.lora is None
    assert scenario.model_name == "qwen2.5-0.5b"  # the hub id's catalog entry (models/qwen2.5-0.5b.yaml's source)


@pytest.mark.parametrize("key, value, needle", [
    ("flash_attn", "fa3", "llamafactory.flash_attn: 'fa3'"),
    ("use_dora", True, "llamafactory.use_dora: True: not modelled"),
    ("finetuning_type", "freeze", "llamafactory.finetuning_type: 'freeze': not modelled"),
    ("stage", "dpo", "llamafactory.stage: 'dpo': not modelled"),
    ("lora_target", "all", None),
])
def test_llamafactory_bad_input_is_one_line_naming_file_key_and_value(tmp_path, capsys, key, value, needle):
    raw = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "stage": "sft", "cutoff_len": 64, key: value}
    path = write_yaml(tmp_path / "lf.yaml", raw)
    out = tmp_path / "r.json"
    code, stdout, err = run_main(capsys, ["run", str(path), "--set", "hardware.device=a100-sxm4-80gb",
                                          "--json", str(out)])
    if needle is None:  # the default spelled out: runs
        assert code == 0 and out.exists()
        return
    assert_mentions(assert_one_line_error(code, stdout, err), needle, "(in lf.yaml)")
    assert not out.exists()


def test_llamafactory_unknown_hub_id_and_missing_gpu_are_clear(tmp_path):
    path = LF / "llama3_lora_sft.yaml"
    # meta-llama/Meta-Llama-3-8B-Instruct is an alias of llama-3-8b (sim/catalog.py: only eos_token_id differs)
    assert load_scenario(path, ["hardware.device=a100-sxm4-80gb"]).model_name == "meta-llama/Meta-Llama-3-8B-Instruct"
    unknown = write_yaml(tmp_path / "lf.yaml", {"model_name_or_path": "Qwen/Qwen1.5-32B-Chat", "stage": "sft"})
    with pytest.raises(ScenarioError, match="Qwen1.5-32B-Chat.*--set model=PATH/config.json"):
        load_scenario(unknown, ["hardware.device=a100-sxm4-80gb"])
    with pytest.raises(ScenarioError, match="a LLaMA-Factory YAML names no GPU: add --set hardware.device"):
        load_scenario(path, ["model=llama-3-8b"])


def test_shipped_scenario_runs_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, ["run", "qwen7b_lora_1xa100", "--set", "simulation.steps=1"])
    assert code == 0 and out.startswith("scenario   Qwen1.5-7B LoRA r64")
    message = assert_one_line_error(*run_main(capsys, ["run", "qwen7b_lora_1xa10"]))
    assert_mentions(message, "'qwen7b_lora_1xa10'", "no shipped scenario of that name", "qwen7b_lora_1xa100")


AX = DATA / "axolotl"


def test_axolotl_phi3_example_equals_its_scenario():
    """examples/phi/phi3-ft.yml (axolotl v0.18.0, verbatim): microsoft/Phi-3-mini-4k-instruct is the catalog's
    phi-3-mini-4k; bf16 auto on an A100 is bf16, and the weights are loaded in it (resolve_dtype)."""
    from_file = load_scenario(AX / "phi3-ft.yml", ["hardware.device=a100-sxm4-80gb", "simulation.steps=1"])
    assert from_file.model_name == "phi-3-mini-4k"
    assert from_file.origins["training.bf16"] == "phi3-ft.yml: bf16 auto (on: a GPU with bf16, Ampere or newer)"
    scenario = {
        "model": "phi-3-mini-4k", "hardware": {"device": "a100-sxm4-80gb"}, "simulation": {"steps": 1},
        "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "seq_len": 4096,
                     "bf16": True, "gradient_checkpointing": True,
                     "gradient_checkpointing_kwargs": {"use_reentrant": True},
                     "attn_implementation": "flash_attention_2", "optim": "adamw_torch_fused", "weight_decay": 0.1,
                     "max_grad_norm": 1.0},
        "lora": {"r": 64, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
    }
    assert result_of(from_file) == result_of(build_scenario(scenario))


def test_axolotl_checkpointing_defaults_to_non_reentrant(tmp_path):
    """core/builders/base.py: gradient_checkpointing without kwargs passes use_reentrant false (HF's own 4.x
    default is true)."""
    raw = {"base_model": "Qwen/Qwen2.5-0.5B", "gradient_checkpointing": True, "sequence_len": 64}
    scenario = load_scenario(write_yaml(tmp_path / "ax.yaml", raw), ["hardware.device=a100-sxm4-80gb"])
    assert scenario.training.gradient_checkpointing_kwargs.use_reentrant is False
    assert scenario.training.seq_len == 64 and scenario.training.per_device_train_batch_size == 1


@pytest.mark.parametrize("changes, needle", [
    ({}, "axolotl.load_in_8bit: True: not modelled"),  # the shipped lora-8b.yml itself: 8-bit base weights
    ({"load_in_8bit": False, "attn_implementation": "sdpa"}, "axolotl.sample_packing: True (in lora-8b.yml): not modelled"),
    ({"load_in_8bit": False, "adapter": "qlora"}, "axolotl.adapter: 'qlora' (in lora-8b.yml): not modelled"),
    ({"load_in_8bit": False, "some_new_key": 3}, "axolotl.some_new_key: 3"),
    ({"load_in_8bit": False, "gradient_checkpointing": "offload"},
     "axolotl.gradient_checkpointing: 'offload': not modelled"),
])
def test_axolotl_bad_input_is_one_line_naming_file_key_and_value(tmp_path, capsys, changes, needle):
    import yaml

    raw = yaml.safe_load((AX / "lora-8b.yml").read_text()) | changes
    path = write_yaml(tmp_path / "lora-8b.yml", raw)
    out = tmp_path / "r.json"
    code, stdout, err = run_main(capsys, ["run", str(path), "--set", "hardware.device=a100-sxm4-80gb", "--json",
                                          str(out)])
    assert_mentions(assert_one_line_error(code, stdout, err), needle, "(in lora-8b.yml)")
    assert not out.exists()


ACC = DATA / "accelerate"
PHI3 = {
    "model": "phi-3-mini-4k", "hardware": {"device": "a100-sxm4-80gb"}, "simulation": {"steps": 1},
    "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "seq_len": 4096, "bf16": True,
                 "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
                 "attn_implementation": "flash_attention_2", "optim": "adamw_torch_fused", "weight_decay": 0.1,
                 "max_grad_norm": 1.0},
    "lora": {"r": 64, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
}


def test_accelerate_deepspeed_launch_equals_its_scenario():
    """TRL's examples/accelerate_configs/deepspeed_zero3.yaml (huggingface/trl 7d75884, verbatim; what
    `accelerate config` writes) launching axolotl's phi3-ft.yml: 8 processes on one machine, the plugin's ZeRO-3
    without offload, its accumulation 1 equal to the file's. The same as the scenario with 8 GPUs and ZeRO-3."""
    from_file = load_scenario(AX / "phi3-ft.yml", ["hardware.device=a100-sxm4-80gb", "simulation.steps=1"],
                              launch=ACC / "deepspeed_zero3.yaml")
    assert from_file.hardware.gpus == 8 and from_file.deepspeed.zero_optimization.stage == 3
    origin = from_file.origins["deepspeed.zero_optimization.stage"]
    assert origin == "deepspeed_zero3.yaml: deepspeed_config.zero_stage"
    scenario = PHI3 | {"hardware": {"device": "a100-sxm4-80gb", "gpus_per_node": 8},
                       "deepspeed": {"zero_optimization": {"stage": 3}}}
    assert result_of(from_file) == result_of(build_scenario(scenario))


def test_accelerate_multi_gpu_sets_the_count_and_the_mixed_precision(tmp_path):
    """accelerate's examples/config_yaml_templates/multi_gpu.yaml (v1.14.0, verbatim): DDP on 2 GPUs, bf16 where the
    training file turns on no precision of its own."""
    scenario = {key: value for key, value in hand_written().items() if key != "hardware"}
    scenario["training"] = {k: v for k, v in scenario["training"].items() if k != "bf16"}
    path = write_yaml(tmp_path / "s.yaml", scenario)
    from_file = load_scenario(path, ["hardware.device=a100-sxm4-80gb"], launch=ACC / "multi_gpu.yaml")
    assert from_file.training.bf16 and from_file.origins["training.bf16"] == "multi_gpu.yaml: mixed_precision bf16"
    expected = hand_written(hardware={"device": "a100-sxm4-80gb", "gpus_per_node": 2})
    assert result_of(from_file) == result_of(build_scenario(expected))


@pytest.mark.parametrize("train, launch, needle", [
    (AX / "phi3-ft.yml", ACC / "fsdp.yaml", "accelerate.distributed_type: 'FSDP' (in fsdp.yaml): not modelled"),
    (ACC / "multi_gpu.yaml", None, "multi_gpu.yaml: an accelerate config describes the launch, not the model"),
    (LF / "llama3_lora_sft.yaml", ACC / "deepspeed_zero3.yaml",  # the plugin's accumulation 1 vs the file's 8
     "ds gradient_accumulation_steps=1 vs hf gradient_accumulation_steps=8"),
])
def test_accelerate_bad_launch_is_one_line(tmp_path, capsys, train, launch, needle):
    out = tmp_path / "r.json"
    argv = ["run", str(train), "--set", "hardware.device=a100-sxm4-80gb", "--set", "model=llama-3-8b"]
    argv = argv[:4] if train.parent == AX else argv  # axolotl's file names its model
    code, stdout, err = run_main(capsys, argv + (["--launch", str(launch)] if launch else []) + ["--json", str(out)])
    assert_mentions(assert_one_line_error(code, stdout, err), needle)
    assert not out.exists()


@pytest.mark.parametrize("raw, needle", [
    ({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "stage": "sft", "lora_rank": -1},
     "lora.r (llamafactory.lora_rank in bad.yaml): Input should be greater than 0 (got -1)"),
    ({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "stage": "sft", "learning_ratee": 1},
     "training.learning_ratee: unknown key (in bad.yaml)"),
    ({"base_model": "Qwen/Qwen2.5-0.5B", "micro_batch_size": 0},
     "training.per_device_train_batch_size (axolotl.micro_batch_size in bad.yaml): Input should be greater than 0"),
])
def test_schema_errors_of_a_tool_file_name_the_file_and_its_key(tmp_path, capsys, raw, needle):
    path = write_yaml(tmp_path / "bad.yaml", raw)
    code, stdout, err = run_main(capsys, ["run", str(path), "--set", "hardware.device=a100-sxm4-80gb"])
    assert_mentions(assert_one_line_error(code, stdout, err), needle)
