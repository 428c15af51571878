"""The wheel must carry every package of sim/ (pyproject.toml lists them explicitly beside the data folders)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_sim_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sim").rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)


def test_data_folders_are_packaged() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"sim._data.models": "models", "sim._data.hardware": "hardware",
                                     "sim._data.scenarios": "scenarios", "sim._data.validation": "validation"}
