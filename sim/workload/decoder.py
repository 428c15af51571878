"""The decoder-layer skeleton every modelled family fills: input norm → attention → residual add → post-attention
norm → MLP → residual add, each layer under torch.utils.checkpoint when gradient checkpointing is on.

The skeleton fixes the order of the ops and how long the tensors between the slots live; a family (hf_decoder.py,
qwen1.py) subclasses Decoder and fills the slots: the two norms (RMSNorm unless it says otherwise), the mask each
layer's attention reads, the attention and the MLP.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from sim.ops import Phase
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.amp import convert_outputs
from sim.workload.checkpoint import checkpoint, checkpoint_without_reentrant
from sim.workload.context import RunContext
from sim.workload.loss import lm_head_loss
from sim.workload.modules import Linear, rms_norm
from sim.workload.tape import Param, Tensor

CPU_RNG_STATE_BYTES = 5056  # torch.get_rng_state().numel() for the CPU generator (torch 2.x)


@dataclass(slots=True)
class DecoderLayer:
    """One decoder layer's parameters: its two norms and its linears (attention's, then the MLP's, in module
    order), under the layer's module path (model.layers.{i} in HF, transformer.h.{i} in Qwen1)."""

    index: int
    prefix: str
    input_norm: Param  # input_layernorm (HF), ln_1 (Qwen1)
    post_attention_norm: Param  # post_attention_layernorm (HF), ln_2 (Qwen1)
    linears: dict[str, Linear]
    rotary_cache: list[Tensor] = field(default_factory=list)  # per-layer cos_cached/sin_cached buffers (old HF code)
    norms: dict[str, Param] = field(default_factory=dict)  # a family's other norms (Qwen3's q_norm/k_norm), by name
    moe: "MoeParams | None" = None  # a sparse MoE block's parameters in creation order (sim/workload/moe.py)

    def params(self) -> list[Param]:
        """The input norm, the linears, a MoE block's parameters, the post-attention norm, then the family's other
        norms."""
        out = [self.input_norm]
        for lin in self.linears.values():
            out += lin.params()
        if self.moe is not None:
            out += self.moe.params()
        out.append(self.post_attention_norm)
        out += self.norms.values()
        return out


class MoeParams(Protocol):
    """A sparse MoE block's parameters (sim/workload/moe.py MoeBlock)."""

    def params(self) -> list[Param]:
        """Router, experts and shared expert, in the order the block's __init__ creates them."""


@dataclass(frozen=True, slots=True)
class LayerTypeMasks:
    """causal_mask_mapping of the families with sliding-window layers (Gemma 2/3): the mask of the full-attention
    layers and the mask of the sliding-window layers (None where the attention needs none)."""

    full: Tensor | None
    sliding: Tensor | None

    def tensors(self) -> list[Tensor]:
        """The masks that exist."""
        return [t for t in (self.full, self.sliding) if t is not None]


Mask = Tensor | LayerTypeMasks | None  # what the model hands every layer; layer_mask picks the layer's


