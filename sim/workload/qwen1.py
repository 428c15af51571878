"""Qwen1's own remote code (modeling_qwen.py, final revision of 2023-12, Qwen/Qwen-7B … Qwen-72B) as the tensor
ops its training forward runs: fused c_attn, fp32 rotary, SDPA with a materialised (b, 1, s, s) mask on
torch >= 2 without flash-attn, flash-attn (direct for batch 1, unpadded varlen otherwise), w1 * silu(w2),
and the loss on bf16 logits (no fp32 upcast). software.qwen_remote_code 2023-10 adds that revision's
registered_causal_mask buffer (sim/workload/behaviour.py _qwen1) and otherwise runs this module's flash-attn path:
that revision's rotary cache and logn_tensor are the final's (tomaarsen/attention_sinks@0125bd6), its flash path was
not read (that copy removes it).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from sim.ops import Category
from sim.errors import ScenarioError
from sim.plan import LoraPlan
from sim.vocab import AttnImplementation, DType
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.decoder import Decoder, DecoderLayer
from sim.workload.hf_decoder import apply_rotary
from sim.workload.modules import apply_linear, in_module, make_linear, make_param, maybe_saved_copy, rms_norm
from sim.workload.tape import Param, Tensor

LOGN_POSITIONS = 32767  # logn_list over range(1, 32768) (QWenAttention.__init__)


@dataclass(slots=True)
class QWenLMHeadModel:
    """QWenLMHeadModel's parameters and the rotary cache its QWenModel keeps."""

    wte: Param
    blocks: list[DecoderLayer]
    ln_f: Param
    lm_head: Param
    rotary_cache: list[Tensor]  # fp32 cos/sin cache of QWenModel.rotary_emb, built at the first forward

    def params(self) -> list[Param]:
        """In module order (lm_head is never tied to wte)."""
        out = [self.wte]
        for block in self.blocks:
            out += block.params()
        return out + [self.ln_f, self.lm_head]


