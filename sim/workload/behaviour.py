"""Version-dependent behaviour of the modelling code, from the transformers and PEFT versions a scenario names.

Boundaries are the first release with the new behaviour, read from the released wheels' source.
"""

from sim.scenario import ModelType, Software
from sim.workload.context import Behaviour


def behaviour_for(software: Software, model_type: ModelType) -> Behaviour:
    tf = software.version("transformers")
    peft = software.version("peft")
    # <=4.45: Qwen2/Llama/MistralForCausalLM.forward did `logits = logits.float()` and shifted in the model.
    # 4.46-4.47: ForCausalLMLoss (loss/loss_utils.py) upcasts and shifts inside the loss.
    # >=4.48: labels are padded and shifted instead of slicing the logits (no shifted copy).
    old_loss = tf < (4, 46, 0)
    return Behaviour(
        model_type=model_type,
        logits_upcast_in_model=old_loss,
        loss_shifts_logits=tf < (4, 48, 0),
        loss_upcasts_logits=not old_loss,
        # Per-layer rotary modules with cos_cached/sin_cached of max_position_embeddings rows until the
        # model-level rotary embedding (4.45 for qwen2/llama/mistral).
        rotary_cache_per_layer=tf < (4, 45, 0),
        rotary_cache_dtype_default=True,
        eager_mask_materialized=True,
        sdpa_repeats_kv=True,
        fa2_repeats_kv=model_type in (ModelType.QWEN2, ModelType.MISTRAL) and tf < (4, 48, 0),
        # PEFT >= 0.12 LoraConfig(autocast_adapter_dtype=True) keeps bf16/fp16 adapters in fp32.
        peft_adapters_fp32=peft >= (0, 12, 0),
    )
