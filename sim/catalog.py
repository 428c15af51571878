"""Finds the data directories models/, hardware/ and scenarios/ (checkout or installed wheel) and their entries."""

import json
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from sim.errors import ScenarioError

_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


@cache
def data_dir(kind: str) -> Path:
    """The directory of one catalog kind: a checkout's top level first, else the copy installed in the wheel."""
    checkout = _CHECKOUT_ROOT / kind
    if checkout.is_dir() and (_CHECKOUT_ROOT / "pyproject.toml").is_file():
        return checkout
    installed = Path(str(resources.files("sim") / "_data" / kind))
    if installed.is_dir():
        return installed
    raise ScenarioError(f"catalog directory {kind}/ not found (looked in {checkout} and {installed})")


def names(kind: str) -> list[str]:
    """Sorted catalog names of one kind (file names without .yaml)."""
    return sorted(p.stem for p in data_dir(kind).glob("*.yaml"))


def load_entry(kind: str, name: str, key_path: str) -> dict:
    """The mapping stored for catalog `name`; unknown names are a user error naming `key_path`."""
    path = data_dir(kind) / f"{name.lower()}.yaml"
    if not path.is_file():
        known = ", ".join(names(kind))
        raise ScenarioError(f"{key_path}: unknown {kind} catalog name {name!r} (known: {known})")
    return load_yaml_mapping(path, key_path)


def load_yaml_mapping(path: Path, key_path: str) -> dict:
    """Parse a YAML (or JSON, a YAML subset) file that must hold a mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{key_path}: cannot read {str(path)!r}: {exc.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScenarioError(
                f"{key_path}: {str(path)!r} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(data, dict):
            raise ScenarioError(f"{key_path}: {str(path)!r} must hold a mapping, got {type(data).__name__}")
        return data
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ScenarioError(f"{key_path}: {str(path)!r} is not valid YAML/JSON:{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{key_path}: {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data
