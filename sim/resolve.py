"""Resolve a validated Scenario once into the Plan that every floor below takes (sim/plan.py).

This is the one place where settings are derived from the raw schema: the dtypes (config torch_dtype, DeepSpeed's
bf16/fp16 sections, Qwen1's autoselection, accelerate's mixed precision, DeepSpeed's communication dtype, PEFT's
adapter dtype), host or device, the version behaviours, the world, ZeRO, NCCL and allocator settings, and the device
runtime (sim/runtime.py). What is not modelled yet is refused here too, with one line naming the key.
"""

from sim.allocator.alloc_conf import parse_alloc_conf
from sim.errors import ScenarioError
from sim.plan import (
    AllocatorPlan,
    AmpPlan,
    DevicePlan,
    LoraPlan,
    ModelShape,
    NcclPlan,
    Plan,
    TrainingPlan,
    Versions,
    World,
    ZeroPlan,
)
from sim.runtime import device_runtime
from sim.scenario import DeviceSpec, Scenario
from sim.versions import parse_version
from sim.vocab import AllocatorBackend, DType, ModelType, Optim
from sim.workload.behaviour import behaviour_for

# deepspeed/runtime/config.py DtypeEnum: the names data_types.grad_accum_dtype accepts
_DEEPSPEED_DTYPES = {name: dtype for dtype, names in (
    (DType.FLOAT16, ("torch.float16", "fp16", "float16", "half")),
    (DType.FLOAT32, ("torch.float32", "fp32", "float32", "float")),
    (DType.BFLOAT16, ("torch.bfloat16", "bf16", "bfloat16"))) for name in names}

# The NCCL of each torch PyPI wheel (nvidia-nccl-cu12 in the wheel's Requires-Dist)
_NCCL_OF_TORCH = [((2, 2), (2, 19, 3)), ((2, 3), (2, 20, 5)), ((2, 5), (2, 21, 5)), ((2, 7), (2, 26, 2)),
                  ((2, 8), (2, 27, 3))]
_DEFAULT_NCCL_CHANNELS = 24  # HGX A100 8-GPU NVSwitch: "Channel 23/24" (NVIDIA/nccl-tests#100); 8×H200:
#                              nvlsPerRankSize 288 MiB = 24 channels × 2 × 6 MiB (vllm-project/vllm#9699)


def resolve_plan(scenario: Scenario) -> Plan:
    """The scenario resolved once; raises ScenarioError for what is not modelled."""
    check_supported(scenario)
    versions = Versions(*(scenario.software.version(p) for p in ("torch", "transformers", "deepspeed", "peft")))
    training = scenario.training
    behaviour = behaviour_for(versions, scenario.model.model_type, training.gradient_checkpointing)
    weights = weights_dtype(scenario)
    host = on_host(scenario)
    device = device_plan(scenario.hardware.device)
    world = World(scenario.hardware.gpus_per_node, scenario.hardware.nodes)
    zero = _zero(scenario, behaviour.default_optim)
    nccl = _nccl(scenario, versions)
    zero3 = zero is not None and zero.stage == 3
    return Plan(
        name=scenario.name,
        model=model_shape(scenario, weights),
        lora=_lora(scenario, weights, behaviour.peft_adapters_fp32),
        training=TrainingPlan(
            micro_batch=training.per_device_train_batch_size,
            accumulation_steps=training.gradient_accumulation_steps, seq_len=training.seq_len,
            gradient_checkpointing=training.gradient_checkpointing,
            use_reentrant=training.gradient_checkpointing_kwargs.use_reentrant, attn=training.attn_implementation,
            optim=training.optim or behaviour.default_optim, weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm, steps=scenario.simulation.steps),
        behaviour=behaviour,
        amp=amp(scenario),
        on_host=host,
        versions=versions,
        world=world,
        device=device,
        zero=zero,
        nccl=nccl,
        allocator=AllocatorPlan(scenario.allocator.backend, parse_alloc_conf(scenario.allocator.conf)),
        runtime=device_runtime(host, device, nccl, world, versions.torch, zero3),
    )


