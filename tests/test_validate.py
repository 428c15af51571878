"""Validation points (validation/<source>/<point>.yaml) and their runner (sim/validate.py): the shipped files load,
bad files are refused with one line naming the file and the key path, the comparison arithmetic, and every shipped
point agrees with the simulator within its tolerance (or, where its file records a known disagreement, does not)."""

import functools
import json
from pathlib import Path

import pytest
import yaml

from sim import cli, validate
from sim.errors import ScenarioError
from sim.validate import Quantity, ResultField, Verdict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SOURCES = {"fms-acceleration-bench", "hf-blog-deepspeed-to-fsdp", "litgpt-config-hub", "litgpt-resource-tables",
                   "mosaicml-llm-foundry", "qwen-finetune-profiling", "qwen-issue-300"}

# A valid point on a tiny inline model (simulates in well under a second); tests change one key at a time.
TINY_POINT = {
    "name": "tiny qwen2 on one A100",
    "citation": "tests/test_validate.py",
    "measures": "tokens_per_s_per_gpu",
    "measured": 1000,
    "compared_with": "tokens_per_s / hardware.gpus",
    "tolerance": None,
    "scenario": {
        "model": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
                  "max_position_embeddings": 128},
        "hardware": {"device": "a100-sxm4-80gb"},
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "seq_len": 32},
        "allocator": {"backend": "exact"},
        "simulation": {"steps": 1},
    },
}


def write_point(root: Path, data: dict, name: str = "tiny") -> Path:
    """Write a point file as validation/src/<name>.yaml under `root` and return its path."""
    path = root / "validation" / "src" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def changed(**keys) -> dict:
    """TINY_POINT with keys replaced; the value `...` drops the key."""
    data = {k: v for k, v in TINY_POINT.items() if keys.get(k, None) is not ...}
    data.update({k: v for k, v in keys.items() if v is not ...})
    return data


def test_shipped_points_load_and_build() -> None:
    """Every shipped file passes the schema and its scenario builds (no simulation)."""
    points = validate.load_points()
    assert {p.key.split("/")[0] for p in points} == SHIPPED_SOURCES
    assert len(points) == 80
    for point_file in points:
        validate.point_scenario(point_file)


def test_one_source() -> None:
    """One source's points only, in file-name order."""
    points = validate.load_points(source="mosaicml-llm-foundry")
    assert [p.key for p in points] == [
        "mosaicml-llm-foundry/mpt-13b-8xa100-2k", "mosaicml-llm-foundry/mpt-7b-8xa100-2k",
        "mosaicml-llm-foundry/mpt-7b-8xa100-4k-ac", "mosaicml-llm-foundry/mpt-7b-8xh100-2k"]


