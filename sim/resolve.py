"""Resolve a validated Scenario once into the Plan that every floor below takes (sim/plan.py).

This is the one place where settings are derived from the raw schema: the dtypes (config torch_dtype, DeepSpeed's
bf16/fp16 sections, Qwen1's autoselection, accelerate's mixed precision, DeepSpeed's communication dtype, PEFT's
adapter dtype), host or device, the version behaviours, the world, ZeRO, NCCL and allocator settings, and the device
runtime (sim/runtime.py). What is not modelled yet is refused here too, with one line naming the key.
"""

import re

from sim.allocator.alloc_conf import parse_alloc_conf
from sim.errors import ScenarioError
from sim.plan import (
    AllocatorPlan,
    AmpPlan,
    DevicePlan,
    LoraPlan,
    ModelShape,
    ModuleLoading,
    MoeShape,
    NcclPlan,
    Plan,
    TrainingPlan,
    Versions,
    World,
    ZeroPlan,
)
from sim.runtime import cuda_context, device_runtime, module_loading
from sim.scenario import DeviceSpec, ModelSpec, Scenario
from sim.strategies import SaveOnCpu, load_strategy
from sim.versions import parse_version
from sim.vocab import BITSANDBYTES_OPTIMS, AllocatorBackend, AttnImplementation, DType, ModelType, Optim
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
# The CUDA runtime in a torch build's local version: "+cu118" is 11.8, "+cu121" 12.1, "+cu130" 13.0
_CUDA_TAG = re.compile(r"\+cu(\d+)(\d)\s*$")


def resolve_plan(scenario: Scenario) -> Plan:
    """The scenario resolved once; raises ScenarioError for what is not modelled."""
    check_supported(scenario)
    software = scenario.software
    packages = ("torch", "transformers", "deepspeed", "peft", "bitsandbytes")
    versions = Versions(*(software.version(p) for p in packages),
                        qwen_remote_code=software.qwen_remote_code)
    training = scenario.training
    behaviour = behaviour_for(versions, scenario.model.model_type, training.gradient_checkpointing,
                              use_cache=(scenario.model.model_extra or {}).get("use_cache") is not False)
    weights = weights_dtype(scenario)
    host = on_host(scenario)
    loading = module_loading(versions.torch, cuda_of_torch(scenario.software.torch))
    device = device_plan(scenario.hardware.device, loading)
    world = World(scenario.hardware.gpus_per_node, scenario.hardware.nodes)
    zero = _zero(scenario, behaviour.default_optim)
    nccl = _nccl(scenario, versions)
    zero3 = zero is not None and zero.stage == 3
    reentrant = use_reentrant(scenario, versions.transformers)
    if training.gradient_checkpointing and not reentrant and scenario.model.model_type is not ModelType.QWEN:
        _check_non_reentrant(versions.torch, zero3)  # Qwen1 checkpoints reentrantly whatever the kwargs say
    return Plan(
        name=scenario.name,
        model=model_shape(scenario, weights),
        lora=_lora(scenario, weights, behaviour.peft_adapters_fp32),
        training=TrainingPlan(
            micro_batch=training.per_device_train_batch_size,
            accumulation_steps=training.gradient_accumulation_steps, seq_len=training.seq_len,
            gradient_checkpointing=training.gradient_checkpointing,
            use_reentrant=reentrant, attn=training.attn_implementation,
            optim=training.optim or behaviour.default_optim, weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm, steps=scenario.simulation.steps,
            loss_check_syncs=training.logging_nan_inf_filter),
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
        strategies=_strategies(scenario, zero3, host),
    )


