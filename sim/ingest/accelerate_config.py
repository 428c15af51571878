"""An accelerate config (`accelerate launch --config_file FILE`, default_config.yaml) describes the launch, not the
model: given with `--launch FILE` beside a scenario, LLaMA-Factory or axolotl file, it sets the GPU count
(num_processes over num_machines), the DeepSpeed plugin's config and, where the training file sets no precision,
the mixed precision. FSDP and the other distributed types are refused as not modelled.

Source: huggingface/accelerate v1.14.0 (beb0672aa8444ea7647aee056f624effe5996346): commands/config/config_args.py
(ClusterConfig: the keys and defaults), utils/dataclasses.py DeepSpeedPlugin.__post_init__ (the DeepSpeed config
built from the plugin keys, zero_stage 2 and offload "none" by default, or read from deepspeed_config_file) and
set_mixed_precision. transformers TrainingArguments.__post_init__ sets ACCELERATE_MIXED_PRECISION from its own
bf16/fp16, so those win over the file's mixed_precision."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.formats import Converted
from sim.ingest.llamafactory import FULL_FLOAT32
from sim.ingest.keys import classify, modelled, neutral, not_modelled
from sim.ingest.paths import existing_path

VERSION = "1.14.0"
ZERO_STAGE_DEFAULT = 2  # DeepSpeedPlugin.__post_init__: ACCELERATE_DEEPSPEED_ZERO_STAGE, default 2

_LAUNCH = "launcher, rendezvous or TPU setting: no device tensor changes"
ACCELERATE = {
    **{key: modelled() for key in (
        "distributed_type", "num_processes", "num_machines", "mixed_precision", "deepspeed_config", "fsdp_config")},
    **{key: neutral(_LAUNCH) for key in (
        "compute_environment", "debug", "machine_rank", "main_training_function", "rdzv_backend", "same_network",
        "tpu_env", "tpu_use_cluster", "tpu_use_sudo", "tpu_name", "tpu_zone", "tpu_vm", "commands", "command_file",
        "main_process_ip", "main_process_port", "gpu_ids", "enable_cpu_affinity", "mpirun_config")},
    "downcast_bf16": neutral("TPU only (XLA_DOWNCAST_BF16)"),
    "use_cpu": not_modelled("training on the CPU", False),
    "dynamo_config": not_modelled("torch.compile'd graphs", None, {}, {"dynamo_backend": "NO"}),
    "megatron_lm_config": not_modelled("Megatron-LM parallelism", None, {}),
    "parallelism_config": not_modelled("tensor, context or sequence parallelism", None, {}),
}
_PLUGIN = {
    **{key: modelled() for key in (
        "zero_stage", "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps",
        "gradient_clipping", "deepspeed_config_file")},
    "zero3_init_flag": neutral("deepspeed.zero.Init partitions the weights while loading, before the step"),
    "zero3_save_16bit_model": neutral("checkpoint saving, between steps"),
    "deepspeed_multinode_launcher": neutral(_LAUNCH),
    "deepspeed_hostfile": neutral(_LAUNCH),
    "deepspeed_exclusion_filter": neutral(_LAUNCH),
    "deepspeed_inclusion_filter": neutral(_LAUNCH),
    "offload_optimizer_nvme_path": not_modelled("NVMe offload", None, "none"),
    "offload_param_nvme_path": not_modelled("NVMe offload", None, "none"),
    "deepspeed_moe_layer_cls_names": not_modelled("DeepSpeed MoE layers", None, ""),
}


def apply_launch(converted: Converted, path: Path) -> None:
    """In place: the launch the accelerate config at `path` describes, merged into the training file's scenario."""
    raw = catalog.load_yaml_mapping(path, "--launch")
    where = f" (in {path.name})"
    config = dict(raw)
    converted.ignored += classify(config, ACCELERATE, "accelerate", where)
    unknown = [key for key in config if key not in ACCELERATE]
    if unknown:
        raise ScenarioError(f"accelerate.{unknown[0]}: unknown key{where}")
    scenario = converted.raw
    _processes(config, scenario, where, converted)
    kind = config.get("distributed_type", "NO")
    if kind == "DEEPSPEED":
        if scenario.get("deepspeed") is not None or "deepspeed" in (scenario.get("training") or {}):
            raise ScenarioError(f"accelerate.distributed_type: 'DEEPSPEED'{where}: the training file names a "
                                "DeepSpeed config too; give one")
        scenario["deepspeed"] = _deepspeed(config.get("deepspeed_config") or {}, path, where, converted)
        if converted.defaults.get("model.torch_dtype") == FULL_FLOAT32:
            raise ScenarioError(f"accelerate.distributed_type: 'DEEPSPEED'{where}: not modelled beside a LLaMA-Factory "
                                "full fine-tuning file (whether ZeRO-3 keeps its weights out of float32 is decided "
                                "from its own deepspeed:); name the DeepSpeed config there")
    elif kind == "FSDP":
        raise ScenarioError(f"accelerate.distributed_type: 'FSDP'{where}: not modelled (affects memory: FSDP shards "
                            "parameters, gradients and optimizer states; fsdp_config is not read)")
    elif kind not in ("NO", "MULTI_GPU"):
        raise ScenarioError(f"accelerate.distributed_type: {kind!r}{where}: not modelled (modelled: NO, MULTI_GPU, "
                            "DEEPSPEED)")
    _precision(config.get("mixed_precision", "no"), scenario, path.name, converted, where)


