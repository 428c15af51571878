"""Which format a file given to `run` is in (a scenario, or a file a training tool launches with), detected from its
keys or named with `--format`, and its conversion to a raw scenario by that format's own module."""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sim.errors import ScenarioError
from sim.ingest.keys import IgnoredKey


class Format(Enum):
    """The formats `run` reads: the scenario vocabulary, or a training tool's own file."""

    SCENARIO = "scenario"
    LLAMAFACTORY = "llamafactory"
    AXOLOTL = "axolotl"
    ACCELERATE = "accelerate"


_TOOL = {Format.LLAMAFACTORY: "a LLaMA-Factory YAML", Format.AXOLOTL: "an axolotl YAML",
         Format.ACCELERATE: "an accelerate config"}


@dataclass
class Converted:
    """A raw scenario mapping, the keys its conversion accepted with no effect, the settings a tool's default
    decided ({scenario path: 'default of TOOL VERSION: ...'}), and the one line for a required key it lacks."""

    raw: dict
    ignored: list[IgnoredKey] = field(default_factory=list)
    defaults: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    file: str = ""  # the tool's file; '' for a scenario
    source_keys: dict[str, str] = field(default_factory=dict)  # scenario path -> the tool's key it came from

    def locate(self, message: str) -> str:
        """A schema error about a tool's file, naming the file and the tool's own key where the line has neither."""
        if not self.file or "(in " in message:
            return message
        path, sep, rest = message.partition(":")
        key = self.source_keys.get(path)
        return f"{path} ({key} in {self.file}){sep}{rest}" if key and sep else f"{message} (in {self.file})"


def model_with_dtype(ref: str, base_dir: Path, dtype: str) -> dict:
    """The model `ref` names (catalog name or config.json path) as an inline config whose weights a tool loads in
    `dtype` whatever config.json says, keeping the name the result reports."""
    from sim.ingest.hf_config import read_model

    mapping, name, _ = read_model(ref, base_dir)
    model = {key: value for key, value in mapping.items() if key != "dtype"}
    return {**model, "_name_or_path": name, "torch_dtype": dtype}


def detect(raw: dict) -> Format:
    """The format by its distinctive keys: LLaMA-Factory's model_name_or_path with stage or finetuning_type,
    axolotl's base_model, accelerate's distributed_type or compute_environment; else a scenario."""
    if "model_name_or_path" in raw and ("stage" in raw or "finetuning_type" in raw):
        return Format.LLAMAFACTORY
    if "base_model" in raw:
        return Format.AXOLOTL
    if "distributed_type" in raw or "compute_environment" in raw:
        return Format.ACCELERATE
    return Format.SCENARIO


def convert(raw: dict, path: Path, fmt: Format | None) -> Converted:
    """The file's mapping as a raw scenario; a scenario passes through."""
    fmt = fmt or detect(raw)
    if fmt is Format.SCENARIO:
        return Converted(raw)
    if fmt is Format.ACCELERATE:
        raise ScenarioError(f"{path.name}: an accelerate config describes the launch, not the model: give it with "
                            "--launch beside a scenario, LLaMA-Factory or axolotl file")
    if fmt is Format.LLAMAFACTORY:
        from sim.ingest import llamafactory as module
    else:
        from sim.ingest import axolotl as module  # type: ignore[no-redef]
    scenario, ignored, defaults = module.to_scenario(raw, path.name, path.parent)
    source_keys = {target: f"{fmt.value}.{key}" for key, target in module.SCENARIO_PATHS.items() if key in raw}
    missing = {"hardware": f"hardware: {_TOOL[fmt]} names no GPU: add --set hardware.device=NAME (python -m sim "
                           "catalog hardware lists them); the count: hardware.gpus_per_node=N or --launch an "
                           "accelerate config"}
    if "_model_missing" in scenario:
        missing["model"] = scenario.pop("_model_missing")
    return Converted(scenario, ignored, defaults, missing, path.name, source_keys)