def _strategies(scenario: Scenario, zero3: bool, host: bool) -> tuple:
    """The scenario's strategies loaded (sim/strategies.py). save_on_cpu is refused under ZeRO-3 (DeepSpeed frees
    the gathered weights a node saves after each module's forward, which the pack hook's copies would change: not
    modelled), on a plain CPU host (there `tensor.cpu()` returns the tensor itself, or a copy in the same memory
    with pin_memory: not the device-to-host offload modelled) and with gradient checkpointing (below)."""
    loaded = tuple(load_strategy(index, item.kind, item.model_extra or {})
                   for index, item in enumerate(scenario.strategies))
    if any(isinstance(strategy, SaveOnCpu) for strategy in loaded):
        if zero3:
            raise ScenarioError("strategies: save_on_cpu under ZeRO-3 (deepspeed.zero_optimization.stage 3) is not "
                                "modelled yet")
        if host:
            raise ScenarioError("strategies: save_on_cpu on a plain CPU host is not modelled (it offloads a GPU's "
                                "saved tensors to the host)")
        if scenario.training.gradient_checkpointing:
            # the checkpoint's saved inputs are offloaded too and its recompute runs on their unpacked copies
            # (CheckpointFunction.backward reads ctx.saved_tensors; the non-reentrant frame saves its inputs through
            # autograd under the outer hooks): the tape's checkpoints recompute from the originals
            raise ScenarioError("strategies: save_on_cpu with training.gradient_checkpointing is not modelled yet")
    return loaded


def _check_non_reentrant(torch: tuple[int, int, int], zero3: bool) -> None:
    """use_reentrant false is modelled as torch >= 2.1 runs it (sim/workload/checkpoint.py); refuse the rest."""
    key = ("training.gradient_checkpointing_kwargs.use_reentrant: false (non-reentrant checkpointing; unset, it is "
           "transformers >= 5.0's default)")
    hint = "; `--set training.gradient_checkpointing_kwargs.use_reentrant=true` simulates the reentrant path"
    if torch < (2, 1, 0):
        # torch <= 2.0's _checkpoint_without_reentrant re-runs the whole function with no early stop and keeps
        # what it recomputed in a dict keyed by holder: another path, not modelled
        raise ScenarioError(f"{key} on torch {'.'.join(map(str, torch))} (< 2.1) is not modelled yet{hint}")
    if zero3:
        # the early stop raises out of the re-run inside the last module that saves a tensor, so ZeRO-3's
        # post-forward hooks of the modules it leaves do not run: what stays gathered is not modelled
        raise ScenarioError(f"{key} under deepspeed ZeRO stage 3 is not modelled yet{hint}")


# config.json keys that change the architecture (and its memory) in the families that define them, and that the
# modelling code of the other model types never reads: a config carrying one under another model_type (a Mixtral
# config relabelled `mistral`) would run there as a dense model, silently. Key → (what it is, the model types whose
# code reads it and that the simulator models).
_ARCHITECTURE_KEYS: dict[str, tuple[str, frozenset[ModelType]]] = {
    # transformers models/mixtral/configuration_mixtral.py: num_local_experts, num_experts_per_tok
    "num_local_experts": ("mixture-of-experts layers (Mixtral)", frozenset({ModelType.MIXTRAL})),
    # models/qwen2_moe/configuration_qwen2_moe.py, qwen3_moe: num_experts, moe_intermediate_size,
    # shared_expert_intermediate_size
    "num_experts": ("mixture-of-experts layers (Qwen2-MoE, Qwen3-MoE)",
                    frozenset({ModelType.QWEN2_MOE, ModelType.QWEN3_MOE})),
    "moe_intermediate_size": ("mixture-of-experts layers (Qwen-MoE, DeepSeek)",
                              frozenset({ModelType.QWEN2_MOE, ModelType.QWEN3_MOE})),
    "shared_expert_intermediate_size": ("shared experts (Qwen2-MoE)", frozenset({ModelType.QWEN2_MOE})),
    # models/deepseek_v2/configuration_deepseek_v2.py, deepseek_v3: n_routed_experts, n_shared_experts,
    # kv_lora_rank, q_lora_rank (multi-head latent attention)
    "n_routed_experts": ("mixture-of-experts layers (DeepSeek-V2/V3)", frozenset()),
    "n_shared_experts": ("shared experts (DeepSeek-V2/V3)", frozenset()),
    "kv_lora_rank": ("multi-head latent attention (DeepSeek-V2/V3)", frozenset()),
    "q_lora_rank": ("multi-head latent attention (DeepSeek-V2/V3)", frozenset()),
}