def _processes(config: dict, scenario: dict, where: str, converted: Converted) -> None:
    """num_processes (over all machines) and num_machines as GPUs per node and nodes."""
    processes, machines = config.get("num_processes", -1), config.get("num_machines", 1)
    for key, value in (("num_processes", processes), ("num_machines", machines)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScenarioError(f"accelerate.{key}: {value!r}{where}: expected a positive count (-1, every GPU of "
                                "the machine, names no number)")
    if processes % machines:
        raise ScenarioError(f"accelerate.num_processes: {processes}{where}: not a multiple of num_machines "
                            f"{machines}")
    hardware = scenario.setdefault("hardware", {})
    if "device" not in hardware:
        converted.missing.setdefault("hardware", f"hardware.device: required key is missing; the accelerate config"
                                                 f"{where} gives the GPU count only: add --set hardware.device=NAME")
    for key, value in (("gpus_per_node", processes // machines), ("nodes", machines)):
        if key in hardware and hardware[key] != value:
            raise ScenarioError(f"accelerate.num_processes: {processes}{where}: conflicts with hardware.{key} "
                                f"{hardware[key]!r} of the training file")
        hardware[key] = value


def _deepspeed(plugin: dict, path: Path, where: str, converted: Converted) -> dict | str:
    """The DeepSpeed config the plugin hands the Trainer: deepspeed_config_file as written (no other plugin key
    beside it, as accelerate's _deepspeed_config_checks requires; its path, read as a scenario's `deepspeed:`), else
    the one __post_init__ builds."""
    plugin = dict(plugin)
    converted.ignored += classify(plugin, _PLUGIN, "accelerate.deepspeed_config", where)
    unknown = [key for key in plugin if key not in _PLUGIN]
    if unknown:
        raise ScenarioError(f"accelerate.deepspeed_config.{unknown[0]}: unknown key{where}")
    file = plugin.pop("deepspeed_config_file", None)
    if file not in (None, "none"):
        if plugin:
            key = next(iter(plugin))
            raise ScenarioError(f"accelerate.deepspeed_config.{key}: {plugin[key]!r}{where}: not with "
                                "deepspeed_config_file (accelerate refuses both; set it in the DeepSpeed JSON)")
        return str(existing_path(file, path.parent, "accelerate.deepspeed_config_file"))  # read as `deepspeed:`
    stage = plugin.get("zero_stage")
    for target, key, default in (("stage", "zero_stage", ZERO_STAGE_DEFAULT),
                                 ("offload_optimizer.device", "offload_optimizer_device", "none"),
                                 ("offload_param.device", "offload_param_device", "none")):
        converted.defaults[f"deepspeed.zero_optimization.{target}"] = (
            f"{path.name}: deepspeed_config.{key}" if key in plugin
            else f"default of accelerate {VERSION}: {key} {default}")
    config: dict[str, Any] = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        # ACCELERATE_GRADIENT_ACCUMULATION_STEPS, "auto" when the file has none; a number is compared with
        # TrainingArguments' by HF's Trainer
        "gradient_accumulation_steps": plugin.get("gradient_accumulation_steps", "auto"),
        "zero_optimization": {
            "stage": ZERO_STAGE_DEFAULT if stage is None else stage,
            "offload_optimizer": {"device": plugin.get("offload_optimizer_device", "none")},
            "offload_param": {"device": plugin.get("offload_param_device", "none")},
        },
    }
    if plugin.get("gradient_clipping") is not None:
        config["gradient_clipping"] = plugin["gradient_clipping"]
    return config


def _precision(mixed: Any, scenario: dict, name: str, converted: Converted, where: str) -> None:
    """mixed_precision bf16/fp16 where the training file turns neither on (TrainingArguments' own flags win)."""
    if mixed not in ("no", "bf16", "fp16"):
        raise ScenarioError(f"accelerate.mixed_precision: {mixed!r}{where}: expected no, bf16 or fp16 (fp8 is not "
                            "modelled)")
    training = scenario.setdefault("training", {})
    if mixed != "no" and not training.get("bf16") and not training.get("fp16"):
        training[mixed] = True
        converted.defaults.pop(f"training.{mixed}", None)
        converted.defaults[f"training.{mixed}"] = f"{name}: mixed_precision {mixed}"
