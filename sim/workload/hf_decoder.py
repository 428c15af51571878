"""The Hugging Face decoder-only models (modeling_qwen2.py, modeling_llama.py, modeling_mistral.py), as the
sequence of tensor ops their forward runs, for the attention implementations eager, sdpa and flash_attention_2.

Shapes: b batch, s sequence, h hidden, a heads, k kv heads, d head dim, i intermediate, V vocab; N = b·s.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from sim.ops import Category
from sim.plan import LoraPlan, ModelShape
from sim.vocab import AttnImplementation, DType, ModelType
from sim.workload import primitives as P
from sim.workload.behaviour import KvCache, Rotary, SdpaContiguous
from sim.workload.context import RunContext
from sim.workload.decoder import Decoder, DecoderLayer, MoeParams
from sim.workload.modules import Linear, apply_linear, in_module, make_linear, make_param, maybe_saved_copy, rms_norm
from sim.workload.tape import Param, Tape, Tensor

LinearShapes = dict[str, tuple[int, int, bool]]  # module name → (in_features, out_features, has_bias)


@dataclass(slots=True)
class CausalLM:
    """XForCausalLM's parameters and model-level buffers."""

    embed_tokens: Param
    layers: list[DecoderLayer]
    norm: Param
    lm_head: Param
    mask_buffer: Tensor | None = None  # llama 4.38.x persistent (M, M) causal_mask buffer
    embed_scale: Tensor | None = None  # Gemma's 0-dim sqrt(hidden) buffer of the scaled embedding

    def params(self) -> list[Param]:
        """In module order; a tied lm_head is embed_tokens and counted once."""
        out = [self.embed_tokens]
        for layer in self.layers:
            out += layer.params()
        out += [self.norm]
        if self.lm_head is not self.embed_tokens:
            out.append(self.lm_head)
        return out


