"""What a modelling-code run needs besides the tape: shapes, dtypes, autocast state and version behaviour."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sim.plan import ModelShape
from sim.vocab import AttnImplementation, DType
from sim.workload.behaviour import Behaviour
from sim.workload.tape import Tape, Tensor

if TYPE_CHECKING:  # the hooks' implementations (sim/parallel/) import this module
    from sim.workload.hooks import ModuleHooks


@dataclass(slots=True)
class RunContext:
    """Fixed facts of one simulated rank's training run plus the autocast weight-cast cache."""

    tape: Tape
    model: ModelShape
    batch: int
    seq: int
    attn: AttnImplementation
    behaviour: Behaviour
    autocast: DType | None  # torch.autocast's dtype around the forward, else None
    adapter_dtype: DType | None = None
    on_host: bool = False  # a CPU host (calibration) rather than a CUDA device
    outputs_to_fp32: bool = False  # accelerate's convert_outputs_to_fp32 wraps the forward (sim/workload/amp.py)
    module_hooks: "ModuleHooks | None" = None  # ZeRO-3's gathers and releases (sim/workload/hooks.py); None: none
    reentrant_checkpointing: bool = True  # gradient_checkpointing_kwargs.use_reentrant (sim/workload/checkpoint.py)
    cast_cache: dict[str, Tensor] = field(default_factory=dict)
    kv_cache: list[Tensor] = field(default_factory=list)  # what a training-time DynamicCache keeps alive
    output_logits: Tensor | None = None  # the returned logits, held for convert_outputs_to_fp32
    output_copies: list[Tensor] = field(default_factory=list)  # convert_outputs_to_fp32's fp32 copies in the output

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def release_kv_cache(self) -> None:
        """The model output (its past_key_values, and accelerate's fp32 copies) is dropped when
        Trainer.compute_loss returns."""
        self.tape.drop(*self.kv_cache, *self.output_copies)
        self.kv_cache.clear()
        self.output_copies.clear()

    def clear_cast_cache(self) -> None:
        """Leaving the outermost autocast region clears its weight-cast cache (torch/amp/autocast_mode.py)."""
        for tensor in self.cast_cache.values():
            self.tape.drop(tensor)
        self.cast_cache.clear()