def check_model_keys(scenario: Scenario) -> None:
    """Refuse a config.json key that changes the architecture where the named model_type's code ignores it."""
    model = scenario.model
    extra = model.model_extra or {}
    for key, (meaning, readers) in _ARCHITECTURE_KEYS.items():
        value = extra.get(key)
        if value in (None, 0) or model.model_type in readers:
            continue
        raise ScenarioError(f"model.{key}: {value!r} configures {meaning}, which model_type "
                            f"{model.model_type.value} does not run (its modelling code would ignore it and run a "
                            "dense model) and the simulator does not model yet")
    gemma = model.model_type in (ModelType.GEMMA, ModelType.GEMMA2, ModelType.GEMMA3_TEXT)
    if model.hidden_act != "silu" and not gemma:
        raise ScenarioError(f"model.hidden_act: {model.hidden_act!r} is modelled for the Gemma families only "
                            f"(model_type {model.model_type.value} is modelled with silu)")
    if model.model_type is ModelType.PHI3:
        rope = extra.get("rope_parameters") or extra.get("rope_scaling") or {}
        partial = extra.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict)
                            else 1.0)
        for key, value in (("partial_rotary_factor", partial), ("resid_pdrop", extra.get("resid_pdrop", 0.0)),
                           ("embd_pdrop", extra.get("embd_pdrop", 0.0))):
            if value != (1.0 if key == "partial_rotary_factor" else 0.0):
                raise ScenarioError(f"model.{key}: {value!r} is not modelled yet for model_type phi3 (the published "
                                    "Phi-3 configs use full rotary and no dropout)")
    scaling = extra.get("rope_scaling")
    rope_type = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else None
    transformers = scenario.software.version("transformers")
    if rope_type == "llama3" and transformers < (4, 43, 0):
        # LlamaConfig._rope_scaling_validation of 4.42 accepts only linear and dynamic (a ValueError at load);
        # 4.43 adds the llama3 type with Llama 3.1 (modeling_rope_utils.py _compute_llama3_parameters)
        raise ScenarioError(f"model.rope_scaling: rope_type 'llama3' needs transformers >= 4.43 (got "
                            f"{scenario.software.transformers}), which refuses the config at load")


# The MoE config classes' defaults (transformers 5.24.0 models/mixtral/configuration_mixtral.py MixtralConfig,
# qwen2_moe/configuration_qwen2_moe.py Qwen2MoeConfig, qwen3_moe/configuration_qwen3_moe.py Qwen3MoeConfig):
# (experts key, experts, top k, expert size key or None for intermediate_size, its default, norm_topk_prob default)
_MOE_DEFAULTS = {
    ModelType.MIXTRAL: ("num_local_experts", 8, 2, None, None, True),  # MixtralTopKRouter always renormalises
    ModelType.QWEN2_MOE: ("num_experts", 60, 4, "moe_intermediate_size", 1408, False),
    ModelType.QWEN3_MOE: ("num_experts", 128, 8, "moe_intermediate_size", 768, False),
}


