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


# Hub ids of instruct/chat models whose published config.json has a catalog entry's architecture and shapes (model
# type, hidden, intermediate, layers, heads, kv heads, head_dim, vocabulary, tying): the id (lower case) → (that
# entry, the memory-relevant keys whose published value differs from the entry's). Keys without a memory effect
# (eos_token_id, rope_theta) are left out. Ids not listed (Qwen/Qwen1.5-32B-Chat: its config.json was not found in
# a readable copy) keep the error of an unknown path.
_HUB_ALIASES: dict[str, tuple[str, dict]] = {
    # kevinstephano/thunder_model_blocks hf_qwen2 qwen_cfg_str, a copy of Qwen/Qwen2.5-7B-Instruct's config.json
    # (transformers_version 4.43.3): max_position_embeddings 32768 where the base has 131072 (the per-layer rotary
    # caches of transformers < 4.45 are sized by it)
    "qwen/qwen2.5-7b-instruct": ("qwen2.5-7b", {"max_position_embeddings": 32768}),
    # kevinstephano/thunder_model_blocks thunder_model_blocks/gemma2/gemma2_config.py, google/gemma-2-9b-it's
    # config.json (4.42.0.dev0): torch_dtype bfloat16 where the base's is float32
    "google/gemma-2-9b-it": ("gemma-2-9b", {"torch_dtype": "bfloat16"}),
    # thunder_model_blocks llama/llama_3_8B_Instruct_config.py: only eos_token_id (128009) differs
    "meta-llama/meta-llama-3-8b-instruct": ("llama-3-8b", {}),
    # thunder_model_blocks hf_llama/llama_config.py LLAMA_3_2_1B_CFG (Llama-3.2-1B-Instruct): identical shapes
    "meta-llama/llama-3.2-1b-instruct": ("llama-3.2-1b", {}),
    # Meta-Llama-3.1-8B-Instruct: AutoConfig prints rope_scaling llama3 factor 8 and max_position_embeddings 131072
    # (public notes, search "snapshot_download LLM-Research/Meta-Llama-3.1-8B-Instruct"), the module print the base's
    # shapes (Retruth/deontic nlp_models/llama3/README.md LLAMA3_1_INSTRUCT); eos_token_id a list
    "meta-llama/llama-3.1-8b-instruct": ("llama-3.1-8b", {}),
    # Azure/azureml-assets assets/models/system/Mistral-7B-Instruct-v0-2/description.md: v0.2 is the v0.1 shapes with
    # a 32k context, rope_theta 1e6 and no sliding window (config.json sliding_window null), which changes the SDPA
    # masks once seq_len >= 4096
    "mistralai/mistral-7b-instruct-v0.2": ("mistral-7b", {"sliding_window": None}),
}


def hub_entry(hub_id: str) -> tuple[str, dict] | None:
    """(catalog name, config.json keys that differ) for a Hugging Face hub id: the entry written from its own
    config.json (each models/*.yaml's first line names it) or an instruct/chat alias of one; None for others."""
    alias = _HUB_ALIASES.get(hub_id.lower())
    if alias is not None:
        return alias[0], dict(alias[1])
    own = own_entry(hub_id)
    return (own, {}) if own is not None else None


def is_alias(hub_id: str) -> bool:
    """Whether `hub_id` is an instruct/chat alias of a catalog entry (not the entry's own config.json)."""
    return hub_id.lower() in _HUB_ALIASES


def own_entry(hub_id: str) -> str | None:
    """The catalog entry written from this hub id's config.json (each models/*.yaml's first line names it)."""
    for name in names("models"):
        first = (data_dir("models") / f"{name}.yaml").read_text().split("\n", 1)[0].split()
        if len(first) >= 3 and first[0] == "#" and first[2] == "config.json" and first[1].lower() == hub_id.lower():
            return name
    return None


def load_entry(kind: str, name: str, key_path: str) -> dict:
    """The mapping stored for catalog `name`; unknown names are a user error naming `key_path`."""
    path = data_dir(kind) / f"{name.lower()}.yaml"
    if not path.is_file():
        known = ", ".join(names(kind))
        raise ScenarioError(f"{key_path}: unknown {kind} catalog name {name!r} (known: {known})")
    return load_yaml_mapping(path, key_path)
