"""`sim sweep`: one scenario over a grid of `--set` values, a CSV row per variant written as each finishes, in grid
order, so that a sweep killed at any point and run again with `--resume` ends with the same file as one never
interrupted (issue #16). Variants run in this process, in `workers` forked processes (multiprocessing), or on a
dask.distributed cluster (the optional `dask` extra) for sweeps larger than one machine."""

import csv
import io
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from sim.errors import ScenarioError
from sim.ingest.files import shown

RESULT_COLUMNS = ("fits", "capacity_bytes", "device_used_peak_bytes", "allocated_peak_bytes", "reserved_peak_bytes",
                  "deficit_bytes", "step_time_s", "tokens_per_s", "mfu", "oom_op", "error")


@dataclass(frozen=True, slots=True)
class Grid:
    """The swept keys and their values, in the order given: variants are their product, the last key fastest."""

    keys: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, specs: list[str]) -> "Grid":
        """`KEY=V1,V2,...` per swept key; a key given twice, or no value, is refused."""
        keys, values = [], []
        for spec in specs:
            key, sep, text = spec.partition("=")
            items = tuple(v.strip() for v in text.split(",")) if sep else ()
            if not key or not items or any(not v for v in items):
                raise ScenarioError(f"--grid: expected KEY=V1,V2,... (got {shown(spec)})")
            if key in keys:
                raise ScenarioError(f"--grid: {key} given twice")
            keys.append(key)
            values.append(items)
        if not keys:
            raise ScenarioError("--grid: give at least one KEY=V1,V2,...")
        return cls(tuple(keys), tuple(values))

    def variants(self) -> list[tuple[str, ...]]:
        """Every combination of values, in grid order."""
        return list(itertools.product(*self.values))

    def header(self) -> list[str]:
        return [*self.keys, *RESULT_COLUMNS]


def run_variant(job: tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> list[str]:
    """One CSV row: the variant's values and its result, or the one-line input error that refused it (a sweep goes
    on past a refused variant). `job`: (scenario path, --set overrides, grid keys, this variant's values)."""
    from sim.report import summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario

    path, overrides, keys, values = job
    try:
        scenario = load_scenario(path, [*overrides, *(f"{k}={v}" for k, v in zip(keys, values))])
        result = summarize(run_scenario(scenario))
    except ScenarioError as exc:
        return [*values, *[""] * (len(RESULT_COLUMNS) - 1), str(exc).replace("\n", " ")]
    oom = result["oom"]
    return [*values, str(result["fits"]).lower(), str(result["hardware"]["capacity_bytes"]),
            str(result["peak"]["total_bytes"]),
            str(result["allocated_peak"]["allocated_bytes"]), str(result["max_memory"]["reserved_bytes"]),
            str(result["deficit_bytes"]), repr(result["step_time_s"]), repr(result["tokens_per_s"]),
            repr(result["mfu"]), oom["op"] if oom else "", ""]


def _row_text(row: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def _done_rows(out: Path, header: list[str]) -> int | None:
    """How many complete variant rows `out` holds (None: not even the header), after cutting a last line a kill
    left half-written; the file's header must be this sweep's."""
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]  # a row cut short by a kill: written again
        out.write_bytes(data)
    if not data:
        return None
    rows = list(csv.reader(io.StringIO(data.decode())))
    if rows[0] != header:
        raise ScenarioError(f"--resume: {shown(str(out))} is not this sweep's CSV (its header differs)")
    return len(rows) - 1


def run_sweep(path: str, overrides: list[str], grid: Grid, out: Path, resume: bool = False, workers: int = 1,
              on_row: Callable[[], None] | None = None, dask_address: str | None = None) -> int:
    """Run every variant not yet in `out` and append its row as it finishes, in grid order (each row flushed to
    disk before the next is written); the number of rows run now. `resume`: continue a CSV a kill cut short;
    `dask_address`: the dask.distributed scheduler that runs the variants instead of local processes (the scenario
    path must be readable by its workers)."""
    header = grid.header()
    variants = grid.variants()
    if out.exists() and not resume:
        raise ScenarioError(f"--out: {shown(str(out))} exists; add --resume to continue it, or remove it")
    done = _done_rows(out, header) if out.exists() else None
    if done is not None and done > len(variants):
        raise ScenarioError(f"--resume: {shown(str(out))} holds {done} rows, more than the grid's {len(variants)}")
    jobs = [(path, tuple(overrides), grid.keys, values) for values in variants[done or 0:]]
    with out.open("a", encoding="utf-8") as handle:
        if done is None:
            handle.write(_row_text(header))
        for row in (_dask_rows(jobs, dask_address) if dask_address else _rows(jobs, workers)):
            handle.write(_row_text(row))
            handle.flush()
            os.fsync(handle.fileno())
            if on_row is not None:
                on_row()
    return len(jobs)


def _rows(jobs: list[tuple], workers: int) -> Iterator[list[str]]:
    """The rows of `jobs` in order: here, or from a pool of forked workers (results kept in job order)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(run_variant, jobs)
        return
    with get_context("fork").Pool(processes=workers) as pool:
        yield from pool.imap(run_variant, jobs)


def _dask_rows(jobs: list[tuple], address: str) -> Iterator[list[str]]:
    """The rows of `jobs` in order, computed on the dask.distributed cluster at `address`."""
    try:
        from distributed import Client
    except ImportError:
        raise ScenarioError("--executor dask: dask.distributed is not installed (pip install '.[dask]')") from None
    try:
        client = Client(address, timeout="10s")
    except OSError as exc:
        raise ScenarioError(f"--address: no dask scheduler at {shown(address)}: {exc}") from None
    with client:
        futures = client.map(run_variant, jobs, pure=False)
        for future in futures:
            yield future.result()
