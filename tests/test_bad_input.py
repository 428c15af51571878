"""Bad input never gives a traceback: one line `error: ...` on stderr naming the key path and the value, exit 2.

design.md §3 (last paragraph) and §5. Most cases fail while the scenario loads and go through `sim.cli.main`
in-process; a handful run `python -m sim` end to end. Anything that simulates uses a tiny inline model.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sim import catalog, cli
from sim.scenario import build_scenario

ROOT = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2

# A tiny inline model: loads and simulates in well under a second.
TINY_MODEL = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
}

# The same tiny model applied to a catalog scenario through --set (design.md §3: edits the resolved entry).
TINY_SETS = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_attention_heads=4", "model.num_key_value_heads=4", "model.vocab_size=1000",
    "training.seq_len=32", "training.gradient_accumulation_steps=2",
]


def tiny_scenario(**changes) -> dict:
    """A valid one-GPU scenario; keyword arguments replace (or, with value None, drop) top-level sections."""
    data = {
        "name": "tiny",
        "model": dict(TINY_MODEL),
        "hardware": {"device": "a100-sxm4-80gb", "gpus_per_node": 1, "nodes": 1},
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "seq_len": 32},
        "allocator": {"backend": "exact"},
        "simulation": {"steps": 1},
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_training(**fields) -> dict:
    training = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "seq_len": 32}
    training.update(fields)
    return tiny_scenario(training=training)


def with_model(**fields) -> dict:
    return tiny_scenario(model={**TINY_MODEL, **fields})


def with_hardware(**fields) -> dict:
    return tiny_scenario(hardware={"device": "a100-sxm4-80gb", "gpus_per_node": 1, "nodes": 1, **fields})


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """sim.cli.main in-process; argparse errors (SystemExit) count as an exit code too."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str) -> str:
    """Exit 2, nothing on stdout, exactly one line `error: ...` on stderr, no traceback; returns the message."""
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == EXIT_BAD_INPUT, (code, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def assert_mentions(message: str, *needles: str) -> None:
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sim", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


# --------------------------------------------------------------------------------------------------------------
# Bad scenario files: (id, scenario mapping, substrings the one-line message must contain)

BAD_SCENARIOS = [
    # unknown keys
    ("unknown-top-level-key", tiny_scenario(bogus_section=1), ["bogus_section", "unknown key"]),
    ("unknown-training-key", with_training(learning_rat=1e-4), ["training.learning_rat", "unknown key"]),
    ("unknown-lora-key", tiny_scenario(lora={"r": 8, "lora_alfa": 16}), ["lora.lora_alfa", "unknown key"]),
    (
        "unknown-zero-key",
        tiny_scenario(deepspeed={"zero_optimization": {"stage": 0, "stage3_bogus": 1}}),
        ["deepspeed.zero_optimization.stage3_bogus", "unknown key"],
    ),
    ("unknown-hardware-key", with_hardware(gpu_per_node=1), ["hardware.gpu_per_node", "unknown key"]),
    (
        "unknown-inline-device-key",
        tiny_scenario(hardware={"device": {"name": "x", "capacity_bytes": 10**9, "peak_flops": {"bf16": 1e12},
                                           "hbm_bytes_per_s": 1e12, "bogus_field": 1}}),
        ["hardware.device.bogus_field", "unknown key"],
    ),
    # wrong types
    ("seq_len-string", with_training(seq_len="long"), ["training.seq_len", "'long'"]),
    ("seq_len-fraction", with_training(seq_len=32.5), ["training.seq_len", "32.5"]),
    ("bf16-list", with_training(bf16=[1]), ["training.bf16", "[1]"]),
    ("gpus_per_node-string", with_hardware(gpus_per_node="x"), ["hardware.gpus_per_node", "'x'"]),
    ("training-not-a-mapping", tiny_scenario(training=[1]), ["training", "[1]"]),
    ("hardware-not-a-mapping", tiny_scenario(hardware=[1]), ["hardware", "[1]"]),
    ("deepspeed-not-a-mapping", tiny_scenario(deepspeed=[1]), ["deepspeed", "[1]"]),
    ("model-not-a-name", tiny_scenario(model=5), ["model", "5"]),
    ("model_type-unknown", with_model(model_type="gpt2"), ["model.model_type", "'gpt2'"]),
    # impossible shapes
    ("hidden-not-divisible-by-heads", with_model(hidden_size=66), ["model", "hidden_size", "66", "num_attention_heads"]),
    ("heads-not-divisible-by-kv-heads", with_model(num_key_value_heads=3),
     ["model", "num_attention_heads", "num_key_value_heads", "3"]),
    # zero and negative sizes
    ("seq_len-zero", with_training(seq_len=0), ["training.seq_len", "0"]),
    ("batch-negative", with_training(per_device_train_batch_size=-1), ["training.per_device_train_batch_size", "-1"]),
    ("layers-negative", with_model(num_hidden_layers=-2), ["model.num_hidden_layers", "-2"]),
    ("lora-r-zero", tiny_scenario(lora={"r": 0}), ["lora.r", "0"]),
    ("steps-zero", tiny_scenario(simulation={"steps": 0}), ["simulation.steps", "0"]),
    # catalog names
    ("unknown-model-name", tiny_scenario(model="no-such-model-7b"), ["model", "'no-such-model-7b'"]),
    ("unknown-device-name", with_hardware(device="no-such-gpu"), ["hardware.device", "'no-such-gpu'"]),
    # missing sections
    ("missing-model", tiny_scenario(model=None), ["model", "missing"]),
    ("missing-hardware", tiny_scenario(hardware=None), ["hardware", "missing"]),
    ("missing-training", tiny_scenario(training=None), ["training", "missing"]),
    ("missing-seq_len", tiny_scenario(training={"per_device_train_batch_size": 1}), ["training.seq_len", "missing"]),
    # contradictions and values that are not modelled
    ("bf16-and-fp16", with_training(bf16=True, fp16=True), ["training", "bf16", "fp16"]),
    ("attn-flash", with_training(attn_implementation="flash"), ["training.attn_implementation", "'flash'"]),
    ("optim-adafactor", with_training(optim="adafactor"), ["training.optim", "'adafactor'"]),
    ("allocator-backend", tiny_scenario(allocator={"backend": "weird"}), ["allocator.backend", "'weird'"]),
    ("seq_len-alias-conflict", with_training(seq_len=32, cutoff_len=64), ["training.cutoff_len", "64", "32"]),
    # refused at run time: not simulated rather than simulated wrongly
]


@pytest.mark.parametrize("data,needles", [c[1:] for c in BAD_SCENARIOS], ids=[c[0] for c in BAD_SCENARIOS])
def test_bad_scenario_is_one_line_error(tmp_path, capsys, data, needles):
    scenario = write_yaml(tmp_path / "bad.yaml", data)
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, *needles)


