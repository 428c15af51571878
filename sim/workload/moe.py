"""The mixture-of-experts families as transformers 5.24.0 runs them: Mixtral (models/mixtral/modeling_mixtral.py),
Qwen2-MoE (models/qwen2_moe) and Qwen3-MoE (models/qwen3_moe), the Mistral/Qwen2/Qwen3 decoders whose sparse
layers replace the MLP by a router and experts.

The experts are one module with 3-D weights, gate_up_proj (E, 2·i, h) and down_proj (E, h, i), decorated with
@use_experts_implementation (integrations/moe.py). PreTrainedModel.get_correct_experts_implementation picks
"grouped_mm" when the config names none, so the default forward is grouped_mm_experts_forward, modelled here: the
routed (token, expert) pairs sorted by expert, one F.grouped_mm per projection over all of them, the weighted
outputs put back in token order and summed over the k picks. (The per-expert loop of the class's own forward, with
one_hot/where/index_add_, runs only under experts_implementation="eager"; it is not modelled.)

Routing is data-dependent, and this path's memory is not: every tensor it allocates is sized by the S = N·k routed
pairs (N = b·s tokens, k = num_experts_per_tok) or by the whole expert weights, never by one expert's share, so how
the router spreads the tokens changes the GEMMs' work per expert but no byte (grouped_mm's CPU and CUDA kernels
take no per-group workspace from the allocator; the CPU calibration measures it). The one assumption is that the
routing in the recompute of a checkpointed layer picks the same number of pairs, which it always does (top-k).

Router (MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter): F.linear(x, gate.weight) → router_logits (N, E)
in the compute dtype; softmax in fp32 (Mixtral: router_logits.float() first, a copy; Qwen: softmax(dtype=float));
topk; renormalise in place (router_top_value /= sum, Mixtral always, Qwen with norm_topk_prob); Qwen casts the
weights back to the logits' dtype, Mixtral keeps them fp32, which makes the weighted expert outputs fp32.
"""

from dataclasses import dataclass, field

from sim.plan import LoraPlan, ModelShape
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.decoder import DecoderLayer
from sim.workload.hf_decoder import HfDecoder, LinearShapes
from sim.workload.modules import Linear, apply_linear, in_module, make_linear, make_param, plain_linear
from sim.workload.qwen3 import Qwen3
from sim.workload.tape import Param, Tensor

F32, I64, I32 = DType.FLOAT32, DType.INT64, DType.INT32


@dataclass(slots=True)
class MoeBlock:
    """A sparse layer's MoE block: the router weight (E, h), the experts' 3-D weights, and Qwen2-MoE's shared
    expert (gate_proj/up_proj/down_proj) and its (1, h) sigmoid gate; `order` is their creation order."""

    router: Param
    gate_up_proj: Param
    down_proj: Param
    shared: dict[str, Linear] = field(default_factory=dict)
    shared_gate: Linear | None = None
    order: list[Param] = field(default_factory=list)

    def params(self) -> list[Param]:
        """In the order the block's __init__ creates them."""
        return self.order


