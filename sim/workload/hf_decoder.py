"""The Hugging Face decoder-only models (modeling_qwen2.py, modeling_llama.py, modeling_mistral.py), as the
sequence of tensor ops their forward runs, for the attention implementations eager, sdpa and flash_attention_2.

Shapes: b batch, s sequence, h hidden, a heads, k kv heads, d head dim, i intermediate, V vocab; N = b·s.
"""

from dataclasses import dataclass, field

from sim.ops import Category
from sim.scenario import AttnImplementation, DType, Lora, ModelType
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.modules import Linear, apply_linear, make_param
from sim.workload.tape import Param, Tensor

LINEAR_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(slots=True)
class DecoderLayer:
    index: int
    input_layernorm: Param
    post_attention_layernorm: Param
    linears: dict[str, Linear]
    rotary_cache: list[Tensor] = field(default_factory=list)  # per-layer cos_cached/sin_cached buffers (old code)


@dataclass(slots=True)
class CausalLM:
    embed_tokens: Param
    layers: list[DecoderLayer]
    norm: Param
    lm_head: Param

    def params(self) -> list[Param]:
        out = [self.embed_tokens]
        for layer in self.layers:
            out += [layer.input_layernorm]
            for lin in layer.linears.values():
                out += lin.params()
            out += [layer.post_attention_layernorm]
        out += [self.norm]
        if self.lm_head is not self.embed_tokens:
            out.append(self.lm_head)
        return out


def _targets(lora: Lora | None, module: str) -> bool:
    if lora is None:
        return False
    if lora.target_modules == "all-linear":  # PEFT: every nn.Linear except the output layer
        return module != "lm_head"
    return module in lora.target_modules


def build_model(ctx: RunContext, lora: Lora | None) -> CausalLM:
    """Create the parameters in module order, in the weights dtype; LoRA freezes the base and adds adapters."""
    m = ctx.model
    dtype = m.weights_dtype
    full = lora is None
    h, d, a, kvh, i = m.hidden_size, m.head_size, m.num_attention_heads, m.kv_heads, m.intermediate_size
    qkv_bias = m.model_type is ModelType.QWEN2 or m.attention_bias
    shapes = {
        "q_proj": (h, a * d, qkv_bias), "k_proj": (h, kvh * d, qkv_bias), "v_proj": (h, kvh * d, qkv_bias),
        "o_proj": (a * d, h, m.attention_bias and m.model_type is not ModelType.QWEN2),
        "gate_proj": (h, i, m.mlp_bias), "up_proj": (h, i, m.mlp_bias), "down_proj": (i, h, m.mlp_bias),
    }
    embed = _maybe_saved_copy(ctx, "model.embed_tokens.weight", m.vocab_size * h, dtype, full, lora, "embed_tokens")
    layers = []
    for index in range(m.num_hidden_layers):
        prefix = f"model.layers.{index}"
        norm1 = make_param(ctx, f"{prefix}.input_layernorm.weight", h, dtype, full)
        linears = {}
        for name, (fan_in, fan_out, has_bias) in shapes.items():
            linears[name] = make_linear(ctx, f"{prefix}.{LINEAR_PARENT[name]}.{name}", fan_in, fan_out, has_bias,
                                        dtype, full, lora, name)
        norm2 = make_param(ctx, f"{prefix}.post_attention_layernorm.weight", h, dtype, full)
        layer = DecoderLayer(index, norm1, norm2, linears)
        if ctx.behaviour.rotary_cache_per_layer:
            rows = m.max_position_embeddings * d
            layer.rotary_cache = [
                ctx.tape.persistent_buffer(f"{prefix}.self_attn.rotary_emb.{n}_cached", rows, dtype, Category.PARAMETERS)
                for n in ("cos", "sin")
            ]
        layers.append(layer)
    norm = make_param(ctx, "model.norm.weight", h, dtype, full)
    if m.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = _maybe_saved_copy(ctx, "lm_head.weight", m.vocab_size * h, dtype, full, lora, "lm_head")
    return CausalLM(embed, layers, norm, lm_head)