def test_bool_is_not_a_size(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "bad.yaml", with_training(seq_len=True))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "training.seq_len", "True")


# --------------------------------------------------------------------------------------------------------------
# Not modelled yet: refused with exit 2 and a clear message, never simulated

NOT_MODELLED = re.compile(r"not (yet )?(modell?ed|supported|simulated)", re.IGNORECASE)


def test_unknown_strategy_is_refused(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "strategy.yaml", tiny_scenario(strategies=[{"kind": "magic"}]))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "strategies", "magic")


@pytest.mark.parametrize("zero", [
    {"stage": 3, "offload_optimizer": {"device": "nvme"}},  # only cpu offload is modelled
    {"stage": 2, "offload_param": {"device": "cpu"}},  # parameter offload only with stage 3
    {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},  # partial offload
])
def test_unmodelled_offload_is_refused(tmp_path, capsys, zero):
    scenario = write_yaml(tmp_path / "zero.yaml", tiny_scenario(deepspeed={"zero_optimization": zero}))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    key = next(k for k in zero if k.startswith("offload"))
    assert_mentions(message, f"deepspeed.zero_optimization.{key}")
    assert NOT_MODELLED.search(message), message


@pytest.mark.parametrize(("deepspeed", "software", "key", "value"), [
    # DeepSpeed 0.14.0 spells bf16 "bfp16" (runtime/config.py get_communication_data_type), 0.14.1 on "bf16"
    ({"communication_data_type": "bf16"}, "0.14.0", "deepspeed.communication_data_type", "'bf16'"),
    ({"communication_data_type": "bfp16"}, "0.15.0", "deepspeed.communication_data_type", "'bfp16'"),
    ({"communication_data_type": 16}, "0.14.0", "deepspeed.communication_data_type", "16"),
])
def test_bad_communication_data_type(tmp_path, capsys, deepspeed, software, key, value):
    data = tiny_scenario(deepspeed={"zero_optimization": {"stage": 3}, **deepspeed},
                         software={"deepspeed": software})
    data["hardware"]["gpus_per_node"] = 2
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, key, value)


