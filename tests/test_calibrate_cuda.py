"""The CUDA calibration on the CPU (sim/calibrate_cuda.py, sim/calibrate_cuda_child.py): all that needs no GPU.

The configurations' scenarios, the command line without CUDA, the comparison and its formatting from a recorded
measurement (a hand-written fixture, not data), and the child's phase bounding through a substitute probe.
"""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sim import calibrate_cuda as cc
from sim import calibrate_cuda_child as child
from sim.cli import main
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from sim.versions import nearest_release
from sim.vocab import AttnImplementation, DType, ModelType

H100 = {"name": "NVIDIA H100 80GB HBM3", "total_bytes": 85_520_809_984, "context_bytes": 524_288_000}
VERSIONS = {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "driver": "580.159.04",
            "transformers": "5.17.0", "peft": "0.18.0"}


@functools.cache
def _gpu_here() -> bool:
    """Whether this machine can run the measured side (a child asks torch; these tests are for machines without)."""
    return cc.cuda_unavailable_reason() is None


# ---- configurations and their scenarios -----------------------------------------------------------------------
@pytest.mark.parametrize("config", cc.CUDA_CONFIGS, ids=lambda c: c.name)
def test_every_configuration_is_a_scenario_the_simulator_runs(config):
    """Each configuration simulates on the H100 entry; its parameter counts are the simulator's."""
    result = summarize(run_scenario(build_scenario(cc.scenario_mapping(config, VERSIONS, H100))))
    assert result["hardware"]["device"] == "h100-sxm-80gb"
    assert result["model"]["parameters"] == config.parameters() + config.lora_parameters()
    trainable = config.lora_parameters() if config.lora_r else config.parameters()
    assert result["model"]["trainable_parameters"] == trainable
    most = result["max_memory"]
    assert most["device_used_bytes"] > most["reserved_bytes"] >= most["allocated_bytes"] > config.model_states_bytes()
    for phase in cc.PHASES:
        peaks = result["phase_peaks"][phase]
        assert most["reserved_bytes"] >= peaks["reserved_bytes"] >= peaks["allocated_bytes"] > 0


def test_configurations_cover_the_issue_and_fit_ten_minutes():
    """Qwen2/Llama/Qwen1 widths up to ~1.5B, seq 512–8192, every attention, LoRA with dropout, checkpointing,
    bf16 weights and fp32 weights under autocast; the whole set estimated under ten minutes on one H100."""
    configs = cc.CUDA_CONFIGS
    assert len({c.name for c in configs}) == len(configs)
    assert {c.attn for c in configs} == set(AttnImplementation)
    assert {c.model_type for c in configs} >= {ModelType.QWEN2, ModelType.LLAMA, ModelType.MISTRAL}
    assert any(c.lora_r and c.lora_dropout > 0 for c in configs)
    assert any(c.gc for c in configs) and any(c.weights is DType.BFLOAT16 for c in configs)
    assert any(c.weights is DType.FLOAT32 and c.bf16 and c.parameters() > 1e9 for c in configs)
    large = [c for c in configs if c.parameters() > 1e8]
    assert min(c.seq for c in large) == 512 and max(c.seq for c in large) == 8192
    assert 1.4e9 < max(c.parameters() for c in configs) < 1.6e9
    assert sum(c.estimated_s() for c in configs) < 600


def test_parameter_count_hand_derived():
    """Qwen1.5-0.5B: embeddings 151,936 × 1,024 = 155,582,464 (tied); per layer q/k/v/o 4 × 1,024² = 4,194,304
    + biases 3 × 1,024 = 3,072, MLP 3 × 1,024 × 2,816 = 8,650,752, norms 2,048: 12,850,176; × 24 = 308,404,224;
    final norm 1,024: 463,987,712, the published 0.46 B."""
    assert cc.config_by_name("q05_sdpa_2k").parameters() == 463_987_712


