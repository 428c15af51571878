"""A LLaMA-Factory training YAML (`llamafactory-cli train FILE`) as a scenario: its own keys mapped to the
scenario's names with LLaMA-Factory's defaults made explicit, every key classified (sim/ingest/keys.py), and the
TrainingArguments keys it shares with HF left for sim/ingest/training_args.py.

Source: hiyouga/LLaMA-Factory v0.9.5 (7af909522a951e3ad9f022ea6f88b6755257eaa5), src/llamafactory/hparams/
{model,data,finetuning,training}_args.py (the fields and defaults), hparams/parser.py, model/loader.py,
model/adapter.py, model/model_utils/{checkpointing,attention,misc}.py (what they do). The deciding defaults below
are the same at v0.9.3 and v0.9.4. The file names no GPU: the hardware comes from `--set hardware.device=NAME`
(and `hardware.gpus_per_node`), or from an accelerate config given with `--launch`."""

from pathlib import Path
from typing import Any

from sim import catalog
from sim.errors import ScenarioError
from sim.ingest.deepspeed import read_deepspeed
from sim.ingest.formats import model_with_dtype
from sim.ingest.keys import IgnoredKey, KeyRule, classify, modelled, neutral, not_modelled

VERSION = "0.9.5"
_DEFAULT = f"default of LLaMA-Factory {VERSION}"

# Deciding defaults (hparams/*_args.py at v0.9.5), each with the scenario path it sets:
CUTOFF_LEN_DEFAULT = 2048  # data_args.py DataArguments.cutoff_len
LORA_RANK_DEFAULT = 8  # finetuning_args.py LoraArguments.lora_rank
LORA_DROPOUT_DEFAULT = 0.0  # LoraArguments.lora_dropout
# LoraArguments.lora_target "all": adapter.py _setup_lora_tuning calls misc.py find_all_linear_modules, every
# nn.Linear but lm_head (chatglm/internlm2 output layers, vision towers) - for the decoder-only text models of the
# catalog the modules PEFT's "all-linear" selects (every Linear but the output layer)
LORA_TARGET_ALL = "all-linear"

_LF = "LLaMA-Factory bookkeeping, data or export setting: no device tensor changes"
_INFER = "inference, export or evaluation engines; not the training step"
_MEDIA = "image, video or audio inputs; the catalog models are text-only"
_UNUSED = "read only by a method that is off (GaLore, APOLLO, BAdam, OFT, freeze, RLHF stages)"

