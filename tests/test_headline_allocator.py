"""The caching allocator on the headline scenario (Qwen1.5-32B, 8×A800, ZeRO-3): invariants over the whole run."""

from pathlib import Path

import numpy as np
import pytest

from sim.cli import main
from sim.report import summarize
from sim.scenario import load_scenario
from sim.simulate import run_scenario

HEADLINE = Path(__file__).resolve().parent.parent / "scenarios" / "qwen32b_8xa800.yaml"


@pytest.mark.slow
def test_reserved_covers_allocated_and_expandable_segments_never_raise_reserved(capsys) -> None:
    default = run_scenario(load_scenario(HEADLINE))
    trace = default.engine.trace
    assert np.all(trace.reserved_bytes >= trace.allocated_bytes)
    expandable = run_scenario(load_scenario(HEADLINE, ["allocator.conf=expandable_segments:True"]))
    assert expandable.engine.trace.reserved_bytes.max() <= trace.reserved_bytes.max()
    assert summarize(expandable)["fits"] and not summarize(default)["fits"]


@pytest.mark.slow
def test_summary_shows_fragmentation_and_retries(capsys) -> None:
    assert main(["run", str(HEADLINE)]) == 0
    printed = capsys.readouterr().out
    assert "fragmentation at the peak:" in printed and "cudaMalloc retries" in printed
    assert "CUDA out of memory. Tried to allocate" in printed
