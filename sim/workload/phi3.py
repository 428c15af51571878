"""Phi-3 (transformers models/phi3/modeling_phi3.py, read at 5.24.0): the Llama decoder with fused projections.

- Phi3Attention: qkv = qkv_proj(x), one (b, s, (a + 2k)·d) output; q, k, v are slices of it (qkv[..., :a·d] ...),
  each .view(b, s, heads, d).transpose(1, 2). Each slice's backward (slice_backward) allocates zeros of the whole
  qkv output and copies its grad in; autograd sums the three.
- apply_rotary_pos_emb with partial rotary support: q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:];
  q_embed = cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass]): with the full rotary of the published configs
  q_pass is empty, yet the cat copies the rotated q and both slices' backwards allocate q-sized zeros.
- Phi3MLP: up_states = gate_up_proj(x); gate, up_states = up_states.chunk(2, dim=-1);
  down_proj(up_states * act(gate)): the gate and up halves are views of the one (b, s, 2i) output.
- The residual dropouts (resid_pdrop) and the embedding dropout are 0 in the published configs and refused
  otherwise (sim/resolve.py); a config's sliding_window makes the mask a sliding-window one (create_sliding_window_
  causal_mask), of the causal mask's size; under sdpa a bool one once s reaches the window (hf_decoder.py).
"""

from sim.plan import ModelShape
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.decoder import DecoderLayer
from sim.workload.hf_decoder import HfDecoder, LinearShapes, apply_rotary
from sim.workload.modules import apply_linear
from sim.workload.tape import Tensor
from sim.vocab import AttnImplementation


class Phi3(HfDecoder):
    """Phi3ForCausalLM: qkv_proj and gate_up_proj fused, sliced and chunked in the forward."""

    LINEAR_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    ROTARY_OUTPUT_CONTIGUOUS = True  # the cat allocates q_embed/k_embed in their own (b, heads, s, d) layout

    def attention_shapes(self, m: ModelShape) -> LinearShapes:
        """o_proj then qkv_proj (Phi3Attention.__init__ creates them in that order), no biases."""
        h, d, a, kvh = m.hidden_size, m.head_size, m.num_attention_heads, m.kv_heads
        return {"o_proj": (a * d, h, False), "qkv_proj": (h, (a + 2 * kvh) * d, False)}

    def mlp_shapes(self, m: ModelShape) -> LinearShapes:
        """gate_up_proj (h → 2i) and down_proj, no biases."""
        h, i = m.hidden_size, m.intermediate_size
        return {"gate_up_proj": (h, 2 * i, False), "down_proj": (i, h, False)}

    def query_key_value(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slices of qkv_proj(x), each viewed as (b, heads, s, d); q and k's view backwards copy (their grads leave
        the rotary in another layout), v's in eager only, as in Llama."""
        tp, m, n = ctx.tape, ctx.model, ctx.tokens
        qkv = apply_linear(ctx, layer.linears["qkv_proj"], x)
        eager = ctx.attn is AttnImplementation.EAGER
        out = []
        for heads, copies in ((m.num_attention_heads, True), (m.kv_heads, True), (m.kv_heads, eager)):
            part = P.slice_view(tp, qkv, n * heads * m.head_size)
            out.append(P.view(tp, part, backward_copies=copies))
            tp.drop(part)
        tp.drop(qkv)
        return out[0], out[1], out[2]

    def rotate(self, ctx: RunContext, name: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """cat([rotate(x[..., :rotary_dim]), x[..., rotary_dim:]]) with rotary_dim = head_dim: the pass-through
        part is empty, the cat a copy."""
        tp = ctx.tape
        rotary_part, passed = P.slice_view(tp, x, x.numel), P.slice_view(tp, x, 0)
        rotated = apply_rotary(ctx, name, rotary_part, cos, sin)
        tp.drop(rotary_part)
        out = P.cat(tp, f"{name}.cat", [rotated, passed])
        tp.drop(rotated, passed)
        return out

    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """down_proj(up * act(gate)) with gate, up = gate_up_proj(x).chunk(2, dim=-1)."""
        tp, lin, prefix = ctx.tape, layer.linears, f"{layer.prefix}.mlp"
        gate_up = apply_linear(ctx, lin["gate_up_proj"], x)
        gate, up = P.split(tp, f"{prefix}.chunk", gate_up, 2)
        tp.drop(gate_up)
        act = P.silu(tp, f"{prefix}.activation_fn", gate)
        product = P.mul(tp, f"{prefix}.mul", up, act)
        tp.drop(act, gate, up)
        out = apply_linear(ctx, lin["down_proj"], product)
        tp.drop(product)
        return out
