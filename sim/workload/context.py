"""What a modelling-code run needs besides the tape: shapes, dtypes, autocast state and version behaviour."""

from dataclasses import dataclass, field

from sim.scenario import AttnImplementation, DType, ModelSpec, ModelType
from sim.workload.tape import Param, Tape, Tensor


@dataclass(slots=True)
class RunContext:
    """Fixed facts of one simulated rank's training run plus the autocast weight-cast cache."""

    tape: Tape
    model: ModelSpec
    batch: int
    seq: int
    attn: AttnImplementation
    behaviour: "Behaviour"
    autocast: DType | None  # torch.autocast dtype when mixed precision casts fp32 weights, else None
    adapter_dtype: DType | None = None
    cast_cache: dict[str, Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def clear_cast_cache(self) -> None:
        """Leaving the outermost autocast region clears its weight-cast cache (torch/amp/autocast_mode.py)."""
        for tensor in self.cast_cache.values():
            self.tape.drop(tensor)
        self.cast_cache.clear()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Version-dependent choices of the modelling code, decided once from `software` (see behaviour.py)."""

    model_type: ModelType
    logits_upcast_in_model: bool  # ForCausalLM.forward does logits.float() on the full logits
    loss_shifts_logits: bool  # logits[..., :-1, :].contiguous() before cross-entropy (else labels are shifted)
    loss_upcasts_logits: bool  # the loss function does logits.float() itself
    rotary_cache_per_layer: bool  # each attention module keeps cos/sin caches of max_position_embeddings rows
    rotary_cache_dtype_default: bool  # the per-layer caches are built in the default dtype (fp32)
    eager_mask_materialized: bool  # eager attention gets a (b, 1, s, s) additive mask in the model dtype
    sdpa_repeats_kv: bool  # the SDPA path materialises repeat_kv copies of k and v
    fa2_repeats_kv: bool  # the FlashAttention-2 path materialises repeat_kv copies of k and v
    peft_adapters_fp32: bool  # PEFT autocast_adapter_dtype: bf16/fp16 adapters are created in fp32


def param_tensor(p: Param | Tensor) -> Tensor:
    return p.tensor if isinstance(p, Param) else p
