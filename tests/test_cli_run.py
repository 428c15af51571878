"""`python -m sim run` end to end: every scenario file, the JSON contract, the plot, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim import cli
from sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
RESULT_KEYS = {"schema_version", "scenario", "model", "hardware", "fits", "peak", "phase_peaks", "breakdown_at_peak",
               "model_states_bytes", "fragmentation", "oom", "deficit_bytes", "step_time_s", "tokens_per_s", "mfu",
               "events", "stream_busy_share", "non_pytorch", "allocator", "max_memory", "settings",
               "ignored_keys", "allocated_peak", "headroom_bytes", "host",
               "device_clock"}  # schema 1 plus additive keys (docs/scenarios.md)
PEAK_KEYS = {"total_bytes", "reserved_bytes", "allocated_bytes", "non_pytorch_bytes", "time_s", "step",
             "micro_batch", "phase", "layer", "op"}
SMALL = ["--set", "model.num_hidden_layers=2", "--set", "training.gradient_accumulation_steps=2"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_every_scenario_runs(scenario: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    assert main(["run", str(scenario), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict" in printed and "peak at" in printed
    result = json.loads(out.read_text())
    assert set(result) == RESULT_KEYS
    assert set(result["peak"]) == PEAK_KEYS
    assert set(result["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert sum(result["breakdown_at_peak"].values()) == result["peak"]["allocated_bytes"]
    assert result["fits"] == (result["peak"]["total_bytes"] <= result["hardware"]["capacity_bytes"])
    assert 0 < result["mfu"] < 1 and result["step_time_s"] > 0
    # torch's two maxima and what nvidia-smi would show: allocated <= reserved <= device used, which is the peak's
    # total and decides the OOM; on a GPU the CUDA context alone makes device used larger than reserved
    most = result["max_memory"]
    assert most["allocated_bytes"] <= most["reserved_bytes"] < most["device_used_bytes"] == result["peak"]["total_bytes"]
    assert most["reserved_bytes"] >= result["peak"]["reserved_bytes"] and most["decides_oom"] == "device_used_bytes"
    assert "device used" in printed and "decides the OOM" in printed


def test_lora_scenario_parameters(tmp_path: Path, capsys) -> None:
    # Qwen1.5-7B LoRA r=64 on all seven linear layers: per layer r·(in + out) for q, k, v, o (4096 + 4096 each)
    # and gate, up, down (4096 + 11008 each): 64·(4·8192 + 3·15104) = 4,997,120; × 32 layers.
    out = tmp_path / "r.json"
    assert main(["run", str(ROOT / "scenarios/qwen7b_lora_1xa100.yaml"), *SMALL[2:], "--json", str(out)]) == 0
    model = json.loads(out.read_text())["model"]
    assert model["trainable_parameters"] == 32 * 4_997_120 == 159_907_840
    assert model["parameters"] == 7_721_324_544 + 159_907_840


def test_plot_is_a_png(tmp_path: Path, capsys) -> None:
    png = tmp_path / "memory.png"
    assert main(["run", str(ROOT / "scenarios/qwen7b_lora_1xa100.yaml"), *SMALL, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fail_on_oom_exit_code(capsys) -> None:
    args = ["run", str(ROOT / "scenarios/qwen7b_lora_1xa100.yaml"), *SMALL, "--set",
            "hardware.device=a100-sxm4-40gb", "--set", "hardware.device.capacity_bytes=2000000000"]
    assert main(args) == 0
    assert "OUT OF MEMORY" in capsys.readouterr().out
    assert main([*args, "--fail-on-oom"]) == 1


def test_oom_names_the_failing_op(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    main(["run", str(ROOT / "scenarios/qwen7b_lora_1xa100.yaml"), *SMALL, "--set",
          "hardware.device.capacity_bytes=4000000000", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["fits"] is False and result["oom"] is not None
    assert result["deficit_bytes"] == result["peak"]["total_bytes"] - 4_000_000_000
    assert result["oom"]["op"] and result["oom"]["phase"] in {"forward", "backward", "recompute", "optimizer"}


def test_catalog_lists_models_and_hardware() -> None:
    done = subprocess.run([sys.executable, "-m", "sim", "catalog"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    assert "qwen1.5-32b" in done.stdout and "a800-sxm4-80gb" in done.stdout


def test_version_prints_the_package_version() -> None:
    out = subprocess.run([sys.executable, "-m", "sim", "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == "sim 0.1.0\n"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    assert cli.console([]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n" and captured.out == ""


def test_an_interrupted_run_writes_no_output_file(monkeypatch, tmp_path: Path) -> None:
    # Ctrl-C while the JSON is being written (after the run): the atomic write leaves neither the file nor its temp
    import os as os_module

    def interrupted_fdopen(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os_module, "fdopen", interrupted_fdopen)
    out = tmp_path / "result.json"
    assert cli.console(["run", str(SCENARIOS[0]), *SMALL, "--json", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_quietly() -> None:
    # `python -m sim run S | head -1` where head has gone before the summary is printed: no BrokenPipeError
    # traceback, exit 0
    run = subprocess.Popen([sys.executable, "-m", "sim", "run", str(SCENARIOS[0]), *SMALL], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=ROOT)
    run.stdout.close()
    assert run.wait(timeout=120) == 0 and run.stderr.read() == b""


def test_an_empty_output_path_is_refused_before_the_run(capsys) -> None:
    assert main(["run", str(SCENARIOS[0]), "--json", ""]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --json: empty path\n" and captured.out == ""


def test_json_to_stdout_is_written_in_place() -> None:
    # /dev/stdout is not a regular file: no temporary file beside it, the JSON goes down the pipe, then the summary
    out = subprocess.run([sys.executable, "-m", "sim", "run", str(SCENARIOS[0]), *SMALL, "--json", "/dev/stdout"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    result, end = json.JSONDecoder().raw_decode(out.stdout)
    assert result["fits"] in (True, False) and "verdict" in out.stdout[end:]


def test_a_bare_command_prints_the_usage(capsys) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m sim") and err.count("\n") == 1 and err.startswith("error: give a command")


def test_every_option_of_every_command_has_help() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # argparse keeps subparsers here
    for name, command in commands.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest}"