class MoeDecoder(HfDecoder):
    """HfDecoder whose sparse layers (ModelShape.moe.sparse_layers) run the router and the grouped_mm experts;
    the other layers run the dense MLP of intermediate_size."""

    # MixtralSparseMoeBlock creates gate then experts; Qwen3MoeSparseMoeBlock experts then gate
    ROUTER_FIRST = True
    # MixtralTopKRouter keeps the top-k weights in fp32; the Qwen routers cast them to router_logits' dtype
    WEIGHTS_TO_LOGITS_DTYPE = False

    def moe_block(self, ctx: RunContext, prefix: str, dtype: DType, full: bool, lora: LoraPlan | None) -> MoeBlock:
        """gate.weight (E, h), experts.gate_up_proj (E, 2·i, h), experts.down_proj (E, h, i) (nn.Parameters, not
        nn.Linear: no LoRA target), in creation order."""
        m = ctx.model
        moe, h = m.moe, m.hidden_size
        e, i = moe.num_experts, moe.expert_intermediate_size

        def router() -> Param:
            return make_param(ctx, f"{prefix}.gate.weight", e * h, dtype, full)

        first = router() if self.ROUTER_FIRST else None
        gate_up = make_param(ctx, f"{prefix}.experts.gate_up_proj", e * 2 * i * h, dtype, full)
        down = make_param(ctx, f"{prefix}.experts.down_proj", e * h * i, dtype, full)
        gate = first or router()
        order = [gate, gate_up, down] if self.ROUTER_FIRST else [gate_up, down, gate]
        return MoeBlock(gate, gate_up, down, order=order)

    def mlp(self, ctx: RunContext, layer: DecoderLayer, x: Tensor) -> Tensor:
        """The dense MLP, or in a sparse layer the MoE block's forward."""
        if layer.moe is None:
            return super().mlp(ctx, layer, x)
        return self.sparse_block(ctx, layer.moe, f"{layer.prefix}.mlp", x)

    def sparse_block(self, ctx: RunContext, block: MoeBlock, prefix: str, x: Tensor) -> Tensor:
        """MixtralSparseMoeBlock.forward / Qwen3MoeSparseMoeBlock.forward: x.view(-1, h), the router, the experts,
        reshape back. The router's logits stay bound to `_` until the block returns."""
        tp = ctx.tape
        flat = P.view(tp, x)
        logits, weights, indices = self.router(ctx, block, f"{prefix}.gate", flat)
        out = experts(ctx, block, f"{prefix}.experts", flat, weights, indices)
        tp.drop(flat, logits, weights, indices)
        return out

    def router(self, ctx: RunContext, block: MoeBlock, prefix: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The TopKRouter's forward: (router_logits, top-k weights, top-k int64 expert indices)."""
        tp, m = ctx.tape, ctx.model
        moe, n = m.moe, ctx.tokens
        logits = plain_linear(ctx, prefix, x, block.router, m.hidden_size, moe.num_experts)
        if self.WEIGHTS_TO_LOGITS_DTYPE:  # softmax(router_logits, dtype=torch.float)
            probs = P.softmax(tp, f"{prefix}.softmax", logits, F32)
        else:  # softmax(router_logits.float()): the .float() copy is freed once softmax has run
            logits32 = P.to_dtype(tp, f"{prefix}.float", logits, F32)
            probs = P.softmax(tp, f"{prefix}.softmax", logits32)
            tp.drop(logits32)
        values, indices = P.topk(tp, f"{prefix}.topk", probs, n, moe.experts_per_token)
        tp.drop(probs)  # router_probs: saved by SoftmaxBackward0 where it needs grad
        if moe.norm_topk_prob:  # router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
            total = P.sum_last(tp, f"{prefix}.topk_sum", values, moe.experts_per_token)
            divided = P.div_(tp, f"{prefix}.renormalise", values, total)
            tp.drop(total, values)
            values = divided
        if self.WEIGHTS_TO_LOGITS_DTYPE:  # router_top_value.to(router_logits.dtype)
            cast = P.to_dtype(tp, f"{prefix}.to", values, logits.dtype)
            tp.drop(values)
            values = cast
        return logits, values, indices


def experts(ctx: RunContext, block: MoeBlock, prefix: str, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    """grouped_mm_experts_forward (integrations/moe.py) for x (N, h), the top-k weights and indices (N, k); every
    local is held until it returns. With ZeRO-3 hooks the experts module gathers its two 3-D weights around it."""
    return in_module(ctx, prefix, [block.gate_up_proj, block.down_proj], x,
                     lambda x: _grouped_experts(ctx, block, prefix, x, weights, indices))


def _grouped_experts(ctx: RunContext, block: MoeBlock, prefix: str, x: Tensor, weights: Tensor,
                     indices: Tensor) -> Tensor:
    """The ops of grouped_mm_experts_forward, run inside the experts module's hooks."""
    tp, m = ctx.tape, ctx.model
    moe, h, n = m.moe, m.hidden_size, ctx.tokens
    k, e, i = moe.experts_per_token, moe.num_experts, moe.expert_intermediate_size
    pairs = n * k  # S
    sample_weights = P.view(tp, weights)  # top_k_weights.reshape(-1): contiguous, a view
    expert_ids = tp.alias(indices)  # top_k_index.reshape(-1)
    sorted_ids = P.untracked(tp, f"{prefix}.sort", pairs, I64)  # torch.sort: values and the permutation
    perm = tp.empty(f"{prefix}.sort.indices", pairs, I64)
    token_of = P.untracked(tp, f"{prefix}.floor_divide", pairs, I64)  # perm // num_top_k
    routed = P.index_rows(tp, f"{prefix}.index_hidden", x, token_of, pairs * h)  # hidden_states[perm // k]
    tp.drop(token_of)  # the temporary index: IndexBackward0 keeps it where x needs grad
    routed_weights = P.index_rows(tp, f"{prefix}.index_weights", sample_weights, perm, pairs)
    # histc's input: expert_ids_g.float() on a CPU/MPS device, .int() on CUDA, 4 bytes each either way; histc gives
    # E counts (float32 on CPU, int32 on CUDA), cumsum(dtype=int32) the offsets
    histc_input = P.untracked(tp, f"{prefix}.histc_input", pairs, F32 if ctx.on_host else I32)
    counts = P.untracked(tp, f"{prefix}.histc", e, F32 if ctx.on_host else I32)
    offsets = P.untracked(tp, f"{prefix}.cumsum", e, I32)
    up_in = _to_weight_dtype(ctx, f"{prefix}.gate_up_proj.input", routed, block.gate_up_proj)
    proj = P.grouped_mm(tp, f"{prefix}.gate_up_proj", up_in, block.gate_up_proj, offsets, pairs, h, 2 * i)
    tp.drop(up_in)
    gate, up = P.split(tp, f"{prefix}.chunk", proj, 2)  # _default_apply_gate: act_fn(gate) * up
    tp.drop(proj)
    act = P.silu(tp, f"{prefix}.act_fn", gate)
    gated = P.mul(tp, f"{prefix}.mul", act, up)
    tp.drop(act, gate, up)
    down_in = _to_weight_dtype(ctx, f"{prefix}.down_proj.input", gated, block.down_proj)
    tp.drop(gated)
    down = P.grouped_mm(tp, f"{prefix}.down_proj", down_in, block.down_proj, offsets, pairs, i, h)
    tp.drop(down_in)
    scale = P.view(tp, routed_weights)  # sample_weights_g.unsqueeze(-1)
    weighted = P.mul(tp, f"{prefix}.routing_weights", down, scale)  # fp32 where the weights are (Mixtral)
    tp.drop(scale)
    inv_perm = P.untracked(tp, f"{prefix}.inv_perm", pairs, I64)  # torch.empty_like(perm)
    positions = P.untracked(tp, f"{prefix}.arange", pairs, I64)  # inv_perm[perm] = torch.arange(S)
    tp.op(f"{prefix}.inv_perm.index_put_", bytes_moved=3 * pairs * I64.size_bytes)
    tp.drop(positions)
    ordered = P.index_rows(tp, f"{prefix}.restore_order", weighted, inv_perm, pairs * h)
    tp.drop(weighted)  # weighted_out rebound to the reordered rows
    # .view(N, k, h).sum(dim=1): the grad comes back through sum's expand, which the view's backward must copy
    grouped = P.view(tp, ordered, backward_copies=True)
    summed = P.sum_last(tp, f"{prefix}.sum", grouped, k)
    tp.drop(grouped)
    out = P.to_dtype(tp, f"{prefix}.to", summed, x.dtype)  # final_hidden_states.to(hidden_states.dtype)
    tp.drop(summed, ordered, down, routed, routed_weights, sample_weights, expert_ids, sorted_ids, perm,
            histc_input, counts, offsets, inv_perm)
    return out


def _to_weight_dtype(ctx: RunContext, name: str, x: Tensor, w: Param) -> Tensor:
    """_grouped_mm's input.to(weight.dtype): grouped_mm is not autocast-enabled, so the input meets the weight's
    own dtype (a copy where they differ)."""
    return P.to_dtype(ctx.tape, name, x, w.tensor.dtype)


class Mixtral(MoeDecoder):
    """MixtralForCausalLM: Mistral's attention, every layer sparse, top-k weights kept in fp32."""

    # the router and the experts are nn.Parameters of non-Linear modules: only attention and lm_head are nn.Linear;
    # LoRA targets the attention only (PEFT's "all-linear" also wraps the router and experts: refused, check_moe)
    LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")

    def attention_shapes(self, m: ModelShape) -> LinearShapes:
        """q/k/v/o without biases whatever the config says (MixtralAttention.__init__: bias=False)."""
        return {name: (fan_in, fan_out, False) for name, (fan_in, fan_out, _) in super().attention_shapes(m).items()}


class Qwen2Moe(MoeDecoder):
    """Qwen2MoeForCausalLM: Qwen2's attention with q/k/v biases by config.qkv_bias; each sparse block adds a
    shared expert (a gated MLP of shared_expert_intermediate_size on every token) scaled by sigmoid of a (1, h)
    shared_expert_gate linear; the router casts the top-k weights to the logits' dtype."""

    WEIGHTS_TO_LOGITS_DTYPE = True
    # the shared expert's (and dense layers') gate/up/down_proj and the shared_expert_gate are nn.Linear
    LINEAR_MODULES = HfDecoder.LINEAR_MODULES + ("shared_expert_gate",)

    def attention_shapes(self, m: ModelShape) -> LinearShapes:
        """q/k/v with config.qkv_bias, o_proj without (Qwen2MoeAttention.__init__)."""
        shapes = super().attention_shapes(m)
        return {name: (fan_in, fan_out, m.moe.qkv_bias and name != "o_proj")
                for name, (fan_in, fan_out, _) in shapes.items()}

    def moe_block(self, ctx: RunContext, prefix: str, dtype: DType, full: bool, lora: LoraPlan | None) -> MoeBlock:
        """gate, experts, then shared_expert (gate_proj/up_proj/down_proj, no biases) and shared_expert_gate (h → 1)
        (Qwen2MoeSparseMoeBlock.__init__)."""
        block = super().moe_block(ctx, prefix, dtype, full, lora)
        h, shared = ctx.model.hidden_size, ctx.model.moe.shared_expert_intermediate_size
        for name, fan_in, fan_out in (("gate_proj", h, shared), ("up_proj", h, shared), ("down_proj", shared, h)):
            block.shared[name] = make_linear(ctx, f"{prefix}.shared_expert.{name}", fan_in, fan_out, False, dtype,
                                             full, lora, name)
            block.order += block.shared[name].params()
        block.shared_gate = make_linear(ctx, f"{prefix}.shared_expert_gate", h, 1, False, dtype, full, lora,
                                        "shared_expert_gate")
        block.order += block.shared_gate.params()
        return block

    def sparse_block(self, ctx: RunContext, block: MoeBlock, prefix: str, x: Tensor) -> Tensor:
        """Qwen2MoeSparseMoeBlock.forward: the shared expert first, then router and experts, then
        sigmoid(shared_expert_gate(x)) * shared_out added to the experts' output."""
        tp = ctx.tape
        flat = P.view(tp, x)
        shared = self.gated_mlp(ctx, f"{prefix}.shared_expert", block.shared, flat)
        logits, weights, indices = self.router(ctx, block, f"{prefix}.gate", flat)
        routed = experts(ctx, block, f"{prefix}.experts", flat, weights, indices)
        gate_logit = apply_linear(ctx, block.shared_gate, flat)
        gate = P.sigmoid(tp, f"{prefix}.shared_expert_gate.sigmoid", gate_logit)
        tp.drop(gate_logit)
        scaled = P.mul(tp, f"{prefix}.shared_expert_scale", gate, shared)
        tp.drop(gate, shared)
        out = P.add(tp, f"{prefix}.add_shared", routed, scaled)
        tp.drop(routed, scaled, flat, logits, weights, indices)
        return out


class Qwen3Moe(MoeDecoder, Qwen3):
    """Qwen3MoeForCausalLM: Qwen3's attention (q_norm/k_norm over head_dim, config.attention_bias), experts created
    before the router, the top-k weights cast to the logits' dtype."""

    ROUTER_FIRST = False
    WEIGHTS_TO_LOGITS_DTYPE = True
    # LoRA on the attention only: what PEFT does to the router and the experts is not modelled (check_moe)
    LINEAR_MODULES = Mixtral.LINEAR_MODULES
