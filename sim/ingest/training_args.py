"""HF TrainingArguments as scenarios name them: every field classified (sim/ingest/keys.py), and the
sequence-length names other trainers use for the same setting (TrainingArguments/tokenizer `model_max_length`,
LLaMA-Factory `cutoff_len`, TRL/axolotl `max_seq_length`).

The fields are those of transformers 5.24.0 src/transformers/training_args.py (the default version, sim/versions.py)
and those 4.32.0 - 4.47.1 had that 5.x removed (read from the wheels), so a file of either era is understood."""

from typing import Any

from sim.errors import ScenarioError
from sim.ingest.keys import IgnoredKey, KeyRule, classify, modelled, neutral, not_modelled
from sim.vocab import Optim

SEQ_LEN_ALIASES = ("model_max_length", "cutoff_len", "max_seq_length")
PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT = 8  # transformers training_args.py TrainingArguments.per_device_train_batch_size

_RUN = "run length, schedule or hyperparameter value: no tensor changes size"
_LOG = "logging, reporting or the Hub"
_SAVE = "checkpoint saving or loading, between steps"
_EVAL = "evaluation only; the training step is what is simulated"
_DATA = "data loading on the host; the simulated batch is per_device_train_batch_size x seq_len"
_HOST = "launcher or process setting"

