"""An axolotl config YAML (`axolotl train FILE`) as a scenario: its keys mapped to the scenario's names with
axolotl's own defaults made explicit, the keys classified (sim/ingest/keys.py); a key in no table here is refused
as not classified rather than guessed.

Source: axolotl-ai-cloud/axolotl v0.18.0 (2f5cb9da62a0fe763a1ddeb7798fc9acb2f4a417): src/axolotl/utils/schemas/
{config,training,peft,model}.py (the keys and defaults), utils/config/__init__.py (resolve_dtype, the weights'
dtype), core/builders/base.py (_configure_gradient_checkpointing), loaders/adapter.py (find_all_linear_names),
loaders/model.py (the embeddings' resize). The file names no GPU: the hardware comes from `--set hardware.device=NAME`
(and `hardware.gpus_per_node`), or from an accelerate config given with `--launch`."""

from pathlib import Path
from typing import Any

from sim.errors import ScenarioError
from sim.ingest.formats import model_with_dtype
from sim.ingest.keys import IgnoredKey, KeyRule, classify, modelled, neutral, not_modelled
from sim.ingest.llamafactory import catalog_name_of

VERSION = "0.18.0"
_DEFAULT = f"default of axolotl {VERSION}"
SEQUENCE_LEN_DEFAULT = 512  # schemas/config.py AxolotlInputConfig.sequence_len
MICRO_BATCH_SIZE_DEFAULT = 1  # schemas/training.py HyperparametersConfig.micro_batch_size
GRADIENT_ACCUMULATION_STEPS_DEFAULT = 1  # HyperparametersConfig.gradient_accumulation_steps

_RUN = "run length, schedule or hyperparameter value: no tensor changes size"
_DATA = "datasets, tokenizer or chat template: prepared on the host"
_LOG = "logging, saving, evaluation or the Hub"
_MODEL = "how the model is named or loaded; the same weights"

