"""`sim compare A B`: the differences by term, ordered, on the CLI, in JSON and on one plot (issue #17)."""

import json
from pathlib import Path

import yaml

from sim.cli import main
from sim.compare import compare_results, format_comparison
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw


def _long(seq_len: int) -> dict:
    raw = tiny_raw(seq_len=seq_len)
    raw["model"]["max_position_embeddings"] = seq_len
    return summarize(run_scenario(build_scenario(raw)))


def test_twice_the_sequence_differs_in_activations_first() -> None:
    # same model and optimizer: model states equal; 4096 tokens instead of 2048 double every activation (long
    # enough for activations and logits, 2 x 4096 x 1000 fp32 = 31 MiB, to pass the 16 MiB of cuBLAS workspaces)
    a, b = _long(2048), _long(4096)
    comparison = compare_results(a, b)
    for row in comparison["figures"].values():
        assert row["b_minus_a"] == row["b"] - row["a"]
    assert all(comparison["figures"][f"model states: {name}"]["b_minus_a"] == 0
               for name in ("parameters", "gradients", "optimizer_states"))
    differences = [abs(row["b_minus_a"]) for row in comparison["terms"]]
    assert differences == sorted(differences, reverse=True)
    assert comparison["figures"]["allocated_peak_bytes"]["b_minus_a"] > 0
    assert {row["term"] for row in comparison["terms"][:2]} & {"allocated peak: activations",
                                                               "allocated peak: temporaries"}
    printed = format_comparison(comparison)
    assert "what makes the difference" in printed and "allocated peak" in printed


def test_cli_compare_writes_json_and_one_plot(tmp_path: Path, capsys) -> None:
    paths = []
    for name, seq in (("short", 16), ("long", 64)):
        raw = tiny_raw(seq_len=seq)
        raw["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(str(path))
    out, svg = tmp_path / "c.json", tmp_path / "c.svg"
    assert main(["compare", *paths, "--set", "training.per_device_train_batch_size=1", "--json", str(out),
                 "--plot", str(svg)]) == 0
    document = json.loads(out.read_text())
    assert document["a"]["scenario"] == "short" and document["b"]["scenario"] == "long"
    assert document["a"]["settings"]["training.per_device_train_batch_size"]["value"] == 1  # --set applies to both
    text = svg.read_text()
    assert "device used A: short" in text and "device used B: long" in text
    assert "B  long" in capsys.readouterr().out
