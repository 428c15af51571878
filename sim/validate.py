"""Validation against published measurements: the schema of one point (validation/<source>/<point>.yaml), loading,
and the runner that simulates each point and compares it with what was measured (docs/validation.md)."""

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from sim.catalog import data_dir, load_yaml_mapping
from sim.errors import ScenarioError
from sim.report import summarize
from sim.scenario import Scenario, build_scenario, load_scenario
from sim.simulate import run_scenario
from sim.units import format_bytes



def _validation_dir() -> Path:
    """validation/ of a checkout, else the copy installed in the wheel (found as sim/catalog.py finds models/)."""
    try:
        return data_dir("validation")
    except ScenarioError:
        return Path(__file__).resolve().parent.parent / "validation"  # load_points says it is missing


VALIDATION_DIR = _validation_dir()


class Quantity(Enum):
    """What a published number measures; the unit is part of the name."""

    ALLOCATED_BYTES = "allocated_bytes"  # torch.cuda.max_memory_allocated()
    RESERVED_BYTES = "reserved_bytes"  # torch.cuda.max_memory_reserved()
    DEVICE_USED_BYTES = "device_used_bytes"  # nvidia-smi memory.used: reserved + CUDA context + NCCL buffers
    TOKENS_PER_S_PER_GPU = "tokens_per_s_per_gpu"  # training throughput of the whole job over its GPUs
    VERDICT = "verdict"  # the job trained (fits) or ran out of memory (oom)


class ResultField(Enum):
    """The simulated value a measurement is compared with, written as the result JSON fields it comes from."""

    MAX_PHASE_ALLOCATED_BYTES = "max(phase_peaks.*.allocated_bytes)"
    MAX_PHASE_RESERVED_BYTES = "max(phase_peaks.*.reserved_bytes)"
    PEAK_TOTAL_BYTES = "peak.total_bytes"
    TOKENS_PER_S_PER_GPU = "tokens_per_s / hardware.gpus"
    FITS = "fits"


class Verdict(Enum):
    """The outcome of a training job on its hardware, as reported or as simulated."""

    FITS = "fits"
    OOM = "oom"


# The one result field each kind of measurement is compared with.
COUNTERPART = {
    Quantity.ALLOCATED_BYTES: ResultField.MAX_PHASE_ALLOCATED_BYTES,
    Quantity.RESERVED_BYTES: ResultField.MAX_PHASE_RESERVED_BYTES,
    Quantity.DEVICE_USED_BYTES: ResultField.PEAK_TOTAL_BYTES,
    Quantity.TOKENS_PER_S_PER_GPU: ResultField.TOKENS_PER_S_PER_GPU,
    Quantity.VERDICT: ResultField.FITS,
}
BYTE_QUANTITIES = (Quantity.ALLOCATED_BYTES, Quantity.RESERVED_BYTES, Quantity.DEVICE_USED_BYTES)