AXOLOTL: dict[str, KeyRule] = {
    **{key: modelled() for key in (
        "base_model", "base_model_config", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
        "lora_target_linear", "lora_modules_to_save", "peft_use_rslora", "sequence_len", "micro_batch_size",
        "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "attn_implementation", "flash_attention", "sdp_attention", "eager_attention", "optimizer", "weight_decay",
        "max_grad_norm", "deepspeed", "sample_packing", "pad_to_sequence_len")},
    **{key: neutral(_RUN) for key in (
        "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "lr_scheduler_kwargs", "warmup_steps",
        "warmup_ratio", "cosine_min_lr_ratio", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "train_on_inputs",
        "loss_watchdog_threshold", "loss_watchdog_patience", "early_stopping_patience", "tf32")},
    **{key: neutral(_DATA) for key in (
        "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "chat_template", "special_tokens",
        "tokens", "tokenizer_type", "tokenizer_config", "tokenizer_use_fast", "tokenizer_legacy",
        "dataset_processes", "shuffle_merged_datasets", "default_system_message", "dataset_exact_deduplication",
        "group_by_length", "eval_sample_packing", "eval_sequence_len")},
    **{key: neutral(_LOG) for key in (
        "output_dir", "hub_model_id", "hub_strategy", "wandb_project", "wandb_entity", "wandb_watch", "wandb_name",
        "wandb_run_id", "wandb_log_model", "mlflow_tracking_uri", "mlflow_experiment_name", "logging_steps",
        "save_steps", "saves_per_epoch", "save_strategy", "save_total_limit", "save_first_step",
        "save_safetensors", "eval_steps", "evals_per_epoch", "eval_batch_size", "eval_table_size",
        "eval_max_new_tokens", "eval_causal_lm_metrics", "do_causal_lm_eval", "resume_from_checkpoint",
        "auto_resume_from_checkpoints", "debug", "strict")},
    **{key: neutral(_MODEL) for key in (
        "model_type", "trust_remote_code", "base_model_ignore_patterns", "revision_of_model")},
    "lora_model_dir": not_modelled("loads an existing adapter", None, ""),
    "resize_token_embeddings_to_32x": neutral(
        "loaders/model.py resizes only when the tokenizer holds more tokens than the embedding (the published "
        "vocab_size is padded above the tokenizer's); assumed not to grow"),
    # not modelled; accepted at their defaults (off)
    "load_in_8bit": not_modelled("8-bit quantized base weights (bitsandbytes)", False, None),
    "load_in_4bit": not_modelled("4-bit quantized base weights (bitsandbytes)", False, None),
    "gptq": not_modelled("GPTQ quantized base weights", False, None),
    "fsdp": not_modelled("FSDP shards parameters, gradients and optimizer states", None, []),
    "fsdp_config": not_modelled("FSDP", None, {}),
    "fsdp_version": not_modelled("FSDP", None),
    "activation_offloading": not_modelled("activations offloaded to the host", False, None),
    "layer_offloading": not_modelled("layers offloaded to the host", False, None),
    "unsloth_cross_entropy_loss": not_modelled("Unsloth's fused cross-entropy", False, None),
    "unsloth_lora_mlp": not_modelled("Unsloth's fused LoRA kernels", False, None),
    "unsloth_lora_qkv": not_modelled("Unsloth's fused LoRA kernels", False, None),
    "unsloth_lora_o": not_modelled("Unsloth's fused LoRA kernels", False, None),
    "lora_mlp_kernel": not_modelled("axolotl's fused LoRA kernels", False, None),
    "lora_qkv_kernel": not_modelled("axolotl's fused LoRA kernels", False, None),
    "lora_o_kernel": not_modelled("axolotl's fused LoRA kernels", False, None),
    "liger_cross_entropy": not_modelled("Liger's fused cross-entropy", False, None),
    "liger_fused_linear_cross_entropy": not_modelled("Liger's fused linear cross-entropy", False, None),
    "plugins": not_modelled("plugins patch the model or the loss", None, []),
    "torch_compile": not_modelled("compiled graphs save and fuse other tensors", False, None),
    "neftune_noise_alpha": not_modelled("NEFTune's noise added to the embeddings' output", None),
    "shrink_embeddings": not_modelled("the embeddings shrunk to the tokenizer", False, None),
    "peft_use_dora": not_modelled("DoRA's magnitude vectors and weight norms", False, None),
    "relora": not_modelled("ReLoRA's merges and resets", False, None),
    "rl": not_modelled("preference or RL training with reference models", None),
    "sequence_parallel_degree": not_modelled("sequence parallelism", None, 1),
    "context_parallel_size": not_modelled("context parallelism", None, 1),
    "tensor_parallel_size": not_modelled("tensor parallelism", None, 1),
    "float16": not_modelled("pure float16 weights", False, None),
    "bfloat16": not_modelled("pure bfloat16 weights", False, None),
}

# The scenario path each axolotl key of another name becomes (for error lines)
SCENARIO_PATHS = {"sequence_len": "training.seq_len", "micro_batch_size": "training.per_device_train_batch_size",
                  "gradient_accumulation_steps": "training.gradient_accumulation_steps", "optimizer": "training.optim",
                  "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm",
                  "gradient_checkpointing": "training.gradient_checkpointing", "lora_r": "lora.r",
                  "lora_alpha": "lora.lora_alpha", "lora_dropout": "lora.lora_dropout",
                  "lora_target_modules": "lora.target_modules", "lora_modules_to_save": "lora.modules_to_save",
                  "attn_implementation": "training.attn_implementation"}

# The legacy boolean attention flags as attn_implementation (schemas/config.py normalize_attn_implementation)
_ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}


