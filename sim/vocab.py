"""The domain vocabulary at the ground floor: the enums every floor speaks (dtypes, model types, attention
implementations, optimizers, allocator backends). It imports nothing of sim, so the schema (sim/scenario.py), the
plan and the rooms below it all take their names from here."""

from enum import Enum


class ModelType(Enum):
    QWEN2 = "qwen2"
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN = "qwen"  # Qwen1's own remote code (modeling_qwen.py)
    QWEN3 = "qwen3"  # transformers models/qwen3 (4.51+): q/k RMSNorm over head_dim
    GEMMA = "gemma"  # models/gemma: scaled embedding, (1 + w) RMSNorm in fp32, GeGLU, head_dim 256
    GEMMA2 = "gemma2"  # models/gemma2: + post-attention/pre/post-feedforward norms, soft-capping, sliding layers
    PHI3 = "phi3"  # models/phi3: fused qkv_proj and gate_up_proj
    GEMMA3_TEXT = "gemma3_text"  # models/gemma3 Gemma3ForCausalLM: + q/k norms, local and global rotary
    MIXTRAL = "mixtral"  # models/mixtral: Mistral attention, top-k routed experts (sim/workload/moe.py)
    QWEN2_MOE = "qwen2_moe"  # models/qwen2_moe: + a shared expert behind a sigmoid gate, dense layers by config
    QWEN3_MOE = "qwen3_moe"  # models/qwen3_moe: Qwen3 attention (q/k norms), routed experts

    @property
    def is_moe(self) -> bool:
        """Whether the family's layers route tokens to experts (sim/workload/moe.py)."""
        return self in (ModelType.MIXTRAL, ModelType.QWEN2_MOE, ModelType.QWEN3_MOE)


class DType(Enum):
    """Tensor element types with their sizes in bytes."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    INT64 = "int64"
    BOOL = "bool"
    FLOAT64 = "float64"
    INT32 = "int32"  # integer bookkeeping only (grouped_mm offsets, CUDA histc input); never a weights dtype
    UINT8 = "uint8"  # quantised optimizer states (bitsandbytes); never a weights dtype

    @property
    def is_floating(self) -> bool:
        return self in (DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16, DType.FLOAT64)


# A plain attribute on each member: the simulator reads it hundreds of thousands of times per run.
for _member, _size in zip(DType, (4, 2, 2, 8, 1, 8, 4, 1), strict=True):
    _member.size_bytes = _size


class AttnImplementation(Enum):
    EAGER = "eager"
    SDPA = "sdpa"
    FLASH_ATTENTION_2 = "flash_attention_2"


class Optim(Enum):
    """HF TrainingArguments.optim names that are modelled."""

    ADAMW_TORCH = "adamw_torch"  # torch.optim.AdamW, default implementation (foreach on CUDA)
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    ADAMW_TORCH_FOREACH = "adamw_torch_foreach"  # not an HF name; forces foreach
    ADAMW_BNB_8BIT = "adamw_bnb_8bit"  # bitsandbytes' 8-bit AdamW (sim/workload/optimizer.py)
    ADAMW_8BIT = "adamw_8bit"  # the same, transformers' alias from 4.30 (training_args.py)
    SGD = "sgd"


BITSANDBYTES_OPTIMS = frozenset({Optim.ADAMW_BNB_8BIT, Optim.ADAMW_8BIT})  # bitsandbytes' 8-bit AdamW, by either name


class QwenRemoteCode(Enum):
    """Revisions of Qwen1's remote code (modeling_qwen.py on the Hugging Face hub) that differ in device memory;
    named by the month they were current (docs/scenarios.md)."""

    OCT_2023 = "2023-10"  # one (P, P) bool registered_causal_mask on QWenModel, registered whatever the attention
    FINAL = "2023-12"  # no registered mask: built per forward where SDPA needs it (the newest revision)


class AllocatorBackend(Enum):
    CACHING = "caching"
    EXACT = "exact"
