"""Version-dependent behaviour of the modelling code, decided once from the transformers and PEFT versions.

Boundaries are the first release with the new behaviour, read from the released wheels of transformers
4.36.2 … 5.24.0 (models/{llama,qwen2,mistral}/modeling_*.py, loss/loss_utils.py, integrations/
sdpa_attention.py and flash_attention.py, masking_utils.py, cache_utils.py, training_args.py); see
docs/transformers-versions.md for the table with the code each row rests on.
"""

from dataclasses import dataclass
from enum import Enum

from sim.errors import ScenarioError
from sim.plan import Versions, format_version
from sim.vocab import ModelType, Optim, QwenRemoteCode


class Rotary(Enum):
    CACHED_PER_LAYER = "cached-per-layer"  # (M, d) cos/sin buffers per layer; cos[position_ids] copies per forward
    COMPUTED_PER_LAYER = "computed-per-layer"  # each layer computes (b, s, d) cos/sin from position_ids
    MODEL_LEVEL = "model-level"  # computed once per forward, shared by every layer


class SdpaContiguous(Enum):
    WITH_MASK_ON_CUDA = "with-mask"  # q/k/v.contiguous() only when a mask is passed (torch 2.1.2 workaround)
    ALWAYS = "always"
    NEVER = "never"


class KvCache(Enum):
    """What the DynamicCache created by use_cache=True does with k/v during a training forward."""

    NONE = "none"  # no cache: use_cache off (gradient checkpointing, or Trainer 5.x default)
    REFERENCES = "references"  # keeps the post-RoPE k and the v of every layer alive until the output is dropped
    COPIES = "copies"  # 4.56+: lazy_initialization + torch.cat copy k and v into the cache


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Version-dependent choices of the modelling code, decided once from the versions (behaviour_for)."""

    model_type: ModelType
    logits_upcast_in_model: bool  # ForCausalLM.forward does logits = logits.float() on the full logits
    loss_upcasts_logits: bool  # the loss function does logits.float() itself
    loss_shifts_logits: bool  # logits[..., :-1, :].contiguous() before cross-entropy (else labels are shifted)
    rotary: Rotary
    unused_rotary_buffers: bool
    llama_full_mask_buffer: bool
    llama_full_mask_bool: bool
    sdpa_mask_always: bool
    sdpa_sliding_window_check: bool
    sdpa_sliding_mask_bool: bool  # 4.53+: SDPA's sliding-window mask is bool (b, 1, s, s) once s >= window
    eager_mask_via_bool: bool
    sdpa_repeats_kv: bool
    sdpa_contiguous: SdpaContiguous
    fa2_repeats_kv: bool
    kv_cache: KvCache
    legacy_cache_output: bool  # the output holds that cache as a tuple of (k, v) tuples (to_legacy_cache)
    peft_adapters_fp32: bool
    peft_lora_add_in_place: bool  # PEFT <= 0.8: result += lora(x); result.to(x.dtype) (_peft_lora_add_in_place)
    default_optim: Optim  # TrainingArguments.optim's default in this version
    qwen_causal_mask_buffer: bool  # Qwen1's QWenModel registers a (P, P) bool registered_causal_mask buffer
    gemma_normalizer_tensor: bool  # Gemma 1/2 4.x: a 0-dim normalizer per forward instead of an embed_scale buffer
    gemma3_both_rotaries: bool  # Gemma 3 4.x: global and local cos/sin every forward, both handed to every layer


# The first transformers release with each family's modelling code (models/<family>/ in the wheel). A family added
# after 4.48 has the model-level rotary, ForCausalLMLoss and no per-family exception from its first release, so it
# takes the shared rows below.
_FIRST_RELEASE = {ModelType.QWEN2: (4, 37, 0), ModelType.QWEN3: (4, 51, 0)}
# Families modelled from a later release than their first: Gemma 1 (4.38), 2 (4.42), 3 (4.50) and Phi-3 (4.40) from
# 4.53, where their models build the masks through masking_utils (create_causal_mask,
# create_sliding_window_causal_mask) as 5.x does (read at 4.53.0, 4.57.1 and 5.24.0); what 4.53 - 4.57 does
# differently is a version row below (the Gemma normalizer tensor, use_cache's DynamicCache, sdpa for Gemma 2).
# Before 4.53 each builds its masks in its own _update_causal_mask (4-D float masks; Gemma 2/3 slice the sliding
# ones out of it) and Phi-3/Gemma 1 run the older rotary: not read yet.
# The MoE families as 5.24.0 runs them (3-D expert weights, grouped_mm experts by default): read at 5.24.0 only.
_MODELLED_FROM = {ModelType.GEMMA: (4, 53, 0), ModelType.GEMMA2: (4, 53, 0), ModelType.GEMMA3_TEXT: (4, 53, 0),
                  ModelType.PHI3: (4, 53, 0), ModelType.MIXTRAL: (5, 24, 0), ModelType.QWEN2_MOE: (5, 24, 0),
                  ModelType.QWEN3_MOE: (5, 24, 0)}


def behaviour_for(versions: Versions, model_type: ModelType, checkpointing: bool, use_cache: bool = True) -> Behaviour:
    """The modelling code's choices for these versions, model type, checkpointing and config.json's use_cache (the
    model's forward falls back to self.config.use_cache when the Trainer passes none, as 4.x's does)."""
    tf, torch, peft = versions.transformers, versions.torch, versions.peft
    if model_type is ModelType.QWEN:
        return _qwen1(torch, peft, tf, versions.qwen_remote_code)
    if versions.qwen_remote_code is not QwenRemoteCode.FINAL:
        raise ScenarioError(f"software.qwen_remote_code: only for model_type qwen (got "
                            f"{versions.qwen_remote_code.value!r} with model_type {model_type.value!r})")
    llama, qwen2, mistral = (model_type is t for t in (ModelType.LLAMA, ModelType.QWEN2, ModelType.MISTRAL))
    first = _FIRST_RELEASE.get(model_type)
    if first is not None and tf < first:
        raise ScenarioError(f"software.transformers: model_type {model_type.value} needs transformers >= "
                            f"{format_version(first)} (got {format_version(tf)})")
    modelled = _MODELLED_FROM.get(model_type)
    if modelled is not None and tf < modelled:
        raise ScenarioError(f"software.transformers: model_type {model_type.value} is modelled for transformers >= "
                            f"{format_version(modelled)} (got {format_version(tf)}; "
                            + ("before 4.53 its model builds its masks in its own _update_causal_mask, not modelled "
                               "yet)" if modelled == (4, 53, 0) else "its earlier code is not modelled yet)"))
    # Loss: <=4.45 the model upcasts the full logits and shifts them; mistral kept that through 4.47.
    # ForCausalLMLoss (4.46+, mistral 4.48+) upcasts inside the loss; from 4.49 it pads the labels instead
    # of slicing the logits, so there is no shifted copy.
    model_upcasts = tf < (4, 46, 0) or (mistral and tf < (4, 48, 0))
    if llama:
        rotary = (Rotary.CACHED_PER_LAYER if tf < (4, 38, 0) else Rotary.COMPUTED_PER_LAYER if tf < (4, 43, 0)
                  else Rotary.MODEL_LEVEL)
    elif qwen2:
        rotary = Rotary.CACHED_PER_LAYER if tf < (4, 45, 0) else Rotary.MODEL_LEVEL
    else:
        rotary = (Rotary.CACHED_PER_LAYER if tf < (4, 42, 0) else Rotary.COMPUTED_PER_LAYER if tf < (4, 48, 0)
                  else Rotary.MODEL_LEVEL)
    # HF forces use_cache=False under checkpointing; the Trainer of 5.x passes it by default
    if checkpointing or not use_cache or tf >= (5, 0, 0):
        kv_cache = KvCache.NONE
    else:
        kv_cache = KvCache.REFERENCES if tf < (4, 56, 0) else KvCache.COPIES
    if tf < (4, 48, 0):
        contiguous = SdpaContiguous.WITH_MASK_ON_CUDA
    else:
        contiguous = SdpaContiguous.ALWAYS if tf < (4, 56, 0) else SdpaContiguous.NEVER
    fused_default = tf >= (4, 53, 1) and torch >= (2, 8, 0)
    return Behaviour(
        model_type=model_type,
        logits_upcast_in_model=model_upcasts,
        loss_upcasts_logits=not model_upcasts,
        loss_shifts_logits=tf < (4, 49, 0),
        rotary=rotary,
        # llama 4.38.2-4.40 registers (M, d) _cos_cached/_sin_cached buffers per layer that forward never reads.
        unused_rotary_buffers=llama and (4, 38, 2) <= tf < (4, 41, 0),
        # llama 4.38.x: a persistent (M, M) causal_mask buffer (int64, bool from 4.38.2) expanded to
        # (b, 1, M, M) per forward, then gathered to (b, 1, s, s) per layer, for eager and sdpa alike.
        llama_full_mask_buffer=llama and (4, 38, 0) <= tf < (4, 39, 0),
        llama_full_mask_bool=tf >= (4, 38, 2),
        # llama 4.38-4.39 always hands SDPA a materialised mask; otherwise an all-ones mask becomes None.
        sdpa_mask_always=llama and tf < (4, 40, 0),
        # mistral 4.40-4.52 (and qwen2 4.46-4.47, 4.49-4.52) skip the SDPA mask only when s < sliding_window.
        sdpa_sliding_window_check=(mistral and (4, 40, 0) <= tf < (4, 53, 0))
        or (qwen2 and ((4, 46, 0) <= tf < (4, 48, 0) or (4, 49, 0) <= tf < (4, 53, 0))),
        # masking_utils (4.53+): create_sliding_window_causal_mask hands SDPA a bool (b, 1, s, s) mask once
        # kv_length >= sliding_window (_ignore_causal_mask_sdpa: local_attention_size), None below it
        sdpa_sliding_mask_bool=tf >= (4, 53, 0),
        eager_mask_via_bool=tf >= (4, 53, 0),
        # repeat_kv before SDPA through 4.53; 4.54+ passes enable_gqa=True on torch >= 2.5 when there is no mask.
        sdpa_repeats_kv=tf < (4, 54, 0) or torch < (2, 5, 0),
        sdpa_contiguous=contiguous,
        fa2_repeats_kv=(qwen2 or mistral) and tf < (4, 48, 0),
        kv_cache=kv_cache,
        # 4.36-4.47: with use_cache and no Cache passed in, XModel.forward returns
        # next_decoder_cache.to_legacy_cache(), a tuple of the cached tensors; from 4.48 the DynamicCache itself
        # (models/{llama,mistral,qwen2}/modeling_*.py of 4.36.2, 4.41.2, 4.42.4, 4.46.3, 4.47.1, 4.48.0).
        legacy_cache_output=tf < (4, 48, 0),
        peft_adapters_fp32=_peft_adapters_fp32(peft),
        peft_lora_add_in_place=_peft_lora_add_in_place(peft),
        # TrainingArguments.optim default: adamw_torch_fused from 4.53.1 when torch >= 2.8.
        default_optim=Optim.ADAMW_TORCH_FUSED if fused_default else Optim.ADAMW_TORCH,
        qwen_causal_mask_buffer=False,
        # GemmaModel/Gemma2Model.forward of 4.x: normalizer = torch.tensor(hidden_size**0.5, dtype=hidden_states.dtype);
        # hidden_states = hidden_states * normalizer, after the masks and the rotary (4.53.0, 4.57.1
        # models/gemma{,2}/modeling_gemma{,2}.py); 5.x scales inside GemmaTextScaledWordEmbedding, with an embed_scale
        # buffer (Gemma 3 has that buffer from 4.50)
        gemma_normalizer_tensor=model_type in (ModelType.GEMMA, ModelType.GEMMA2) and tf < (5, 0, 0),
        # Gemma3TextModel of 4.x: rotary_emb and rotary_emb_local both built and run every forward, and each
        # Gemma3DecoderLayer takes position_embeddings_global and position_embeddings_local (4.53.0, 4.57.1); 5.x
        # computes one pair per layer type present and hands each layer its own
        gemma3_both_rotaries=model_type is ModelType.GEMMA3_TEXT and tf < (5, 0, 0),
    )


def _qwen1(torch: tuple, peft: tuple, tf: tuple, revision: QwenRemoteCode) -> Behaviour:
    """Qwen1's remote code does not change with transformers: bf16 logits, shifted copy, no fp32 upcast. Its own
    revisions differ in the causal-mask buffer: the 2023-10 code's QWenModel.__init__ registers
    registered_causal_mask = tril(ones((P, P), bool)) with P = max_position_embeddings whatever the attention
    (tomaarsen/attention_sinks@0125bd6 attention_sinks/models/qwen/modeling_qwen.py, a copy of it made 2023-10-11;
    intel/ipex-llm PR #9513 calls it the "10-12 version"); Qwen/Qwen-7B-Chat@2abd8e5 set it to None under
    flash-attn and Qwen/Qwen-7B@f7bc352 (before 2023-11-23) dropped it for a mask built per forward
    (tomaarsen/attention_sinks PR #33), as the final revision that sim/workload/qwen1.py models."""
    if torch < (2, 1, 0):
        raise ScenarioError("software.torch: model_type qwen is modelled for torch >= 2.1 (SDPA with a mask)")
    return Behaviour(
        model_type=ModelType.QWEN, logits_upcast_in_model=False, loss_upcasts_logits=False, loss_shifts_logits=True,
        rotary=Rotary.MODEL_LEVEL, unused_rotary_buffers=False, llama_full_mask_buffer=False,
        llama_full_mask_bool=False, sdpa_mask_always=True, sdpa_sliding_window_check=False,
        sdpa_sliding_mask_bool=False, eager_mask_via_bool=False, sdpa_repeats_kv=False,
        sdpa_contiguous=SdpaContiguous.NEVER, fa2_repeats_kv=False, kv_cache=KvCache.NONE, legacy_cache_output=False,
        peft_adapters_fp32=_peft_adapters_fp32(peft), peft_lora_add_in_place=_peft_lora_add_in_place(peft),
        default_optim=Optim.ADAMW_TORCH_FUSED if tf >= (4, 53, 1) and torch >= (2, 8, 0) else Optim.ADAMW_TORCH,
        qwen_causal_mask_buffer=revision is QwenRemoteCode.OCT_2023, gemma_normalizer_tensor=False,
        gemma3_both_rotaries=False,
    )


def _peft_adapters_fp32(peft: tuple) -> bool:
    """Whether LoRA adapters stay fp32 on bf16/fp16 weights. PEFT 0.5 creates lora_A/lora_B as nn.Linear in the
    default dtype and moves them to the weight's device only (src/peft/tuners/lora.py v0.5.0 update_layer:
    self.to(self.weight.device)); 0.6 moves them to the weight's dtype too (tuners/lora/layer.py v0.6.0:
    self.to(weight.device, dtype=weight.dtype)); from 0.12 LoraConfig(autocast_adapter_dtype=True) upcasts bf16/fp16
    adapters to fp32 again."""
    return peft < (0, 6, 0) or peft >= (0, 12, 0)


def _peft_lora_add_in_place(peft: tuple) -> bool:
    """Whether lora.Linear.forward adds the adapter output into the base result in place and casts the sum to the
    layer input's dtype: PEFT 0.5.0 - 0.8.2 `previous_dtype = x.dtype ... result += lora_B(lora_A(dropout(x))) *
    scaling; result = result.to(previous_dtype)` (src/peft/tuners/lora.py v0.5.0, tuners/lora/layer.py v0.6.2,
    v0.7.1, v0.8.2); from 0.9.0 (#1010, "Better respect result dtype in LoRA layers") `result = result + ...;
    result = result.to(torch_result_dtype)` with the base result's dtype (tuners/lora/layer.py v0.9.0)."""
    return peft < (0, 9, 0)