def to_scenario(raw: dict, file: str, base_dir: Path) -> tuple[dict, list[IgnoredKey], dict[str, str]]:
    """(a raw scenario mapping, the keys accepted with no effect, {setting: axolotl default it took})."""
    where = f" (in {file})"
    data = dict(raw)
    ignored = classify(data, AXOLOTL, "axolotl", where)
    unknown = [key for key in data if key not in AXOLOTL]
    if unknown:
        raise ScenarioError(f"axolotl.{unknown[0]}: {data[unknown[0]]!r}{where}: a key the simulator has not "
                            "classified (modelled, no memory effect or not modelled); remove it to run without it")
    defaults: dict[str, str] = {}

    def take(key: str, default: Any, path: str, text: str) -> Any:
        if data.get(key) is not None:
            return data.pop(key)
        data.pop(key, None)
        defaults[path] = f"{_DEFAULT}: {text}"
        return default

    scenario: dict[str, Any] = {"name": Path(file).stem}
    ref = data.pop("base_model_config", None) or data.pop("base_model", None)
    data.pop("base_model", None)
    model = _model_ref(ref, base_dir, where)
    if model is not None:
        scenario["model"] = model
    else:
        scenario["_model_missing"] = (
            f"axolotl.base_model: {ref!r}{where}: a hub id the simulator cannot download and no catalog entry is "
            "written from; pass its config.json: --set model=PATH/config.json (or a catalog name)")
    training: dict[str, Any] = {
        "per_device_train_batch_size": take("micro_batch_size", MICRO_BATCH_SIZE_DEFAULT,
                                            "training.per_device_train_batch_size", "micro_batch_size 1"),
        "gradient_accumulation_steps": take("gradient_accumulation_steps", GRADIENT_ACCUMULATION_STEPS_DEFAULT,
                                            "training.gradient_accumulation_steps", "gradient_accumulation_steps 1"),
        "seq_len": take("sequence_len", SEQUENCE_LEN_DEFAULT, "training.seq_len", "sequence_len 512"),
    }
    _precision(data, training, defaults, file)
    _checkpointing(data, training, defaults, where)
    _attention(data, training, where)
    ignored += _packing(data, training, where)
    for key, field in (("optimizer", "optim"), ("weight_decay", "weight_decay"), ("max_grad_norm", "max_grad_norm"),
                       ("deepspeed", "deepspeed")):
        if data.get(key) is not None:
            training[field] = data.pop(key)
    adapter = data.pop("adapter", None)
    if adapter == "lora":
        scenario["lora"] = _lora(data, where)
    elif adapter:
        raise ScenarioError(f"axolotl.adapter: {adapter!r}{where}: not modelled (affects memory: quantized base "
                            "weights (qlora) or another adapter; modelled: lora, none for full fine-tuning)")
    ignored += [IgnoredKey(f"axolotl.{key}", value, "read only with adapter: lora") for key, value in data.items()
                if value is not None]
    if "model" in scenario:  # utils/config/__init__.py resolve_dtype: from_pretrained(torch_dtype=cfg.torch_dtype)
        dtype = "bfloat16" if training["bf16"] else "float16" if training["fp16"] else "float32"
        scenario["model"] = model_with_dtype(scenario["model"], base_dir, dtype)
        defaults["model.torch_dtype"] = f"axolotl {VERSION} resolve_dtype: the weights loaded in {dtype} (bf16/fp16)"
    scenario["training"] = training
    return scenario, ignored, defaults


def _model_ref(ref: Any, base_dir: Path, where: str) -> Any:
    """base_model: a local folder or config.json as is; a hub id mapped to its catalog entry; else None."""
    if not isinstance(ref, str) or not ref:
        raise ScenarioError(f"axolotl.base_model: {ref!r}{where}: expected a hub id or a path")
    if Path(ref).exists() or (base_dir / ref).exists():
        return ref
    return catalog_name_of(ref)


def _precision(data: dict, training: dict, defaults: dict[str, str], file: str) -> None:
    """bf16 'auto' (the default): on where torch.cuda.is_bf16_supported (Ampere and newer; resolve_dtype)."""
    origin = f"{file}: bf16" if "bf16" in data else f"{_DEFAULT}: bf16"
    bf16 = data.pop("bf16", "auto")
    fp16 = data.pop("fp16", None)
    if bf16 == "auto":
        bf16 = not fp16
        if not fp16:
            defaults["training.bf16"] = f"{origin} auto (on: a GPU with bf16, Ampere or newer)"
    training["bf16"], training["fp16"] = bool(bf16), bool(fp16)