LLAMAFACTORY: dict[str, KeyRule] = {
    # modelled: mapped by to_scenario before classification; listed so none is taken for unknown
    **{key: modelled() for key in (
        "model_name_or_path", "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
        "additional_target", "use_rslora", "cutoff_len", "flash_attn", "disable_gradient_checkpointing",
        "use_reentrant_gc")},
    "model_max_length": neutral("parser.py overwrites it with cutoff_len"),
    "packing": neutral("samples concatenated into rows of at most cutoff_len tokens (on for stage pt): the "
                       "simulated rows of cutoff_len"),
    # neutral
    **{key: neutral(_LF) for key in (
        "trust_remote_code", "adapter_folder", "cache_dir", "use_fast_tokenizer", "split_special_tokens",
        "model_revision", "low_cpu_mem_usage", "offload_folder", "hf_hub_token", "ms_hub_token", "om_hub_token",
        "print_param_status", "template", "dataset", "eval_dataset", "dataset_dir", "media_dir", "train_on_prompt",
        "mask_history", "streaming", "buffer_size", "mix_strategy", "interleave_probs", "overwrite_cache",
        "preprocessing_batch_size", "preprocessing_num_workers", "max_samples", "ignore_pad_token_for_loss",
        "val_size", "eval_on_each_dataset", "tool_format", "default_system", "enable_thinking", "preserve_thinking",
        "tokenized_path", "data_shared_file_system", "plot_loss", "compute_accuracy", "disable_shuffling",
        "early_stopping_steps", "include_effective_tokens_per_second", "train_from_scratch", "device_map",
        "compute_dtype", "moe_aux_loss_coef", "loraplus_lr_ratio", "loraplus_lr_embedding", "create_new_adapter",
        "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "init_special_tokens",
        "master_addr", "master_port",
        "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key",
        "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret",
        "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_num_workers", "resources_per_worker",
        "placement_strategy", "ray_init_kwargs")},
    **{key: neutral(_INFER) for key in (
        "infer_backend", "infer_dtype", "use_kv_cache", "export_dir", "export_size", "export_device",
        "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
        "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id", "vllm_maxlen", "vllm_gpu_util",
        "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config", "sglang_maxlen", "sglang_mem_fraction",
        "sglang_tp_size", "sglang_config", "sglang_lora_backend", "eval_num_beams", "predict_with_generate",
        "sortish_sampler", "generation_max_length", "generation_num_beams", "generation_config", "do_sample",
        "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens", "repetition_penalty",
        "length_penalty", "skip_special_tokens")},
    **{key: neutral(_MEDIA) for key in (
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
        "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate")},
    **{key: neutral(_UNUSED) for key in (
        "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "oft_rank", "oft_block_size",
        "oft_target", "module_dropout", "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing",
        "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm",
        "ppo_target", "ppo_whiten_rewards", "ld_alpha", "reward_model_type", "galore_target", "galore_rank",
        "galore_update_interval", "galore_scale", "galore_proj_type", "galore_layerwise", "apollo_target",
        "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
        "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "badam_mode", "badam_start_block",
        "badam_switch_mode", "badam_switch_interval", "badam_update_ratio", "badam_mask_mode", "badam_verbose",
        "quantization_method", "quantization_type", "double_quantization", "quantization_device_map",
        "fp8_backend", "fp8_enable_fsdp_float8_all_gather", "pissa_iter", "pissa_convert", "kt_optimize_rule",
        "cpu_infer", "chunk_size", "mode", "kt_maxlen", "kt_use_cuda_graph", "kt_mode", "kt_force_think",
        "kt_weight_path", "kt_expert_checkpoint_path", "kt_lora_expert_num", "kt_lora_expert_intermediate_size",
        "kt_use_lora_experts", "profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
        "profiler_active_steps", "profiler_repeat", "profiler_record_shapes", "profiler_profile_memory",
        "profiler_with_stack", "profile_modules", "hyper_parallel_args", "asft_alpha", "eaft_alpha")},
    # not modelled; accepted at their defaults (off)
    "adapter_name_or_path": not_modelled("loads an existing adapter (and merges earlier ones into the weights)", None),
    "resize_vocab": not_modelled("a resized vocabulary, its embeddings made trainable", False),
    "add_tokens": not_modelled("new tokens resize the vocabulary", None),
    "add_special_tokens": not_modelled("new tokens resize the vocabulary", None),
    "new_special_tokens_config": not_modelled("new tokens resize the vocabulary", None),
    "rope_scaling": not_modelled("RoPE scaling (and a longer model_max_length)", None),
    "shift_attn": not_modelled("LongLoRA's shifted sparse attention", False),
    "mixture_of_depths": not_modelled("mixture-of-depths layers", None),
    "use_unsloth": not_modelled("Unsloth's patched model and kernels", False),
    "use_unsloth_gc": not_modelled("Unsloth's checkpointing offloads the layers' inputs to the host", False),
    "enable_liger_kernel": not_modelled("Liger's fused kernels and fused linear cross-entropy", False),
    "use_v1_kernels": not_modelled("LLaMA-Factory's v1 fused kernels", False),
    "upcast_layernorm": not_modelled("the norm weights upcast to float32", False),
    "upcast_lmhead_output": not_modelled("the lm_head output (the logits) upcast to float32 by a hook", False),
    "block_diag_attn": not_modelled("block-diagonal attention masks", False),
    "neat_packing": not_modelled("packing without cross-attention: block-diagonal masks", False),
    "quantization_bit": not_modelled("quantized base weights (QLoRA)", None),
    "fp8": not_modelled("FP8 training", False),
    "use_kt": not_modelled("KTransformers' CPU experts", False),
    "use_mca": not_modelled("Megatron-core training", False),
    "use_hyper_parallel": not_modelled("another parallel runtime", False),
    "pure_bf16": not_modelled("bfloat16 trainable parameters and optimizer states (no float32 upcast)", False),
    "use_llama_pro": not_modelled("LLaMA Pro's expanded blocks", False),
    "use_adam_mini": not_modelled("Adam-mini's reduced second moments", False),
    "use_muon": not_modelled("the Muon optimizer's states", False),
    "use_dft_loss": not_modelled("another loss over the logits", False),
    "use_asft_loss": not_modelled("another loss over the logits (and a reference model)", False),
    "use_eaft_loss": not_modelled("another loss over the logits", False),
    "use_dora": not_modelled("DoRA's magnitude vectors and weight norms", False),
    "pissa_init": not_modelled("PiSSA's decomposed base weights", False),
    "use_galore": not_modelled("GaLore's projected optimizer states", False),
    "use_apollo": not_modelled("APOLLO's projected optimizer states", False),
    "use_badam": not_modelled("BAdam trains one block at a time", False),
    "ref_model": not_modelled("a reference model (RLHF stages)", None),
    "ref_model_adapters": not_modelled("a reference model (RLHF stages)", None),
    "ref_model_quantization_bit": not_modelled("a reference model (RLHF stages)", None),
    "reward_model": not_modelled("a reward model (PPO)", None),
    "reward_model_adapters": not_modelled("a reward model (PPO)", None),
    "reward_model_quantization_bit": not_modelled("a reward model (PPO)", None),
    "enable_torch_profiler": not_modelled("the torch profiler's buffers", False),
}

