"""Versions that are no release the simulator knows are refused in one line naming key, value and known range;
`target_modules: all` (LLaMA-Factory's spelling) is refused naming PEFT's `all-linear`."""

import pytest

from sim.scenario import build_scenario
from tests.test_bad_input import assert_mentions, assert_one_line_error, run_main, tiny_scenario, write_yaml


@pytest.mark.parametrize(("package", "version", "needle"), [
    ("transformers", "6.0.0", "later than the newest transformers the simulator knows"),
    ("transformers", "5.25.0", "later than the newest"),  # released after the newest whose behaviour is known
    ("transformers", "4.60.0", "is no transformers release"),  # 4.x ended with 4.57
    ("transformers", "4.39.9", "is no transformers release"),  # 4.39 ended with 4.39.3
    ("transformers", "3.5.1", "older than the oldest"),
    ("torch", "2.20.0", "later than the newest torch"),
    ("deepspeed", "0.19.9", "later than the newest deepspeed"),
    ("peft", "0.30.0", "later than the newest peft"),
])
def test_unknown_version_is_one_line_error(tmp_path, capsys, package, version, needle):
    data = tiny_scenario(software={package: version})
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, f"software.{package}", repr(version), needle, "known: ")


@pytest.mark.parametrize("version", ["4.46.0", "4.57.0.dev0", "2.11.0+cu130", "5.24.0"])
def test_versions_of_known_series_are_accepted(version):
    """4.46.0 (a series whose first patch PyPI no longer lists), a dev build of a released series, a local
    build tag, the newest."""
    package = "torch" if "cu" in version else "transformers"
    assert getattr(build_scenario(tiny_scenario(software={package: version})).software, package) == version


@pytest.mark.parametrize("targets", ["all", ["all"]])
def test_target_modules_all_suggests_all_linear(tmp_path, capsys, targets):
    data = tiny_scenario(lora={"r": 8, "target_modules": targets})
    message = assert_one_line_error(*run_main(capsys, ["run", str(write_yaml(tmp_path / "s.yaml", data))]))
    assert_mentions(message, "lora.target_modules", "'all'", "all-linear")