def make_linear(ctx: RunContext, name: str, fan_in: int, fan_out: int, has_bias: bool, dtype: DType, full: bool,
                lora: Lora | None, module: str) -> Linear:
    weight = make_param(ctx, f"{name}.weight", fan_in * fan_out, dtype, full)
    bias = make_param(ctx, f"{name}.bias", fan_out, dtype, full) if has_bias else None
    lin = Linear(name, fan_in, fan_out, weight, bias)
    if _targets(lora, module):
        adapter = ctx.adapter_dtype or dtype
        lin.lora_a = make_param(ctx, f"{name}.lora_A.default.weight", lora.r * fan_in, adapter, True)
        lin.lora_b = make_param(ctx, f"{name}.lora_B.default.weight", fan_out * lora.r, adapter, True)
        lin.lora_dropout = lora.lora_dropout
    return lin


def _maybe_saved_copy(ctx: RunContext, name: str, numel: int, dtype: DType, full: bool, lora: Lora | None,
                      module: str) -> Param:
    """PEFT modules_to_save wraps the module and trains a copy of it; the original stays frozen beside it."""
    base = make_param(ctx, name, numel, dtype, full)
    if lora is not None and module in lora.modules_to_save:
        return make_param(ctx, name.replace(".weight", ".modules_to_save.default.weight"), numel, dtype, True)
    return base


# ---- RMSNorm, MLP ---------------------------------------------------------------------------------------------------
def rms_norm(ctx: RunContext, name: str, x: Tensor, w: Param) -> Tensor:
    """Qwen2RMSNorm/LlamaRMSNorm: x.to(fp32); var = x.pow(2).mean(-1, keepdim=True);
    x = x * rsqrt(var + eps); return weight * x.to(input_dtype)."""
    tp, h = ctx.tape, ctx.model.hidden_size
    x32 = P.to_dtype(tp, f"{name}.to_fp32", x, DType.FLOAT32)
    squared = P.pow2(tp, f"{name}.pow", x32)
    variance = P.mean_last(tp, f"{name}.mean", squared, h)
    tp.drop(squared)
    shifted = P.add_scalar(tp, f"{name}.add_eps", variance)
    inv = P.rsqrt(tp, f"{name}.rsqrt", shifted)
    tp.drop(shifted)
    normed = P.mul(tp, f"{name}.mul", x32, inv)
    tp.drop(inv, x32)
    back = P.to_dtype(tp, f"{name}.to_input_dtype", normed, x.dtype)
    out = P.mul(tp, f"{name}.weight_mul", w.tensor, back)
    tp.drop(back, normed, variance)
    return out