class Qwen1(Decoder):
    """Qwen1's QWenBlock on the decoder-layer skeleton: ln_1, attn (fused c_attn, c_proj), ln_2, mlp (w1, w2,
    c_proj)."""

    LINEAR_MODULES = ("c_attn", "c_proj", "w1", "w2", "lm_head")
    SAVABLE_MODULES = ("wte", "lm_head")
    EMBEDDING_WEIGHT = "wte.weight"
    ATTENTION_OUTPUT_FIRST = True  # QWenBlock.forward: layernorm_input = attn_output + residual
    # Reentrant checkpointing's host RNG stash (decoder._host_rng_stash) is modelled where it was measured, for the
    # HF families on a CPU host (docs/validation.md H4); Qwen1 is not calibrated on a host and leaves it out.
    STASHES_HOST_RNG = False
    # QWenModel.forward calls torch.utils.checkpoint.checkpoint itself without use_reentrant (torch's default, True
    # through 2.13: torch/utils/checkpoint.py checkpoint), and its old-format _set_gradient_checkpointing(module,
    # value) makes transformers ignore gradient_checkpointing_kwargs (4.35+ modeling_utils.py
    # gradient_checkpointing_enable): Qwen1 is reentrant whatever use_reentrant says.
    HONOURS_USE_REENTRANT = False

    def build_model(self, ctx: RunContext, lora: LoraPlan | None) -> QWenLMHeadModel:
        """Parameters in the autoselected dtype (bf16 on bf16-capable GPUs); c_attn always has a bias."""
        m = ctx.model
        dtype, full, h = m.weights_dtype, lora is None, m.hidden_size
        ffn = m.intermediate_size // 2  # w1 and w2 are Linear(h, intermediate_size // 2)
        wte = maybe_saved_copy(ctx, "transformer.wte.weight", m.vocab_size * h, dtype, full, lora, "wte")
        if ctx.behaviour.qwen_causal_mask_buffer:
            _registered_causal_mask(ctx)
        blocks = []
        for index in range(m.num_hidden_layers):
            prefix = f"transformer.h.{index}"
            ln_1 = make_param(ctx, f"{prefix}.ln_1.weight", h, dtype, full)
            shapes = {"c_attn": (h, 3 * h, True, "attn"), "c_proj": (h, h, not m.no_bias, "attn"),
                      "w1": (h, ffn, not m.no_bias, "mlp"), "w2": (h, ffn, not m.no_bias, "mlp"),
                      "mlp.c_proj": (ffn, h, not m.no_bias, "mlp")}
            linears = {}
            for key, (fan_in, fan_out, bias, parent) in shapes.items():
                module = key.split(".")[-1]
                linears[key] = make_linear(ctx, f"{prefix}.{parent}.{module}", fan_in, fan_out, bias, dtype, full,
                                           lora, module)
            ln_2 = make_param(ctx, f"{prefix}.ln_2.weight", h, dtype, full)
            ctx.tape.persistent_buffer(f"{prefix}.attn.logn_tensor", LOGN_POSITIONS, dtype, Category.PARAMETERS)
            ctx.tape.persistent_buffer(f"{prefix}.attn.masked_bias", 1, dtype, Category.PARAMETERS)
            blocks.append(DecoderLayer(index, prefix, ln_1, ln_2, linears))
        ctx.tape.persistent_buffer("transformer.rotary_emb.inv_freq", m.head_size // 2, DType.FLOAT32,
                                   Category.PARAMETERS)
        ln_f = make_param(ctx, "transformer.ln_f.weight", h, dtype, full)
        lm_head = maybe_saved_copy(ctx, "lm_head.weight", m.vocab_size * h, dtype, full, lora, "lm_head")
        return QWenLMHeadModel(wte, blocks, ln_f, lm_head, [])

    def forward_loss(self, ctx: RunContext, model: QWenLMHeadModel, ids: Tensor, labels: Tensor,
                     checkpointing: bool) -> Tensor:
        """QWenLMHeadModel.forward with labels; the (b, 1, 1, s) additive mask is built once per forward."""
        tp, m = ctx.tape, ctx.model
        rotary = _rotary_cache(ctx, model)
        embeds = in_module(ctx, "transformer.wte", [model.wte], ids,
                           lambda ids: P.embedding(tp, "transformer.wte", ids, model.wte, m.vocab_size, m.hidden_size))
        tp.op("transformer.attention_mask.to_dtype", bytes_moved=ctx.tokens * 10)
        converted = tp.empty("attention_mask.to", ctx.tokens, embeds.dtype)
        tp.op("transformer.attention_mask.one_minus", bytes_moved=ctx.tokens * 4)
        inverted = tp.empty("attention_mask.one_minus", ctx.tokens, embeds.dtype)
        tp.drop(converted)
        tp.op("transformer.attention_mask.times_min", bytes_moved=ctx.tokens * 4)
        mask = tp.empty("attention_mask.additive", ctx.tokens, embeds.dtype)
        tp.drop(inverted)
        hidden = self.run_layers(ctx, model.blocks, embeds, mask, rotary, [mask], checkpointing)
        normed = rms_norm(ctx, "transformer.ln_f", hidden, model.ln_f)
        tp.drop(hidden, mask)
        return self.loss_and_return(ctx, model.lm_head, normed, labels)

    # ---- slots ---------------------------------------------------------------------------------------------------
    def attention(self, ctx: RunContext, layer: DecoderLayer, x: Tensor, mask: Tensor | None,
                  rotary: Sequence[Tensor] | None) -> Tensor:
        """QWenAttention.forward: c_attn split into q/k/v, fp32 rotary from the model's cache, SDPA with the
        materialised mask or flash-attn, c_proj."""
        tp, m = ctx.tape, ctx.model
        b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
        prefix = f"{layer.prefix}.attn"
        mixed = apply_linear(ctx, layer.linears["c_attn"], x)
        q, k, v = P.split(tp, f"{prefix}.split", mixed, 3)
        tp.drop(mixed)
        cos, sin = (tp.alias(c, s * d, view=True) for c in rotary)  # cos[:, :s] views of the fp32 cache
        q_rot = _rotary(ctx, f"{prefix}.q_rotary", q, cos, sin)
        k_rot = _rotary(ctx, f"{prefix}.k_rotary", k, cos, sin)
        tp.drop(q, k, cos, sin)
        flops = 2.0 * b * a * s * s * d
        if ctx.attn is AttnImplementation.FLASH_ATTENTION_2:
            out = _flash(ctx, prefix, q_rot, k_rot, v, flops)
        else:
            out = _sdpa_with_mask(ctx, prefix, q_rot, k_rot, v, mask, flops)
        result = apply_linear(ctx, layer.linears["c_proj"], out)
        tp.drop(out, q_rot, k_rot, v)
        return result

    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """a1 = w1(x); a2 = w2(x); c_proj(a1 * F.silu(a2))."""
        tp, lin, prefix = ctx.tape, layer.linears, f"{layer.prefix}.mlp"
        a1 = apply_linear(ctx, lin["w1"], x)
        a2 = apply_linear(ctx, lin["w2"], x)
        act = P.silu(tp, f"{prefix}.silu", a2)
        product = P.mul(tp, f"{prefix}.mul", a1, act)
        tp.drop(act, a1, a2)
        out = apply_linear(ctx, lin["mlp.c_proj"], product)
        tp.drop(product)
        return out


def _registered_causal_mask(ctx: RunContext) -> None:
    """The 2023-10 QWenModel.__init__: register_buffer("registered_causal_mask", tril(ones((P, P), bool))
    .view(1, 1, P, P), persistent=False) with P = max_position_embeddings, one for the model, kept on the GPU for the
    run (.bfloat16() leaves a bool buffer bool). Its non-flash path is eager attention (QWenAttention._attn, matmul
    and softmax), which is not modelled, so that revision is refused without flash-attn."""
    if ctx.attn is not AttnImplementation.FLASH_ATTENTION_2:
        raise ScenarioError("software.qwen_remote_code: revision 2023-10 is modelled with training.attn_implementation "
                            f"flash_attention_2 only (got {ctx.attn.value!r})")
    positions = ctx.model.max_position_embeddings
    ctx.tape.persistent_buffer("transformer.registered_causal_mask", positions * positions, DType.BOOL,
                               Category.PARAMETERS)


