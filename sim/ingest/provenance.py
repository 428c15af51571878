"""Where each setting that decides a result came from: the scenario file, a file it names (config.json, a DeepSpeed
JSON, a catalog entry), `--set`, "auto" filled by HF's Trainer, or a tool's default at the scenario's version."""

from typing import Any

from sim.versions import NEWEST_BITSANDBYTES, NEWEST_DEEPSPEED, NEWEST_PEFT, NEWEST_TORCH, NEWEST_TRANSFORMERS
from sim.vocab import BITSANDBYTES_OPTIMS

_NEWEST = {"torch": NEWEST_TORCH, "transformers": NEWEST_TRANSFORMERS, "deepspeed": NEWEST_DEEPSPEED,
           "peft": NEWEST_PEFT, "bitsandbytes": NEWEST_BITSANDBYTES}

# Each deciding setting: (the package whose default applies where the scenario has none, what that default is)
DECIDING: dict[str, tuple[str, str]] = {
    "training.per_device_train_batch_size": ("transformers", "TrainingArguments"),
    "training.gradient_accumulation_steps": ("transformers", "TrainingArguments"),
    "training.seq_len": ("", "required"),
    "model.torch_dtype": ("transformers", "from_pretrained: float32 where config.json has no dtype"),
    "training.bf16": ("transformers", "TrainingArguments"),
    "training.fp16": ("transformers", "TrainingArguments"),
    "training.gradient_checkpointing": ("transformers", "TrainingArguments"),
    "training.gradient_checkpointing_kwargs.use_reentrant": ("transformers", "true before 5.0, false from 5.0"),
    "training.attn_implementation": ("transformers", "from_pretrained: sdpa"),
    "training.optim": ("transformers", "TrainingArguments, with the scenario's torch"),
    "software.torch": ("", "the newest the simulator knows"),
    "software.transformers": ("", "the newest the simulator knows"),
    "software.deepspeed": ("", "the newest the simulator knows"),
    "software.peft": ("", "the newest the simulator knows"),
    "nccl.version": ("torch", "the NCCL its PyPI wheel pins"),
    "allocator.conf": ("torch", "PYTORCH_CUDA_ALLOC_CONF unset"),
}
DEEPSPEED_DECIDING: dict[str, tuple[str, str]] = {
    "deepspeed.bf16.enabled": ("transformers", "absent, the Trainer's bf16 flag decides (accelerate)"),
    "deepspeed.fp16.enabled": ("transformers", "absent, the Trainer's fp16 flag decides (accelerate)"),
    **{f"deepspeed.zero_optimization.{key}": ("deepspeed", "zero/config.py") for key in (
        "stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
        "sub_group_size", "offload_optimizer.device", "offload_param.device")},
}
BITSANDBYTES_DECIDING = {"software.bitsandbytes": ("", "the newest the simulator knows")}
LORA_DECIDING: dict[str, tuple[str, str]] = {
    f"lora.{key}": ("peft", "LoraConfig") for key in ("r", "lora_alpha", "target_modules", "modules_to_save")}


def deciding_paths(data: dict) -> dict[str, tuple[str, str]]:
    """The deciding settings of this scenario: DeepSpeed's and LoRA's only where it has them, bitsandbytes' only
    with one of its optimizers."""
    paths = dict(DECIDING)
    if isinstance(data.get("deepspeed"), dict):
        paths |= DEEPSPEED_DECIDING
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    if str(training.get("optim")) in {optim.value for optim in BITSANDBYTES_OPTIMS}:  # any raw value, unvalidated
        paths |= BITSANDBYTES_DECIDING
    if isinstance(data.get("lora"), dict):
        paths |= LORA_DECIDING
    return paths


def origins(data: dict, set_paths: list[str], files: dict[str, str], scenario_file: str) -> dict[str, str]:
    """Each deciding setting's origin, from the raw scenario after `--set` and renames, before "auto" is filled:
    `--set`, the file its section came from ("auto": HF's Trainer), or the default of its package's version."""
    software = data.get("software") if isinstance(data.get("software"), dict) else {}
    out = {}
    for path, (package, default) in deciding_paths(data).items():
        if any(path == s or path.startswith(s + ".") for s in set_paths):
            out[path] = "--set"
            continue
        value = lookup(data, path)
        if value == "auto":
            out[path] = f"'auto' in {files.get(path.split('.')[0]) or scenario_file}, filled by HF's Trainer"
        elif value is not None:
            out[path] = files.get(path.split(".")[0]) or scenario_file
        elif package:
            out[path] = f"default of {package} {software.get(package, _NEWEST[package])}: {default}"
        else:
            out[path] = default
    return out


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path of nested mappings, None where a part is missing."""
    for part in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data