def _measured_value(value: Any) -> Verdict | float:
    """A measured value is a verdict's name or a number; anything else (a boolean, other words) is refused."""
    if isinstance(value, str) and value in {v.value for v in Verdict}:
        return Verdict(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError("expected a number, or fits or oom for a verdict")


class Point(BaseModel):
    """One published or measured point: the scenario it was taken on, the value, what it measures, where it is
    published and how close the simulator must come."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    citation: str = Field(min_length=1)  # paper and table, URL, or repo/path
    assumptions: str | None = None  # what the source leaves open and the scenario had to fix
    scenario: str | dict[str, Any]  # path to a scenario file (relative to this file) | inline scenario mapping
    overrides: list[str] = Field([], alias="set")  # `--set KEY=VALUE` overrides applied to the scenario
    measures: Quantity
    measured: Annotated[Verdict | float, BeforeValidator(_measured_value)]
    compared_with: ResultField
    # largest |simulated / measured − 1| (0 for a verdict: the same outcome); null: the source states none, so the
    # point is reported, not judged
    tolerance: Annotated[float, Field(ge=0)] | None
    disagreement: str | None = None  # why the simulator is known to fall outside the tolerance

    @model_validator(mode="after")
    def _consistent(self) -> "Point":
        """The measured value, result field and tolerance must suit what the point measures."""
        if (self.measures is Quantity.VERDICT) != isinstance(self.measured, Verdict):
            wanted = "fits or oom" if self.measures is Quantity.VERDICT else "a number"
            raise ValueError(f"measured: a {self.measures.value} point needs {wanted} (got {_plain(self.measured)!r})")
        if not isinstance(self.measured, Verdict) and not (math.isfinite(self.measured) and self.measured > 0):
            raise ValueError(f"measured: must be a positive number (got {self.measured!r})")
        if self.compared_with is not COUNTERPART[self.measures]:
            raise ValueError(f"compared_with: a {self.measures.value} point is compared with "
                             f"{COUNTERPART[self.measures].value!r} (got {self.compared_with.value!r})")
        if self.measures is Quantity.VERDICT and self.tolerance not in (0, None):
            raise ValueError(f"tolerance: a verdict agrees or not; use 0 or null (got {self.tolerance!r})")
        if self.disagreement is not None and self.tolerance is None:
            raise ValueError("disagreement: only a point with a tolerance can be known to fall outside it")
        return self


@dataclass(frozen=True, slots=True)
class PointFile:
    """A point with where it came from: `key` is <source>/<point>, the file's place under validation/."""

    key: str
    path: Path
    point: Point


@dataclass(frozen=True, slots=True)
class Row:
    """One point compared: measured and simulated value, the error and whether it is within tolerance."""

    key: str
    point: Point
    simulated: Verdict | float
    error: float  # simulated / measured − 1 for numbers; 0 (same outcome) or 1 (other outcome) for a verdict
    within: bool | None  # None: the source states no tolerance
    result: dict  # the whole result JSON (design.md §4) the simulated value comes from

    @property
    def measured(self) -> Verdict | float:
        """The published value, as its point file gives it."""
        return self.point.measured

    @property
    def as_expected(self) -> bool:
        """Within tolerance unless the point records a known disagreement (then outside); unjudged points pass."""
        return self.within is None or self.within == (self.point.disagreement is None)


def sources(root: Path = VALIDATION_DIR) -> list[str]:
    """The sources under `root`: each directory that holds point files."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def load_point(path: Path, root: Path = VALIDATION_DIR) -> PointFile:
    """Read and validate one point file; a bad file is a ScenarioError naming the file and the key path."""
    key = f"{path.parent.name}/{path.stem}"
    raw = load_yaml_mapping(path, _shown(path, root))
    try:
        return PointFile(key, path, Point(**raw))
    except ValidationError as exc:
        raise ScenarioError(f"{_shown(path, root)}: {_describe(exc)}") from None


def load_points(root: Path = VALIDATION_DIR, source: str | None = None) -> list[PointFile]:
    """Every point under `root`, or those of one source, sorted by key."""
    if not root.is_dir():
        raise ScenarioError(f"validate: no validation directory at {str(root)!r}")
    known = sources(root)
    if source is not None and source not in known:
        raise ScenarioError(f"source: unknown validation source {source!r} (known: {', '.join(known)})")
    chosen = [source] if source is not None else known
    return [load_point(path, root) for name in chosen for path in sorted((root / name).glob("*.yaml"))]


def point_scenario(point_file: PointFile, root: Path = VALIDATION_DIR) -> Scenario:
    """The scenario a point was measured on, with its overrides applied."""
    point, base_dir = point_file.point, point_file.path.parent
    try:
        if isinstance(point.scenario, str):
            return load_scenario(base_dir / point.scenario, point.overrides)
        return build_scenario(point.scenario, base_dir=base_dir, overrides=point.overrides,
                              default_name=point_file.key)
    except ScenarioError as exc:
        problem = str(exc).removeprefix("scenario: ")
        raise ScenarioError(f"{_shown(point_file.path, root)}: scenario: {problem}") from None


def simulated_value(field: ResultField, result: dict) -> Verdict | float:
    """The value of one result field (design.md §4) of a simulated run."""
    if field is ResultField.FITS:
        return Verdict.FITS if result["fits"] else Verdict.OOM
    if field is ResultField.TOKENS_PER_S_PER_GPU:
        return result["tokens_per_s"] / result["hardware"]["gpus"]
    if field is ResultField.PEAK_TOTAL_BYTES:
        return result["peak"]["total_bytes"]
    name = "allocated_bytes" if field is ResultField.MAX_PHASE_ALLOCATED_BYTES else "reserved_bytes"
    return max(phase[name] for phase in result["phase_peaks"].values())


def compare(point_file: PointFile, result: dict) -> Row:
    """Compare a point's measured value with the simulated run's result."""
    point = point_file.point
    simulated = simulated_value(point.compared_with, result)
    if isinstance(point.measured, Verdict):
        error = 0.0 if simulated is point.measured else 1.0
    else:
        error = simulated / point.measured - 1
    within = None if point.tolerance is None else abs(error) <= point.tolerance
    return Row(point_file.key, point, simulated, error, within, result)


def validate(points: list[PointFile], root: Path = VALIDATION_DIR) -> list[Row]:
    """Simulate every point and compare it with its measurement."""
    return [compare(p, summarize(run_scenario(point_scenario(p, root)))) for p in points]


def format_table(rows: list[Row]) -> str:
    """The Markdown table `python -m sim validate` prints, with each point's citation (and known disagreement) below
    it; the assumptions stay in the point files."""
    lines = ["| point | measures | measured | simulated | error | tolerance | agrees |",
             "|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for row in rows:
        point = row.point
        lines.append(f"| {row.key} | {point.measures.value} | {_value(point.measures, row.measured)} | "
                     f"{_value(point.measures, row.simulated)} | {_error(row)} | {_tolerance(point)} | "
                     f"{_agrees(row)} |")
        known = f"; known disagreement: {point.disagreement}" if point.disagreement else ""
        notes.append(f"- {row.key}: {point.citation}{known}")
    return "\n".join(lines + [""] + notes)


def rows_json(rows: list[Row]) -> list[dict]:
    """The rows as JSON-ready dicts (without the whole result of each run)."""
    return [{"point": row.key, "name": row.point.name, "measures": row.point.measures.value,
             "compared_with": row.point.compared_with.value, "measured": _plain(row.measured),
             "simulated": _plain(row.simulated), "error": row.error, "tolerance": row.point.tolerance,
             "within": row.within, "disagreement": row.point.disagreement, "citation": row.point.citation}
            for row in rows]


def _describe(exc: ValidationError) -> str:
    """The first validation error as `key.path: problem (got value)`."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"] if part not in ("str", "dict[str,any]"))  # union members
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    if not loc:  # a check across keys names its key itself
        return msg
    value = err.get("input")
    return f"{loc}: {msg} (got {value!r})" if not isinstance(value, dict) else f"{loc}: {msg}"