def moe_shape(model_type: ModelType, layers: int, intermediate_size: int, extra: dict) -> MoeShape | None:
    """The routed experts as the MoE config classes read config.json; None for a dense family. The sparse layers:
    every layer in Mixtral; in Qwen2/3-MoE those not in mlp_only_layers with (i + 1) % decoder_sparse_step == 0
    (Qwen2MoeDecoderLayer.__init__, Qwen3MoeDecoderLayer.__init__)."""
    if not model_type.is_moe:
        return None
    experts_key, experts, top_k, size_key, size_default, norm = _MOE_DEFAULTS[model_type]
    experts = extra.get(experts_key, experts)
    top_k = extra.get("num_experts_per_tok", top_k)
    size = extra.get(size_key, size_default) if size_key else intermediate_size
    for key, value in ((experts_key, experts), ("num_experts_per_tok", top_k), (size_key, size)):
        if key is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ScenarioError(f"model.{key}: {value!r} must be a positive integer")
    if top_k > experts:
        raise ScenarioError(f"model.num_experts_per_tok: {top_k} is more than model.{experts_key} ({experts}): "
                            "torch.topk cannot pick more experts than there are")
    if model_type is ModelType.MIXTRAL:
        sparse = frozenset(range(layers))
    else:
        step = extra.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ScenarioError(f"model.decoder_sparse_step: {step!r} must be a positive integer")
        dense = extra.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
            raise ScenarioError(f"model.mlp_only_layers: {dense!r} must be a list of layer indices")
        sparse = frozenset(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    shared = extra.get("shared_expert_intermediate_size", 5632) if model_type is ModelType.QWEN2_MOE else 0
    return MoeShape(num_experts=experts, experts_per_token=top_k, expert_intermediate_size=size,
                    norm_topk_prob=bool(extra.get("norm_topk_prob", norm)) if model_type is not ModelType.MIXTRAL
                    else True, sparse_layers=sparse, shared_expert_intermediate_size=shared or 0,
                    qkv_bias=bool(extra.get("qkv_bias", True)) if model_type is ModelType.QWEN2_MOE else False)


def check_moe(scenario: Scenario) -> None:
    """Refuse what the MoE modelling (sim/workload/moe.py) does not cover, one line naming the key."""
    model = scenario.model
    if not model.model_type.is_moe:
        return
    extra = model.model_extra or {}
    kind = model.model_type.value
    moe_shape(model.model_type, model.num_hidden_layers, model.intermediate_size, extra)  # the expert keys' checks
    if extra.get("output_router_logits"):
        # MixtralForCausalLM.forward: the router logits of every layer kept to the loss and the load-balancing
        # aux loss (load_balancing_loss_func) added: not modelled
        raise ScenarioError(f"model.output_router_logits: true (the router aux loss) is not modelled yet for "
                            f"model_type {kind}")
    if extra.get("router_jitter_noise"):  # MixtralSparseMoeBlock.forward multiplies the input by uniform noise
        raise ScenarioError(f"model.router_jitter_noise: {extra['router_jitter_noise']!r} is not modelled yet "
                            "(the published Mixtral configs use 0.0)")
    window = extra.get("use_sliding_window") if model.model_type is not ModelType.MIXTRAL else \
        extra.get("sliding_window")
    if window:  # Mixtral reads sliding_window itself, the Qwen MoE configs only under use_sliding_window
        key = "sliding_window" if model.model_type is ModelType.MIXTRAL else "use_sliding_window"
        raise ScenarioError(f"model.{key}: {extra[key]!r}: sliding-window attention is not modelled yet for "
                            f"model_type {kind}")
    if scenario.lora is not None and scenario.lora.target_modules == "all-linear" and \
            model.model_type in (ModelType.MIXTRAL, ModelType.QWEN3_MOE):
        # measured with peft 0.21.2 / transformers 5.24.0: get_peft_model wraps Mixtral's and Qwen3-MoE's router and
        # 3-D experts in lora.ParamWrapper adapters (a parametrised weight per forward), not modelled; Qwen2-MoE's
        # all-linear targets only nn.Linear modules
        raise ScenarioError(f"lora.target_modules: 'all-linear' on model_type {kind} also puts PEFT's ParamWrapper "
                            "adapters on the router and the experts, which is not modelled yet; name the attention "
                            "projections (q_proj, k_proj, v_proj, o_proj)")
    if scenario.deepspeed is not None and scenario.deepspeed.zero_optimization.stage == 3:
        # DeepSpeed ZeRO-3 gathers per module unless deepspeed.utils.set_z3_leaf_modules marks the MoE block a leaf
        # (LLaMA-Factory src/llamafactory/model/model_utils/moe.py add_z3_leaf_module does for Mixtral/Qwen2-MoE;
        # transformers 5.24 does not); neither granularity is modelled
        raise ScenarioError(f"deepspeed.zero_optimization.stage: 3 with model_type {kind} (ZeRO-3 leaf modules "
                            "for the MoE block) is not modelled yet; stages 0-2 are")
    torch = scenario.software.version("torch")
    host = on_host(scenario)
    capability = tuple(int(part) for part in (scenario.hardware.device.compute_capability or "8.0").split("."))
    cuda_kernel = torch >= (2, 9, 0) and capability >= (8, 0) or (2, 8, 0) <= torch and capability[0] == 9
    if torch < (2, 9, 0) if host else not cuda_kernel:
        # integrations/moe.py _can_use_grouped_mm: no CPU kernel up to torch 2.8; on CUDA sm80+ from torch 2.9,
        # Hopper only before (taken from torch 2.8; whether 2.7 has torch._grouped_mm is not checked, so it is
        # refused); elsewhere transformers::grouped_mm_fallback runs, a per-expert mm loop
        raise ScenarioError(f"software.torch: {scenario.software.torch} on this device runs transformers' "
                            "grouped_mm fallback for the experts, which is not modelled yet (torch >= 2.9 on "
                            "compute capability >= 8.0 or a CPU host is)")


def check_attention(scenario: Scenario, shape: ModelShape) -> None:
    """Refuse the attention paths of the sliding-window families that transformers refuses or that are not
    modelled: on 5.x SDPA with soft-capped scores (integrations/sdpa_attention.py raises ValueError on a softcap) and
    Gemma 2 under SDPA at all (Gemma2PreTrainedModel._supports_sdpa = False, "sdpa does not support softcapping":
    _sdpa_can_dispatch raises; read at 5.24.0); Qwen2's sliding layers from 4.53, whose second mask is not modelled.
    On 4.53 - 4.57 Gemma 2 supports sdpa and sdpa_attention_forward takes the softcap kwarg without applying it
    (4.53.0, 4.57.1 integrations/sdpa_attention.py): plain SDPA, as modelled."""
    attn, model = scenario.training.attn_implementation, scenario.model
    transformers = scenario.software.version("transformers")
    sdpa_5x = attn is AttnImplementation.SDPA and transformers >= (5, 0, 0)
    if sdpa_5x and shape.attn_logit_softcapping is not None:
        raise ScenarioError(f"training.attn_implementation: sdpa does not support attention soft-capping "
                            f"(model.attn_logit_softcapping {shape.attn_logit_softcapping}): transformers refuses "
                            "it for this model; use eager (its default here) or flash_attention_2")
    if sdpa_5x and model.model_type is ModelType.GEMMA2:
        raise ScenarioError("training.attn_implementation: sdpa is refused by transformers for model_type gemma2 "
                            "(Gemma2PreTrainedModel._supports_sdpa = False); use eager or flash_attention_2")
    extra = model.model_extra or {}
    if (model.model_type is ModelType.QWEN2 and shape.use_sliding_window and shape.sliding_window
            and attn is not AttnImplementation.FLASH_ATTENTION_2
            and transformers >= (4, 53, 0)
            and model.num_hidden_layers > extra.get("max_window_layers", 28)):
        # 4.53+ Qwen2Config.layer_types: "sliding_attention" for i >= max_window_layers (default 28), and Qwen2Model
        # builds causal_mask_mapping["sliding_attention"] beside the full mask (models/qwen2/modeling_qwen2.py)
        raise ScenarioError(f"model.use_sliding_window: true with {model.num_hidden_layers} layers > max_window_layers "
                            f"{extra.get('max_window_layers', 28)} gives Qwen2 a second, sliding-window mask under "
                            f"{attn.value} on transformers >= 4.53, which is not modelled yet (flash_attention_2 is)")


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


def check_optimizer(scenario: Scenario) -> None:
    """bitsandbytes' 8-bit AdamW as HF's Trainer makes it: on a CUDA device, without DeepSpeed (ZeRO would wrap it:
    not modelled), `adamw_8bit` only where transformers has that name (an alias from 4.30)."""
    optim = scenario.training.optim
    if optim not in BITSANDBYTES_OPTIMS:
        return
    shown = f"training.optim: {optim.value!r}"
    transformers = scenario.software.transformers
    if optim is Optim.ADAMW_8BIT and scenario.software.version("transformers") < (4, 30, 0):
        raise ScenarioError(f"{shown}: no optimizer of transformers {transformers} (an alias of adamw_bnb_8bit from "
                            "4.30)")
    if scenario.deepspeed is not None:
        raise ScenarioError(f"{shown} with deepspeed is not modelled yet (DeepSpeed's ZeRO optimizers wrap it)")
    if on_host(scenario):
        raise ScenarioError(f"{shown} on a plain host: bitsandbytes' 8-bit optimizers run on CUDA devices")


def check_supported(scenario: Scenario) -> None:
    """Refuse, with a clear message, what is not modelled yet rather than simulate it wrongly."""
    check_model_keys(scenario)
    check_optimizer(scenario)
    check_moe(scenario)
    check_attention(scenario, model_shape(scenario, weights_dtype(scenario)))
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
    if scenario.allocator.backend is AllocatorBackend.EXACT and scenario.allocator.conf:
        raise ScenarioError(f"allocator.conf: only meaningful with backend caching (got {scenario.allocator.conf!r})")


def use_reentrant(scenario: Scenario, transformers: tuple[int, int, int]) -> bool:
    """gradient_checkpointing_kwargs.use_reentrant as given, else what the model's checkpointing_enable passes when
    the Trainer hands it no kwargs: true up to 4.x (4.57.6 modeling_utils.py gradient_checkpointing_enable), false
    from 5.0 (5.0.0 and 5.24.0 _activation_checkpointing_enable)."""
    given = scenario.training.gradient_checkpointing_kwargs.use_reentrant
    return given if given is not None else transformers < (5, 0, 0)


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
    sliding = _sliding_shape(m.model_type, m.num_hidden_layers, extra)
    return ModelShape(
        model_type=m.model_type, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads, kv_heads=m.kv_heads,
        head_size=m.head_size, vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=_tied(m), weights_dtype=weights, attention_bias=m.attention_bias,
        mlp_bias=m.mlp_bias, attention_dropout=m.attention_dropout, no_bias=m.no_bias,
        sliding_window=sliding.pop("sliding_window", extra.get("sliding_window")),
        use_sliding_window=bool(extra.get("use_sliding_window")), moe=moe_shape(m.model_type,
                                                                                  m.num_hidden_layers,
                                                                                  m.intermediate_size, extra),
        **sliding)


# Config classes whose tie_word_embeddings defaults to True (transformers 5.24.0 GemmaConfig, Gemma2Config,
# Gemma3TextConfig: `tie_word_embeddings: bool = True`); the others default to False.
_TIED_BY_DEFAULT = frozenset({ModelType.GEMMA, ModelType.GEMMA2, ModelType.GEMMA3_TEXT})


def _tied(model: ModelSpec) -> bool:
    """config.json's tie_word_embeddings, or where it is absent the family's config-class default."""
    if "tie_word_embeddings" in model.model_fields_set:
        return model.tie_word_embeddings
    return model.model_type in _TIED_BY_DEFAULT


# The Gemma 2 and Gemma 3 config classes' defaults for keys a config.json may leave out (transformers 5.24.0
# models/gemma2/configuration_gemma2.py Gemma2Config, models/gemma3/configuration_gemma3.py Gemma3TextConfig):
# soft-capping (attention, final), sliding_window, and the layer pattern when layer_types is absent (Gemma 2: every
# other layer from the first, `bool((i + 1) % 2)`; Gemma 3: `bool((i + 1) % sliding_window_pattern)`, pattern 6).
_GEMMA_DEFAULTS = {ModelType.GEMMA2: (50.0, 30.0, 4096, 2), ModelType.GEMMA3_TEXT: (None, None, 4096, 6)}


# sliding_window where config.json leaves it out: MistralConfig's default, 4096
# (models/mistral/configuration_mistral.py, 4.34 to 5.24.0); Qwen2Config's and MixtralConfig's is None (no window)
_DEFAULT_WINDOW = {ModelType.MISTRAL: 4096}


def _sliding_shape(model_type: ModelType, layers: int, extra: dict) -> dict:
    """The sliding layers (Gemma 2/3, Phi-3) and soft-capping (Gemma 2/3) as the config classes read them; nothing
    for the other families."""
    if model_type in (ModelType.PHI3, ModelType.MISTRAL):
        # Phi3Model, MistralModel: create_sliding_window_causal_mask, one mask for every layer, when sliding_window is
        # set (5.24.0 models/{phi3,mistral}/modeling_*.py `create_causal_mask if self.config.sliding_window is None`)
        window = extra.get("sliding_window", _DEFAULT_WINDOW.get(model_type))
        return {"sliding_layers": frozenset(range(layers)) if window else frozenset(), "sliding_window": window}
    if model_type not in _GEMMA_DEFAULTS:
        return {}
    attn_cap, final_cap, window, pattern = _GEMMA_DEFAULTS[model_type]
    types = extra.get("layer_types")
    if types is None:
        pattern = extra.get("sliding_window_pattern", pattern)
        sliding = frozenset(i for i in range(layers) if (i + 1) % pattern)
    else:
        sliding = frozenset(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return {"sliding_layers": sliding, "attn_logit_softcapping": extra.get("attn_logit_softcapping", attn_cap),
            "final_logit_softcapping": extra.get("final_logit_softcapping", final_cap),
            "sliding_window": extra.get("sliding_window", window)}


def cuda_of_torch(torch: str) -> tuple[int, int] | None:
    """The CUDA runtime a torch build names in its local version, as torch.__version__ prints it ("2.1.0+cu118" →
    (11, 8), "+cu121" → (12, 1)); None where it names none (the PyPI wheel's)."""
    match = _CUDA_TAG.search(torch)
    return (int(match.group(1)), int(match.group(2))) if match else None


def device_plan(device: DeviceSpec, loading: ModuleLoading = ModuleLoading.LAZY) -> DevicePlan:
    """A catalog or inline device as the rooms below read it, with the CUDA context it holds under `loading`
    (sim/runtime.py cuda_context)."""
    eff = device.efficiency
    return DevicePlan(
        capacity_bytes=device.capacity_bytes, compute_capability=device.compute_capability,
        cuda_context=cuda_context(device.cuda_context_bytes, loading), nvlink_sharp=device.nvlink_sharp,
        peak_flops=dict(device.peak_flops),
        hbm_bytes_per_s=device.hbm_bytes_per_s, intra_node_bytes_per_s=device.intra_node_bytes_per_s,
        inter_node_bytes_per_s=device.inter_node_bytes_per_s, intra_node_latency_us=device.intra_node_latency_us,
        inter_node_latency_us=device.inter_node_latency_us, host_link_bytes_per_s=device.host_link_bytes_per_s,
        host_memory_bytes_per_s=device.host_memory_bytes_per_s, gemm_efficiency=eff.gemm,
        attention_efficiency=eff.attention, hbm_efficiency=eff.hbm, nvlink_efficiency=eff.nvlink,
        network_efficiency=eff.network, pcie_efficiency=eff.pcie, host_memory_efficiency=eff.host_memory)


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
