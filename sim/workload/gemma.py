"""Gemma, Gemma 2 and Gemma 3 text (transformers models/gemma/modeling_gemma.py, models/gemma2/modeling_gemma2.py,
models/gemma3/modeling_gemma3.py Gemma3ForCausalLM), read at 5.24.0 and for 4.53 - 4.57 at 4.53.0 and 4.57.1, on the
Llama decoder:

- GemmaTextScaledWordEmbedding: embedding(ids) * embed_scale.to(weight.dtype), a 0-dim sqrt(hidden) buffer in the
  model's dtype: a second (b, s, h) tensor in the weights dtype. Gemma 1/2 on 4.x multiply by a 0-dim normalizer
  tensor made per forward, after the masks and the rotary, and keep the unscaled embedding bound to the end of the
  model's forward (Gemma 3 has the buffer from 4.50).
- GemmaRMSNorm: output = _norm(x.float()) (pow, mean, + eps, rsqrt, x * rsqrt in fp32), then
  output * (1.0 + weight.float()) in fp32, then .type_as(x): it saves the fp32 input, the rsqrt and the fp32
  normalised tensor (Llama's saves a copy cast back to the input dtype).
- GeGLU MLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)); head_dim from the config (256), lm_head tied.
- Gemma 2 and 3: post_attention_layernorm on the attention output before the residual add, pre_feedforward_layernorm
  and post_feedforward_layernorm around the MLP; layer_types alternate sliding-window and full attention, each type
  with its own mask (causal_mask_mapping). Gemma 2 soft-caps the attention scores (eager; flash-attn's kernel takes
  softcap; SDPA refuses it) and the logits: x / cap, tanh, * cap in the logits' dtype.
- Gemma 3: q_norm/k_norm, Gemma RMSNorms over head_dim on the transposed (b, heads, s, d) q and k, and a rotary
  embedding per layer type (local base for the sliding layers, global for the full ones), both computed per
  forward.
"""

from collections.abc import Sequence

from sim.ops import Category
from sim.plan import LoraPlan
from sim.vocab import DType, ModelType
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.decoder import DecoderLayer, LayerTypeMasks, Mask
from sim.workload.hf_decoder import (CausalLM, HfDecoder, causal_mask, inv_freq_buffer, rotary_computed,
                                    sliding_window_mask)
from sim.workload.modules import apply_linear, in_module, make_param
from sim.workload.tape import Param, Tape, Tensor

