"""`--plot`: the format its extension names, and what the picture holds, read from the SVG's text (issue #17
deliverable 2)."""

from pathlib import Path

import pytest

from sim.cli import main
from sim.errors import ScenarioError
from sim.plot import plot_format, render_memory_timeline
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw
from tests.test_zero3 import zero_raw

ROOT = Path(__file__).resolve().parent.parent


def _svg(raw: dict) -> str:
    run = run_scenario(build_scenario(raw))
    return render_memory_timeline(run, summarize(run), "svg").decode()


def test_an_oom_run_shows_its_marker_lines_and_phase_legend() -> None:
    raw = tiny_raw(gradient_accumulation_steps=2)
    raw["allocator"] = {"backend": "caching"}
    raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": 3 * 2**20, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    svg = _svg(raw)
    for text in ("first OOM", "reserved", "capacity", "forward phase", "backward phase", "optimizer phase", "peak ",
                 "parameters", "activations", "simulated time (s)"):
        assert text in svg, text
    assert "busy" not in svg  # one stream: no lane panel


def test_several_streams_get_lanes_and_no_oom_no_marker() -> None:
    svg = _svg(zero_raw())
    assert "busy" in svg and "compute" in svg and "allgather" in svg and "reduce" in svg
    assert "first OOM" not in svg and "device used (reserved + non-PyTorch)" in svg


def test_each_extension_writes_its_format(tmp_path: Path) -> None:
    scenario = ROOT / "scenarios" / "qwen7b_lora_1xa100.yaml"
    small = ["--set", "model.num_hidden_layers=1", "--set", "training.seq_len=64"]
    magic = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF"}
    for suffix, start in magic.items():
        out = tmp_path / f"m.{suffix}"
        assert main(["run", str(scenario), "--plot", str(out)] + small) == 0
        assert out.read_bytes().startswith(start), suffix
    assert plot_format("out/memory") == "png" and plot_format("a.b/m.SVG") == "svg"
    with pytest.raises(ScenarioError, match="names format 'jpg'"):
        plot_format("m.jpg")