# The scenario path each LLaMA-Factory key of another name becomes (for error lines)
SCENARIO_PATHS = {"cutoff_len": "training.seq_len", "lora_rank": "lora.r", "lora_alpha": "lora.lora_alpha",
                  "lora_dropout": "lora.lora_dropout", "lora_target": "lora.target_modules",
                  "additional_target": "lora.modules_to_save", "use_reentrant_gc":
                  "training.gradient_checkpointing_kwargs.use_reentrant",
                  **{key: f"training.{key}" for key in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                        "bf16", "fp16", "optim", "weight_decay", "max_grad_norm")}}

FULL_FLOAT32 = (f"LLaMA-Factory {VERSION} adapter.py: full fine-tuning casts the trainable parameters to float32 "
                "(no ZeRO-3)")

# finetuning_args.py FinetuningArguments.stage: sft and pt train the causal-LM loss of one model; rm, ppo, dpo, kto
# add a value head, reference or reward models
_STAGES = ("sft", "pt")


def catalog_name_of(hub_id: str) -> str | None:
    """What `model:` is given for a hub id: the catalog entry written from its config.json, or the id itself where it
    is an instruct/chat alias of one (read_model resolves it, sim/catalog.py); None for an id the catalog lacks."""
    return catalog.own_entry(hub_id) or (hub_id if catalog.is_alias(hub_id) else None)


def to_scenario(raw: dict, file: str, base_dir: Path) -> tuple[dict, list[IgnoredKey], dict[str, str]]:
    """(a raw scenario mapping, the keys accepted with no effect, {setting: LLaMA-Factory default it took})."""
    where = f" (in {file})"
    data = dict(raw)
    ignored = classify(data, LLAMAFACTORY, "llamafactory", where)
    defaults: dict[str, str] = {}
    scenario: dict[str, Any] = {"name": Path(file).stem}

    def take(key: str, default: Any, path: str, default_text: str) -> Any:
        if key in data:
            return data.pop(key)
        defaults[path] = f"{_DEFAULT}: {default_text}"
        return default

    ref = data.pop("model_name_or_path", None)
    if ref is None:
        raise ScenarioError(f"llamafactory.model_name_or_path: required key is missing{where}")
    model = _model_ref(ref, base_dir, where)
    if model is not None:
        scenario["model"] = model
    else:
        scenario["_model_missing"] = (
            f"llamafactory.model_name_or_path: {ref!r}{where}: a hub id the simulator cannot download and no catalog "
            "entry is written from; pass its config.json: --set model=PATH/config.json (or a catalog name)")
    stage = data.pop("stage", "sft")
    if stage not in _STAGES:
        raise ScenarioError(f"llamafactory.stage: {stage!r}: not modelled (affects memory: reward, reference or "
                            f"value-head models; modelled: {', '.join(_STAGES)}){where}")
    kind = take("finetuning_type", "lora", "finetuning_type", "finetuning_type lora")
    training = {key: data.pop(key) for key in list(data)}  # the rest: HF (Seq2Seq)TrainingArguments
    if "cutoff_len" not in training:  # every sample truncated to it: the longest step
        defaults["training.seq_len"] = f"{_DEFAULT}: cutoff_len {CUTOFF_LEN_DEFAULT}"
    training["seq_len"] = training.pop("cutoff_len", CUTOFF_LEN_DEFAULT)
    checkpointing_off = training.pop("disable_gradient_checkpointing", None)
    if checkpointing_off is None:
        defaults["training.gradient_checkpointing"] = (
            f"{_DEFAULT}: disable_gradient_checkpointing false (checkpointing on, checkpointing.py)")
        checkpointing_off = False
    if "gradient_checkpointing" in training and training["gradient_checkpointing"] != (not checkpointing_off):
        raise ScenarioError(f"llamafactory.gradient_checkpointing: {training['gradient_checkpointing']!r} conflicts "
                            f"with disable_gradient_checkpointing {checkpointing_off!r}{where} (LLaMA-Factory reads "
                            "the latter; give one)")
    training["gradient_checkpointing"] = not checkpointing_off
    if not checkpointing_off:
        reentrant = training.pop("use_reentrant_gc", None)
        if reentrant is None:
            defaults["training.gradient_checkpointing_kwargs.use_reentrant"] = f"{_DEFAULT}: use_reentrant_gc true"
            reentrant = True
        training["gradient_checkpointing_kwargs"] = {"use_reentrant": reentrant}
    else:
        training.pop("use_reentrant_gc", None)
    _attention(training, defaults, where)
    if kind == "lora":
        scenario["lora"] = _lora(training, defaults, where)
    elif kind == "full" and "model" in scenario and not _zero3(training.get("deepspeed"), base_dir):
        # adapter.py init_adapter: without ZeRO-3 (pure_bf16 and BAdam are refused above) the trainable parameters,
        # here all, are cast to float32 after loading (loader.py loads with torch_dtype="auto"): float32 weights
        scenario["model"] = model_with_dtype(scenario["model"], base_dir, "float32")
        defaults["model.torch_dtype"] = FULL_FLOAT32
    elif kind != "full":
        raise ScenarioError(f"llamafactory.finetuning_type: {kind!r}: not modelled (affects memory: only some layers "
                            f"or another adapter trained; modelled: lora, full){where}")
    for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora"):
        if key in training and kind != "lora":
            ignored.append(IgnoredKey(f"llamafactory.{key}", training.pop(key), _UNUSED))
    scenario["training"] = training
    return scenario, ignored, defaults