def test_unmodelled_reduction_without_reduce_scatter_is_refused(tmp_path, capsys):
    data = tiny_scenario(deepspeed={"zero_optimization": {"stage": 2, "reduce_scatter": False}})
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, "deepspeed.zero_optimization.reduce_scatter", "false")
    assert NOT_MODELLED.search(message), message


def test_unmodelled_gradient_accumulation_dtype_is_refused(tmp_path, capsys):
    # bf16 model, fp32 accumulation: DeepSpeed's BF16_Optimizer with ZeRO-1, fp32 partitions with ZeRO-3
    data = tiny_scenario(deepspeed={"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                                    "data_types": {"grad_accum_dtype": "fp32"}})
    data["training"]["bf16"] = True  # HF's Trainer requires bf16.enabled to match TrainingArguments.bf16
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, "deepspeed.data_types.grad_accum_dtype", "'fp32'")
    assert NOT_MODELLED.search(message), message


# --------------------------------------------------------------------------------------------------------------
# Files: missing, malformed, not a mapping


def test_missing_scenario_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    message = assert_one_line_error(*run_main(capsys, ["run", str(missing)]))
    assert_mentions(message, "scenario", str(missing))


def test_missing_model_config_json(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "s.yaml", tiny_scenario(model="nowhere/config.json"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "model", "nowhere/config.json")


def test_missing_deepspeed_json(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "s.yaml", tiny_scenario(deepspeed="nowhere/ds_config.json"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "deepspeed", "nowhere/ds_config.json")


def test_broken_yaml_scenario(tmp_path, capsys):
    scenario = tmp_path / "broken.yaml"
    scenario.write_text("name: broken\ntraining: [unclosed\n")
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "scenario", "broken.yaml")
    assert re.search(r"line \d+", message), message


def test_broken_model_config_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 4096,')
    scenario = write_yaml(tmp_path / "s.yaml", tiny_scenario(model=str(config)))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "model", "config.json")


def test_broken_deepspeed_json(tmp_path, capsys):
    ds = tmp_path / "ds_config.json"
    ds.write_text('{"zero_optimization": {"stage": 3,')
    scenario = write_yaml(tmp_path / "s.yaml", tiny_scenario(deepspeed=str(ds)))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "deepspeed", "ds_config.json")


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("", None), ("just a string\n", "str")],
                         ids=["list", "empty", "string"])
def test_scenario_top_level_not_a_mapping(tmp_path, capsys, text, kind):
    scenario = tmp_path / "notmap.yaml"
    scenario.write_text(text)
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "scenario", "mapping")
    if kind:
        assert_mentions(message, kind)


def test_model_config_json_not_a_mapping(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text("[1, 2, 3]")
    scenario = write_yaml(tmp_path / "s.yaml", tiny_scenario(model=str(config)))
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario)]))
    assert_mentions(message, "model", "mapping")


# --------------------------------------------------------------------------------------------------------------
# --set

BAD_SETS = [
    ("no-equals", ["training.seq_len"], ["--set", "'training.seq_len'", "KEY=VALUE"]),
    ("empty-key", ["=3"], ["--set", "KEY=VALUE"]),
    ("unknown-top-key", ["trainer.seq_len=5"], ["--set trainer.seq_len", "'trainer'"]),
    ("unknown-model-key", ["model.not_a_key=3"], ["--set model.not_a_key", "not_a_key"]),
    ("not-a-yaml-scalar", ["training.seq_len=[1,"], ["--set training.seq_len", "'[1,'"]),
    ("below-a-scalar", ["training.seq_len.x=1"], ["--set training.seq_len.x", "training.seq_len"]),
    ("hidden-size-zero", ["model.hidden_size=0"], ["model.hidden_size", "0"]),
    ("seq_len-string", ["training.seq_len=long"], ["training.seq_len", "'long'"]),
    ("unknown-model-name", ["model=no-such-model"], ["model", "'no-such-model'"]),
    ("unknown-device-name", ["hardware.device=no-such-gpu"], ["hardware.device", "'no-such-gpu'"]),
    ("missing-deepspeed-file", ["deepspeed=nowhere.json"], ["deepspeed", "nowhere.json"]),
    ("training-scalar", ["training=5"], ["training", "5"]),
]


