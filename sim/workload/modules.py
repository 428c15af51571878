"""The modules every modelled family is built from: parameters, Linear as nn.Linear, PEFT LoRA and
torch.autocast run it, and RMSNorm."""

from dataclasses import dataclass

from sim.ops import Category
from sim.plan import LoraPlan
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.context import RunContext
from sim.workload.tape import Param, Tensor


@dataclass(slots=True)
class Linear:
    """An nn.Linear (weight out×in), optionally wrapped by a PEFT LoRA layer (A: r×in, B: out×r)."""

    name: str
    in_features: int
    out_features: int
    weight: Param
    bias: Param | None = None
    lora_a: Param | None = None
    lora_b: Param | None = None
    lora_dropout: float = 0.0

    def params(self) -> list[Param]:
        return [p for p in (self.weight, self.bias, self.lora_a, self.lora_b) if p is not None]


def make_param(ctx: RunContext, name: str, numel: int, dtype: DType, trainable: bool) -> Param:
    """A parameter, resident on the device unless module hooks (ZeRO-3) gather it when its module runs."""
    return ctx.tape.parameter(name, numel, dtype, trainable, Category.PARAMETERS, resident=ctx.module_hooks is None)


def make_linear(ctx: RunContext, name: str, fan_in: int, fan_out: int, has_bias: bool, dtype: DType, full: bool,
                lora: LoraPlan | None, module: str) -> Linear:
    """nn.Linear(fan_in, fan_out) named `name`, its weight then its bias; PEFT wraps it in a LoRA layer (A: r×in,
    B: out×r, in the adapter dtype) when the LoRA config targets `module`."""
    weight = make_param(ctx, f"{name}.weight", fan_in * fan_out, dtype, full)
    bias = make_param(ctx, f"{name}.bias", fan_out, dtype, full) if has_bias else None
    lin = Linear(name, fan_in, fan_out, weight, bias)
    if _targets(lora, module):
        adapter = ctx.adapter_dtype or dtype
        lin.lora_a = make_param(ctx, f"{name}.lora_A.default.weight", lora.r * fan_in, adapter, True)
        lin.lora_b = make_param(ctx, f"{name}.lora_B.default.weight", fan_out * lora.r, adapter, True)
        lin.lora_dropout = lora.lora_dropout
    return lin


def _targets(lora: LoraPlan | None, module: str) -> bool:
    """Whether PEFT wraps the linear module `module` in a LoRA layer."""
    if lora is None:
        return False
    if lora.target_modules == "all-linear":  # PEFT: every nn.Linear except the output layer
        return module != "lm_head"
    return module in lora.target_modules


def in_module(ctx: RunContext, module: str, params: list[Param], x: Tensor, compute) -> Tensor:
    """Run `compute(x)` as the forward of module `module` owning `params`: under ZeRO-3 with its pre- and
    post-forward hooks (gather before, release after, and the matching backward hooks)."""
    hooks = ctx.module_hooks
    if hooks is None:
        return compute(x)
    hooked = hooks.pre_forward(module, params, x)
    out = compute(hooked if hooked is not None else x)
    ctx.tape.drop(hooked)
    wrapped = hooks.post_forward(module, out)
    if wrapped is None:
        return out
    ctx.tape.drop(out)
    return wrapped


def autocast_input(ctx: RunContext, name: str, x: Tensor) -> Tensor:
    """Autocast casts a floating input of a lower-precision op to the autocast dtype (not cached)."""
    if ctx.autocast is None or x.dtype is ctx.autocast:
        return ctx.tape.alias(x)
    return P.to_dtype(ctx.tape, f"{name}.autocast_input", x, ctx.autocast)


def autocast_param(ctx: RunContext, param: Param) -> Tensor:
    """Autocast's weight cast. Leaf params that require grad are cast once per autocast region and cached
    (aten/src/ATen/autocast_mode.cpp cached_cast: fp32 leaf, requires_grad, cache enabled); frozen ones are
    cast at every use."""
    tensor = param.tensor
    if ctx.autocast is None or tensor.dtype is ctx.autocast:
        return ctx.tape.alias(tensor)
    if not tensor.requires_grad:
        return P.to_dtype(ctx.tape, f"{param.name}.autocast", tensor, ctx.autocast)
    cached = ctx.cast_cache.get(param.name)
    if cached is None:
        cached = P.to_dtype(ctx.tape, f"{param.name}.autocast", tensor, ctx.autocast)
        cached.storage.category = Category.PARAMETERS
        ctx.cast_cache[param.name] = cached
    return ctx.tape.alias(cached)