# ZeRO stage 0 in half precision: DeepSpeed's engine wraps the optimizer (engine.py _do_optimizer_sanity_check →
# _configure_bf16_optimizer / _configure_fp16_optimizer) in optimizers that keep fp32 master weights, not the plain
# half-precision AdamW of torch DDP that the DDP placement would model.
_STAGE0_WRAPPERS = {
    # deepspeedai/DeepSpeed deepspeed/runtime/bf16_optimizer.py BF16_Optimizer._setup_for_real_optimizer: the
    # trainable weights flattened into one bf16 buffer, an fp32 gradient buffer of its full size, the fp32 master
    # weights and the optimizer states on this rank's 1/world partition only
    DType.BFLOAT16: ("bf16", "DeepSpeed's BF16_Optimizer keeps full-size fp32 gradient buffers and a 1/world "
                             "partition of fp32 master weights and optimizer states"),
    # deepspeed/runtime/fp16/fused_optimizer.py FP16_Optimizer.__init__: fp32_groups_flat, a full fp32 copy of the
    # flat fp16 weights, with fp32 optimizer states on it
    DType.FLOAT16: ("fp16", "DeepSpeed's FP16_Optimizer keeps a full fp32 master copy of the weights with fp32 "
                            "optimizer states"),
}


def check_supported(scenario: Scenario) -> None:
    """Refuse, with a clear message, what is not modelled yet rather than simulate it wrongly."""
    if scenario.deepspeed is not None:
        zero = scenario.deepspeed.zero_optimization
        for key in ("offload_param", "offload_optimizer"):
            config = getattr(zero, key) or {}
            device = config.get("device", "none")
            if device == "none":
                continue
            if device != "cpu" or (key == "offload_param" and zero.stage != 3):
                raise ScenarioError(f"deepspeed.zero_optimization.{key}.device: {device!r} offload is not modelled "
                                    f"yet with stage {zero.stage} (cpu offload is: of the optimizer with stages 1-3, "
                                    "of the parameters with stage 3)")
            if config.get("ratio", 1.0) != 1.0:
                raise ScenarioError(f"deepspeed.zero_optimization.{key}.ratio: partial offload ({config['ratio']!r}) "
                                    "is not modelled yet")
        if zero.stage == 0 and weights_dtype(scenario) in _STAGE0_WRAPPERS:
            section, wrapper = _STAGE0_WRAPPERS[weights_dtype(scenario)]
            raise ScenarioError(f"deepspeed.zero_optimization.stage: 0 with {section} is not modelled yet: {wrapper} "
                                "(use stage 1-3, or no deepspeed section for torch DDP)")
        if not zero.reduce_scatter:
            raise ScenarioError("deepspeed.zero_optimization.reduce_scatter: false is not modelled yet (gradients are "
                                "reduced as with the default, true)")
        accumulation = ((scenario.deepspeed.model_extra or {}).get("data_types") or {}).get("grad_accum_dtype")
        if accumulation is not None and _DEEPSPEED_DTYPES.get(str(accumulation).lower()) is not weights_dtype(scenario):
            raise ScenarioError(f"deepspeed.data_types.grad_accum_dtype: {accumulation!r} is not modelled yet "
                                f"(gradients are accumulated in the model dtype, {weights_dtype(scenario).value})")
    if scenario.strategies:
        raise ScenarioError(f"strategies: unknown strategy kind {scenario.strategies[0].kind!r} (none are defined yet)")
    if scenario.allocator.backend is AllocatorBackend.EXACT and scenario.allocator.conf:
        raise ScenarioError(f"allocator.conf: only meaningful with backend caching (got {scenario.allocator.conf!r})")


def weights_dtype(scenario: Scenario) -> DType:
    """Config torch_dtype; Qwen1's remote code with no bf16/fp16/fp32 flag set autoselects bf16
    (modeling_qwen.py QWenLMHeadModel.__init__ autoset_precision) on bf16-capable GPUs. DeepSpeed converts the
    module to bf16/fp16 when its config enables them (engine.py _configure_distributed_model); a config without
    the section gets it from the Trainer's flag (accelerate DeepSpeedPlugin.set_mixed_precision adds
    {"bf16": {"enabled": true}} when the config has no bf16 key)."""
    if scenario.deepspeed is not None:
        extra = scenario.deepspeed.model_extra or {}
        for section, dtype in (("bf16", DType.BFLOAT16), ("fp16", DType.FLOAT16)):
            node = extra.get(section)
            flag = node.get("enabled", False) if isinstance(node, dict) else None
            if flag is True or (flag in ("auto", None) and getattr(scenario.training, section)):
                return dtype
        return DType.FLOAT32
    model = scenario.model
    if model.torch_dtype is None and model.model_type is ModelType.QWEN:
        extra = model.model_extra or {}
        if extra.get("fp16"):
            return DType.FLOAT16
        if extra.get("fp32"):
            return DType.FLOAT32
        return DType.BFLOAT16
    return model.weights_dtype