def _checkpointing(data: dict, training: dict, defaults: dict[str, str], where: str) -> None:
    """gradient_checkpointing (default false) and, when on without kwargs, use_reentrant false (base.py)."""
    on = data.pop("gradient_checkpointing", False)
    kwargs = data.pop("gradient_checkpointing_kwargs", None)
    if on not in (True, False, None):
        raise ScenarioError(f"axolotl.gradient_checkpointing: {on!r}: not modelled (affects memory: the checkpointed "
                            f"layers' inputs offloaded to the host or disk){where}")
    training["gradient_checkpointing"] = bool(on)
    if on and kwargs is None:
        kwargs = {"use_reentrant": False}
        defaults["training.gradient_checkpointing_kwargs.use_reentrant"] = (
            f"{_DEFAULT}: use_reentrant false (core/builders/base.py)")
    if on:
        training["gradient_checkpointing_kwargs"] = kwargs


def _attention(data: dict, training: dict, where: str) -> None:
    """attn_implementation, or a legacy flag; neither: transformers' default."""
    flags = [flag for flag in _ATTENTION_FLAGS if data.pop(flag, None)]
    value = data.pop("attn_implementation", None)
    if value and flags:
        raise ScenarioError(f"axolotl.attn_implementation: {value!r}{where}: not with the legacy flag {flags[0]} "
                            "(axolotl refuses both; give attn_implementation)")
    if value or flags:
        training["attn_implementation"] = value or _ATTENTION_FLAGS[flags[0]]


def _packing(data: dict, training: dict, where: str) -> list[IgnoredKey]:
    """sample_packing: micro_batch_size bins of packed samples, each padded to sequence_len (pad_to_sequence_len
    defaults to true with it), attended per sample by flash-attention's varlen kernel: the tensors of
    micro_batch_size x sequence_len. Other attention needs block-diagonal masks, not modelled."""
    packing = data.pop("sample_packing", None)
    padded = data.pop("pad_to_sequence_len", None)
    if packing and training.get("attn_implementation") != "flash_attention_2":
        raise ScenarioError(f"axolotl.sample_packing: {packing!r}{where}: not modelled (affects memory: "
                            "block-diagonal attention masks) except with attn_implementation flash_attention_2")
    if packing and padded is False:
        raise ScenarioError(f"axolotl.pad_to_sequence_len: False{where}: not modelled with sample_packing "
                            "(affects memory: packed rows shorter than sequence_len)")
    return [IgnoredKey("axolotl.sample_packing", packing, "packed rows of sequence_len tokens, flash-attention's "
                       "varlen kernel per sample: the tensors of unpacked rows")] if packing else []


def _lora(data: dict, where: str) -> dict:
    """lora_* as PEFT's LoraConfig (loaders/adapter.py load_lora); lora_target_linear: find_all_linear_names, every
    Linear but the output embedding, as PEFT's all-linear."""
    lora: dict[str, Any] = {}
    for key, field in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                       ("lora_modules_to_save", "modules_to_save"), ("peft_use_rslora", "use_rslora")):
        if data.get(key) is not None:
            lora[field] = data.pop(key)
        data.pop(key, None)
    targets = data.pop("lora_target_modules", None)
    if data.pop("lora_target_linear", None):
        lora["target_modules"] = "all-linear"  # adapter.py adds the found names to lora_target_modules: all linear
    elif targets is not None:
        lora["target_modules"] = [targets] if isinstance(targets, str) else targets
    else:
        raise ScenarioError(f"axolotl.lora_target_modules: None{where}: adapter lora needs lora_target_modules or "
                            "lora_target_linear")
    return lora
