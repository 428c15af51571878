"""Every golden case gives exactly its recorded result, printed summary, trace, op times and allocator end state
(tests/golden_record.py says what is recorded and how to rewrite it)."""

import json

import pytest

from golden_record import case_paths, expected_path, record

CASES = case_paths()


def test_every_case_has_a_record_and_every_record_a_case() -> None:
    recorded = {path.stem for path in expected_path("x").parent.glob("*.json")}
    assert recorded == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    expected = json.loads(expected_path(name).read_text())
    got = json.loads(json.dumps(record(CASES[name])))
    assert got["result"] == expected["result"]
    assert got["summary"] == expected["summary"]
    assert (got["end_time_us"], got["repeated_events"]) == (expected["end_time_us"], expected["repeated_events"])
    differing = sorted(key for key in expected["digests"].keys() | got["digests"].keys()
                       if expected["digests"].get(key) != got["digests"].get(key))
    assert differing == []
