"""Finds the data directories models/, hardware/ and scenarios/ (checkout or installed wheel) and their entries;
`load_yaml_mapping` (sim/ingest/files.py) is the one reader of every input file."""

from functools import cache
from importlib import resources
from pathlib import Path

from sim.errors import ScenarioError
from sim.ingest.files import load_yaml_mapping

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


def scenario_path(ref: str) -> Path:
    """What `run` was given: a file path as is, else the name of a shipped scenario (scenarios/NAME.yaml), so that
    `python -m sim run qwen32b_8xa800` works from any directory; neither is one line listing the names."""
    path = Path(ref)
    if path.exists():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name.lower() in names("scenarios"):
        return data_dir("scenarios") / f"{name.lower()}.yaml"
    raise ScenarioError(f"scenario: no file {ref!r} and no shipped scenario of that name (known: "
                        f"{', '.join(names('scenarios'))})")


def load_entry(kind: str, name: str, key_path: str) -> dict:
    """The mapping stored for catalog `name`; unknown names are a user error naming `key_path`."""
    path = data_dir(kind) / f"{name.lower()}.yaml"
    if not path.is_file():
        known = ", ".join(names(kind))
        raise ScenarioError(f"{key_path}: unknown {kind} catalog name {name!r} (known: {known})")
    return load_yaml_mapping(path, key_path)