@pytest.mark.parametrize("sets,needles", [c[1:] for c in BAD_SETS], ids=[c[0] for c in BAD_SETS])
def test_bad_set_is_one_line_error(tmp_path, capsys, sets, needles):
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    argv = ["run", str(scenario)]
    for item in sets:
        argv += ["--set", item]
    message = assert_one_line_error(*run_main(capsys, argv))
    assert_mentions(message, *needles)


def test_set_hidden_size_zero_on_catalog_scenario(capsys):
    """The brief's own case: `--set model.hidden_size=0` on the shipped scenario (catalog model)."""
    argv = ["run", str(ROOT / "scenarios" / "qwen7b_lora_1xa100.yaml"), "--set", "model.hidden_size=0"]
    message = assert_one_line_error(*run_main(capsys, argv))
    assert_mentions(message, "model.hidden_size", "0")


# --------------------------------------------------------------------------------------------------------------
# Usage errors from argparse: same shape


@pytest.mark.parametrize(
    "argv", [["run"], ["frobnicate"], ["run", "x.yaml", "--bogus"], ["catalog", "things"]],
    ids=["run-without-scenario", "unknown-command", "unknown-option", "catalog-bad-kind"],
)  # a bare command prints the usage instead (issue #17; tests/test_cli_run.py)
def test_usage_errors(capsys, argv):
    assert_one_line_error(*run_main(capsys, argv))


# --------------------------------------------------------------------------------------------------------------
# Output files: nothing half-written


def test_json_into_missing_directory(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    target = tmp_path / "no" / "such" / "dir" / "out.json"
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario), "--json", str(target)]))
    assert_mentions(message, str(target.parent))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ok.yaml"]


def test_plot_into_missing_directory_writes_no_json(tmp_path, capsys):
    """--json to an existing directory, --plot to a missing one: refused before anything is written."""
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", str(scenario), "--json", str(out / "r.json"), "--plot", str(tmp_path / "missing" / "p.png")]
    message = assert_one_line_error(*run_main(capsys, argv))
    assert_mentions(message, str(tmp_path / "missing"))
    assert list(out.iterdir()) == []
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "data",
    [
        with_training(seq_len="long"),  # fails while loading
        tiny_scenario(strategies=[{"kind": "magic"}]),  # loads, refused before simulating
        tiny_scenario(deepspeed={"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
    ],
    ids=["load-error", "strategy", "offload"],
)
def test_error_leaves_output_directory_empty(tmp_path, capsys, data):
    scenario = write_yaml(tmp_path / "s.yaml", data)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", str(scenario), "--json", str(out / "result.json"), "--plot", str(out / "timeline.png")]
    assert_one_line_error(*run_main(capsys, argv))
    assert list(out.iterdir()) == []  # no result, no plot, no leftover temporary file


def test_json_written_on_success(tmp_path, capsys):
    """Control for the tests above: the same tiny scenario does run and write its --json."""
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_main(capsys, ["run", str(scenario), "--json", str(out / "result.json")])
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["result.json"]
    assert json.loads((out / "result.json").read_text())["schema_version"] == 1


def test_json_path_is_a_directory(tmp_path, capsys):
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    target = tmp_path / "out"
    target.mkdir()
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario), "--json", str(target)]))
    assert_mentions(message, str(target))
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.yaml", "out"]


def test_plot_of_valid_run(tmp_path):
    """Control: --json and --plot of a run that fits both get written, no traceback."""
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    proc = run_cli("run", str(scenario), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.json").is_file() and (tmp_path / "p.png").is_file()


# --------------------------------------------------------------------------------------------------------------
# End to end through `python -m sim`: exit status, exactly one stderr line, no traceback, empty stdout


def assert_cli_one_line_error(proc: subprocess.CompletedProcess) -> str:
    return assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)


def test_e2e_unknown_key(tmp_path):
    scenario = write_yaml(tmp_path / "s.yaml", with_training(seq_lenn=32))
    message = assert_cli_one_line_error(run_cli("run", str(scenario)))
    assert_mentions(message, "training.seq_lenn")


def test_e2e_wrong_type(tmp_path):
    scenario = write_yaml(tmp_path / "s.yaml", with_training(seq_len="long"))
    message = assert_cli_one_line_error(run_cli("run", str(scenario)))
    assert_mentions(message, "training.seq_len", "'long'")