class HfDecoder(Decoder):
    """Hugging Face's qwen2/llama/mistral modelling code on the decoder-layer skeleton: q/k/v/o attention with
    rotary embeddings in three kernels, and the gated SiLU MLP gate_proj/up_proj/down_proj."""

    LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    SAVABLE_MODULES = ("embed_tokens", "lm_head")
    EMBEDDING_WEIGHT = "embed_tokens.weight"
    # The rotated q/k are contiguous in (b, heads, s, d) (Phi-3's rotary ends in a cat) rather than transposed views
    # of the (b, s, heads, d) projections
    ROTARY_OUTPUT_CONTIGUOUS: ClassVar[bool] = False

    def attention_shapes(self, m: ModelShape) -> LinearShapes:
        """The attention slot's linears (self_attn.*), in module order."""
        h, d, a, kvh = m.hidden_size, m.head_size, m.num_attention_heads, m.kv_heads
        qkv_bias = m.model_type is ModelType.QWEN2 or m.attention_bias
        return {"q_proj": (h, a * d, qkv_bias), "k_proj": (h, kvh * d, qkv_bias), "v_proj": (h, kvh * d, qkv_bias),
                "o_proj": (a * d, h, m.attention_bias and m.model_type is not ModelType.QWEN2)}

    def mlp_shapes(self, m: ModelShape) -> LinearShapes:
        """The MLP slot's linears (mlp.*), in module order."""
        h, i = m.hidden_size, m.intermediate_size
        return {"gate_proj": (h, i, m.mlp_bias), "up_proj": (h, i, m.mlp_bias), "down_proj": (i, h, m.mlp_bias)}

    def layer_norms(self, ctx: RunContext, prefix: str, full: bool) -> dict[str, Param]:
        """A layer's norms besides the input and post-attention norms: none here."""
        return {}

    def moe_block(self, ctx: RunContext, prefix: str, dtype: DType, full: bool, lora: LoraPlan | None) -> MoeParams:
        """A sparse layer's MoE block (the MoE families, sim/workload/moe.py); the dense families have none."""
        raise NotImplementedError(f"{type(self).__name__} has no MoE block")

    def build_model(self, ctx: RunContext, lora: LoraPlan | None) -> CausalLM:
        """Create the parameters in module order, in the weights dtype; LoRA freezes the base and adds adapters."""
        m = ctx.model
        dtype = m.weights_dtype
        full = lora is None
        h, d = m.hidden_size, m.head_size
        attention, dense = self.attention_shapes(m), self.mlp_shapes(m)
        embed = maybe_saved_copy(ctx, "model.embed_tokens.weight", m.vocab_size * h, dtype, full, lora,
                                  "embed_tokens")
        layers = []
        for index in range(m.num_hidden_layers):
            prefix = f"model.layers.{index}"
            norm1 = make_param(ctx, f"{prefix}.input_layernorm.weight", h, dtype, full)
            linears = {}
            sparse = m.moe is not None and index in m.moe.sparse_layers
            for parent, group in (("self_attn", attention), ("mlp", {} if sparse else dense)):
                for name, (fan_in, fan_out, has_bias) in group.items():
                    linears[name] = make_linear(ctx, f"{prefix}.{parent}.{name}", fan_in, fan_out, has_bias, dtype,
                                                full, lora, name)
            moe = self.moe_block(ctx, f"{prefix}.mlp", dtype, full, lora) if sparse else None
            norm2 = make_param(ctx, f"{prefix}.post_attention_layernorm.weight", h, dtype, full)
            layer = DecoderLayer(index, prefix, norm1, norm2, linears, norms=self.layer_norms(ctx, prefix, full),
                                 moe=moe)
            beh = ctx.behaviour
            if beh.rotary is not Rotary.MODEL_LEVEL:  # each attention layer owns a rotary module and its inv_freq
                inv_freq_buffer(ctx, f"{prefix}.self_attn.rotary_emb")
            if beh.rotary is Rotary.CACHED_PER_LAYER or beh.unused_rotary_buffers:
                # register_buffer(cos_cached/sin_cached, (max_position_embeddings, d)) in the load dtype, per layer;
                # forward rebuilds them for seq_len rows when a sequence is longer (_set_cos_sin_cache)
                rows = max(m.max_position_embeddings, ctx.seq) * d
                layer.rotary_cache = [
                    ctx.tape.persistent_buffer(f"{prefix}.self_attn.rotary_emb.{n}_cached", rows, dtype,
                                               Category.PARAMETERS)
                    for n in ("cos", "sin")
                ]
            layers.append(layer)
        norm = make_param(ctx, "model.norm.weight", h, dtype, full)
        if ctx.behaviour.rotary is Rotary.MODEL_LEVEL:
            inv_freq_buffer(ctx, "model.rotary_emb")
        if m.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = maybe_saved_copy(ctx, "lm_head.weight", m.vocab_size * h, dtype, full, lora, "lm_head")
        mask_buffer = None
        if ctx.behaviour.llama_full_mask_buffer:
            flag = DType.BOOL if ctx.behaviour.llama_full_mask_bool else DType.INT64
            mask_buffer = ctx.tape.persistent_buffer("model.causal_mask", m.max_position_embeddings ** 2, flag,
                                                     Category.ACTIVATIONS)
        return CausalLM(embed, layers, norm, lm_head, mask_buffer)

    def forward_loss(self, ctx: RunContext, model: CausalLM, ids: Tensor, labels: Tensor,
                     checkpointing: bool) -> Tensor:
        """XForCausalLM.forward with labels inside Trainer.compute_loss; returns the loss. The model output
        (logits, past_key_values) is dropped when compute_loss returns, before backward."""
        tp, m = ctx.tape, ctx.model
        embeds = in_module(ctx, "model.embed_tokens", [model.embed_tokens], ids,
                           lambda ids: P.embedding(tp, "model.embed_tokens", ids, model.embed_tokens, m.vocab_size,
                                                   m.hidden_size, on_host=ctx.on_host))
        hidden_dtype = embeds.dtype
        if model.mask_buffer is not None and ctx.attn is not AttnImplementation.FLASH_ATTENTION_2:
            mask = llama_full_mask(ctx, model.mask_buffer, hidden_dtype)
        elif m.sliding_layers and ctx.behaviour.sdpa_sliding_mask_bool:  # Phi-3, Mistral: every layer slides
            mask = sliding_window_mask(ctx, hidden_dtype)
        else:
            mask = causal_mask(ctx, hidden_dtype)
        rotary = None
        if ctx.behaviour.rotary is Rotary.MODEL_LEVEL:
            rotary = rotary_computed(ctx, "model.rotary_emb", hidden_dtype, scaled=True)
        extra = [t for t in (mask, *(rotary or ())) if t is not None]
        hidden = self.run_layers(ctx, model.layers, embeds, mask, rotary, extra, checkpointing)
        normed = rms_norm(ctx, "model.norm", hidden, model.norm)
        tp.drop(hidden, mask, *(rotary or ()))  # locals of XModel.forward, released when it returns
        return self.loss_and_return(ctx, model.lm_head, normed, labels)

    # ---- slots ------------------------------------------------------------------------------------------------
    def layer_mask(self, ctx: RunContext, layer: DecoderLayer, mask: Tensor | None) -> Tensor | None:
        """The model's mask, or with llama 4.38.x's full-positions mask this layer's (b, 1, s, s) gather of it."""
        if mask is not None and ctx.behaviour.llama_full_mask_buffer:
            return llama_layer_mask(ctx, mask, layer.index)
        return super().layer_mask(ctx, layer, mask)

    def attention(self, ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Tensor | None,
                  rotary: Sequence[Tensor] | None) -> Tensor:
        """XAttention.forward: q/k/v projections, rotary embedding (model-level cos/sin, or the layer's own),
        the KV cache of the version, eager/sdpa/flash_attention_2 attention, o_proj."""
        tp, m = ctx.tape, ctx.model
        prefix = f"{layer.prefix}.self_attn"
        lin = layer.linears
        eager = ctx.attn is AttnImplementation.EAGER
        rotary = self.layer_rotary(ctx, layer, rotary)
        # q/k/v: linear, then .view(b, s, heads, d).transpose(1, 2): views whose grads come back through a copy in
        # eager. The q and k grads leave the rotary backward in (b, heads, s, d) layout whatever layout the
        # attention kernel gave them (TensorIterator's output strides, shared by CPU and CUDA; measured on CPU: a
        # ViewBackward0 clone of b·s·a·d and b·s·k·d per layer, docs/validation.md), so their view-backward copies.
        q, k, v = self.query_key_value(ctx, layer, x)
        beh = ctx.behaviour
        if rotary is not None:
            cos, sin = tp.alias(rotary[0]), tp.alias(rotary[1])
        elif beh.rotary is Rotary.CACHED_PER_LAYER:
            cos, sin = rotary_cached(ctx, layer, v.dtype)
        else:  # self.rotary_emb(value_states, position_ids)
            cos, sin = rotary_computed(ctx, f"{prefix}.rotary_emb", v.dtype, scaled=False)
        q_rot = self.rotate(ctx, f"{prefix}.q_rotary", q, cos, sin)
        k_rot = self.rotate(ctx, f"{prefix}.k_rotary", k, cos, sin)
        tp.drop(cos, sin, q, k)  # query_states, key_states = apply_rotary_pos_emb(...) rebinds both
        if beh.kv_cache is KvCache.REFERENCES:
            ctx.kv_cache += [tp.alias(k_rot), tp.alias(v)]
        elif beh.kv_cache is KvCache.COPIES:
            ctx.kv_cache += [P.contiguous_copy(tp, f"{prefix}.cache.keys", k_rot),
                             P.contiguous_copy(tp, f"{prefix}.cache.values", v)]
        groups = m.num_attention_heads // m.kv_heads
        if eager:
            out = _eager(ctx, prefix, q_rot, k_rot, v, mask, groups)
        elif ctx.attn is AttnImplementation.SDPA:
            out = _sdpa(ctx, prefix, q_rot, k_rot, v, mask, groups)
            if ctx.on_host and self.ROTARY_OUTPUT_CONTIGUOUS:
                # the CPU flash kernel (with or without a mask) allocates its output like q (empty_like): a q in its
                # own (b, heads, s, d) layout gives a (b, heads, s, d) output, which transpose(1, 2).contiguous() copies
                copied = P.contiguous_copy(tp, f"{prefix}.transpose_contiguous", out)
                tp.drop(out)
                out = copied
        else:
            out = _flash_kernel(ctx, prefix, q_rot, k_rot, v, groups, beh.fa2_repeats_kv, "flash_attn_func")
        result = apply_linear(ctx, lin["o_proj"], out)
        tp.drop(out, v, q_rot, k_rot)  # locals of the attention forward, released when it returns
        return result

    def layer_rotary(self, ctx: RunContext, layer: DecoderLayer,
                     rotary: Sequence[Tensor] | None) -> Sequence[Tensor] | None:
        """The model-level (cos, sin) this layer's attention reads: the one pair here."""
        return rotary

    def query_key_value(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (query_key) and v_proj(x) as a (b, heads, s, d) view, whose backward copies in eager only (the grad
        comes from eager's bmm in another layout; SDPA and flash hand it back in the view's own)."""
        q, k = self.query_key(ctx, layer, x)
        eager = ctx.attn is AttnImplementation.EAGER
        v = P.view(ctx.tape, apply_linear(ctx, layer.linears["v_proj"], x), backward_copies=eager)
        ctx.tape.release(v.storage)  # the view holds the projection output; drop the projection's own reference
        return q, k, v

    def rotate(self, ctx: RunContext, name: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """apply_rotary_pos_emb's rotation of q or k."""
        return apply_rotary(ctx, name, x, cos, sin)

    def query_key(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> tuple[Tensor, Tensor]:
        """q_proj(x) and k_proj(x) as (b, heads, s, d) views, before the rotary embedding. Their grads come back
        in another layout (see attention), so each view's backward copies."""
        tp, lin = ctx.tape, layer.linears
        q = P.view(tp, apply_linear(ctx, lin["q_proj"], x), backward_copies=True)
        k = P.view(tp, apply_linear(ctx, lin["k_proj"], x), backward_copies=True)
        for t in (q, k):  # the view holds the projection output; drop the projection's own reference
            tp.release(t.storage)
        return q, k

    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
        return self.gated_mlp(ctx, f"{layer.prefix}.mlp", layer.linears, x)

    def gated_mlp(self, ctx: RunContext, prefix: str, lin: dict[str, Linear], x: Tensor) -> Tensor:
        """down_proj(act_fn(gate_proj(x)) * up_proj(x)) over the linears named gate_proj/up_proj/down_proj in `lin`
        (the layer's MLP, or Qwen2-MoE's shared expert)."""
        tp = ctx.tape
        gate = apply_linear(ctx, lin["gate_proj"], x)
        act = self.activation(tp, f"{prefix}.act_fn", gate)
        tp.drop(gate)
        up = apply_linear(ctx, lin["up_proj"], x)
        product = P.mul(tp, f"{prefix}.mul", act, up)
        tp.drop(act, up)
        out = apply_linear(ctx, lin["down_proj"], product)
        tp.drop(product)
        return out

    def activation(self, tp: Tape, name: str, x: Tensor) -> Tensor:
        """The MLP's act_fn: SiLU (hidden_act silu), which saves its input."""
        return P.silu(tp, name, x)


def inv_freq_buffer(ctx: RunContext, module: str) -> None:
    """register_buffer("inv_freq", 1 / base**(arange(0, d, 2).float() / d)): d/2 fp32 values per rotary module."""
    ctx.tape.persistent_buffer(f"{module}.inv_freq", ctx.model.head_size // 2, DType.FLOAT32, Category.PARAMETERS)


# ---- rotary -----------------------------------------------------------------------------------------------------------
def rotary_computed(ctx: RunContext, name: str, x_dtype: DType, scaled: bool) -> tuple[Tensor, Tensor]:
    """RotaryEmbedding.forward(x, position_ids): inv_freq @ position_ids in fp32 → freqs (b, s, d/2),
    emb = cat(freqs, freqs), cos/sin (times attention_scaling from 4.43: another fp32 tensor), cast to x's dtype.
    Runs under no_grad: nothing is saved. position_ids default to arange(s)[None] (shape (1, s)), so cos/sin
    are (1, s, d) and broadcast over the batch."""
    tp, n = ctx.tape, ctx.seq * ctx.model.head_size
    tp.op(f"{name}.freqs", bytes_moved=2 * n)
    freqs = tp.empty("rotary.freqs", n // 2, DType.FLOAT32)
    tp.op(f"{name}.cat", bytes_moved=4 * n)
    emb = tp.empty("rotary.emb", n, DType.FLOAT32)
    tp.drop(freqs)
    out = []
    for which in ("cos", "sin"):
        tp.op(f"{name}.{which}", bytes_moved=8 * n)
        value = tp.empty(f"rotary.{which}32", n, DType.FLOAT32)
        if scaled:
            tp.op(f"{name}.{which}.attention_scaling", bytes_moved=8 * n)
            scaled_value = tp.empty(f"rotary.{which}32.scaled", n, DType.FLOAT32)
            tp.drop(value)
            value = scaled_value
        cast = P.to_dtype(tp, f"{name}.{which}.to", value, x_dtype)
        tp.drop(value)
        out.append(cast)
    tp.drop(emb)
    return out[0], out[1]


def rotary_cached(ctx: RunContext, layer: DecoderLayer, x_dtype: DType) -> tuple[Tensor, Tensor]:
    """Oldest code: cos_cached[:s].to(x.dtype) (a view when the dtype matches), then cos[position_ids]: an
    advanced-index gather, a new (1, s, d) tensor (default position_ids (1, s)) per layer per forward."""
    tp, n = ctx.tape, ctx.seq * ctx.model.head_size
    out = []
    for which, cache in zip(("cos", "sin"), layer.rotary_cache, strict=True):
        sliced = P.to_dtype(tp, f"model.layers.{layer.index}.rotary.{which}.to", cache, x_dtype)
        tp.op(f"model.layers.{layer.index}.rotary.{which}[position_ids]", bytes_moved=2 * n * x_dtype.size_bytes)
        out.append(tp.empty(f"rotary.{which}", n, x_dtype))
        tp.drop(sliced)
    return out[0], out[1]


def apply_rotary(ctx: RunContext, name: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)."""
    tp = ctx.tape
    first = P.mul(tp, f"{name}.mul_cos", x, cos)
    half = x.numel // 2
    x1, x2 = P.slice_view(tp, x, half), P.slice_view(tp, x, half)
    negated = P.neg(tp, f"{name}.neg", x2)
    rotated = P.cat(tp, f"{name}.rotate_half", [negated, x1])
    tp.drop(x1, x2, negated)
    second = P.mul(tp, f"{name}.mul_sin", rotated, sin)
    tp.drop(rotated)
    out = P.add(tp, f"{name}.add", first, second)
    tp.drop(first, second)
    return out


# ---- attention ----------------------------------------------------------------------------------------------------------
def _eager(ctx: RunContext, prefix: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int) -> Tensor:
    """matmul(q, kᵀ) * scale (+ mask), softmax in fp32 then back to q's dtype, dropout, matmul with v, then
    transpose(1, 2).contiguous(). q/k/v are transposed views of (b, s, heads, d) projections, so matmul's reshape
    to (b·heads, s, d) copies them; repeat_kv's reshape already yields contiguous (b, heads, s, d)."""
    tp, m = ctx.tape, ctx.model
    b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
    k_rep = P.expand_copy(tp, f"{prefix}.repeat_kv.k", k, groups)
    v_rep = P.expand_copy(tp, f"{prefix}.repeat_kv.v", v, groups)
    q_mat = P.contiguous_copy(tp, f"{prefix}.matmul_qk.reshape_q", q)
    k_mat = P.contiguous_copy(tp, f"{prefix}.matmul_qk.reshape_k", k_rep) if groups == 1 else tp.alias(k_rep)
    scores = P.bmm(tp, f"{prefix}.matmul_qk", q_mat, k_mat, b * a * s * s, 2.0 * b * a * s * s * d)
    tp.drop(q_mat, k_mat, k_rep)
    scaled = P.mul_scalar(tp, f"{prefix}.scale", scores)
    tp.drop(scores)
    if m.attn_logit_softcapping is not None:  # Gemma 2's eager_attention_forward: before the mask
        capped = P.softcap(tp, f"{prefix}.softcap", scaled)
        tp.drop(scaled)
        scaled = capped
    if mask is not None:
        masked = P.add(tp, f"{prefix}.add_mask", scaled, mask)
        tp.drop(scaled)
        scaled = masked
    probs32 = P.softmax(tp, f"{prefix}.softmax", scaled, DType.FLOAT32)
    tp.drop(scaled)
    probs = P.to_dtype(tp, f"{prefix}.softmax.to", probs32, q.dtype)
    tp.drop(probs32)
    dropped = P.dropout(tp, f"{prefix}.attn_dropout", probs, m.attention_dropout)
    tp.drop(probs)
    v_mat = P.contiguous_copy(tp, f"{prefix}.matmul_pv.reshape_v", v_rep) if groups == 1 else tp.alias(v_rep)
    context = P.bmm(tp, f"{prefix}.matmul_pv", dropped, v_mat, b * a * s * d, 2.0 * b * a * s * s * d)
    tp.drop(dropped, v_mat, v_rep)
    out = P.contiguous_copy(tp, f"{prefix}.transpose_contiguous", context, backward_copies=True)
    tp.drop(context)
    return out


def _sdpa(ctx: RunContext, prefix: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int) -> Tensor:
    """F.scaled_dot_product_attention. Without a mask (is_causal) torch picks the flash kernel; with a
    materialised mask it picks the memory-efficient kernel on CUDA (the CPU flash kernel on a host), which saves the
    mask too. Some versions call .contiguous() on q/k/v first, which copies the transposed (b, s, heads, d)
    projections. With a mask, k and v are always repeated to every head: from 4.54 sdpa_attention_forward's
    use_gqa_in_sdpa requires attention_mask None (5.24.0 integrations/sdpa_attention.py)."""
    tp, beh = ctx.tape, ctx.behaviour
    contiguous = beh.sdpa_contiguous is SdpaContiguous.ALWAYS or (
        beh.sdpa_contiguous is SdpaContiguous.WITH_MASK_ON_CUDA and mask is not None and not ctx.on_host)
    if mask is None and not contiguous:
        return _flash_kernel(ctx, prefix, q, k, v, groups, beh.sdpa_repeats_kv, "sdpa")
    m = ctx.model
    b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
    repeats_kv = beh.sdpa_repeats_kv or mask is not None
    if repeats_kv and groups > 1:
        k_in = P.expand_copy(tp, f"{prefix}.repeat_kv.k", k, groups)
        v_in = P.expand_copy(tp, f"{prefix}.repeat_kv.v", v, groups)
        kv_heads = a
    else:
        k_in, v_in, kv_heads = tp.alias(k), tp.alias(v), m.kv_heads
    if contiguous:  # repeat_kv output is already contiguous; the projections' transposed views are not
        q_in = P.contiguous_copy(tp, f"{prefix}.q.contiguous", q)
        if not (repeats_kv and groups > 1):
            k_c = P.contiguous_copy(tp, f"{prefix}.k.contiguous", k_in)
            v_c = P.contiguous_copy(tp, f"{prefix}.v.contiguous", v_in)
            tp.drop(k_in, v_in)
            k_in, v_in = k_c, v_c
    else:
        q_in = tp.alias(q)
    flops = 2.0 * b * a * s * s * d
    attn_mask = additive_mask(ctx, prefix, mask, q.dtype) if mask is not None and mask.dtype is DType.BOOL else mask
    if mask is None or ctx.on_host:
        out = P.flash_attention(tp, f"{prefix}.sdpa", q_in, k_in, v_in, b, a, kv_heads, s, d, flops,
                                on_host=ctx.on_host, mask=attn_mask)
    else:
        out = P.efficient_attention(tp, f"{prefix}.sdpa", q_in, k_in, v_in, attn_mask, b, a, s, d, flops)
    tp.drop(q_in, k_in, v_in)
    if attn_mask is not mask:
        tp.drop(attn_mask)  # the kernel's autograd node keeps it until the layer's backward
    return out


def additive_mask(ctx: RunContext, prefix: str, mask: Tensor, dtype: DType) -> Tensor:
    """SDPA's convert_boolean_attn_mask on every call: at::where(attn_mask, 0.0, scalar_tensor(-inf, q dtype)), a
    new (b, 1, s, s) mask in q's dtype beside the two 0-dim scalars (pytorch aten/src/ATen/native/transformers/
    attention.cpp, read for 2.13; measured on CPU: where allocates b·s·s·itemsize)."""
    tp = ctx.tape
    scalars = [tp.empty(f"{prefix}.sdpa.mask_{which}", 1, dtype) for which in ("neg_inf", "zero")]
    tp.op(f"{prefix}.sdpa.mask_where", bytes_moved=mask.numel * (1 + dtype.size_bytes))
    out = tp.empty(f"{prefix}.sdpa.mask_additive", mask.numel, dtype)
    tp.drop(*reversed(scalars))
    return out


def _flash_kernel(ctx: RunContext, prefix: str, q: Tensor, k: Tensor, v: Tensor, groups: int, repeats_kv: bool,
                  kernel: str) -> Tensor:
    """torch SDPA (flash backend, attn_mask None, is_causal) or flash_attn_func: the kernel reads the
    (b, s, heads, d) layout in place; its output is already (b, s, heads, d), so the following
    transpose(1, 2).contiguous()/reshape copies nothing."""
    tp, m = ctx.tape, ctx.model
    b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
    if repeats_kv and groups > 1:
        k_in = P.expand_copy(tp, f"{prefix}.repeat_kv.k", k, groups)
        v_in = P.expand_copy(tp, f"{prefix}.repeat_kv.v", v, groups)
        kv_heads = a
    else:
        k_in, v_in, kv_heads = tp.alias(k), tp.alias(v), m.kv_heads
    flops = 2.0 * b * a * s * s * d  # causal: half of 4·b·a·s²·d
    # on a host torch SDPA runs _scaled_dot_product_flash_attention_for_cpu (flash_attn_func needs CUDA)
    out = P.flash_attention(tp, f"{prefix}.{kernel}", q, k_in, v_in, b, a, kv_heads, s, d, flops,
                            on_host=ctx.on_host and kernel == "sdpa")
    tp.drop(k_in, v_in)
    return out


def causal_mask(ctx: RunContext, dtype: DType) -> Tensor | None:
    """The 4-D additive mask built once per forward for an all-ones attention_mask, or None.

    Eager always gets a (b, 1, s, s) mask in the embeddings' dtype: full((s, s), min) + triu, expanded and
    cloned to (b, 1, s, s) (4.53+: a bool (b, 1, s, s) mask turned into it by torch.where). SDPA gets None
    (is_causal) unless the version always builds one or s reaches the sliding window; FA2 always gets None.
    """
    beh, m = ctx.behaviour, ctx.model
    if ctx.attn is AttnImplementation.FLASH_ATTENTION_2:
        return None
    if ctx.attn is AttnImplementation.SDPA and not beh.sdpa_mask_always:
        window = m.sliding_window
        uses_window = m.model_type is not ModelType.QWEN2 or m.use_sliding_window
        if not (beh.sdpa_sliding_window_check and window and uses_window and ctx.seq >= window):
            return None
    tp, s, b = ctx.tape, ctx.seq, ctx.batch
    if beh.eager_mask_via_bool:
        tp.op("model.causal_mask.bool", bytes_moved=b * s * s)
        flags = tp.empty("causal_mask.bool", b * s * s, DType.BOOL)
        tp.op("model.causal_mask.where", bytes_moved=b * s * s * (1 + dtype.size_bytes))
        mask = tp.empty("causal_mask", b * s * s, dtype, Category.ACTIVATIONS)
        tp.drop(flags)
        return mask
    tp.op("model.causal_mask.full", bytes_moved=s * s * dtype.size_bytes)
    full = tp.empty("causal_mask.full", s * s, dtype)
    tp.op("model.causal_mask.triu", bytes_moved=2 * s * s * dtype.size_bytes)
    triu = tp.empty("causal_mask.triu", s * s, dtype)
    tp.drop(full)
    tp.op("model.causal_mask.expand_clone", bytes_moved=2 * b * s * s * dtype.size_bytes)
    mask = tp.empty("causal_mask", b * s * s, dtype, Category.ACTIVATIONS)
    tp.drop(triu)
    return mask


def sliding_window_mask(ctx: RunContext, dtype: DType) -> Tensor | None:
    """create_sliding_window_causal_mask (masking_utils, 4.53+): eager gets causal_mask's float (b, 1, s, s) mask,
    SDPA a bool one once s reaches the window (None below it: _ignore_causal_mask_sdpa skips to is_causal),
    flash_attention_2 none."""
    if ctx.attn is AttnImplementation.SDPA:
        return sdpa_sliding_mask(ctx) if ctx.seq >= ctx.model.sliding_window else None
    return causal_mask(ctx, dtype)


def sdpa_sliding_mask(ctx: RunContext) -> Tensor:
    """masking_utils.sdpa_mask with sliding_window_causal_mask_function and the 2-D attention_mask of ones that the
    Trainer's batch carries, non-vmap (5.24.0 masking_utils.py): attention_mask.to(bool) (b, s); int64 aranges of
    b, 1, s + q_offset and s + kv_offset (each arange then a new tensor for the + 0); the window and causal
    comparisons of the (1, 1, s, 1) and (1, 1, 1, s) indices, each an (s, s) bool and-ed into the running result
    (at most three s² alive); padding_mask[batch_idx, kv_idx] (b, 1, 1, s); and the final & (b, 1, s, s) bool, which
    .expand(b, -1, s, s) keeps as is. Everything but the mask goes when the function returns."""
    tp, b, s = ctx.tape, ctx.batch, ctx.seq
    tp.op("model.sliding_mask.attention_mask.to_bool", bytes_moved=9 * b * s)
    padding = tp.empty("sliding_mask.padding", b * s, DType.BOOL)
    tp.op("model.sliding_mask.arange", bytes_moved=8 * (b + 1 + 4 * s))
    aranges = [tp.empty("sliding_mask.batch_arange", b, DType.INT64),
               tp.empty("sliding_mask.head_arange", 1, DType.INT64)]
    for which in ("q", "kv"):
        base = tp.empty(f"sliding_mask.{which}_arange", s, DType.INT64)
        aranges.append(tp.empty(f"sliding_mask.{which}_arange.add_offset", s, DType.INT64))
        tp.drop(base)
    tp.op("model.sliding_mask.window_causal", bytes_moved=8 * s + 6 * s * s)
    shifted = tp.empty("sliding_mask.q_minus_window", s, DType.INT64)
    window = tp.empty("sliding_mask.window", s * s, DType.BOOL)
    tp.drop(shifted)
    anded = tp.empty("sliding_mask.and_window", s * s, DType.BOOL)
    tp.drop(window)
    causal = tp.empty("sliding_mask.causal", s * s, DType.BOOL)
    inner = tp.empty("sliding_mask.and_causal", s * s, DType.BOOL)
    tp.drop(causal, anded)
    combined = tp.empty("sliding_mask.and_outer", s * s, DType.BOOL)
    tp.drop(inner)
    tp.op("model.sliding_mask.and_padding", bytes_moved=2 * b * s + b * s * s + s * s)
    gathered = tp.empty("sliding_mask.padding_gather", b * s, DType.BOOL)
    mask = tp.empty("sliding_mask", b * s * s, DType.BOOL, Category.ACTIVATIONS)
    tp.drop(gathered, combined, *aranges, padding)
    return mask


def llama_full_mask(ctx: RunContext, buffer: Tensor, dtype: DType) -> Tensor:
    """Llama 4.38.x _update_causal_mask: causal_mask buffer (M, M) → repeat(b) → .to(dtype) * min, a
    (b, 1, M, M) tensor per forward (eager and sdpa alike)."""
    tp, b = ctx.tape, ctx.batch
    cells = ctx.model.max_position_embeddings ** 2
    tp.op("model.causal_mask.repeat", bytes_moved=2 * b * buffer.size_bytes)
    repeated = tp.empty("causal_mask.repeat", b * cells, buffer.dtype)
    tp.op("model.causal_mask.to", bytes_moved=b * cells * (buffer.dtype.size_bytes + dtype.size_bytes))
    converted = tp.empty("causal_mask.to", b * cells, dtype)
    tp.drop(repeated)
    tp.op("model.causal_mask.mul_min", bytes_moved=2 * b * cells * dtype.size_bytes)
    mask = tp.empty("causal_mask.full_positions", b * cells, dtype, Category.ACTIVATIONS)
    tp.drop(converted)
    return mask


def llama_layer_mask(ctx: RunContext, full: Tensor, layer: int) -> Tensor:
    """attention_mask[:, :, cache_position, :kv_len]: an advanced-index gather, a (b, 1, s, s) copy per layer."""
    tp, cells = ctx.tape, ctx.batch * ctx.seq * ctx.seq
    tp.op(f"model.layers.{layer}.self_attn.causal_mask[cache_position]", bytes_moved=2 * cells * full.dtype.size_bytes)
    return tp.empty("causal_mask.layer", cells, full.dtype)
