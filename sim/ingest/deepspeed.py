"""A DeepSpeed config: a path to its JSON or an inline mapping; every key classified (sim/ingest/keys.py) from
DeepSpeed 0.19.6's schema (deepspeed/runtime/config.py DeepSpeedConfig._initialize_params and constants.py,
zero/config.py DeepSpeedZeroConfig, zero/offload_config.py, precision_config.py); "auto" values filled and explicit
ones checked the way transformers' HfTrainerDeepSpeedConfig does (integrations/deepspeed.py, 5.24.0). HF compares
an explicit train_batch_size with world x micro-batch x accumulation of TrainingArguments, so what passes also passes
DeepSpeed's own runtime/config.py _batch_assertion (train_batch_size = micro-batch x accumulation x world size), and
the micro-batch and accumulation simulated are TrainingArguments' (equal to DeepSpeed's wherever it gives them)."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.keys import IgnoredKey, KeyRule, classify, disabled, modelled, neutral, not_modelled
from sim.ingest.paths import existing_path
from sim.ingest.training_args import PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT

_LOG = "monitoring, logging or profiling"
_SAVE = "checkpoint saving or loading, between steps"
_SCALAR = "a scalar setting of the step: no tensor changes size"
_OFF = "a feature section, accepted while disabled"

DEEPSPEED: dict[str, KeyRule] = {
    **{key: modelled() for key in (
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
        "zero_optimization", "bf16", "fp16", "communication_data_type", "data_types", "optimizer")},
    "bfloat16": modelled("bf16"),  # constants.py BFLOAT16_OLD, read when "bf16" is absent
    **{key: neutral(_LOG) for key in (
        "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "tensorboard", "wandb",
        "csv_monitor", "comet", "comms_logger", "flops_profiler", "timers", "log_level")},
    **{key: neutral(_SAVE) for key in ("checkpoint", "nebula", "datastates_ckpt", "load_universal_checkpoint")},
    **{key: neutral(_SCALAR) for key in (
        "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op", "disable_allgather",
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "graph_harvesting", "dataloader_drop_last",
        "use_data_before_expert_parallelism", "seq_parallel_communication_data_type")},
    "scheduler": neutral("the learning-rate schedule"),
    "autotuning": neutral("DeepSpeed's autotuner, a separate launcher run"),
    "aio": neutral("asynchronous I/O of NVMe offload (refused)"),
    "activation_checkpointing": neutral("read by deepspeed.checkpointing (Megatron-style models); HF models "
                                        "checkpoint with torch.utils.checkpoint (training.gradient_checkpointing)"),
    "managed_gradient_accumulation": neutral("which side counts the accumulation boundary"),
    "amp": not_modelled("apex amp's casts and master weights", when=disabled),
    "torch_autocast": not_modelled("DeepSpeed's own torch.autocast around the forward", when=disabled),
    "sparse_gradients": not_modelled("sparse embedding gradients", False),
    "sparse_attention": not_modelled("block-sparse attention layouts", None, {}),
    "pipeline": not_modelled("pipeline parallelism", None, {}),
    "progressive_layer_drop": not_modelled("layers skipped in the forward", when=disabled),
    "curriculum_learning": not_modelled("sequence lengths that grow during training", when=disabled),
    "data_efficiency": not_modelled("data sampling and random layer-token drop", when=disabled),
    "eigenvalue": not_modelled("Hessian eigenvalue power iterations", when=disabled),
    "quantize_training": not_modelled("quantised weights during training", when=disabled),
    "compression_training": not_modelled("compressed (pruned, quantised) layers", None, {}),
    "weight_quantization": not_modelled("quantised weights", None, {}),
    "hybrid_engine": not_modelled("DeepSpeed-Chat's inference containers", when=disabled),
    "elasticity": not_modelled("batch sizes chosen by elastic training", when=disabled),
    "tensor_parallel": not_modelled("AutoTP tensor parallelism",
                                    when=lambda v: v in (None, {}) or (isinstance(v, dict) and
                                                                       v.get("autotp_size", 0) in (0, 1))),
    "compile": not_modelled("DeepCompile's passes (activation freeing and offload)",
                            when=lambda v: v in (None, {}) or (isinstance(v, dict) and not v.get("deepcompile"))),
    "expert_parallel": not_modelled("expert parallelism", None, {}),
}

ZERO: dict[str, KeyRule] = {
    **{key: modelled() for key in (
        "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size",
        "overlap_comm", "sub_group_size", "offload_param", "offload_optimizer", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_model_persistence_threshold", "stage3_max_live_parameters",
        "stage3_max_reuse_distance")},
    # zero/config.py: the field names whose aliases (populate_by_name) are the stage3_ names above
    **{key: modelled(f"stage3_{key}") for key in (
        "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
        "max_live_parameters", "max_reuse_distance")},
    **{key: neutral(_SAVE) for key in (
        "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save", "load_from_fp32_weights", "elastic_checkpoint",
        "pipeline_loading_checkpoint")},
    **{key: neutral(_LOG) for key in ("log_trace_cache_warnings", "enable_sanity_checks")},
    "allgather_partitions": neutral("read by DeepSpeedEngine.zero_allgather_partitions, passed to no ZeRO "
                                    "optimizer in 0.19.6"),
    "round_robin_gradients": neutral("the order of gradient partitions copied to the host; the same buffers"),
    "ignore_unused_parameters": neutral("an assertion of ZeRO-1/2 on parameters without gradients"),
    "override_module_apply": neutral("ZeRO-3 gathers parameters for module.apply at initialisation"),
    "use_multi_rank_bucket_allreduce": not_modelled("the all-reduce path of reduce_scatter false (refused)", True),
    "memory_efficient_linear": not_modelled("false keeps torch's linear under ZeRO-3 (other saved tensors)", True),
    "cpu_offload": not_modelled("deprecated spelling of offload_optimizer: write that", None, False),
    "cpu_offload_param": not_modelled("deprecated spelling of offload_param: write that", None, False),
    "cpu_offload_use_pin_memory": neutral("pinned host memory of the deprecated cpu_offload"),
    "zenflow": not_modelled("ZenFlow's asynchronous CPU optimizer updates", None, {}),
    "module_granularity_threshold": not_modelled("small modules fetched whole as ZeRO-3 leaf modules", 0),
    "stage3_module_granularity_threshold": not_modelled("small modules fetched whole as ZeRO-3 leaf modules", 0),
    "use_all_reduce_for_fetch_params": not_modelled("parameters fetched by all-reduce", False),
    "stage3_use_all_reduce_for_fetch_params": not_modelled("parameters fetched by all-reduce", False),
    "allgather_sequential": not_modelled("parameters gathered one by one", False),
    "stage3_allgather_sequential": not_modelled("parameters gathered one by one", False),
    "legacy_stage1": not_modelled("the legacy ZeRO-1 partitioning", False),
    "zero_hpz_partition_size": not_modelled("ZeRO++ hpZ: a secondary copy of the parameters' partition inside "
                                            "the node", 1),
    "zero_quantized_weights": not_modelled("ZeRO++ qwZ: int8 parameter all-gathers", False),
    "zero_quantized_nontrainable_weights": not_modelled("quantised frozen weights", False),
    "zero_quantized_gradients": not_modelled("ZeRO++ qgZ: quantised gradient reduction", False),
    "zeropp_loco_param": not_modelled("ZeRO++ LoCo error feedback buffers", None, {}),
    "mics_shard_size": not_modelled("MiCS: parameters sharded over a sub-group", -1),
    "mics_hierarchical_params_gather": not_modelled("MiCS hierarchical all-gather", False),
    "save_muon_momentum_buffer_in_memory": not_modelled("Muon's momentum buffers", False),
    "leaf_module": not_modelled("modules fetched whole as ZeRO-3 leaf modules", None, {}),
}

_NVME = "NVMe offload only (refused)"
OFFLOAD: dict[str, KeyRule] = {
    "device": modelled(),
    "ratio": modelled(),
    "pin_memory": neutral("pinned host memory"),
    "fast_init": neutral("how the host optimizer state is initialised"),
    "cpuadam_cores_perc": neutral("host CPU cores of DeepSpeedCPUAdam"),
    **{key: neutral(_NVME) for key in (
        "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pipeline_read", "pipeline_write", "pipeline")},
    "super_offload": not_modelled("SuperOffload's overlapped CPU optimizer step", False),
}

PRECISION: dict[str, KeyRule] = {
    "enabled": modelled(),
    **{key: neutral("loss scaling: a scalar") for key in (
        "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
        "min_loss_scale")},
    "check_grad_overflow": neutral("an overflow check of the gradients' norm: a scalar"),
    "auto_cast": not_modelled("inputs cast to fp16 by the engine", False),
    "fp16_master_weights_and_grads": not_modelled("fp16 master weights and gradients", False),
    "bf16_master_weights_and_grads": not_modelled("bf16 master weights and gradients", False),
    "bf16_optimizer_states": not_modelled("bf16 optimizer states", False),
    "immediate_grad_update": not_modelled("gradients applied to the fp32 copy as they arrive", False),
}


def read_deepspeed(ref: Any, base_dir: Path) -> tuple[dict | None, str]:
    """The `deepspeed:` reference as a mapping (None: no DeepSpeed), and its file as written ('' inline)."""
    if isinstance(ref, str):
        return catalog.load_yaml_mapping(existing_path(ref, base_dir, "deepspeed"), "deepspeed"), ref
    if ref is not None and not isinstance(ref, dict):
        raise ScenarioError(f"deepspeed: expected a path or a mapping (got {ref!r})")
    return ref, ""


def classify_deepspeed(ds: dict, where: str = "") -> list[IgnoredKey]:
    """In place: every section classified; a top-level key in no table is unknown (the schema keeps the top level
    open for the sections resolve.py reads)."""
    ignored = classify(ds, DEEPSPEED, "deepspeed", where)
    unknown = [key for key in ds if key not in DEEPSPEED]
    if unknown:
        raise ScenarioError(f"deepspeed.{unknown[0]}: unknown key{where}")
    for section in ("bf16", "fp16"):
        if isinstance(ds.get(section), dict):
            ignored += classify(ds[section], PRECISION, f"deepspeed.{section}", where)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        ignored += classify(zero, ZERO, "deepspeed.zero_optimization", where)
        for key in ("offload_param", "offload_optimizer"):
            if isinstance(zero.get(key), dict):
                ignored += classify(zero[key], OFFLOAD, f"deepspeed.zero_optimization.{key}", where)
    return ignored


# TrainingArguments defaults the Trainer compares DeepSpeed's values with (transformers 5.24.0 training_args.py)
_HF_DEFAULTS = {"per_device_train_batch_size": PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT, "gradient_accumulation_steps": 1,
                "max_grad_norm": 1.0, "learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "adam_epsilon": 1e-8, "weight_decay": 0.0, "bf16": False, "fp16": False, "bf16_full_eval": False,
                "fp16_full_eval": False}


def resolve_auto(ds: dict, training: dict, hardware: dict, model: dict, where: str = "") -> None:
    """In place, as HF's Trainer and DeepSpeed do before training: trainer_config_process fills "auto" from
    TrainingArguments and collects every explicit value that differs (its ValueError, here one line);
    trainer_config_finalize fills the ZeRO bucket sizes from the model's hidden_size."""
    hf = {key: training.get(key, default) for key, default in _HF_DEFAULTS.items()}
    gpus = _as_int(hardware.get("gpus_per_node", 1)) * _as_int(hardware.get("nodes", 1))
    micro, accumulation = hf["per_device_train_batch_size"], hf["gradient_accumulation_steps"]
    matched = [  # (DeepSpeed key, TrainingArguments value, its name in HF's message), in trainer_config_process order
        ("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", accumulation, "gradient_accumulation_steps"),
        ("train_batch_size", _as_int(micro) * _as_int(accumulation) * gpus, "train_batch_size (calculated)"),
        ("gradient_clipping", hf["max_grad_norm"], "max_grad_norm"),
        ("optimizer.params.lr", hf["learning_rate"], "learning_rate"),
        ("optimizer.params.betas", [hf["adam_beta1"], hf["adam_beta2"]], "adam_beta1+adam_beta2"),
        ("optimizer.params.eps", hf["adam_epsilon"], "adam_epsilon"),
        ("optimizer.params.weight_decay", hf["weight_decay"], "weight_decay"),
        ("scheduler.params.warmup_max_lr", hf["learning_rate"], "learning_rate"),
        ("fp16.enabled", bool(hf["fp16"] or hf["fp16_full_eval"]), "fp16|fp16_full_eval"),
        ("bf16.enabled", bool(hf["bf16"] or hf["bf16_full_eval"]), "bf16|bf16_full_eval"),
    ]
    mismatches = []
    for long_key, hf_value, hf_name in matched:
        node, key = _node(ds, long_key)
        if node is None:
            continue
        if node.get(key) == "auto":
            node[key] = hf_value
        elif node.get(key) is not None and node[key] != hf_value:
            mismatches.append(f"ds {long_key}={node[key]!r} vs hf {hf_name}={hf_value!r}")
    node, key = _node(ds, "scheduler.params.warmup_min_lr")
    if node is not None and node.get(key) == "auto":
        node[key] = 0  # fill_only: not a trainer argument
    if mismatches:
        raise ScenarioError(f"deepspeed{where}: DeepSpeed config values mismatch TrainingArguments values: "
                            f"{'; '.join(mismatches)} (HF Trainer raises this; set them to 'auto')")
    _fill_hidden_size_auto(ds, model)


def _fill_hidden_size_auto(ds: dict, model: dict) -> None:
    """trainer_config_finalize: the ZeRO bucket sizes that say "auto" from the model's hidden_size."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    hidden = model.get("hidden_size")
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


def _node(ds: dict, long_key: str) -> tuple[dict | None, str]:
    """find_config_node: the mapping holding the last part of a dotted key, None where a part is missing."""
    *parents, key = long_key.split(".")
    node = ds
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None, key
    return node, key


def _as_int(value: Any) -> int:
    """A count as a user wrote it, or 1 where it is not a positive int (validation reports it later)."""
    return value if isinstance(value, int) and value > 0 else 1