BAD_POINTS = [
    # (id, point mapping, the message after "validation/src/tiny.yaml: ")
    ("unknown-key", changed(toleranse=0.1), "toleranse: unknown key"),
    ("unknown-key-overrides-spelled-out", changed(overrides=["training.seq_len=64"]), "overrides: unknown key"),
    ("missing-measured", changed(measured=...), "measured: required key is missing"),
    ("missing-tolerance", changed(tolerance=...), "tolerance: required key is missing"),
    ("missing-citation", changed(citation=...), "citation: required key is missing"),
    ("measured-a-word", changed(measured="lots"),
     "measured: expected a number, or fits or oom for a verdict (got 'lots')"),
    ("measured-a-boolean", changed(measured=True),
     "measured: expected a number, or fits or oom for a verdict (got True)"),
    ("measured-zero", changed(measured=0), "measured: must be a positive number (got 0.0)"),
    ("verdict-for-a-rate", changed(measured="oom"),
     "measured: a tokens_per_s_per_gpu point needs a number (got 'oom')"),
    ("rate-for-a-verdict", changed(measures="verdict", compared_with="fits"),
     "measured: a verdict point needs fits or oom (got 1000.0)"),
    ("unknown-quantity", changed(measures="throughput"),
     "measures: Input should be 'allocated_bytes', 'reserved_bytes', 'device_used_bytes', 'tokens_per_s_per_gpu' "
     "or 'verdict' (got 'throughput')"),
    ("wrong-result-field", changed(compared_with="peak.total_bytes"),
     "compared_with: a tokens_per_s_per_gpu point is compared with 'tokens_per_s / hardware.gpus' "
     "(got 'peak.total_bytes')"),
    ("tolerance-a-word", changed(tolerance="tight"),
     "tolerance: Input should be a valid number, unable to parse string as a number (got 'tight')"),
    ("tolerance-negative", changed(tolerance=-0.1), "tolerance: Input should be greater than or equal to 0 (got -0.1)"),
    ("verdict-with-a-relative-tolerance", changed(measures="verdict", measured="fits", compared_with="fits",
                                                  tolerance=0.1),
     "tolerance: a verdict agrees or not; use 0 or null (got 0.1)"),
    ("disagreement-unjudged", changed(disagreement="too slow"),
     "disagreement: only a point with a tolerance can be known to fall outside it"),
    ("set-not-a-list", changed(set="training.seq_len=64"),
     "set: Input should be a valid list (got 'training.seq_len=64')"),
    ("scenario-unknown-key", changed(scenario={**TINY_POINT["scenario"], "trainin": {}}),
     "scenario: trainin: unknown key (allowed: allocator, deepspeed, hardware, lora, model, name, nccl, simulation, "
     "software, strategies, training)"),
    ("scenario-wrong-type", changed(scenario={**TINY_POINT["scenario"], "simulation": {"steps": "two"}}),
     "scenario: simulation.steps: Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    ("scenario-bad-override", changed(set=["training.seq_lenn=64"]), "scenario: training.seq_lenn: unknown key"),
]


@pytest.mark.parametrize("data, message", [(d, m) for _, d, m in BAD_POINTS], ids=[i for i, _, _ in BAD_POINTS])
def test_bad_point_is_one_line_naming_file_and_key(tmp_path: Path, data: dict, message: str) -> None:
    """Each bad file is refused with exactly this one-line message."""
    path = write_point(tmp_path, data)
    root = tmp_path / "validation"
    with pytest.raises(ScenarioError) as caught:
        validate.point_scenario(validate.load_point(path, root), root)
    assert str(caught.value) == f"validation/src/tiny.yaml: {message}"


def test_missing_scenario_file_names_it(tmp_path: Path) -> None:
    """A scenario path that does not exist is named in the message, after the point file."""
    path = write_point(tmp_path, changed(scenario="../../scenarios/nope.yaml"))
    root = tmp_path / "validation"
    with pytest.raises(ScenarioError) as caught:
        validate.point_scenario(validate.load_point(path, root), root)
    assert str(caught.value).startswith("validation/src/tiny.yaml: scenario: cannot read ")
    assert "nope.yaml" in str(caught.value)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    """Malformed YAML names the point file and the line."""
    path = tmp_path / "validation" / "src" / "tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("measured: [1,\n")
    with pytest.raises(ScenarioError, match=r"^validation/src/tiny.yaml: .* is not valid YAML/JSON: line 2"):
        validate.load_point(path, tmp_path / "validation")


def test_unknown_source(tmp_path: Path) -> None:
    """An unknown --source lists the known ones."""
    write_point(tmp_path, TINY_POINT)
    with pytest.raises(ScenarioError, match=r"^source: unknown validation source 'nope' \(known: src\)$"):
        validate.load_points(tmp_path / "validation", source="nope")


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """sim.cli.main in-process, with argparse's exits counted as exit codes."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_point_is_one_line_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    """Through the command: one line on stderr, nothing on stdout, exit 2."""
    write_point(tmp_path, changed(measured=...))
    monkeypatch.setattr(validate, "load_points", functools.partial(validate.load_points, tmp_path / "validation"))
    code, out, err = run_cli(capsys, ["validate"])
    assert (code, out, err) == (2, "", "error: validation/src/tiny.yaml: measured: required key is missing\n")


def test_cli_unknown_source_exit_2(capsys) -> None:
    """Through the command, against the shipped validation/: exit 2 naming the source."""
    code, out, err = run_cli(capsys, ["validate", "--source", "nope"])
    assert code == 2 and out == "" and err.startswith("error: source: unknown validation source 'nope' (known: ")


# Hand-made results (design.md §4, only the fields compared): 8 GPUs at 36,000 tokens/s are 4,500 per GPU.
RESULT = {"fits": False, "hardware": {"gpus": 8}, "tokens_per_s": 36_000.0, "peak": {"total_bytes": 70 * 2**30},
          "phase_peaks": {"forward": {"allocated_bytes": 50 * 2**30, "reserved_bytes": 60 * 2**30},
                          "backward": {"allocated_bytes": 55 * 2**30, "reserved_bytes": 58 * 2**30},
                          "optimizer": {"allocated_bytes": 40 * 2**30, "reserved_bytes": 62 * 2**30}}}


def point_file(**keys) -> validate.PointFile:
    """A PointFile of TINY_POINT with keys replaced, not read from disk."""
    return validate.PointFile("src/tiny", Path("tiny.yaml"), validate.Point(**changed(**keys)))


@pytest.mark.parametrize("tolerance, within", [(None, None), (0.125, True), (0.12, False)])
def test_rate_error_is_relative(tolerance, within) -> None:
    """A rate's error is simulated / measured − 1, judged against the tolerance only when there is one."""
    row = validate.compare(point_file(measured=4000, tolerance=tolerance), RESULT)
    assert row.simulated == 4500.0
    assert row.error == pytest.approx(0.125)  # 4500 / 4000 − 1
    assert row.within is within


@pytest.mark.parametrize("quantity, field, simulated_gib", [
    (Quantity.ALLOCATED_BYTES, ResultField.MAX_PHASE_ALLOCATED_BYTES, 55),  # the backward's, the largest phase
    (Quantity.RESERVED_BYTES, ResultField.MAX_PHASE_RESERVED_BYTES, 62),  # the optimizer's
    (Quantity.DEVICE_USED_BYTES, ResultField.PEAK_TOTAL_BYTES, 70),
])
def test_memory_fields(quantity, field, simulated_gib) -> None:
    """Each memory measurement is compared with its own result field."""
    row = validate.compare(point_file(measures=quantity.value, compared_with=field.value, measured=50 * 2**30,
                                      tolerance=0.1), RESULT)
    assert row.simulated == simulated_gib * 2**30
    assert row.within is (abs(simulated_gib / 50 - 1) <= 0.1)


@pytest.mark.parametrize("measured, error, disagreement, as_expected", [
    ("oom", 0.0, None, True),  # the run does not fit: the same verdict
    ("fits", 1.0, None, False),
    ("fits", 1.0, "known", True),  # a recorded disagreement that still holds
    ("oom", 0.0, "known", False),  # ... and one that no longer does: the file needs updating
])
def test_verdict(measured, error, disagreement, as_expected) -> None:
    """A verdict is the same or the other one; a recorded disagreement must still disagree."""
    row = validate.compare(point_file(measures="verdict", compared_with="fits", measured=measured, tolerance=0,
                                      disagreement=disagreement), RESULT)
    assert row.simulated is Verdict.OOM
    assert (row.error, row.within, row.as_expected) == (error, error == 0.0, as_expected)


def test_cli_writes_table_and_json(tmp_path: Path, capsys) -> None:
    """The command prints the table, writes the same text as Markdown and the rows as JSON, exit 0."""
    markdown, rows_path = tmp_path / "v.md", tmp_path / "v.json"
    code, out, err = run_cli(capsys, ["validate", "--source", "hf-blog-deepspeed-to-fsdp", "--markdown", str(markdown),
                                      "--json", str(rows_path)])
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "| point | measures | measured | simulated | error | tolerance | agrees |"
    assert "| hf-blog-deepspeed-to-fsdp/llama-2-7b-4xa100-zero3 | tokens_per_s_per_gpu | 3,094 |" in out
    assert markdown.read_text() == out
    [row] = json.loads(rows_path.read_text())
    assert (row["point"], row["measured"], row["tolerance"], row["within"]) == (
        "hf-blog-deepspeed-to-fsdp/llama-2-7b-4xa100-zero3", 3094.5, None, None)
    assert row["error"] == pytest.approx(row["simulated"] / 3094.5 - 1)


@pytest.mark.slow
def test_every_shipped_point_within_its_tolerance() -> None:
    """Each judged point agrees within its tolerance, except those whose file records a known disagreement, which
    must still disagree (else the file is out of date)."""
    rows = validate.validate(validate.load_points())
    unexpected = [(r.key, r.measured, r.simulated, r.error) for r in rows if not r.as_expected]
    assert not unexpected
    assert sum(r.within is True for r in rows) == 52 and sum(r.within is False for r in rows) == 23