def amp(scenario: Scenario) -> AmpPlan | None:
    """Mixed precision around the forward. The HF Trainer hands its bf16/fp16 flag to accelerate
    (transformers training_args.py __post_init__ sets ACCELERATE_MIXED_PRECISION; Trainer._inner_training_loop
    calls accelerator.prepare(model); read in 4.32.0, whose Trainer keeps its own cuda_amp only for fairscale's
    sharded_ddp). Accelerate turns native_amp on for bf16 and, on a GPU, fp16 except under
    DeepSpeed or Megatron (accelerate/accelerator.py Accelerator.__init__, v0.20.3 ... v1.x), and then
    prepare_model wraps model.forward in torch.autocast and in convert_outputs_to_fp32, whatever the weights'
    dtype (accelerator.py prepare_model `if self.native_amp:`). Under DeepSpeed the engine converts the model
    itself and nothing is wrapped. A plain host stands for the calibration, which drives the model without
    the Trainer (sim/calibrate.py): there autocast only where the flag meets weights of another dtype, and no
    output conversion."""
    if scenario.deepspeed is not None:
        return None
    wanted = DType.BFLOAT16 if scenario.training.bf16 else DType.FLOAT16 if scenario.training.fp16 else None
    if wanted is None:
        return None
    if on_host(scenario):
        return AmpPlan(wanted, outputs_to_fp32=False) if wanted is not weights_dtype(scenario) else None
    return AmpPlan(wanted, outputs_to_fp32=True)


def communication_dtype(scenario: Scenario) -> DType:
    """DeepSpeed's `communication_data_type` for gradient reduction: "fp32", "fp16", or bf16 as "bfp16" up to
    0.14.0 and "bf16" from 0.14.1 (runtime/config.py get_communication_data_type raises on anything else);
    without it the model dtype (engine.py communication_data_type)."""
    value = (scenario.deepspeed.model_extra or {}).get("communication_data_type")
    if value is None:
        return weights_dtype(scenario)
    bf16 = "bfp16" if scenario.software.version("deepspeed") <= (0, 14, 0) else "bf16"
    names = {"fp32": DType.FLOAT32, "fp16": DType.FLOAT16, bf16: DType.BFLOAT16}
    if not isinstance(value, str) or value.lower() not in names:
        raise ScenarioError(f"deepspeed.communication_data_type: {value!r} is not one of {', '.join(names)} "
                            "(DeepSpeed's names for this version)")
    return names[value.lower()]


def on_host(scenario: Scenario) -> bool:
    """An inline device with no CUDA context and the exact allocator stands for a plain CPU host (design.md §3)."""
    return scenario.hardware.device.cuda_context_bytes == 0 and scenario.allocator.backend is AllocatorBackend.EXACT


def model_shape(scenario: Scenario, weights: DType) -> ModelShape:
    """The config.json's shapes with the dtype the weights load in."""
    m = scenario.model
    extra = m.model_extra or {}
    return ModelShape(
        model_type=m.model_type, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads, kv_heads=m.kv_heads,
        head_size=m.head_size, vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, weights_dtype=weights, attention_bias=m.attention_bias,
        mlp_bias=m.mlp_bias, attention_dropout=m.attention_dropout, no_bias=m.no_bias,
        sliding_window=extra.get("sliding_window"), use_sliding_window=bool(extra.get("use_sliding_window")))