def test_e2e_broken_yaml(tmp_path):
    scenario = tmp_path / "broken.yaml"
    scenario.write_text("training: [unclosed\n")
    message = assert_cli_one_line_error(run_cli("run", str(scenario)))
    assert_mentions(message, "broken.yaml")


def test_e2e_missing_scenario(tmp_path):
    message = assert_cli_one_line_error(run_cli("run", str(tmp_path / "missing.yaml")))
    assert_mentions(message, "missing.yaml")


def test_e2e_bad_set_on_shipped_scenario():
    proc = run_cli("run", "scenarios/qwen7b_lora_1xa100.yaml", *sum((["--set", s] for s in TINY_SETS), []),
                   "--set", "model.not_a_key=3")
    message = assert_cli_one_line_error(proc)
    assert_mentions(message, "model.not_a_key")


def test_e2e_offload_refused():
    proc = run_cli("run", "scenarios/qwen32b_8xa800.yaml", *sum((["--set", s] for s in TINY_SETS), []),
                   "--set", "deepspeed.zero_optimization.offload_optimizer.device=nvme")
    message = assert_cli_one_line_error(proc)
    assert NOT_MODELLED.search(message), message


def test_e2e_json_into_missing_directory(tmp_path):
    target = tmp_path / "nowhere" / "out.json"
    proc = run_cli("run", "scenarios/qwen7b_lora_1xa100.yaml", *sum((["--set", s] for s in TINY_SETS), []),
                   "--json", str(target))
    assert_cli_one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_e2e_usage_error():
    assert_cli_one_line_error(run_cli("run"))