def mlp(ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
    """down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    tp, lin, prefix = ctx.tape, layer.linears, f"model.layers.{layer.index}.mlp"
    gate = apply_linear(ctx, lin["gate_proj"], x)
    act = P.silu(tp, f"{prefix}.act_fn", gate)
    tp.drop(gate)
    up = apply_linear(ctx, lin["up_proj"], x)
    product = P.mul(tp, f"{prefix}.mul", act, up)
    tp.drop(act, up)
    out = apply_linear(ctx, lin["down_proj"], product)
    tp.drop(product)
    return out


# ---- rotary -----------------------------------------------------------------------------------------------------------
def rotary_once(ctx: RunContext, x_dtype: DType) -> tuple[Tensor, Tensor]:
    """Model-level rotary (newer code): inv_freq @ position_ids in fp32, cat(freqs, freqs), cos/sin, cast to x dtype;
    one (b, s, d) cos and sin shared by every layer."""
    tp, n = ctx.tape, ctx.tokens * ctx.model.head_size
    tp.op("model.rotary_emb.freqs", bytes_moved=2 * n)
    freqs = tp.empty("rotary.freqs", n // 2, DType.FLOAT32)
    tp.op("model.rotary_emb.cat", bytes_moved=4 * n)
    emb = tp.empty("rotary.emb", n, DType.FLOAT32)
    tp.drop(freqs)
    out = []
    for which in ("cos", "sin"):
        tp.op(f"model.rotary_emb.{which}", bytes_moved=8 * n)
        value = tp.empty(f"rotary.{which}32", n, DType.FLOAT32)
        cast = P.to_dtype(tp, f"model.rotary_emb.{which}.to", value, x_dtype)
        tp.drop(value)
        out.append(cast)
    tp.drop(emb)
    return out[0], out[1]


def rotary_per_layer(ctx: RunContext, layer: DecoderLayer, x_dtype: DType) -> tuple[Tensor, Tensor]:
    """Older code: cos_cached[:s].to(x.dtype) then cos[position_ids] (an index: a new (b, s, d) tensor)."""
    tp, n = ctx.tape, ctx.tokens * ctx.model.head_size
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
def attention(ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Tensor | None,
              rotary: tuple[Tensor, Tensor] | None) -> Tensor:
    tp, m = ctx.tape, ctx.model
    prefix = f"model.layers.{layer.index}.self_attn"
    lin = layer.linears
    eager = ctx.attn is AttnImplementation.EAGER
    # q/k/v: linear, then .view(b, s, heads, d).transpose(1, 2): views whose grads come back through a copy in eager.
    q = P.view(tp, apply_linear(ctx, lin["q_proj"], x), backward_copies=eager)
    k = P.view(tp, apply_linear(ctx, lin["k_proj"], x), backward_copies=eager)
    v = P.view(tp, apply_linear(ctx, lin["v_proj"], x), backward_copies=eager)
    for t in (q, k, v):  # the view holds the projection output; drop the projection's own reference
        tp.release(t.storage)
    if rotary is None:
        cos, sin = rotary_per_layer(ctx, layer, q.dtype)
    else:
        cos, sin = tp.alias(rotary[0]), tp.alias(rotary[1])
    q_rot = apply_rotary(ctx, f"{prefix}.q_rotary", q, cos, sin)
    k_rot = apply_rotary(ctx, f"{prefix}.k_rotary", k, cos, sin)
    tp.drop(cos, sin)
    groups = m.num_attention_heads // m.kv_heads
    if eager:
        out = _eager(ctx, prefix, q_rot, k_rot, v, mask, groups)
    elif ctx.attn is AttnImplementation.SDPA:
        out = _flash_kernel(ctx, prefix, q_rot, k_rot, v, groups, ctx.behaviour.sdpa_repeats_kv, "sdpa")
    else:
        out = _flash_kernel(ctx, prefix, q_rot, k_rot, v, groups, ctx.behaviour.fa2_repeats_kv, "flash_attn_func")
    tp.drop(q, k, v, q_rot, k_rot)
    result = apply_linear(ctx, lin["o_proj"], out)
    tp.drop(out)
    return result


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
    out = P.contiguous_copy(tp, f"{prefix}.transpose_contiguous", context)
    tp.drop(context)
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
    out = P.flash_attention(tp, f"{prefix}.{kernel}", q, k_in, v_in, b, a, kv_heads, s, d, flops)
    tp.drop(k_in, v_in)
    return out


# ---- layer and model -------------------------------------------------------------------------------------------------
def decoder_layer(ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Tensor | None,
                  rotary: tuple[Tensor, Tensor] | None) -> Tensor:
    """residual + self_attn(input_layernorm(x)), then residual + mlp(post_attention_layernorm(·))."""
    tp, prefix = ctx.tape, f"model.layers.{layer.index}"
    normed = rms_norm(ctx, f"{prefix}.input_layernorm", x, layer.input_layernorm)
    attn_out = attention(ctx, layer, normed, mask, rotary)
    tp.drop(normed)
    hidden = P.add(tp, f"{prefix}.residual_attn", x, attn_out)
    tp.drop(attn_out)
    normed = rms_norm(ctx, f"{prefix}.post_attention_layernorm", hidden, layer.post_attention_layernorm)
    mlp_out = mlp(ctx, layer, normed)
    tp.drop(normed)
    out = P.add(tp, f"{prefix}.residual_mlp", hidden, mlp_out)
    tp.drop(hidden, mlp_out)
    return out


def causal_mask(ctx: RunContext, dtype: DType) -> Tensor | None:
    """Eager attention gets an additive (b, 1, s, s) mask in the model dtype, built once per forward from a
    full (s, s) min-value matrix and triu; SDPA (all-ones attention_mask) and FlashAttention-2 get None."""
    if ctx.attn is not AttnImplementation.EAGER or not ctx.behaviour.eager_mask_materialized:
        return None
    tp, s = ctx.tape, ctx.seq
    tp.op("model.causal_mask.full", bytes_moved=s * s * dtype.size_bytes)
    full = tp.empty("causal_mask.full", s * s, dtype)
    tp.op("model.causal_mask.triu", bytes_moved=2 * s * s * dtype.size_bytes)
    triu = tp.empty("causal_mask.triu", s * s, dtype)
    tp.drop(full)
    tp.op("model.causal_mask.expand_clone", bytes_moved=2 * ctx.batch * s * s * dtype.size_bytes)
    mask = tp.empty("causal_mask", ctx.batch * s * s, dtype, Category.ACTIVATIONS)
    tp.drop(triu)
    return mask