_FEEDFORWARD_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class Gemma(HfDecoder):
    """GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM: one class, the differences keyed on model_type."""

    def layer_norms(self, ctx: RunContext, prefix: str, full: bool) -> dict[str, Param]:
        """Gemma 2/3: the feed-forward norms (hidden); Gemma 3: q_norm and k_norm (head_dim) too."""
        m = ctx.model
        norms = {}
        if m.model_type is ModelType.GEMMA3_TEXT:
            norms = {name: make_param(ctx, f"{prefix}.self_attn.{name}.weight", m.head_size, m.weights_dtype, full)
                     for name in ("q_norm", "k_norm")}
        if m.model_type is not ModelType.GEMMA:
            norms |= {name: make_param(ctx, f"{prefix}.{name}.weight", m.hidden_size, m.weights_dtype, full)
                      for name in _FEEDFORWARD_NORMS}
        return norms

    def build_model(self, ctx: RunContext, lora: LoraPlan | None) -> CausalLM:
        """HfDecoder's parameters, the embedding's 0-dim embed_scale buffer (non-persistent, model dtype) and, for
        Gemma 3, the second rotary module's inv_freq (one per layer type)."""
        model = super().build_model(ctx, lora)
        if not ctx.behaviour.gemma_normalizer_tensor:
            model.embed_scale = ctx.tape.persistent_buffer("model.embed_tokens.embed_scale", 1,
                                                           ctx.model.weights_dtype, Category.PARAMETERS)
        if len(_rotary_types(ctx)) == 2:  # Gemma3RotaryEmbedding: inv_freq per layer type present (4.x: always two)
            inv_freq_buffer(ctx, _sliding_rotary_name(ctx))
        return model

    def forward_loss(self, ctx: RunContext, model: CausalLM, ids: Tensor, labels: Tensor,
                     checkpointing: bool) -> Tensor:
        """XForCausalLM.forward with labels: the scaled embedding, the masks (one per layer type), the rotary
        cos/sin (one pair per layer type in Gemma 3), the layers, the final norm, the LM head (soft-capped in
        Gemma 2) and the loss."""
        tp, m = ctx.tape, ctx.model
        normalizer_tensor = ctx.behaviour.gemma_normalizer_tensor
        embedding = (lambda ids: P.embedding(tp, "model.embed_tokens", ids, model.embed_tokens, m.vocab_size,
                                             m.hidden_size, on_host=ctx.on_host)) if normalizer_tensor else \
            (lambda ids: self._scaled_embedding(ctx, model, ids))
        embeds = in_module(ctx, "model.embed_tokens", [model.embed_tokens], ids, embedding)
        dtype = embeds.dtype
        mask: Mask = causal_mask(ctx, dtype)
        if m.model_type is not ModelType.GEMMA:  # causal_mask_mapping: full, then sliding_attention
            sliding = sliding_window_mask(ctx, dtype) if m.sliding_layers else None
            mask = LayerTypeMasks(mask, sliding)
        rotary: list[Tensor] = []
        for sliding_type in _rotary_types(ctx):
            name = _sliding_rotary_name(ctx) if sliding_type else "model.rotary_emb"
            rotary += rotary_computed(ctx, name, dtype, scaled=True)
        masks = mask.tensors() if isinstance(mask, LayerTypeMasks) else [t for t in (mask,) if t is not None]
        held: list[Tensor] = []
        if normalizer_tensor:
            embeds, held = self._normalized(ctx, embeds, checkpointing)
        hidden = self.run_layers(ctx, model.layers, embeds, mask, rotary, masks + rotary, checkpointing)
        normed = gemma_rms_norm(ctx, "model.norm", hidden, model.norm)
        tp.drop(hidden, *masks, *rotary, *held)
        return self.loss_and_return(ctx, model.lm_head, normed, labels)

    def _normalized(self, ctx: RunContext, embeds: Tensor, checkpointing: bool) -> tuple[Tensor, list[Tensor]]:
        """Gemma 1/2 on 4.x: normalizer = torch.tensor(hidden**0.5, dtype=hidden_states.dtype), a 0-dim tensor, and
        hidden_states = hidden_states * normalizer after the masks and the rotary; inputs_embeds and normalizer stay
        bound until XModel.forward returns (the returned `held`). Under checkpointing with frozen embeddings,
        enable_input_require_grads' hook makes the unscaled embedding output a leaf that requires grad, which its
        AccumulateGrad node keeps until the graph is freed (held by the product's MulBackward0 here)."""
        tp = ctx.tape
        hooked = checkpointing and not embeds.requires_grad
        if hooked:
            embeds.requires_grad = True
        normalizer = tp.empty("model.normalizer", 1, embeds.dtype)
        hidden = P.mul(tp, "model.normalizer.mul", embeds, normalizer)
        if hooked and hidden.node is not None:
            tp.hold(embeds.storage)
            hidden.node.saved.append(embeds.storage)
        return hidden, [embeds, normalizer]

    def _scaled_embedding(self, ctx: RunContext, model: CausalLM, ids: Tensor) -> Tensor:
        """super().forward(input_ids) * self.embed_scale.to(self.weight.dtype): the buffer is already in the
        weights' dtype, so the cast is the buffer itself; MulBackward0 saves only the 0-dim scale."""
        m, tp = ctx.model, ctx.tape
        looked_up = P.embedding(tp, "model.embed_tokens", ids, model.embed_tokens, m.vocab_size, m.hidden_size,
                                on_host=ctx.on_host)
        scaled = P.mul(tp, "model.embed_tokens.embed_scale", looked_up, model.embed_scale)
        tp.drop(looked_up)
        return scaled

    # ---- slots ------------------------------------------------------------------------------------------------
    def input_norm(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """input_layernorm, a GemmaRMSNorm."""
        return gemma_rms_norm(ctx, f"{layer.prefix}.input_layernorm", x, layer.input_norm)

    def post_attention_norm(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """Gemma: post_attention_layernorm before the MLP (Llama's place), a GemmaRMSNorm."""
        return gemma_rms_norm(ctx, f"{layer.prefix}.post_attention_layernorm", x, layer.post_attention_norm)

    def layer_mask(self, ctx: RunContext, layer: DecoderLayer, mask: Mask) -> Tensor | None:
        """causal_mask_mapping[layer_types[i]]: the sliding layers' mask or the full layers'."""
        if isinstance(mask, LayerTypeMasks):
            chosen = mask.sliding if layer.index in ctx.model.sliding_layers else mask.full
            return ctx.tape.alias(chosen) if chosen is not None else None
        return super().layer_mask(ctx, layer, mask)

    def layer_rotary(self, ctx: RunContext, layer: DecoderLayer,
                     rotary: Sequence[Tensor] | None) -> Sequence[Tensor] | None:
        """Gemma 3: position_embeddings[layer_types[i]], the sliding layers' (local base) pair or the full ones'."""
        if rotary is None or ctx.model.model_type is not ModelType.GEMMA3_TEXT:
            return rotary
        return _layer_pair(ctx, layer.index, rotary)

    def checkpoint_extra(self, ctx: RunContext, layer: DecoderLayer, mask: Mask, rotary: Sequence[Tensor] | None,
                         extra: list[Tensor]) -> list[Tensor]:
        """GradientCheckpointingLayer binds each layer's own attention_mask and position_embeddings
        (causal_mask_mapping[layer_types[i]], position_embeddings[layer_types[i]]) into the checkpointed call as
        keyword arguments, which the checkpoint's run_function keeps until the graph is freed: the masks and cos/sin
        of the layer types present stay alive through the backward; a type no layer has (the full mask of a model
        whose layers all slide) goes when the model's forward returns."""
        kept = {id(t): t for i in range(ctx.model.num_hidden_layers)
                for t in self._layer_tensors(ctx, i, mask, rotary)}
        return list(kept.values())

    def frame_extra(self, ctx: RunContext, layer: DecoderLayer, mask: Mask, rotary: Sequence[Tensor] | None,
                    extra: list[Tensor]) -> list[Tensor]:
        """Non-reentrant: the frame's partial binds only this layer's mask and cos/sin, and the frame goes once
        the layer's backward is done (torch/utils/checkpoint.py _checkpoint_without_reentrant_generator)."""
        return self._layer_tensors(ctx, layer.index, mask, rotary)

    def _layer_tensors(self, ctx: RunContext, index: int, mask: Mask,
                       rotary: Sequence[Tensor] | None) -> list[Tensor]:
        """The mask and cos/sin layer `index` is called with: its own pair, or on 4.x Gemma 3 both
        (Gemma3DecoderLayer.forward takes position_embeddings_global and position_embeddings_local, 4.53.0 - 4.57.1)."""
        sliding = index in ctx.model.sliding_layers
        chosen = (mask.sliding if sliding else mask.full) if isinstance(mask, LayerTypeMasks) else mask
        pair: Sequence[Tensor] = rotary or []
        if rotary is not None and _own_pair_only(ctx):
            pair = _layer_pair(ctx, index, rotary)
        return [t for t in (chosen, *pair) if t is not None]

    def query_key(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gemma 3: q_norm(q_proj(x).view(b, s, heads, d).transpose(1, 2)), the same for k: Gemma RMSNorms over
        head_dim on the transposed views. Gemma and Gemma 2: Llama's views."""
        if ctx.model.model_type is not ModelType.GEMMA3_TEXT:
            return super().query_key(ctx, layer, x)
        tp, d = ctx.tape, ctx.model.head_size
        out = []
        for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            heads = P.view(tp, apply_linear(ctx, layer.linears[proj], x), backward_copies=True)
            tp.release(heads.storage)  # the view holds the projection output
            out.append(gemma_rms_norm(ctx, f"{layer.prefix}.self_attn.{norm}", heads, layer.norms[norm], dim=d))
            tp.drop(heads)
        return out[0], out[1]

    def activation(self, tp: Tape, name: str, x: Tensor) -> Tensor:
        """gelu_pytorch_tanh, the MLP's act_fn (down_proj(act_fn(gate_proj(x)) * up_proj(x)) as the HF families):
        GELU saves its input, as SiLU does."""
        return P.gelu(tp, name, x)

    def decoder_layer(self, ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Mask,
                      rotary: Sequence[Tensor] | None) -> Tensor:
        """Gemma: the skeleton's layer. Gemma 2/3: residual + post_attention_layernorm(attention(input_layernorm(x))),
        then residual + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(·)))."""
        if ctx.model.model_type is ModelType.GEMMA:
            return super().decoder_layer(ctx, layer, x, mask, rotary)
        tp, prefix = ctx.tape, layer.prefix
        normed = self.input_norm(ctx, layer, x)
        layer_mask = self.layer_mask(ctx, layer, mask)
        attn_out = self.attention(ctx, layer, normed, layer_mask, rotary)
        tp.drop(normed, layer_mask)
        post = gemma_rms_norm(ctx, f"{prefix}.post_attention_layernorm", attn_out, layer.post_attention_norm)
        tp.drop(attn_out)
        hidden = P.add(tp, f"{prefix}.residual_attn", x, post)
        tp.drop(post)
        pre = gemma_rms_norm(ctx, f"{prefix}.pre_feedforward_layernorm", hidden,
                             layer.norms["pre_feedforward_layernorm"])
        mlp_out = self.mlp(ctx, layer, pre)
        tp.drop(pre)
        post = gemma_rms_norm(ctx, f"{prefix}.post_feedforward_layernorm", mlp_out,
                              layer.norms["post_feedforward_layernorm"])
        tp.drop(mlp_out)
        out = P.add(tp, f"{prefix}.residual_mlp", hidden, post)
        tp.drop(hidden, post)
        return out


def _rotary_types(ctx: RunContext) -> list[bool]:
    """The layer types (sliding or not) that get their own rotary cos/sin: Gemma 3 computes one pair per type
    present in layer_types (`for layer_type in set(config.layer_types)`, full then sliding here: the order does not
    change the bytes), on 4.x both rotary_emb and rotary_emb_local whatever the layers; the other Gemmas one pair for
    all layers."""
    m = ctx.model
    if m.model_type is not ModelType.GEMMA3_TEXT:
        return [False]
    if ctx.behaviour.gemma3_both_rotaries:
        return [False, True]
    return [sliding for sliding in (False, True)
            if any((i in m.sliding_layers) is sliding for i in range(m.num_hidden_layers))]


def _own_pair_only(ctx: RunContext) -> bool:
    """Whether each layer is called with only its own layer type's cos/sin: 5.x Gemma 3 (the other Gemmas have one
    pair for all layers, 4.x Gemma 3 hands every layer both)."""
    return ctx.model.model_type is ModelType.GEMMA3_TEXT and not ctx.behaviour.gemma3_both_rotaries


def _sliding_rotary_name(ctx: RunContext) -> str:
    """The sliding layers' rotary module: rotary_emb_local on 4.x, the sliding_attention entry of 5.x's."""
    return "model.rotary_emb_local" if ctx.behaviour.gemma3_both_rotaries else "model.rotary_emb.sliding_attention"


def _layer_pair(ctx: RunContext, index: int, rotary: Sequence[Tensor]) -> Sequence[Tensor]:
    """The (cos, sin) Gemma 3's layer `index` reads: the local-base pair for a sliding layer, else the global one."""
    first = 2 * _rotary_types(ctx).index(index in ctx.model.sliding_layers)
    return rotary[first:first + 2]


def gemma_rms_norm(ctx: RunContext, name: str, x: Tensor, w: Param, dim: int | None = None) -> Tensor:
    """GemmaRMSNorm.forward over a last dimension of `dim` (hidden unless given), inside the module's hooks."""
    return in_module(ctx, name, [w], x, lambda x: _gemma_rms_norm(ctx, name, x, w, dim or ctx.model.hidden_size))


def _gemma_rms_norm(ctx: RunContext, name: str, x: Tensor, w: Param, h: int) -> Tensor:
    """output = x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) on x.float(); output = output * (1.0 +
    weight.float()); return output.type_as(x). Each temporary of the one-line _norm goes once consumed."""
    tp = ctx.tape
    x32 = P.to_dtype(tp, f"{name}.float", x, DType.FLOAT32)
    squared = P.pow2(tp, f"{name}.pow", x32)
    variance = P.mean_last(tp, f"{name}.mean", squared, h)
    tp.drop(squared)
    shifted = P.add_scalar(tp, f"{name}.add_eps", variance)
    tp.drop(variance)
    inv = P.rsqrt(tp, f"{name}.rsqrt", shifted)
    tp.drop(shifted)
    normed = P.mul(tp, f"{name}.mul", x32, inv)
    tp.drop(x32, inv)
    w32 = P.to_dtype(tp, f"{name}.weight.float", w.tensor, DType.FLOAT32)
    scale = P.add_scalar(tp, f"{name}.one_plus_weight", w32)
    tp.drop(w32)
    out32 = P.mul(tp, f"{name}.mul_weight", normed, scale)
    tp.drop(normed, scale)
    out = P.to_dtype(tp, f"{name}.type_as", out32, x.dtype)
    tp.drop(out32)
    return out