def test_a_tensor_beyond_any_address_space_names_itself_and_the_shape_keys(tmp_path, capsys) -> None:
    # eager attention scores of the tiny model at 10^9 tokens: 1 · 4 heads · (10^9)^2 · 4 bytes (fp32) = 1.6e19
    # bytes, more than 2^62 = 4.6e18 (issue #19: an OverflowError deep in the engine before)
    path = write_yaml(tmp_path / "s.yaml", with_training(seq_len=10**9, attn_implementation="eager"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert_mentions(message, "a tensor of 1.600e+19 bytes, more than the 2^62 bytes", "training.seq_len (1000000000)",
                    "training.per_device_train_batch_size (1)")


def test_tensors_that_add_up_beyond_the_address_space_are_refused(tmp_path, capsys) -> None:
    # at 10^9 tokens each eager scores tensor is 1.6e19 bytes (too large alone); at 5·10^8, 1 · 4 · (5·10^8)^2 · 4
    # = 4e18 bytes, just under 2^62, but the run holds several of them (scores, softmax, its fp32 copy ...) and their
    # sum passes 2^62: the int64 byte counts of the traces could not hold the peak
    path = write_yaml(tmp_path / "s.yaml", with_training(seq_len=5 * 10**8, attn_implementation="eager"))
    message = assert_one_line_error(*run_main(capsys, ["run", str(path)]))
    assert_mentions(message, "the run's tensors add up to", "more than the 2^62 bytes", "training.seq_len (500000000)")


def test_a_far_out_of_memory_job_gets_its_deficit(tmp_path, capsys) -> None:
    # 4 · (2^20 tokens)^2 · 4 bytes = 16 TiB of eager scores on an 80 GiB device: an answer, not a crash
    path = write_yaml(tmp_path / "s.yaml", {**with_training(seq_len=2**20, attn_implementation="eager"),
                                           "allocator": {"backend": "caching"}})
    code, out, err = run_main(capsys, ["run", str(path)])
    assert code == 0 and err == "" and "OUT OF MEMORY" in out and "short by" in out


# --------------------------------------------------------------------------------------------------------------
# Numbers at the schema (issue #19 items 2 and 8): bounded by what is physical, finite, never a boolean

BOUNDS = [
    # 1e30 elements is past 2^62 (sim/errors.py MAX_TENSOR_BYTES): no device addresses a tensor that wide
    ("hidden-size-1e30", ["model.hidden_size=1e30"], ["model.hidden_size", "2^62", "1e30"]),
    ("lora-r-1e30", ["lora={r: 1e30, target_modules: [q_proj]}"], ["lora.r", "2^62", "1e30"]),
    ("bucket-1e20", ["deepspeed={zero_optimization: {stage: 2, reduce_bucket_size: 1e20}}"],
     ["deepspeed.zero_optimization.reduce_bucket_size", "2^62", "1e20"]),
    # 1e30 bytes against the 2^50-byte (1 PiB) bound on a device memory
    ("capacity-1e30", ["hardware.device.capacity_bytes=1e30"], ["hardware.device.capacity_bytes", "2^50", "1e30"]),
    # 1e6 layers x 64 x 128 = 8.2e9 < 2^62 runs; 1e15 x 64 x 128 = 8.2e18 > 2^62 = 4.6e18 is refused
    ("layers-past-2^62", ["model.num_hidden_layers=1e15"], ["model", "num_hidden_layers 1000000000000000", "2^62"]),
    ("weight-decay-inf", ["training.weight_decay=.inf"], ["training.weight_decay", "finite", "inf"]),
    ("lora-alpha-nan", ["lora={lora_alpha: .nan}"], ["lora.lora_alpha", "finite", "nan"]),
    ("lora-alpha-true", ["lora={lora_alpha: true}"], ["lora.lora_alpha", "boolean", "True"]),
    ("target-modules-empty", ["lora={target_modules: []}"], ["lora.target_modules", "PEFT", "[]"]),
    ("peak-flops-empty", ["hardware.device.peak_flops={}"], ["hardware.device.peak_flops", "at least 1"]),
    ("peak-flops-inf", ["hardware.device.peak_flops={bf16: .inf}"], ["hardware.device.peak_flops.bf16", "inf"]),
    ("peak-flops-1e19", ["hardware.device.peak_flops={bf16: 1.0e+19}"], ["hardware.device.peak_flops.bf16", "1e+19"]),
    ("hbm-tiny", ["hardware.device.hbm_bytes_per_s=1.0e-300"], ["hardware.device.hbm_bytes_per_s", "1e-300"]),
    ("latency-inf", ["hardware.device.inter_node_latency_us=.inf"], ["hardware.device.inter_node_latency_us", "inf"]),
    # 2^40 GPUs overflowed a C long in the run (OverflowError); 576 is the largest NVLink domain, 2^20 GPUs in all
    ("gpus-per-node-2^40", ["hardware.gpus_per_node=1099511627776"], ["hardware.gpus_per_node", "576"]),
    ("nodes-2^40", ["hardware.nodes=1099511627776"], ["hardware.nodes", "1099511627776", "2^20"]),
    ("data-types-list", ["deepspeed={zero_optimization: {stage: 2}, data_types: [fp32]}"],
     ["deepspeed.data_types", "mapping", "['fp32']"]),
]


@pytest.mark.parametrize("sets,needles", [c[1:] for c in BOUNDS], ids=[c[0] for c in BOUNDS])
def test_impossible_number_is_one_line_error(tmp_path, capsys, sets, needles):
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario(
        hardware={"device": dict(catalog.load_entry("hardware", "a100-sxm4-80gb", "hardware.device"))}))
    argv = ["run", str(scenario)]
    for item in sets:
        argv += ["--set", item]
    message = assert_one_line_error(*run_main(capsys, argv))
    assert_mentions(message, *needles)


def test_unused_deepspeed_version_is_listed_as_ignored():
    """`software.deepspeed` with no deepspeed section changes nothing: listed, not silently accepted."""
    scenario = build_scenario(tiny_scenario(software={"deepspeed": "0.14.0"}))
    assert [(k.path, k.value) for k in scenario.ignored_keys] == [("software.deepspeed", "0.14.0")]
    with_section = build_scenario(tiny_scenario(software={"deepspeed": "0.14.0"},
                                                deepspeed={"zero_optimization": {"stage": 2}}))
    assert "software.deepspeed" not in [k.path for k in with_section.ignored_keys]


def test_argument_with_control_characters_is_one_line(capsys):
    """Found by bench/fuzz.py: argparse echoed an unrecognized argument holding \\r and \\v, breaking the line."""
    message = assert_one_line_error(*run_main(capsys, ["run", "s.yaml", "a\rb\x0bc"]))
    assert_mentions(message, "unrecognized arguments", "a\\rb\\x0bc")


def test_set_key_with_control_characters_is_one_line(tmp_path, capsys):
    """`--set` names the key it refuses as typed: its \\r is escaped, not a line break."""
    scenario = write_yaml(tmp_path / "ok.yaml", tiny_scenario())
    message = assert_one_line_error(*run_main(capsys, ["run", str(scenario), "--set", "a\rb=1"]))
    assert_mentions(message, "--set a\\rb")
