"""The result states every deciding setting with its origin (scenario file, a file it names, --set, HF's "auto",
a tool's default at the scenario's version) and lists the keys accepted with no memory effect."""

import json

from sim.report import format_summary, summarize
from sim.scenario import build_scenario, load_scenario
from sim.simulate import run_scenario
from tests.test_bad_input import run_main, tiny_scenario, write_yaml


def test_origins_name_file_set_and_versioned_defaults(tmp_path):
    data = tiny_scenario(software={"transformers": "4.39.3"})
    data["training"]["learning_rate"] = 1e-5
    path = write_yaml(tmp_path / "s.yaml", data)
    origins = load_scenario(path, ["training.seq_len=64"]).origins
    assert origins["training.per_device_train_batch_size"] == "s.yaml"  # the file name: the same on every machine
    assert origins["training.seq_len"] == "--set"
    assert origins["training.bf16"] == "default of transformers 4.39.3: TrainingArguments"
    assert origins["software.torch"] == "the newest the simulator knows"
    assert "lora.r" not in origins and "deepspeed.zero_optimization.stage" not in origins


def test_origins_of_model_and_deepspeed_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_scenario()["model"], "dtype": "bfloat16"}))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    data = tiny_scenario(model="config.json", deepspeed="ds.json")
    origins = load_scenario(write_yaml(tmp_path / "s.yaml", data)).origins
    assert origins["model.torch_dtype"] == "config.json"  # as the scenario wrote it
    assert origins["deepspeed.zero_optimization.stage"] == "ds.json"
    assert origins["deepspeed.zero_optimization.reduce_bucket_size"].startswith("'auto' in ")
    assert origins["deepspeed.zero_optimization.allgather_bucket_size"] == (
        "default of deepspeed 0.19.6: zero/config.py")


def test_result_json_and_summary_state_settings_and_ignored_keys(tmp_path, capsys):
    """--json gains `settings` and `ignored_keys`; the summary prints the assumed block and the accepted keys."""
    data = tiny_scenario()
    data["training"].update(seed=7, output_dir="out")
    out = tmp_path / "r.json"
    code, stdout, _ = run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data)), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    # tiny_scenario: per_device_train_batch_size 1 from the file, weights fp32 (no dtype in the inline model)
    assert result["settings"]["training.per_device_train_batch_size"]["value"] == 1
    assert result["settings"]["weights_dtype"] == {"value": "float32", "from": "model.torch_dtype"}
    assert result["ignored_keys"] == [
        {"path": "training.seed", "value": 7,
         "why": "run length, schedule or hyperparameter value: no tensor changes size"},
        {"path": "training.output_dir", "value": "out", "why": "checkpoint saving or loading, between steps"}]
    assert "  training.per_device_train_batch_size = 1  (" in stdout
    assert "  training.seed (run length" in stdout


def test_summary_without_ignored_keys_has_no_accepted_line():
    run = run_scenario(build_scenario(tiny_scenario()))
    summary = format_summary(summarize(run))
    assert "assumed (" in summary and "accepted, no memory effect" not in summary


def test_alloc_conf_keys_that_change_nothing_modelled_are_listed():
    """PYTORCH_CUDA_ALLOC_CONF's pinned-memory and lock keys are accepted and listed like other neutral keys."""
    data = tiny_scenario(allocator={"backend": "caching",
                                    "conf": "expandable_segments:True,release_lock_on_cudamalloc:True"})
    result = summarize(run_scenario(build_scenario(data)))
    assert [item["path"] for item in result["ignored_keys"]] == ["allocator.conf.release_lock_on_cudamalloc"]
    assert result["ignored_keys"][0]["value"] == "True"


def test_use_reentrant_default_follows_the_transformers_version():
    """No kwargs: the Trainer passes none and the model's checkpointing_enable picks use_reentrant, true in 4.57.6,
    false from 5.0.0; the origin says so; a given value wins."""
    from sim.resolve import resolve_plan

    def plan(transformers, **training):
        data = tiny_scenario(software={"transformers": transformers})
        data["training"].update(gradient_checkpointing=True, **training)
        return build_scenario(data)

    assert resolve_plan(plan("4.57.6")).training.use_reentrant is True
    assert resolve_plan(plan("5.0.0")).training.use_reentrant is False
    given = plan("5.0.0", gradient_checkpointing_kwargs={"use_reentrant": True})
    assert resolve_plan(given).training.use_reentrant is True
    assert plan("5.24.0").origins["training.gradient_checkpointing_kwargs.use_reentrant"] == (
        "default of transformers 5.24.0: true before 5.0, false from 5.0")
