"""`sim sweep`: rows in grid order as they finish; killed with SIGKILL and resumed, the same CSV as a sweep never
interrupted; workers change nothing; a refused variant is a row with its error (issue #16)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sim.cli import main
from sim.errors import ScenarioError
from sim.sweep import RESULT_COLUMNS, Grid, run_sweep
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parent.parent


def _scenario(tmp_path: Path) -> str:
    raw = tiny_raw()  # device-used peaks: 2.1 MB up to 32 tokens, 5.1 MB at 256 x 1, 14.2 MB at 256 x 3, 18.8 MB
    raw["model"]["max_position_embeddings"] = 1024  # at 1024 x 1: the 6.3 MB toy device holds the small ones only
    raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": 3 * 2**21, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


GRID = Grid.parse(["training.seq_len=64,256,1024", "training.per_device_train_batch_size=1,2,3"])


def test_grid_order_and_rows(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    assert run_sweep(_scenario(tmp_path), [], GRID, out) == 9
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == ["training.seq_len", "training.per_device_train_batch_size", *RESULT_COLUMNS]
    assert [tuple(line.split(",")[:2]) for line in lines[1:]] == GRID.variants()  # the last key fastest
    fits = [line.split(",")[2] for line in lines[1:]]
    assert set(fits) == {"true", "false"}  # the toy device holds the small variants only


def test_workers_write_the_same_csv(tmp_path: Path) -> None:
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run_sweep(_scenario(tmp_path), [], GRID, one)
    run_sweep(_scenario(tmp_path), [], GRID, two, workers=2)
    assert one.read_bytes() == two.read_bytes()


def test_a_row_cut_short_is_run_again_on_resume(tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole.csv", tmp_path / "cut.csv"
    scenario = _scenario(tmp_path)
    run_sweep(scenario, [], GRID, whole)
    lines = whole.read_bytes().split(b"\n")
    cut.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:7])  # header, 3 rows, a kill mid-row
    assert run_sweep(scenario, [], GRID, cut, resume=True) == 6
    assert cut.read_bytes() == whole.read_bytes()


def test_killed_with_sigkill_and_resumed_is_the_uninterrupted_csv(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    big = ["--grid", "training.seq_len=8,16,24,32,40,48", "--grid", "training.per_device_train_batch_size=1,2,3,4"]
    whole, killed = tmp_path / "whole.csv", tmp_path / "killed.csv"
    assert main(["sweep", scenario, *big, "--out", str(whole)]) == 0
    process = subprocess.Popen([sys.executable, "-m", "sim", "sweep", scenario, *big, "--out", str(killed)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not killed.exists() or killed.read_bytes().count(b"\n") < 4):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert killed.read_bytes().count(b"\n") < whole.read_bytes().count(b"\n")  # it was stopped part-way
    assert main(["sweep", scenario, *big, "--out", str(killed), "--resume"]) == 0
    assert killed.read_bytes() == whole.read_bytes()


def test_refused_variants_are_rows_and_the_sweep_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    run_sweep(_scenario(tmp_path), [], Grid.parse(["training.seq_len=8,-1,16"]), out)
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["8", "-1", "16"]
    assert rows[1][-1].startswith("training.seq_len") and rows[0][-1] == "" and rows[2][1] in ("true", "false")


def test_bad_sweeps_are_one_line(tmp_path: Path, capsys) -> None:
    scenario, out = _scenario(tmp_path), tmp_path / "s.csv"
    for grid in (["training.seq_len"], ["training.seq_len=8,,16"], ["a=1", "a=2"]):
        with pytest.raises(ScenarioError):
            Grid.parse(grid)
    out.write_text("something,else\n")
    assert main(["sweep", scenario, "--grid", "training.seq_len=8", "--out", str(out)]) == 2  # exists, no --resume
    assert main(["sweep", scenario, "--grid", "training.seq_len=8", "--out", str(out), "--resume"]) == 2
    assert "header differs" in capsys.readouterr().err


def test_sweep_plots(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    for grid, expected in ((["training.seq_len=8,16,32"], "capacity"),
                           (["training.seq_len=8,1024", "training.per_device_train_batch_size=1,3"], "OOM")):
        svg = tmp_path / "p.svg"
        out = tmp_path / f"{len(grid)}.csv"
        assert main(["sweep", scenario, *sum((["--grid", g] for g in grid), []), "--out", str(out),
                     "--plot", str(svg)]) == 0
        assert expected in svg.read_text()


def test_a_dask_cluster_writes_the_same_csv(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    scenario = _scenario(tmp_path)
    local, remote = tmp_path / "local.csv", tmp_path / "dask.csv"
    run_sweep(scenario, [], GRID, local)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        run_sweep(scenario, [], GRID, remote, dask_address=cluster.scheduler_address)
    assert remote.read_bytes() == local.read_bytes()


def test_the_dask_executor_needs_an_address(tmp_path: Path, capsys) -> None:
    scenario, out = _scenario(tmp_path), tmp_path / "s.csv"
    assert main(["sweep", scenario, "--grid", "training.seq_len=8", "--out", str(out), "--executor", "dask"]) == 2
    assert "go together" in capsys.readouterr().err