def device_plan(device: DeviceSpec) -> DevicePlan:
    """A catalog or inline device as the rooms below read it."""
    eff = device.efficiency
    return DevicePlan(
        capacity_bytes=device.capacity_bytes, compute_capability=device.compute_capability,
        cuda_context_bytes=device.cuda_context_bytes, peak_flops=dict(device.peak_flops),
        hbm_bytes_per_s=device.hbm_bytes_per_s, intra_node_bytes_per_s=device.intra_node_bytes_per_s,
        inter_node_bytes_per_s=device.inter_node_bytes_per_s, intra_node_latency_us=device.intra_node_latency_us,
        inter_node_latency_us=device.inter_node_latency_us, gemm_efficiency=eff.gemm,
        attention_efficiency=eff.attention, hbm_efficiency=eff.hbm, nvlink_efficiency=eff.nvlink,
        network_efficiency=eff.network)


def _lora(scenario: Scenario, weights: DType, adapters_fp32: bool) -> LoraPlan | None:
    """PEFT's LoraConfig; adapters in fp32 where PEFT upcasts bf16/fp16 ones (autocast_adapter_dtype)."""
    lora = scenario.lora
    if lora is None:
        return None
    low_precision = weights in (DType.BFLOAT16, DType.FLOAT16)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    return LoraPlan(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets,
                    modules_to_save=tuple(lora.modules_to_save),
                    adapter_dtype=DType.FLOAT32 if adapters_fp32 and low_precision else weights)


def _zero(scenario: Scenario, default_optim: Optim) -> ZeroPlan | None:
    """zero_optimization with a stage, offload as booleans (check_supported refused the rest)."""
    if scenario.deepspeed is None or scenario.deepspeed.zero_optimization.stage == 0:
        return None
    z = scenario.deepspeed.zero_optimization
    offloaded = {key: (getattr(z, key) or {}).get("device", "none") == "cpu"
                 for key in ("offload_param", "offload_optimizer")}
    return ZeroPlan(
        stage=z.stage, contiguous_gradients=z.contiguous_gradients, reduce_bucket_size=z.reduce_bucket_size,
        allgather_bucket_size=z.allgather_bucket_size, overlap_comm=z.overlap_comm, sub_group_size=z.sub_group_size,
        stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
        stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
        stage3_model_persistence_threshold=z.stage3_model_persistence_threshold,
        stage3_max_live_parameters=z.stage3_max_live_parameters,
        stage3_max_reuse_distance=z.stage3_max_reuse_distance, offload_param=offloaded["offload_param"],
        offload_optimizer=offloaded["offload_optimizer"],
        inner_optimizer_temporaries=_inner_optimizer_temporaries(scenario, default_optim),
        communication_dtype=communication_dtype(scenario))


def _inner_optimizer_temporaries(scenario: Scenario, default_optim: Optim) -> int:
    """fp32 temporaries of the sub-group size in the inner optimizer's step: DeepSpeed's own optimizer (config
    "optimizer" section → FusedAdam) and torch's fused AdamW make none; torch AdamW foreach makes
    exp_avg_sq_sqrt (_multi_tensor_adamw)."""
    if (scenario.deepspeed.model_extra or {}).get("optimizer"):
        return 0
    optim = scenario.training.optim or default_optim
    return 0 if optim in (Optim.ADAMW_TORCH_FUSED, Optim.SGD) else 1


def _nccl(scenario: Scenario, versions: Versions) -> NcclPlan:
    """`nccl.version`, else the one torch's wheel pins (the newest known for newer torch; wheels before 2.2 were not
    read and get a 2.18, which the buffer figures treat like 2.19); channels, else what NCCL opens on an 8-GPU
    NVSwitch node; communicators of one rank: none on one GPU, DeepSpeed (any ZeRO stage) the world group
    (parameter all-gathers, zero.Init broadcasts) and its clone for gradient reduction
    (deepspeed/utils/groups.py _clone_world_group), torch DDP its one process group."""
    nccl = scenario.nccl
    if nccl.version is not None:
        version = parse_version(nccl.version, "nccl.version")
    else:
        version = (2, 18, 6)
        for first_torch, pinned in _NCCL_OF_TORCH:
            if versions.torch[:2] >= first_torch:
                version = pinned
    if nccl.communicators is not None:
        count = nccl.communicators
    elif scenario.hardware.gpus <= 1:
        count = 0
    else:
        count = 2 if scenario.deepspeed is not None else 1
    return NcclPlan(version, nccl.channels or _DEFAULT_NCCL_CHANNELS, nccl.buffsize_bytes, nccl.nvls, count)