def plain_linear(ctx: RunContext, name: str, x: Tensor, weight: Param, in_features: int, out_features: int,
                 bias: Param | None = None) -> Tensor:
    """F.linear, through autocast's casts when it is active."""
    tp = ctx.tape

    def compute(x: Tensor) -> Tensor:
        x_cast = autocast_input(ctx, name, x)
        w_cast = autocast_param(ctx, weight)
        b_cast = autocast_param(ctx, bias) if bias is not None else None
        out = P.linear(tp, name, x_cast, w_cast, in_features, out_features, b_cast)
        tp.drop(x_cast, w_cast, b_cast)
        return out

    return in_module(ctx, name, [weight] + ([bias] if bias is not None else []), x, compute)


def apply_linear(ctx: RunContext, lin: Linear, x: Tensor) -> Tensor:
    """nn.Linear, or PEFT's lora.Linear.forward: base(x) + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling, a new
    tensor cast back to the base result's dtype (peft/tuners/lora/layer.py, 0.9+); PEFT <= 0.8 adds in place into
    the base result and casts the sum to x's dtype (behaviour._peft_lora_add_in_place)."""
    tp = ctx.tape
    result = plain_linear(ctx, lin.name, x, lin.weight, lin.in_features, lin.out_features, lin.bias)
    if lin.lora_a is None or lin.lora_b is None:
        return result
    in_place = ctx.behaviour.peft_lora_add_in_place
    # the sum is cast to previous_dtype = x.dtype (taken before x.to(lora_A.weight.dtype)) up to 0.8, else to the
    # base result's dtype
    cast_to = x.dtype if in_place else result.dtype
    rank = lin.lora_a.tensor.numel // lin.in_features
    x_adapter = P.to_dtype(tp, f"{lin.name}.lora_input_cast", x, lin.lora_a.tensor.dtype)
    dropped = P.dropout(tp, f"{lin.name}.lora_dropout", x_adapter, lin.lora_dropout)
    tp.drop(x_adapter)
    a_out = plain_linear(ctx, f"{lin.name}.lora_A", dropped, lin.lora_a, lin.in_features, rank)
    tp.drop(dropped)
    b_out = plain_linear(ctx, f"{lin.name}.lora_B", a_out, lin.lora_b, rank, lin.out_features)
    tp.drop(a_out)
    scaled = P.mul_scalar(tp, f"{lin.name}.lora_scaling", b_out)
    tp.drop(b_out)
    if in_place:
        summed = P.add_(tp, f"{lin.name}.lora_add_", result, scaled)
    else:
        summed = P.add(tp, f"{lin.name}.lora_add", result, scaled)
    tp.drop(result, scaled)
    out = P.to_dtype(tp, f"{lin.name}.lora_result_cast", summed, cast_to)
    tp.drop(summed)
    return out


def rms_norm(ctx: RunContext, name: str, x: Tensor, w: Param, dim: int | None = None) -> Tensor:
    """Qwen2RMSNorm/LlamaRMSNorm: x.to(fp32); var = x.pow(2).mean(-1, keepdim=True);
    x = x * rsqrt(var + eps); return weight * x.to(input_dtype). `dim`: the normalised last dimension (hidden
    size unless given: Qwen3's q_norm/k_norm normalise each head's head_dim)."""
    return in_module(ctx, name, [w], x, lambda x: _rms_norm(ctx, name, x, w, dim or ctx.model.hidden_size))


def _rms_norm(ctx: RunContext, name: str, x: Tensor, w: Param, h: int) -> Tensor:
    """The ops of rms_norm over a last dimension of h, run inside the module's ZeRO-3 hooks."""
    tp = ctx.tape
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


def maybe_saved_copy(ctx: RunContext, name: str, numel: int, dtype: DType, full: bool, lora: LoraPlan | None,
                      module: str) -> Param:
    """The parameter a module's forward uses: with PEFT modules_to_save naming the module, ModulesToSaveWrapper keeps
    the original frozen and trains a deepcopy of it (peft/utils/other.py ModulesToSaveWrapper: original_module and
    modules_to_save[adapter] = copy.deepcopy(original_module)); else the module's own."""
    base = make_param(ctx, name, numel, dtype, full)
    if lora is not None and module in lora.modules_to_save:
        return make_param(ctx, name.replace(".weight", ".modules_to_save.default.weight"), numel, dtype, True)
    return base
