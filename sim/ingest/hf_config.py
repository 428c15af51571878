"""The model as a HF config.json says it: a catalog name, a path to a config.json (or its folder), or an inline
mapping of config.json keys; the dtype under either of its spellings, and what is not modelled refused."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.paths import existing_path

# Keys of a config.json that change memory in ways the simulator does not model, with what they change.
NOT_MODELLED_CONFIG_KEYS = {
    # transformers quantizers (quantizers/auto.py) replace the Linear weights with packed low-bit ones
    # (bitsandbytes, GPTQ, AWQ, fp8, ...): the weights' bytes and the dequantising matmuls differ
    "quantization_config": "quantized weights and their dequantisation buffers",
}


def read_model(ref: Any, base_dir: Path) -> tuple[dict, str, str]:
    """(config.json mapping, the name the result reports, the file it came from: '' inline) for `model:`; a hub id
    that is no local path resolves to its catalog entry (sim/catalog.py hub_entry)."""
    if isinstance(ref, dict):
        return ref, str(ref.get("_name_or_path", "inline")), ""
    if not isinstance(ref, str):
        raise ScenarioError(f"model: expected a catalog name, a path or a mapping (got {ref!r})")
    if ref.endswith((".json", ".yaml", ".yml")) or "/" in ref:
        entry = None if any(p.exists() for p in (Path(ref), base_dir / ref)) else catalog.hub_entry(ref)
        if entry is not None:  # a hub id of a catalog entry or of an instruct/chat alias of one
            name, differing = entry
            return {**catalog.load_entry("models", name, "model"), **differing}, ref, f"models/{name}.yaml"
        file = existing_path(ref, base_dir, "model")
        if file.is_dir():
            file = file / "config.json"
        mapping = catalog.load_yaml_mapping(file, "model")
        written = ref if file.name == Path(ref).name else str(Path(ref) / "config.json")  # as the user wrote it
        return mapping, str(mapping.get("_name_or_path", file.parent.name)), written
    return catalog.load_entry("models", ref, "model"), ref.lower(), f"models/{ref.lower()}.yaml"


def normalize_config(model: dict, file: str = "") -> None:
    """In place: `dtype` (what transformers writes from 4.56, PR #39782; 5.x writes only it) becomes the schema's
    `torch_dtype` (what earlier versions write). transformers 5.24 configuration_utils.py PretrainedConfig
    __post_init__ keeps `dtype` when both are given; here two different values are an error instead, since one
    file cannot mean both. Before 4.56 a config with only `dtype` has no torch_dtype, and from_pretrained
    (torch_dtype="auto") takes the checkpoint's own dtype (4.47 modeling_utils.py get_state_dict_dtype), which is
    the one save_pretrained wrote as `dtype`: the same weights for every version. Keys that change memory in a way
    not modelled are refused, naming the file."""
    where = f" (in {file})" if file else ""
    if "dtype" in model:
        dtype = model.pop("dtype")
        if "torch_dtype" in model and model["torch_dtype"] != dtype:
            raise ScenarioError(f"model.dtype: {dtype!r} conflicts with model.torch_dtype {model['torch_dtype']!r}"
                                f"{where} (transformers writes one of them; give one)")
        model["torch_dtype"] = dtype
    for key, why in NOT_MODELLED_CONFIG_KEYS.items():
        value = model.get(key)
        if value is not None:
            shown = value.get("quant_method", "{...}") if isinstance(value, dict) else value
            raise ScenarioError(f"model.{key}: {shown!r}: not modelled (affects memory: {why}){where}")
