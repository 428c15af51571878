"""Qwen3 (transformers models/qwen3/modeling_qwen3.py, 4.51.0 onward): the Qwen2/Llama decoder with an RMSNorm over
each head's head_dim on the query and key projections, and head_dim given by the config (128 in every published
size, not hidden_size / heads).

Qwen3Attention.forward: query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2),
the same for k with k_norm, v without a norm; the rotary embedding, the attention interface and o_proj as Llama's.
q/k/v/o take config.attention_bias (False in the published configs); the MLP is Qwen2's gated SiLU MLP.
"""

from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.decoder import DecoderLayer
from sim.workload.hf_decoder import HfDecoder
from sim.workload.modules import apply_linear, make_param, rms_norm
from sim.workload.tape import Param, Tensor


class Qwen3(HfDecoder):
    """Qwen3ForCausalLM: HfDecoder with q_norm/k_norm (Qwen3RMSNorm(head_dim)) on the projected q and k."""

    def layer_norms(self, ctx: RunContext, prefix: str, full: bool) -> dict[str, Param]:
        """self_attn.q_norm and self_attn.k_norm: one head_dim weight each, in the weights dtype."""
        m = ctx.model
        return {name: make_param(ctx, f"{prefix}.self_attn.{name}.weight", m.head_size, m.weights_dtype, full)
                for name in ("q_norm", "k_norm")}

    def query_key(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> tuple[Tensor, Tensor]:
        """norm(proj(x).view(b, s, heads, d)).transpose(1, 2) for q and k. The norm runs on the contiguous
        (b, s, heads, d) view and saves its fp32 input and rsqrt like any RMSNorm; the grad reaching the view
        comes back through the transpose in (b, heads, s, d) layout, so the view's backward (the reshape to
        (b, s, heads·d)) copies, as Llama's does."""
        tp, d = ctx.tape, ctx.model.head_size
        out = []
        for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            heads = P.view(tp, apply_linear(ctx, layer.linears[proj], x), backward_copies=True)
            tp.release(heads.storage)  # the view holds the projection output
            normed = rms_norm(ctx, f"{layer.prefix}.self_attn.{norm}", heads, layer.norms[norm], dim=d)
            tp.drop(heads)
            out.append(P.view(tp, normed))  # .transpose(1, 2): a view whose backward is a view
            tp.release(normed.storage)
        return out[0], out[1]
