"""Where a file a scenario names is found: as given, or beside the scenario file."""

from pathlib import Path

from sim.errors import ScenarioError


def existing_path(ref: str, base_dir: Path, key_path: str) -> Path:
    """The first of `ref` and `base_dir / ref` that exists; else one line naming the key and the path."""
    for candidate in (Path(ref), base_dir / ref):
        if candidate.exists():
            return candidate
    raise ScenarioError(f"{key_path}: file not found: {ref!r}")
