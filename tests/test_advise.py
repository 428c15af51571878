"""`sim advise`: every remedy it reports is re-simulated and verified; those that fit come first, fastest first."""

import json
from pathlib import Path

import pytest
import yaml

from sim.advise import advise, combinations, remedies_for
from sim.cli import main
from sim.report import summarize
from sim.scenario import build_scenario, load_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parent.parent


def _tight(tmp_path: Path) -> Path:
    # eager attention, no checkpointing, micro-batch 4 x 512 tokens, full fine-tuning, caching allocator on a toy
    # device of 60 MiB: it needs 112 MiB; sdpa alone (56 MiB), with checkpointing (50) or smaller micro-batches fit
    raw = tiny_raw(per_device_train_batch_size=4, seq_len=512, attn_implementation="eager")
    raw["model"]["max_position_embeddings"] = 512
    raw["allocator"] = {"backend": "caching"}
    raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": 60 * 2**20, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_remedies_that_apply() -> None:
    names = [r.name for r in remedies_for(build_scenario(tiny_raw(attn_implementation="eager")))]
    # eager, no checkpointing, micro-batch 2, one GPU, no ZeRO-3, torch's AdamW without DeepSpeed, no LoRA, exact
    # allocator (no expandable segments)
    assert names == ["sdpa attention", "gradient checkpointing", "half the micro-batch, twice the accumulation",
                     "twice the GPUs", "activations offloaded to the CPU (save_on_cpu)", "8-bit AdamW (bitsandbytes)",
                     "LoRA instead of full fine-tuning"]
    assert len(combinations(remedies_for(build_scenario(tiny_raw())))) == 6 + 15  # 6 alone, 15 pairs


def test_every_reported_outcome_is_what_a_run_gives(tmp_path: Path) -> None:
    path = _tight(tmp_path)
    scenario = load_scenario(path)
    base = summarize(run_scenario(scenario))
    assert not base["fits"]
    found = remedies_for(scenario)
    by_name = {r.name: r for r in found}
    outcomes = advise(base, found, lambda o: summarize(run_scenario(load_scenario(path, list(o)))))
    assert len(outcomes) == len(combinations(found))
    fitting = [o for o in outcomes if o.fits]
    assert len(fitting) >= 3
    assert [o.step_time_s for o in fitting] == sorted(o.step_time_s for o in fitting)
    assert outcomes[:len(fitting)] == fitting  # those that fit come first
    for outcome in outcomes[:4]:  # verified: the same overrides run directly give the same verdict and peak
        overrides = [o for name in outcome.remedies for o in by_name[name].overrides]
        again = summarize(run_scenario(load_scenario(path, overrides)))
        assert (again["fits"], again["peak"]["total_bytes"]) == (outcome.fits, outcome.peak_bytes)
        after = again["allocated_peak"]["breakdown"]
        assert outcome.breakdown_change == {k: after[k] - base["allocated_peak"]["breakdown"][k] for k in after}


def test_cli_advise_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.json"
    assert main(["advise", str(_tight(tmp_path)), "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert not document["base"]["fits"] and any(o["fits"] for o in document["outcomes"])
    assert "remedies that fit, fastest first:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_headline_has_at_least_three_verified_remedies(capsys) -> None:
    assert main(["advise", str(ROOT / "scenarios" / "qwen32b_8xa800.yaml")]) == 0
    printed = capsys.readouterr().out
    listed = printed.split("remedies that fit, fastest first:")[1].split("remedies that do not fit alone:")[0]
    assert sum(1 for line in listed.splitlines() if line.startswith("  ") and not line.startswith("      ")) >= 3
