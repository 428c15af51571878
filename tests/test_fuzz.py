"""The fuzz suite's short deterministic profile (issue #19 item 6): every category of tests/fuzz_cases.py, a fixed
number of examples each, derandomized; `python bench/fuzz.py --cases N` runs the long one."""

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_cases import Case, Category, cases, check

# Per category; the whole file runs in about 15 s of CPU on a 2-core machine (tiny models: tens of ms a run).
EXAMPLES = {Category.VALID: 150, Category.TYPES: 150, Category.BOUNDS: 150, Category.UNKNOWN_KEYS: 80,
            Category.FILES: 100, Category.SET: 150, Category.ARGV: 150}


@pytest.mark.parametrize("category", list(Category), ids=[c.name.lower() for c in Category])
def test_no_traceback_and_every_property_holds(category: Category) -> None:
    """No exception but the input error; exit codes 0/1/2, one stderr line on exit 2; results finite and sound."""

    @settings(max_examples=EXAMPLES[category], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(category))
    def one(case: Case) -> None:
        assert check(case) in {"refused", "ran", "exit 0", "exit 1", "exit 2"}

    one()
