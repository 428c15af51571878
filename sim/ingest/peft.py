"""PEFT LoraConfig as scenarios name it (`lora:`): every field of PEFT 0.21.2 src/peft/tuners/lora/config.py
LoraConfig (with PeftConfig's) classified (sim/ingest/keys.py)."""

from sim.errors import ScenarioError
from sim.ingest.keys import IgnoredKey, KeyRule, classify, modelled, neutral, not_modelled

_BOOK = "PEFT's bookkeeping of the adapter"
_INIT = "initialisation values; the same tensors"

LORA: dict[str, KeyRule] = {
    **{key: modelled() for key in (
        "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "use_rslora")},
    **{key: neutral(_BOOK) for key in (
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "megatron_core")},
    "fan_in_fan_out": neutral("the weight's layout (GPT-2 Conv1D); the same sizes"),
    "alpha_pattern": neutral("per-layer scaling factors: scalars"),
    "qalora_group_size": neutral("read only with use_qalora"),
    "init_lora_weights": not_modelled("PiSSA/OLoRA/EVA/CorDA/LoftQ decompose or quantise the base weights at "
                                      "initialisation", True, False, "gaussian"),
    "inference_mode": not_modelled("adapters frozen: no gradients or optimizer states", False),
    "exclude_modules": not_modelled("fewer adapted modules", None, []),
    "layers_to_transform": not_modelled("only some layers adapted", None, []),
    "layers_pattern": not_modelled("only some layers adapted", None, []),
    "rank_pattern": not_modelled("per-layer ranks", {}, None),
    "megatron_config": not_modelled("Megatron parallel LoRA layers", None),
    "trainable_token_indices": not_modelled("trainable rows of the embedding", None),
    "loftq_config": not_modelled("LoftQ quantised base weights", {}, None),
    "eva_config": not_modelled("EVA initialisation from activations", None),
    "corda_config": not_modelled("CorDA initialisation from activations", None),
    "lora_ga_config": not_modelled("LoRA-GA initialisation from gradients", None),
    "use_dora": not_modelled("DoRA's magnitude vectors and weight norms", False),
    "velora_config": not_modelled("VeLoRA's compressed activations", None),
    "alora_invocation_tokens": not_modelled("activated LoRA's masked adapters", None),
    "use_qalora": not_modelled("QA-LoRA's pooled inputs", False),
    "monteclora_config": not_modelled("MonteCLoRA's sampled adapters", None),
    "layer_replication": not_modelled("replicated layers", None),
    "runtime_config": not_modelled("ephemeral GPU offload of the adapters", None, {},
                                   {"ephemeral_gpu_offload": False}),
    "lora_bias": not_modelled("a bias on lora_B", False),
    "target_parameters": not_modelled("adapters on parameters (MoE experts)", None, []),
    "use_bdlora": not_modelled("block-diagonal LoRA", None),
    "arrow_config": not_modelled("Arrow routing between adapters", None),
    "kasa_config": not_modelled("KaSA's singular-value adapters", None),
    "ensure_weight_tying": not_modelled("tied adapters of tied embeddings", False),
}


def classify_lora(lora: dict, where: str = "") -> list[IgnoredKey]:
    """In place: LoraConfig names classified; `target_modules: all` (LLaMA-Factory's spelling of its lora_target)
    refused with the PEFT spelling it means (PEFT matches "all" as a module name and finds none)."""
    ignored = classify(lora, LORA, "lora", where)
    targets = lora.get("target_modules")
    if targets == "all" or targets == ["all"]:
        raise ScenarioError(f"lora.target_modules: {targets!r}{where}: 'all' is LLaMA-Factory's spelling (lora_target:"
                            " all); PEFT's LoraConfig says 'all-linear'")
    return ignored
