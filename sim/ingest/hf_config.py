"""The model as a HF config.json says it: a catalog name, a path to a config.json (or its folder), or an inline
mapping of config.json keys."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.paths import existing_path


def read_model(ref: Any, base_dir: Path) -> tuple[dict, str]:
    """(config.json mapping, the name the result reports) for a `model:` reference."""
    if isinstance(ref, dict):
        return ref, str(ref.get("_name_or_path", "inline"))
    if not isinstance(ref, str):
        raise ScenarioError(f"model: expected a catalog name, a path or a mapping (got {ref!r})")
    if ref.endswith((".json", ".yaml", ".yml")) or "/" in ref:
        file = existing_path(ref, base_dir, "model")
        if file.is_dir():
            file = file / "config.json"
        mapping = catalog.load_yaml_mapping(file, "model")
        return mapping, str(mapping.get("_name_or_path", file.parent.name))
    return catalog.load_entry("models", ref, "model"), ref.lower()
