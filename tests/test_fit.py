"""`sim fit`: galloping then bisection agrees with a brute-force scan wherever the peak grows with the value."""

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sim.cli import main
from sim.errors import ScenarioError
from sim.fit import Probe, search_fit
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw


def _threshold_probe(threshold: int, calls: list[int]):
    def probe(value: int) -> Probe:
        calls.append(value)
        return Probe(value, value <= threshold, value)
    return probe


def test_gallop_and_bisect_by_hand() -> None:
    # fits up to 100; from 16: 16, 32, 64 fit, 128 fails; bisect 96 fits, 112 fails, 104 fails, 100 fits, 102 fails,
    # 101 fails
    calls: list[int] = []
    found = search_fit("training.seq_len", 16, _threshold_probe(100, calls))
    assert (found.largest_fitting.value, found.first_failing.value) == (100, 101)
    assert calls == [16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    # in multiples of 8 from 256 (too big): 256 and 128 fail, 64 fits; bisect 96 fits, 112 and 104 fail: 96 and 104
    calls = []
    found = search_fit("training.seq_len", 256, _threshold_probe(100, calls), multiple=8)
    assert (found.largest_fitting.value, found.first_failing.value) == (96, 104)
    assert calls == [256, 128, 64, 96, 112, 104]


def test_bounds_and_bad_keys() -> None:
    assert search_fit("training.seq_len", 8, _threshold_probe(10**9, []), limit=64).first_failing is None
    assert search_fit("training.seq_len", 8, _threshold_probe(0, []), multiple=4).largest_fitting is None
    with pytest.raises(ScenarioError, match="not a key fit searches"):
        search_fit("model.hidden_size", 8, _threshold_probe(1, []))


@given(st.integers(1, 40), st.integers(1, 8), st.sampled_from([1, 2, 4]))
def test_agrees_with_a_brute_force_scan(threshold: int, start: int, multiple: int) -> None:
    found = search_fit("training.per_device_train_batch_size", start, _threshold_probe(threshold, []), multiple,
                       limit=64)
    fitting = [v for v in range(multiple, 65, multiple) if v <= threshold]
    assert (found.largest_fitting.value if found.largest_fitting else None) == (max(fitting) if fitting else None)


@given(st.sampled_from([2**21, 3 * 2**21, 2**22, 3 * 2**22]))
def test_on_real_runs_agrees_with_a_scan(capacity_bytes: int) -> None:
    # a tiny model on a toy device with the exact allocator on one GPU: the peak grows with the micro-batch
    def simulate(batch: int) -> Probe:
        raw = tiny_raw(per_device_train_batch_size=batch)
        raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": capacity_bytes, "peak_flops": {"bf16": 1e14},
                                     "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
        result = summarize(run_scenario(build_scenario(raw)))
        return Probe(batch, result["fits"], result["peak"]["total_bytes"])

    scan = [simulate(b) for b in range(1, 17)]
    found = search_fit("training.per_device_train_batch_size", 2, simulate, limit=16)
    fitting = [p.value for p in scan if p.fits]
    assert (found.largest_fitting.value if found.largest_fitting else None) == (max(fitting) if fitting else None)


def test_cli_fit_prints_and_writes_json(tmp_path: Path, capsys) -> None:
    raw = tiny_raw()
    raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": 3 * 2**21, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(raw))
    out = tmp_path / "fit.json"
    assert main(["fit", str(scenario), "--maximize", "training.per_device_train_batch_size", "--limit", "64",
                 "--json", str(out)]) == 0
    answer = json.loads(out.read_text())
    largest, first = answer["largest_fitting"], answer["first_failing"]
    assert largest["fits"] and not first["fits"] and first["value"] == largest["value"] + 1
    assert "largest that fits" in capsys.readouterr().out