TRAINING_ARGS: dict[str, KeyRule] = {
    # modelled: the scenario's training fields (design.md §3) and their other names
    **{key: modelled() for key in (
        "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "optim", "weight_decay", "max_grad_norm", "seq_len", "attn_implementation",
        "logging_nan_inf_filter")},
    # 5.x: activation_checkpointing* are the names, gradient_checkpointing* their deprecated aliases
    "activation_checkpointing": modelled("gradient_checkpointing"),
    "activation_checkpointing_kwargs": modelled("gradient_checkpointing_kwargs"),
    "per_gpu_train_batch_size": modelled("per_device_train_batch_size"),  # 4.x deprecated alias
    "deepspeed": modelled(),  # the DeepSpeed config: moved to the scenario's top-level `deepspeed`
    # neutral
    **{key: neutral(_RUN) for key in (
        "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
        "warmup_ratio", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "data_seed", "do_train", "do_eval",
        "do_predict")},
    **{key: neutral(_LOG) for key in (
        "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "include_num_input_tokens_seen",
        "include_tokens_per_second", "log_level", "log_level_replica",
        "logging_dir", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "skip_memory_metrics", "push_to_hub", "hub_token", "hub_private_repo",
        "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "push_to_hub_model_id",
        "push_to_hub_organization", "push_to_hub_token", "ray_scope", "tpu_metrics_debug")},
    **{key: neutral(_SAVE) for key in (
        "output_dir", "overwrite_output_dir", "save_only_model", "save_strategy", "save_steps", "save_on_each_node",
        "save_total_limit", "save_safetensors", "enable_jit_checkpoint", "restore_callback_states_from_checkpoint",
        "resume_from_checkpoint", "ignore_data_skip", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better")},
    **{key: neutral(_EVAL) for key in (
        "eval_strategy", "evaluation_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size",
        "per_gpu_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
        "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "include_inputs_for_metrics",
        "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "jit_mode_eval", "use_legacy_prediction_loop")},
    **{key: neutral(_DATA) for key in (
        "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
        "remove_unused_columns", "label_names", "train_sampling_strategy", "group_by_length", "length_column_name",
        "dispatch_batches")},
    **{key: neutral(_HOST) for key in ("local_rank", "ddp_timeout", "mp_parameters", "tpu_num_cores")},
    "tf32": neutral("TF32 matmul mode: the same tensors, other arithmetic"),
    "fp16_opt_level": neutral("apex amp only (half_precision_backend apex is refused)"),
    "average_tokens_across_devices": neutral("one scalar all-reduce of the token count"),
    "ddp_find_unused_parameters": neutral("DDP's search of the autograd graph for unused parameters; no buffer"),
    "ddp_broadcast_buffers": neutral("DDP broadcasts module buffers in place"),
    "ddp_static_graph": neutral("DDP's bookkeeping of a graph that does not change; the same buckets"),
    # not modelled; accepted at their defaults (off)
    "torch_empty_cache_steps": not_modelled("torch.cuda.empty_cache() every n steps returns reserved memory", None),
    "label_smoothing_factor": not_modelled("the Trainer's LabelSmoother takes log_softmax of the logits outside the "
                                           "model's loss", 0),
    "optim_args": not_modelled("optimizer arguments (GaLore/APOLLO rank, AnyPrecision state dtypes)", None, ""),
    "optim_target_modules": not_modelled("GaLore/APOLLO projected optimizer states", None),
    "adafactor": not_modelled("Adafactor's factored optimizer states", False),
    "torch_compile": not_modelled("compiled graphs save and fuse other tensors", False),
    "torch_compile_backend": not_modelled("sets torch_compile", None),
    "torch_compile_mode": not_modelled("sets torch_compile", None),
    "torchdynamo": not_modelled("sets torch_compile", None),
    "use_liger_kernel": not_modelled("Liger's fused kernels and fused linear cross-entropy", False),
    "liger_kernel_config": not_modelled("Liger's fused kernels", None),
    "use_cache": not_modelled("the model returns a KV cache from the training forward", False),
    "neftune_noise_alpha": not_modelled("NEFTune's noise added to the embeddings' output", None),
    "auto_find_batch_size": not_modelled("halves the batch after an OOM and retries", False),
    "full_determinism": not_modelled("CUBLAS_WORKSPACE_CONFIG=:16:8 (trainer_utils.py enable_full_determinism): "
                                     "other cuBLAS workspaces", False),
    "use_cpu": not_modelled("training on the CPU", False),
    "no_cuda": not_modelled("training on the CPU", False),
    "use_mps_device": not_modelled("training on Apple MPS", False),
    "use_ipex": not_modelled("Intel Extension for PyTorch", False),
    "half_precision_backend": not_modelled("apex amp's own casts", "auto", "cuda_amp"),
    "fp16_backend": not_modelled("apex amp's own casts", "auto", "cuda_amp"),
    "past_index": not_modelled("the model's mems kept between steps", -1),
    "debug": not_modelled("underflow_overflow registers hooks that reduce every activation", "", [], None),
    "ddp_backend": not_modelled("another backend's buffers (NCCL's are modelled)", None, "nccl"),
    "ddp_bucket_cap_mb": not_modelled("DDP gradient buckets of another size (25 MiB is modelled)", None, 25),
    "sharded_ddp": not_modelled("fairscale sharded DDP", "", [], False, None),
    "fsdp": not_modelled("FSDP shards parameters, gradients and optimizer states", None, "", [], False),
    "fsdp_config": not_modelled("FSDP", None, {}),
    "fsdp_min_num_params": not_modelled("FSDP", 0),
    "fsdp_transformer_layer_cls_to_wrap": not_modelled("FSDP", None),
    "accelerator_config": not_modelled("accelerate's split_batches, dispatch_batches and even_batches change what "
                                       "each process holds", None, {}),
    "split_batches": not_modelled("divides per_device_train_batch_size among the processes", None, False),
    "parallelism_config": not_modelled("tensor, context or sequence parallelism", None),
}

# transformers training_args.py OptimizerNames (5.24.0; adamw_hf and adamw_torch_npu_fused of 4.x too): names the
# Trainer accepts, each with other optimizer states or steps than the modelled ones (sim/vocab.py Optim)
HF_OPTIMIZERS = (
    "adamw_hf", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_apex_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "adagrad", "ademamix_8bit",
    "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw")

# torch.utils.checkpoint keyword arguments and transformers 5.24's own (modeling_utils.py
# activation_checkpointing_enable: every_n_layers, offload), inside gradient_checkpointing_kwargs
CHECKPOINTING_KWARGS: dict[str, KeyRule] = {
    "use_reentrant": modelled(),
    "preserve_rng_state": neutral("the RNG state is a few bytes on the host and the device"),
    "determinism_check": neutral("compares metadata of the recomputed tensors"),
    "debug": neutral("records the recomputed ops' names"),
    "context_fn": not_modelled("custom saved-tensor contexts (selective checkpointing)", None),
    "every_n_layers": not_modelled("only every n-th decoder layer checkpointed", 1),
    "offload": not_modelled("the checkpointed layers' inputs held in pinned host memory", False),
}


def classify_training(training: dict, where: str = "") -> list[IgnoredKey]:
    """In place: TrainingArguments names classified; a known HF optimizer that is not modelled refused."""
    ignored = classify(training, TRAINING_ARGS, "training", where)
    kwargs = training.get("gradient_checkpointing_kwargs")
    if isinstance(kwargs, dict):
        ignored += classify(kwargs, CHECKPOINTING_KWARGS, "training.gradient_checkpointing_kwargs", where)
    optim = training.get("optim")
    if isinstance(optim, str) and optim in HF_OPTIMIZERS:
        modelled_names = ", ".join(o.value for o in Optim)
        raise ScenarioError(f"training.optim: {optim!r}: not modelled (affects memory: its optimizer states and "
                            f"step differ from AdamW's/SGD's; modelled: {modelled_names}){where}")
    return ignored


def resolve_seq_len_alias(training: dict) -> None:
    """Rename an alias of `seq_len` in a raw `training:` mapping; an alias that disagrees with seq_len is an error."""
    for alias in SEQ_LEN_ALIASES:
        if alias in training:
            if "seq_len" in training and training["seq_len"] != training[alias]:
                raise ScenarioError(
                    f"training.{alias}: conflicts with training.seq_len "
                    f"({training[alias]!r} vs {training['seq_len']!r})"
                )
            training["seq_len"] = training.pop(alias)


def take_deepspeed(training: dict, current: Any) -> Any:
    """TrainingArguments' `deepspeed` (a path or a mapping) moved out of `training`: the scenario's top-level
    `deepspeed` reference; both given and different is an error."""
    ref = training.pop("deepspeed", None)
    if ref is None:
        return current
    if current is not None and current != ref:
        raise ScenarioError(f"training.deepspeed: {ref!r} conflicts with deepspeed {current!r} (give one)")
    return ref