class Decoder(ABC):
    """A decoder-only family's layers: the slots it fills, and the skeleton (decoder_layer, run_layers) that runs
    them in the order every family's modelling code does."""

    # The first residual add is residual + attn_output (HF); Qwen1 writes attn_output + residual. The order of
    # AddBackward0's inputs is the order their gradients are routed in backward.
    ATTENTION_OUTPUT_FIRST: ClassVar[bool] = False
    # Reentrant checkpointing on a CPU host stashes torch.get_rng_state() per layer (see _host_rng_stash).
    STASHES_HOST_RNG: ClassVar[bool] = True
    # The family's code passes gradient_checkpointing_kwargs.use_reentrant on to torch.utils.checkpoint (False:
    # it calls checkpoint itself without use_reentrant, and torch's default is the reentrant path).
    HONOURS_USE_REENTRANT: ClassVar[bool] = True

    # ---- slots ------------------------------------------------------------------------------------------------
    def input_norm(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """The norm before attention: RMSNorm over the layer's input_norm weight."""
        return rms_norm(ctx, _module_of(layer.input_norm), x, layer.input_norm)

    def layer_mask(self, ctx: RunContext, layer: DecoderLayer, mask: Mask) -> Tensor | None:
        """The mask this layer's attention reads, a tensor the skeleton drops after attention: by default the
        model's own mask under another reference."""
        return ctx.tape.alias(mask) if mask is not None else None

    @abstractmethod
    def attention(self, ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Tensor | None,
                  rotary: Sequence[Tensor] | None) -> Tensor:
        """Self-attention of the normed input, up to and including its output projection."""

    def post_attention_norm(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """The norm before the MLP: RMSNorm over the layer's post_attention_norm weight."""
        return rms_norm(ctx, _module_of(layer.post_attention_norm), x, layer.post_attention_norm)

    @abstractmethod
    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """The MLP of the normed hidden state, up to and including its down projection."""

    # ---- skeleton ---------------------------------------------------------------------------------------------
    def decoder_layer(self, ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Mask,
                      rotary: Sequence[Tensor] | None) -> Tensor:
        """residual + attention(input_norm(x)), then residual + mlp(post_attention_norm(·)); each local is dropped
        where the modelling code rebinds it or returns."""
        tp, prefix = ctx.tape, layer.prefix
        normed = self.input_norm(ctx, layer, x)
        layer_mask = self.layer_mask(ctx, layer, mask)
        attn_out = self.attention(ctx, layer, normed, layer_mask, rotary)
        tp.drop(normed, layer_mask)
        addends = (attn_out, x) if self.ATTENTION_OUTPUT_FIRST else (x, attn_out)
        hidden = P.add(tp, f"{prefix}.residual_attn", *addends)
        tp.drop(attn_out)
        normed = self.post_attention_norm(ctx, layer, hidden)
        mlp_out = self.mlp(ctx, layer, normed)
        tp.drop(normed)
        out = P.add(tp, f"{prefix}.residual_mlp", hidden, mlp_out)
        tp.drop(hidden, mlp_out)
        return out

    def run_layers(self, ctx: RunContext, layers: list[DecoderLayer], embeds: Tensor, mask: Mask,
                   rotary: Sequence[Tensor] | None, extra: list[Tensor], checkpointing: bool) -> Tensor:
        """The decoder stack over the embeddings (whose reference it takes over): each layer in turn, under
        checkpointing with `extra` as its other tensor arguments when that is on; returns the last layer's output."""
        tp = ctx.tape
        if checkpointing and not embeds.requires_grad:
            # enable_input_require_grads (PEFT/trainers with reentrant checkpointing): the embedding output
            # requires grad so that checkpointed layers produce grads.
            embeds.requires_grad = True
        stashes: list[Tensor] = []
        graph_end = None
        hidden = embeds
        for layer in layers:
            tp.layer = layer.index

            def run_layer(x: Tensor, layer: DecoderLayer = layer) -> Tensor:
                stash = _host_rng_stash(ctx) if checkpointing and self.STASHES_HOST_RNG else None
                out = self.decoder_layer(ctx, layer, x, mask, rotary)
                if stash is not None and tp.phase is Phase.FORWARD:
                    stashes.append(stash)
                else:
                    tp.drop(stash)  # fork_rng's copy goes when the recompute's forward returns
                return out

            if checkpointing and self.HONOURS_USE_REENTRANT and not ctx.reentrant_checkpointing:
                out = checkpoint_without_reentrant(ctx, run_layer, hidden,
                                                   self.frame_extra(ctx, layer, mask, rotary, extra), stashes)
            elif checkpointing:
                out = checkpoint(ctx, run_layer, hidden, self.checkpoint_extra(ctx, layer, mask, rotary, extra))
            else:
                out = run_layer(hidden)
            if stashes and graph_end is None:
                graph_end = embeds.node or out.node  # the node autograd runs last
            if graph_end is not None:
                graph_end.saved += [t.storage for t in stashes]  # ctx.fwd_cpu_state: alive until the graph is freed
                stashes.clear()
            tp.drop(hidden)
            hidden = out
        tp.layer = None
        return hidden

    def checkpoint_extra(self, ctx: RunContext, layer: DecoderLayer, mask: Mask, rotary: Sequence[Tensor] | None,
                         extra: list[Tensor]) -> list[Tensor]:
        """The tensors a layer's checkpoint keeps besides its input: the model's `extra`, the same for every layer."""
        return extra

    def frame_extra(self, ctx: RunContext, layer: DecoderLayer, mask: Mask, rotary: Sequence[Tensor] | None,
                    extra: list[Tensor]) -> list[Tensor]:
        """The tensors a layer's non-reentrant checkpoint frame keeps besides its input, the keyword arguments
        bound into its function (GradientCheckpointingLayer's partial): by default the model's `extra`."""
        return extra

    def loss_and_return(self, ctx: RunContext, lm_head: Param, normed: Tensor, labels: Tensor) -> Tensor:
        """The LM head and the loss on the final norm's output (which it takes over), then what ends the forward
        in Trainer.compute_loss: accelerate's fp32 output copies, the output's KV cache and autocast's cast cache
        dropped; returns the loss."""
        loss = lm_head_loss(ctx, lm_head, normed, labels)
        ctx.tape.drop(normed)
        convert_outputs(ctx)
        ctx.release_kv_cache()
        ctx.clear_cast_cache()
        return loss


def _module_of(param: Param) -> str:
    """The module path a norm's weight belongs to: its name without `.weight`."""
    return param.name.removesuffix(".weight")


def _host_rng_stash(ctx: RunContext) -> Tensor | None:
    """torch.get_rng_state() on a CPU host: a 5,056-byte uint8 tensor (the mt19937 state plus the normal-sampling
    cache, aten/src/ATen/CPUGeneratorImpl.cpp CPUGeneratorImplState). Reentrant checkpointing
    (torch/utils/checkpoint.py, preserve_rng_state=True) takes one in CheckpointFunction.forward
    (ctx.fwd_cpu_state, kept until the graph is freed) and one in backward, where torch.random.fork_rng holds the
    current state while the layer is recomputed. Non-reentrant checkpointing takes the same two: fwd_cpu_state in
    _checkpoint_without_reentrant_generator before the layer runs (kept by the frame), and fork_rng's in
    recompute_fn. On a GPU run both are host memory, so only a host counts them."""
    if not ctx.on_host:
        return None
    tp = ctx.tape
    tp.op("checkpoint.get_rng_state", bytes_moved=CPU_RNG_STATE_BYTES)
    return tp.empty("cpu_rng_state", CPU_RNG_STATE_BYTES, DType.BOOL)  # uint8: one byte each, as bool