def _zero3(ref: Any, base_dir: Path) -> bool:
    """The DeepSpeed config the file names is ZeRO stage 3 (is_deepspeed_zero3_enabled)."""
    if ref is None:
        return False
    config = ref if isinstance(ref, dict) else read_deepspeed(ref, base_dir)[0]
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return stage == 3


def _model_ref(ref: Any, base_dir: Path, where: str) -> Any:
    """model_name_or_path: a local folder or config.json as is; a hub id mapped to its catalog entry; else None."""
    if not isinstance(ref, str) or not ref:
        raise ScenarioError(f"llamafactory.model_name_or_path: {ref!r}{where}: expected a hub id or a path")
    if Path(ref).exists() or (base_dir / ref).exists():
        return ref
    return catalog_name_of(ref)


# model_args.py flash_attn (AttentionFunction): attention.py configure_attn_implementation leaves "auto" to
# transformers' from_pretrained, and sets "disabled" -> eager, "sdpa" -> sdpa, "fa2" -> flash_attention_2
_ATTENTION = {"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}


def _attention(training: dict, defaults: dict[str, str], where: str) -> None:
    """flash_attn as attn_implementation; 'auto' (the default) leaves HF's own default."""
    value = training.pop("flash_attn", "auto")
    if value == "auto":
        defaults["training.attn_implementation"] = f"{_DEFAULT}: flash_attn auto (transformers' from_pretrained: sdpa)"
        return
    if value not in _ATTENTION:
        raise ScenarioError(f"llamafactory.flash_attn: {value!r}{where}: expected auto, disabled, sdpa or fa2")
    training["attn_implementation"] = _ATTENTION[value]


def _lora(training: dict, defaults: dict[str, str], where: str) -> dict:
    """LoraArguments as PEFT's LoraConfig (adapter.py _setup_lora_tuning's peft_kwargs)."""
    rank = training.pop("lora_rank", None)
    if rank is None:
        defaults["lora.r"] = f"{_DEFAULT}: lora_rank {LORA_RANK_DEFAULT}"
        rank = LORA_RANK_DEFAULT
    alpha = training.pop("lora_alpha", None)
    if alpha is None:  # finetuning_args.py __post_init__: lora_alpha = lora_alpha or lora_rank * 2
        defaults["lora.lora_alpha"] = f"{_DEFAULT}: lora_alpha = 2 x lora_rank"
        alpha = rank * 2 if isinstance(rank, int) else rank
    target = training.pop("lora_target", None)
    if target is None:
        defaults["lora.target_modules"] = f"{_DEFAULT}: lora_target all (every Linear but lm_head)"
        target = "all"
    targets = [t.strip() for t in target.split(",")] if isinstance(target, str) else target  # __post_init__ split
    lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": training.pop("lora_dropout", LORA_DROPOUT_DEFAULT),
            "target_modules": LORA_TARGET_ALL if targets == ["all"] else targets}
    if "use_rslora" in training:
        lora["use_rslora"] = training.pop("use_rslora")
    extra = training.pop("additional_target", None)
    if extra is not None:
        lora["modules_to_save"] = [t.strip() for t in extra.split(",")] if isinstance(extra, str) else extra
    return lora