@pytest.mark.parametrize(("name", "total_bytes", "entry"), [
    ("NVIDIA H100 80GB HBM3", 85_520_809_984, "h100-sxm-80gb"),
    ("NVIDIA H200", 150_754_820_096, "h200-sxm-141gb"),
    ("NVIDIA A100-SXM4-80GB", 85_097_971_712, "a100-sxm4-80gb"),
    ("NVIDIA A100-SXM4-40GB", 42_505_273_344, None),
    ("NVIDIA L4", 23_580_639_232, None),
])
def test_catalog_device_by_measured_name(name, total_bytes, entry):
    """H100, H200 and the 80 GB A100 have catalog entries; other GPUs (a 40 GB A100, an L4) none."""
    assert cc.catalog_device(name, total_bytes) == entry


def test_unknown_gpu_is_an_inline_device_with_the_measured_memory():
    """A GPU without a catalog entry simulates as an inline device carrying the measured context."""
    device = {"name": "NVIDIA L4", "total_bytes": 23_580_639_232, "context_bytes": 300 << 20}
    simulated = cc.simulate(cc.config_by_name("tiny_base"), VERSIONS, device)
    assert simulated["device"] == "NVIDIA L4"
    assert simulated["non_pytorch_bytes"] == 300 << 20  # the measured context is the device's


def test_config_json_round_trip():
    """The JSON form of every configuration reads back to the same configuration (enums included)."""
    for config in cc.CUDA_CONFIGS:
        assert cc.config_from_json(json.loads(json.dumps(cc.config_to_json(config)))) == config