def _rotary_cache(ctx: RunContext, model: QWenLMHeadModel) -> list[Tensor]:
    """RotaryEmbedding.update_rotary_pos_emb_cache: built once for max(2s, 16) positions in fp32
    (outer(seq, inv_freq), cat(freqs, freqs), cos, sin) and kept on the module for later forwards."""
    if model.rotary_cache:
        return model.rotary_cache
    tp, d = ctx.tape, ctx.model.head_size
    rows = max(2 * ctx.seq, 16)
    tp.op("transformer.rotary_emb.freqs", bytes_moved=rows * d * 2)
    freqs = tp.empty("rotary.freqs", rows * d // 2, DType.FLOAT32)
    tp.op("transformer.rotary_emb.cat", bytes_moved=rows * d * 6)
    emb = tp.empty("rotary.emb", rows * d, DType.FLOAT32)
    tp.drop(freqs)
    cache = []
    for which in ("cos", "sin"):
        cache.append(tp.persistent_buffer(f"transformer.rotary_emb.{which}_cache", rows * d, DType.FLOAT32,
                                          Category.PARAMETERS))
        tp.op(f"transformer.rotary_emb.{which}", bytes_moved=rows * d * 8)
        tp.allocate_existing(cache[-1])
    tp.drop(emb)
    model.rotary_cache = cache
    return cache


def _rotary(ctx: RunContext, name: str, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rotary_pos_emb (PyTorch path): t_float = t.float(); t_rot*cos + rotate_half(t_rot)*sin in fp32;
    cat((t_rot, t_pass)) with an empty t_pass (rotary_pct 1.0) copies; .type_as(t) back to bf16."""
    tp = ctx.tape
    t_float = P.to_dtype(tp, f"{name}.float", t, DType.FLOAT32)
    summed = apply_rotary(ctx, name, t_float, cos, sin)
    tp.drop(t_float)
    joined = P.cat(tp, f"{name}.cat_pass", [summed])
    tp.drop(summed)
    out = P.to_dtype(tp, f"{name}.type_as", joined, t.dtype)
    tp.drop(joined)
    return out


def _sdpa_with_mask(ctx: RunContext, prefix: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                    flops: float) -> Tensor:
    """torch >= 2 without flash-attn: causal = tril(ones((s, s), bool)); the (b, 1, 1, s) attention mask is
    expanded and masked_fill(~causal, min) into a new (b, 1, s, s) mask; SDPA with that attn_mask runs the
    memory-efficient kernel, which saves it. Its output is already (b, s, heads, d): _merge_heads copies nothing."""
    tp, m = ctx.tape, ctx.model
    b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
    tp.op(f"{prefix}.causal_mask.ones", bytes_moved=s * s)
    ones = tp.empty("qwen.causal.ones", s * s, DType.BOOL)
    tp.op(f"{prefix}.causal_mask.tril", bytes_moved=2 * s * s)
    causal = tp.empty("qwen.causal.tril", s * s, DType.BOOL)
    tp.drop(ones)
    tp.op(f"{prefix}.causal_mask.invert", bytes_moved=2 * s * s)
    inverted = tp.empty("qwen.causal.inverted", s * s, DType.BOOL)
    tp.op(f"{prefix}.attention_mask.masked_fill", bytes_moved=b * s * s * 3)
    full_mask = tp.empty("qwen.attention_mask", b * s * s, mask.dtype)
    tp.drop(inverted)
    out = P.efficient_attention(tp, f"{prefix}.sdpa", q, k, v, full_mask, b, a, s, d, flops, on_host=ctx.on_host)
    tp.drop(full_mask, causal)
    return out


def _flash(ctx: RunContext, prefix: str, q: Tensor, k: Tensor, v: Tensor, flops: float) -> Tensor:
    """FlashSelfAttention: batch 1 calls flash_attn_func on the (b, s, h, d) tensors as they are; a larger
    batch with an attention_mask is unpadded even when it is all ones (gather copies of q, k, v for the varlen
    kernel, then pad_input: zeros (b·s, h, d) and an index_put)."""
    tp, m = ctx.tape, ctx.model
    b, s, a, d = ctx.batch, ctx.seq, m.num_attention_heads, m.head_size
    if b == 1:
        return P.flash_attention(tp, f"{prefix}.flash_attn_func", q, k, v, b, a, a, s, d, flops)
    tp.op(f"{prefix}.unpad_input.indices", bytes_moved=ctx.tokens * 16)
    indices = tp.empty("qwen.unpad.indices", ctx.tokens, DType.INT64)
    gathered = [P.contiguous_copy(tp, f"{prefix}.unpad_input.{n}", t) for n, t in zip("qkv", (q, k, v), strict=True)]
    unpadded = P.flash_attention(tp, f"{prefix}.flash_attn_varlen_func", *gathered, b, a, a, s, d, flops)
    tp.drop(*gathered)
    padded = P.contiguous_copy(tp, f"{prefix}.pad_input", unpadded)
    tp.drop(unpadded, indices)
    return padded
