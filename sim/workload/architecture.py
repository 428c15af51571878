"""The modelling code of each model family, chosen once from config.json's `model_type`.

An Architecture is what sim.schedule needs of a family: its parameters (build_model), its training forward with the
loss (forward_loss), and the module names PEFT may target or save. Decoder-only families are a
sim.workload.decoder.Decoder that fills the decoder-layer skeleton's slots.

Adding a family is one new module and one line here: write sim/workload/<family>.py with a class that implements
Architecture (usually a Decoder subclass filling the slots: attention and MLP, and the norms or the per-layer mask
where they differ), and map its model_type to an instance of it in ARCHITECTURES. Its model_type must be a
sim.vocab.ModelType, which the scenario schema accepts. Its version-dependent choices come from
sim.workload.behaviour.behaviour_for, which branches on the model types it knows: until it names a new one, that one
takes mistral's rotary schedule and none of the per-family exceptions. tests/test_architectures.py registers and
runs a test family this way.
"""

from typing import Protocol, runtime_checkable

from sim.plan import LoraPlan
from sim.vocab import ModelType
from sim.workload.context import RunContext
from sim.workload.gemma import Gemma
from sim.workload.hf_decoder import HfDecoder
from sim.workload.moe import Mixtral, Qwen2Moe, Qwen3Moe
from sim.workload.phi3 import Phi3
from sim.workload.qwen1 import Qwen1
from sim.workload.qwen3 import Qwen3
from sim.workload.tape import Param, Tensor


class Model(Protocol):
    """A built model: whatever a family's forward needs, and its parameters."""

    def params(self) -> list[Param]:
        """Every parameter in module order (creation order: the order DeepSpeed and the optimizer see them)."""


@runtime_checkable
class Architecture(Protocol):
    """What the modelling code of one family provides."""

    LINEAR_MODULES: tuple[str, ...]  # the nn.Linear module names lora.target_modules may name
    SAVABLE_MODULES: tuple[str, ...]  # the module names lora.modules_to_save may name (the modelled ones)
    EMBEDDING_WEIGHT: str  # the name ending of the token embedding's weight (and of a saved copy of it)

    def build_model(self, ctx: RunContext, lora: LoraPlan | None) -> Model:
        """Create the parameters and model buffers on the tape, in module order; LoRA freezes the base and adds
        adapters."""

    def forward_loss(self, ctx: RunContext, model: Model, ids: Tensor, labels: Tensor,
                     checkpointing: bool) -> Tensor:
        """The training forward with labels, as Trainer.compute_loss runs it; returns the loss tensor."""


ARCHITECTURES: dict[ModelType, Architecture] = {
    ModelType.QWEN2: HfDecoder(),
    ModelType.LLAMA: HfDecoder(),
    ModelType.MISTRAL: HfDecoder(),
    ModelType.QWEN: Qwen1(),
    ModelType.QWEN3: Qwen3(),
    ModelType.GEMMA: Gemma(),
    ModelType.GEMMA2: Gemma(),
    ModelType.GEMMA3_TEXT: Gemma(),
    ModelType.PHI3: Phi3(),
    ModelType.MIXTRAL: Mixtral(),
    ModelType.QWEN2_MOE: Qwen2Moe(),
    ModelType.QWEN3_MOE: Qwen3Moe(),
}