# ---- the command line without CUDA ----------------------------------------------------------------------------
def test_list_needs_no_torch_and_no_gpu():
    """--list runs in a fresh interpreter that never imports torch."""
    code = ("import sys; from sim.cli import main; rc = main(['calibrate', '--device', 'cuda', '--list']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    for config in cc.CUDA_CONFIGS:
        assert f"\n{config.name} " in proc.stdout
    assert "estimated" in proc.stdout.splitlines()[-1]


def test_cuda_without_cuda_is_one_line_exit_2(capsys):
    """On this CPU-only machine (torch a CPU build, or not installed) the command refuses in one line."""
    if _gpu_here():
        pytest.skip("a CUDA GPU is here")
    assert main(["calibrate", "--device", "cuda", "--config", "tiny_base"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: calibrate --device cuda: ")


@pytest.mark.parametrize("argv", [
    ["calibrate", "--snapshot-dir", "."],
    ["calibrate", "--measurements", "x.json"],
    ["calibrate", "--device", "cuda", "--ci"],
    ["calibrate", "--device", "cuda", "--config", "nope"],
    ["calibrate", "--device", "cuda", "--measure-only", "--measurements", "x.json"],
    ["calibrate", "--device", "cuda", "--snapshot-dir", ".", "--measurements", "x.json"],
    ["calibrate", "--device", "cuda", "--measurements", "does-not-exist.json"],
])
def test_bad_options_are_one_line_exit_2(argv, capsys):
    """Options of the other device, an unknown configuration, conflicting or missing inputs: one line, exit 2."""
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---- comparison and formatting from a recorded measurement ----------------------------------------------------
def _phase(start: int, most: int, used: int) -> dict:
    """A recorded phase starting at `start` bytes, peaking at `most` (reserved 2 MiB above), `used` at its end."""
    return {"start_allocated_bytes": start, "start_reserved_bytes": start, "max_allocated_bytes": most,
            "max_reserved_bytes": most + (2 << 20), "end_allocated_bytes": start, "end_reserved_bytes": most,
            "end_device_used_bytes": used, "alloc_retries": 0}


def _fixture_rows() -> list[dict]:
    """A hand-written recording: tiny_base measured (round numbers, not a real measurement) and q05_fa2_2k skipped."""
    phases = {"build": _phase(0, 1 << 20, 600 << 20), "inputs": _phase(1 << 20, 1 << 20, 600 << 20),
              "forward": _phase(1 << 20, 40 << 20, 650 << 20), "backward": _phase(2 << 20, 70 << 20, 680 << 20),
              "optimizer": _phase(2 << 20, 72 << 20, 690 << 20)}
    measured = {"status": "measured", "device": H100, "versions": VERSIONS, "phases": phases, "loss": 6.94,
                "end_non_pytorch_bytes": 600 << 20, "wall_s": 9.5, **child.overall(phases)}
    skipped = {"status": "skipped", "reason": "flash_attention_2 needs the flash-attn package, which is not installed",
               "device": H100, "versions": VERSIONS, "wall_s": 6.0}
    return [{"config": cc.config_to_json(cc.config_by_name(n)), "measured": m}
            for n, m in (("tiny_base", measured), ("q05_fa2_2k", skipped))]


def test_overall_takes_the_largest_phase():
    """The run's maxima are the largest of its phases', build and inputs included."""
    measured = _fixture_rows()[0]["measured"]
    assert measured["max_allocated_bytes"] == 72 << 20 and measured["max_reserved_bytes"] == 74 << 20
    assert measured["max_device_used_bytes"] == 690 << 20 and measured["alloc_retries"] == 0


def test_compare_from_recorded_measurements(tmp_path, capsys):
    """--measurements re-simulates a recorded JSON: errors are (simulated − measured) / measured, skipped rows
    keep their reason, and the markdown names the versions and the device."""
    recorded = tmp_path / "measured.json"
    recorded.write_text(json.dumps(_fixture_rows()))
    out_json, out_md = tmp_path / "rows.json", tmp_path / "table.md"
    assert main(["calibrate", "--device", "cuda", "--measurements", str(recorded), "--json", str(out_json),
                 "--markdown", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["config"]["name"] for r in rows] == ["tiny_base", "q05_fa2_2k"]
    base, skipped = rows
    simulated = cc.simulate(cc.config_by_name("tiny_base"), VERSIONS, H100)
    assert base["simulated"] == simulated
    forward = simulated["phases"]["forward"]["allocated_bytes"]
    assert math.isclose(base["errors"]["forward"]["allocated"], (forward - (40 << 20)) / (40 << 20))
    used = simulated["device_used_bytes"]
    assert math.isclose(base["errors"]["max"]["device_used"], (used - (690 << 20)) / (690 << 20))
    assert "simulated" not in skipped and skipped["measured"]["status"] == "skipped"
    table = capsys.readouterr().out
    assert f"| tiny_base | 40.00 / {forward / 2**20:,.2f} (" in table
    assert "| q05_fa2_2k | skipped: flash_attention_2 needs the flash-attn package" in table
    markdown = out_md.read_text()
    assert "torch 2.11.0+cu130" in markdown and "driver 580.159.04" in markdown
    assert "NVIDIA H100 80GB HBM3" in markdown and "--measurements" in markdown
    assert "| tiny_base | CPU base shape |" in markdown and "| 500.00 | 600.00 |" in markdown


def test_measurements_of_one_configuration(tmp_path, capsys):
    """--config picks rows of a recorded JSON; a configuration it does not hold is one line, exit 2."""
    recorded = tmp_path / "measured.json"
    recorded.write_text(json.dumps(_fixture_rows()))
    assert main(["calibrate", "--device", "cuda", "--measurements", str(recorded), "--config", "q05_fa2_2k"]) == 0
    assert "tiny_base" not in capsys.readouterr().out
    assert main(["calibrate", "--device", "cuda", "--measurements", str(recorded), "--config", "q15_gc_4k"]) == 2


# ---- the child's phase bounding, through a substitute probe ---------------------------------------------------
class ScriptedProbe:
    """A MemoryProbe on the CPU: logs every call; the k-th stats() reports allocated 10k, reserved 10k+1,
    peaks 10k+5 / 10k+6, k retries; device used 1000 + k."""

    device_type = "cpu"

    def __init__(self) -> None:
        """An empty log."""
        self.log: list[str] = []
        self.calls = 0

    def synchronize(self) -> None:
        """Log it."""
        self.log.append("sync")

    def reset_peak(self) -> None:
        """Log it."""
        self.log.append("reset")

    def stats(self) -> dict[str, int]:
        """The next scripted statistics."""
        self.calls += 1
        self.log.append("stats")
        k = self.calls
        return {"allocated": 10 * k, "reserved": 10 * k + 1, "max_allocated": 10 * k + 5,
                "max_reserved": 10 * k + 6, "alloc_retries": k}

    def device_used_bytes(self) -> int:
        """1000 + the number of stats calls so far."""
        self.log.append("used")
        return 1000 + self.calls


def test_phase_recorder_reads_at_entry_and_exit():
    """Entry: synchronise, reset the peaks, read the start; exit: synchronise, read the peaks, then the device use."""
    probe = ScriptedProbe()
    recorder = child.PhaseRecorder(probe)
    with recorder.phase("forward"):
        probe.log.append("work")
    assert probe.log == ["sync", "reset", "stats", "work", "sync", "stats", "used"]
    assert recorder.phases["forward"] == {
        "start_allocated_bytes": 10, "start_reserved_bytes": 11, "max_allocated_bytes": 25, "max_reserved_bytes": 26,
        "end_allocated_bytes": 20, "end_reserved_bytes": 21, "end_device_used_bytes": 1002, "alloc_retries": 1}


@pytest.mark.calibrate
@pytest.mark.parametrize("name", ["tiny_base", "tiny_bf16", "tiny_lora", "tiny_sdpa_gc"])
def test_child_step_bounds_its_phases_on_the_cpu(name, monkeypatch):
    """The child's step (run_step) on the CPU with the substitute probe: the loss is computed inside forward,
    backward inside backward, AdamW's step and zero_grad inside optimizer; bf16 runs under autocast."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if cc.config_by_name(name).lora_r:
        pytest.importorskip("peft")
    probe = ScriptedProbe()
    cross_entropy, backward = torch.nn.functional.cross_entropy, torch.Tensor.backward
    step, zero_grad = torch.optim.AdamW.step, torch.optim.AdamW.zero_grad

    def logged(label, fn):
        """`fn`, logging `label` (marked when autocast is on) into the probe's log first."""
        def wrapper(*args, **kwargs):
            """Log, then call."""
            probe.log.append(label + (":autocast" if torch.is_autocast_enabled("cpu") else ""))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", logged("loss", cross_entropy))
    monkeypatch.setattr(torch.Tensor, "backward", logged("backward", backward))
    monkeypatch.setattr(torch.optim.AdamW, "step", logged("step", step))
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", logged("zero_grad", zero_grad))
    phases, loss = child.run_step(cc.config_by_name(name), probe)
    assert list(phases) == ["build", "inputs", "forward", "backward", "optimizer"]
    assert abs(loss - math.log(1000)) < 0.1  # random init: about ln(vocab)
    entries = [i for i, entry in enumerate(probe.log) if entry == "reset"]
    exits = [i for i, entry in enumerate(probe.log) if entry == "used"]
    assert len(entries) == len(exits) == 5

    def work(start: int, end: int) -> list[str]:
        """The step's own calls logged between two positions."""
        return [e for e in probe.log[start:end] if e not in ("sync", "reset", "stats", "used")]

    amp = ":autocast" if cc.config_by_name(name).bf16 else ""
    assert [work(a, b) for a, b in zip(entries, exits)] == [[], [], ["loss" + amp], ["backward"], ["step", "zero_grad"]]
    assert [work(a, b) for a, b in zip([0] + exits, entries + [len(probe.log)])] == [[]] * 6  # nothing outside
    for k, phase in enumerate(phases.values()):
        assert phase["start_allocated_bytes"] == 10 * (2 * k + 1)  # the probe's stats at entry, then at exit
        assert phase["max_allocated_bytes"] == 10 * (2 * k + 2) + 5


@pytest.mark.calibrate
def testoutputs_to_fp32_copies_half_tensors_only():
    """accelerate's convertoutputs_to_fp32 as the child applies it: bf16 logits become fp32, the fp32 loss stays."""
    torch = pytest.importorskip("torch")
    loss, logits = torch.tensor(1.0), torch.ones(2, 3, dtype=torch.bfloat16)
    out = child.outputs_to_fp32({"loss": loss, "logits": logits})
    assert out["loss"] is loss and out["logits"].dtype is torch.float32


def test_measure_only_then_compare(tmp_path, monkeypatch, capsys):
    """The device machine's two steps with the child substituted: --measure-only records the measured side without
    simulating (names each snapshot after its configuration), then --measurements adds the simulated side."""
    recorded = {row["config"]["name"]: row["measured"] for row in _fixture_rows()}
    asked = []

    def fake_measure(config, snapshot_path, python=None):
        """The recorded measurement of `config`, noting what was asked."""
        asked.append((config.name, snapshot_path))
        return recorded[config.name]

    def no_simulation(*args):
        """Fails the test if called."""
        raise AssertionError("--measure-only must not simulate")

    monkeypatch.setattr(cc, "cuda_unavailable_reason", lambda python=None: None)
    monkeypatch.setattr(cc, "measure", fake_measure)
    monkeypatch.setattr(cc, "simulate", no_simulation)
    measured_json = tmp_path / "measured.json"
    assert main(["calibrate", "--device", "cuda", "--measure-only", "--config", "tiny_base", "--config", "q05_fa2_2k",
                 "--snapshot-dir", str(tmp_path), "--json", str(measured_json)]) == 0
    assert asked == [("tiny_base", tmp_path / "tiny_base.pickle"), ("q05_fa2_2k", tmp_path / "q05_fa2_2k.pickle")]
    rows = json.loads(measured_json.read_text())
    assert rows == _fixture_rows()
    assert "measured; not simulated" in capsys.readouterr().out
    monkeypatch.undo()
    compared = tmp_path / "compared.json"
    assert main(["calibrate", "--device", "cuda", "--measurements", str(measured_json), "--json", str(compared)]) == 0
    assert "simulated" in json.loads(compared.read_text())[0]


def test_a_failing_child_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """The real child on this CPU-only machine fails at its first CUDA call (or at importing torch): the row is
    recorded as failed with the child's last line, the next configuration is still tried, and the exit code is 1."""
    if _gpu_here():
        pytest.skip("a CUDA GPU is here: the child would measure")
    monkeypatch.setattr(cc, "cuda_unavailable_reason", lambda python=None: None)
    out_json = tmp_path / "rows.json"
    assert main(["calibrate", "--device", "cuda", "--config", "tiny_base", "--config", "tiny_llama",
                 "--json", str(out_json)]) == 1
    rows = json.loads(out_json.read_text())
    assert [r["config"]["name"] for r in rows] == ["tiny_base", "tiny_llama"]
    for row in rows:
        assert row["measured"]["status"] == "failed" and row["measured"]["reason"].startswith("child exit 1: ")
        assert "simulated" not in row
    captured = capsys.readouterr()
    assert "| tiny_base | failed: child exit 1: " in captured.out
    assert "failed: tiny_base, tiny_llama" in captured.err


def test_measure_only_needs_neither_pydantic_nor_numpy(tmp_path):
    """The lent GPU machine's Python lacks pydantic: --measure-only (child substituted) runs with both blocked."""
    out = tmp_path / "m.json"
    code = ("import sys; sys.modules['pydantic'] = sys.modules['numpy'] = None\n"
            "from sim import calibrate_cuda as cc\n"
            "cc.cuda_unavailable_reason = lambda python=None: None\n"
            "cc.measure = lambda config, snapshot, python=None: {'status': 'skipped', 'reason': 'r', 'wall_s': 1.0}\n"
            "from sim.cli import main\n"
            f"sys.exit(main(['calibrate', '--device', 'cuda', '--measure-only', '--json', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())) == len(cc.CUDA_CONFIGS)


def test_a_measured_version_newer_than_known_is_simulated_as_the_newest_known() -> None:
    # a GPU machine on torch 2.15.0+cu130 and transformers 5.25.0 (newer than sim/versions.py knows): simulated as
    # torch 2.13.0 and transformers 5.24.0 instead of refused; a known version passes unchanged, its build tag dropped
    config = cc.CUDA_CONFIGS[0]
    newer = {"torch": "2.15.0+cu130", "transformers": "5.25.0", "peft": "0.21.2"}
    assert cc.scenario_mapping(config, newer, H100)["software"] == {"torch": "2.13.0", "transformers": "5.24.0",
                                                                   "peft": "0.21.2"}
    assert cc.scenario_mapping(config, {"torch": "2.8.0+cu128"}, H100)["software"] == {"torch": "2.8.0"}
    # a patch after its series' last known: the series' last
    assert nearest_release("torch", "2.12.7") == "2.12.1" and nearest_release("peft", "0.5.0") == "0.5.0"
