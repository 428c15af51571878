"""What a modelling-code run needs besides the tape: shapes, dtypes, autocast state and version behaviour."""

from dataclasses import dataclass, field
from typing import Any

from sim.plan import ModelShape
from sim.vocab import AttnImplementation, DType, ModelType, Optim
from sim.workload.tape import Tape, Tensor


@dataclass(slots=True)
class RunContext:
    """Fixed facts of one simulated rank's training run plus the autocast weight-cast cache."""

    tape: Tape
    model: ModelShape
    batch: int
    seq: int
    attn: AttnImplementation
    behaviour: "Behaviour"
    autocast: DType | None  # torch.autocast dtype when mixed precision casts fp32 weights, else None
    adapter_dtype: DType | None = None
    on_host: bool = False  # a CPU host (calibration) rather than a CUDA device
    zero3: Any = None  # sim.parallel.zero3.Zero3 when DeepSpeed ZeRO-3 partitions the parameters
    cast_cache: dict[str, Tensor] = field(default_factory=dict)
    kv_cache: list[Tensor] = field(default_factory=list)  # what a training-time DynamicCache keeps alive

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def release_kv_cache(self) -> None:
        """The model output (and its past_key_values) is dropped when Trainer.compute_loss returns."""
        self.tape.drop(*self.kv_cache)
        self.kv_cache.clear()

    def clear_cast_cache(self) -> None:
        """Leaving the outermost autocast region clears its weight-cast cache (torch/amp/autocast_mode.py)."""
        for tensor in self.cast_cache.values():
            self.tape.drop(tensor)
        self.cast_cache.clear()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Version-dependent choices of the modelling code, decided once from `software` (see behaviour.py)."""

    model_type: ModelType
    logits_upcast_in_model: bool  # ForCausalLM.forward does logits = logits.float() on the full logits
    loss_upcasts_logits: bool  # the loss function does logits.float() itself
    loss_shifts_logits: bool  # logits[..., :-1, :].contiguous() before cross-entropy (else labels are shifted)
    rotary: Any  # behaviour.Rotary
    unused_rotary_buffers: bool
    llama_full_mask_buffer: bool
    llama_full_mask_bool: bool
    sdpa_mask_always: bool
    sdpa_sliding_window_check: bool
    eager_mask_via_bool: bool
    sdpa_repeats_kv: bool
    sdpa_contiguous: Any  # behaviour.SdpaContiguous
    fa2_repeats_kv: bool
    kv_cache: Any  # behaviour.KvCache
    peft_adapters_fp32: bool
    default_optim: Optim  # TrainingArguments.optim's default in this version
