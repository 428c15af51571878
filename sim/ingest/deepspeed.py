"""A DeepSpeed config: a path to its JSON or an inline mapping, with "auto" values filled the way transformers'
HfTrainerDeepSpeedConfig fills them (integrations/deepspeed.py)."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.paths import existing_path
from sim.ingest.training_args import PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT


def read_deepspeed(ref: Any, base_dir: Path) -> dict | None:
    """The `deepspeed:` reference as a mapping (None: no DeepSpeed)."""
    if isinstance(ref, str):
        return catalog.load_yaml_mapping(existing_path(ref, base_dir, "deepspeed"), "deepspeed")
    if ref is not None and not isinstance(ref, dict):
        raise ScenarioError(f"deepspeed: expected a path or a mapping (got {ref!r})")
    return ref


def resolve_auto(ds: dict, training: dict, hardware: dict, model: dict) -> None:
    """Replace "auto" in place: trainer_config_process fills batch sizes, clipping and precision from
    TrainingArguments; trainer_config_finalize fills the ZeRO bucket sizes from the model's hidden_size."""
    gpus = _as_int(hardware.get("gpus_per_node", 1)) * _as_int(hardware.get("nodes", 1))
    micro = training.get("per_device_train_batch_size", PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT)
    accumulation = training.get("gradient_accumulation_steps", 1)
    hidden = model.get("hidden_size")
    filled = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": _as_int(micro) * _as_int(accumulation) * gpus,
        "gradient_clipping": training.get("max_grad_norm", 1.0),
    }
    for key, value in filled.items():
        if ds.get(key) == "auto":
            ds[key] = value
    for section, flag in (("bf16", "bf16"), ("fp16", "fp16")):
        if isinstance(ds.get(section), dict) and ds[section].get("enabled") == "auto":
            ds[section]["enabled"] = bool(training.get(flag, False))
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    hidden_auto = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, rule in hidden_auto.items():
        if zero.get(key) == "auto":
            if not isinstance(hidden, int):
                raise ScenarioError(f"deepspeed.zero_optimization.{key}: 'auto' needs model.hidden_size")
            zero[key] = rule(hidden)


def _as_int(value: Any) -> int:
    """A count as a user wrote it, or 1 where it is not a positive int (validation reports it later)."""
    return value if isinstance(value, int) and value > 0 else 1