def _shown(path: Path, root: Path) -> str:
    """A point file as a user names it: relative to the directory above validation/ when it is inside it."""
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def _value(quantity: Quantity, value: Verdict | float) -> str:
    """A measured or simulated value for the table: bytes in binary units, rates as whole numbers."""
    if isinstance(value, Verdict):
        return value.value
    if quantity in BYTE_QUANTITIES:
        return format_bytes(round(value))
    return f"{value:,.0f}"


def _error(row: Row) -> str:
    """The error for the table: a signed percentage, or whether a verdict is the same."""
    if isinstance(row.measured, Verdict):
        return "same" if row.error == 0 else "other"
    return f"{100 * row.error:+.1f}%"


def _tolerance(point: Point) -> str:
    """The tolerance for the table: a percentage, exact for a verdict, or none stated by the source."""
    if point.tolerance is None:
        return "none stated"
    return "exact" if isinstance(point.measured, Verdict) else f"±{100 * point.tolerance:g}%"


def _agrees(row: Row) -> str:
    """Whether the point agrees, flagging a recorded disagreement that no longer holds."""
    if row.within is None:
        return "not judged"
    if row.within:
        return "yes" if row.point.disagreement is None else "yes (recorded as a disagreement: update the point)"
    return "no (known)" if row.point.disagreement is not None else "NO"


def _plain(value: Verdict | float) -> str | float:
    """A value as JSON holds it: the verdict's name or the number."""
    return value.value if isinstance(value, Verdict) else value
