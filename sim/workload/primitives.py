"""Primitive tensor ops with the memory behaviour of their PyTorch kernels and autograd formulas.

Each primitive emits one op that allocates its output, records the autograd node with exactly the tensors
PyTorch saves (tools/autograd/derivatives.yaml: a tensor is saved only when a formula of an input that
requires grad uses it), and gives the node a backward that allocates what the backward kernels allocate.
Shapes are reduced to element counts; the arithmetic per kernel is given where it is not obvious.
"""

from sim.ops import OpKind
from sim.vocab import DType
from sim.workload.tape import Node, Param, Tape, Tensor

F32 = DType.FLOAT32
I64 = DType.INT64


def promote(a: DType, b: DType) -> DType:
    """Type promotion between floating dtypes: the wider wins (fp32 over bf16/fp16)."""
    if a is b:
        return a
    if F32 in (a, b):
        return F32
    return F32  # bf16 with fp16 promotes to fp32


def _grad_for(tp: Tape, name: str, numel: int, dtype: DType, target: Tensor, flops: float = 0.0,
              kind: OpKind = OpKind.MEMORY) -> Tensor:
    """Allocate a gradient of `numel` elements; reduce it to `target`'s size when `target` was broadcast."""
    tp.op(name, flops=flops, bytes_moved=2 * numel * dtype.size_bytes, kind=kind)
    if kind is OpKind.GEMM:
        tp.first_gemm()
    grad = tp.empty(f"{name}.out", numel, dtype)
    if target.numel < numel:  # engine.cpp validate_outputs: at::sum_to the input's shape
        tp.op(f"{name}.sum_to", bytes_moved=numel * dtype.size_bytes)
        reduced = tp.empty(f"{name}.sum_to.out", target.numel, dtype)
        tp.drop(grad)
        grad = reduced
    return grad


# ---- leaf-level helpers ---------------------------------------------------------------------------------------
def input_tensor(tp: Tape, name: str, numel: int, dtype: DType = I64) -> Tensor:
    """A batch tensor copied to the device (input_ids, labels, attention_mask); an activation once saved."""
    tp.op(f"{name}.to_device", bytes_moved=numel * dtype.size_bytes)
    return tp.empty(name, numel, dtype)


def weight(p: Param | Tensor) -> Tensor:
    return p.tensor if isinstance(p, Param) else p


# ---- casts, views, copies -------------------------------------------------------------------------------------
def to_dtype(tp: Tape, name: str, x: Tensor, dtype: DType) -> Tensor:
    """x.to(dtype): the same tensor when the dtype already matches, else a copy (ToCopyBackward saves nothing)."""
    if x.dtype is dtype:
        return tp.alias(x)
    tp.op(name, bytes_moved=x.numel * (x.dtype.size_bytes + dtype.size_bytes))
    out = tp.empty(f"{name}.out", x.numel, dtype)
    node = tp.record(name, [x], [], _to_dtype_backward, numel=x.numel, dtype=x.dtype)
    return tp.output(out, node)


def _to_dtype_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [_grad_for(tp, f"{node.name}.backward", node.ctx["numel"], node.ctx["dtype"], node.inputs[0])]


def view(tp: Tape, x: Tensor, numel: int | None = None, backward_copies: bool = False) -> Tensor:
    """view/transpose/unsqueeze: no memory. Its backward is a view too, unless the grad arrives in another
    layout and the inverse reshape must copy (`backward_copies`: e.g. q.view(b,s,a,d).transpose(1,2) whose
    grad comes back contiguous in (b,a,s,d) from eager attention's bmm)."""
    out = tp.alias(x, numel)
    if x.requires_grad and tp.grad_enabled:
        node = tp.record("view", [x], [], _view_backward, numel=x.numel, copies=backward_copies)
        out = tp.output(out, node)
    return out


def _view_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    if node.ctx["copies"]:
        tp.op("view.backward.reshape_copy", bytes_moved=2 * grad.size_bytes)
        return [tp.empty("view_backward.copy", node.ctx["numel"], grad.dtype)]
    return [tp.alias(grad, node.ctx["numel"], view=True)]


def contiguous_copy(tp: Tape, name: str, x: Tensor, numel: int | None = None, backward_copies: bool = False) -> Tensor:
    """.contiguous()/.clone()/reshape of a non-contiguous view: a copy whose backward passes the grad through,
    or (`backward_copies`) copies it back when the consumer of that grad needs the original layout
    (eager's transpose(1, 2).contiguous(): UnsafeViewBackward's clone before the second bmm's backward)."""
    numel = x.numel if numel is None else numel
    tp.op(name, bytes_moved=2 * numel * x.dtype.size_bytes)
    out = tp.empty(f"{name}.out", numel, x.dtype)
    if backward_copies:
        node = tp.record(name, [x], [], _view_backward, numel=numel, copies=True)
    else:
        node = tp.record(name, [x], [], _passthrough_backward)
    return tp.output(out, node)


def _passthrough_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [tp.alias(grad)]


def split(tp: Tape, name: str, x: Tensor, parts: int) -> list[Tensor]:
    """tensor.split(size, dim=-1) into equal views. SplitBackward waits for the grads of all parts, then
    concatenates them into one new tensor of x's size (missing grads as zeros)."""
    numel = x.numel // parts
    node = tp.record(name, [x], [], _split_backward, numel=x.numel)
    outs = []
    for index in range(parts):
        out = tp.alias(x, numel, view=True)
        if node is not None:
            out.node, out.requires_grad, out.output_index = node, True, index
        outs.append(out)
    if node is not None:
        node.output_grads = [None] * parts
    return outs


def _split_backward(tp: Tape, node: Node, grad: Tensor | None) -> list:
    grads = [g for g in node.output_grads if g is not None]
    tp.op(f"{node.name}.backward", bytes_moved=2 * node.ctx["numel"] * grads[0].dtype.size_bytes)
    out = tp.empty(f"{node.name}.backward.out", node.ctx["numel"], grads[0].dtype)
    tp.drop(*grads)
    node.output_grads = [None] * len(node.output_grads)
    return [out]


def slice_view(tp: Tape, x: Tensor, numel: int) -> Tensor:
    """A narrow/slice view; SliceBackward (slice_backward) allocates zeros of the full size and copies into it."""
    out = tp.alias(x, numel)
    if x.requires_grad and tp.grad_enabled:
        node = tp.record("slice", [x], [], _slice_backward, full=x.numel)
        out = tp.output(out, node)
    return out


def _slice_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    tp.op("slice.backward", bytes_moved=node.ctx["full"] * grad.dtype.size_bytes)
    return [tp.empty("slice_backward.out", node.ctx["full"], grad.dtype)]


def expand_copy(tp: Tape, name: str, x: Tensor, factor: int) -> Tensor:
    """x[:, :, None].expand(..., n_rep, ...).reshape(...): a copy n_rep times larger; ExpandBackward sums back."""
    if factor == 1:
        return tp.alias(x)
    tp.op(name, bytes_moved=(1 + factor) * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel * factor, x.dtype)
    node = tp.record(name, [x], [], _expand_backward, numel=x.numel)
    return tp.output(out, node)


def _expand_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    tp.op(f"{node.name}.backward", bytes_moved=grad.size_bytes)
    return [tp.empty(f"{node.name}.backward.out", node.ctx["numel"], grad.dtype)]


def cat(tp: Tape, name: str, parts: list[Tensor]) -> Tensor:
    """torch.cat: a new tensor; CatBackward hands each input a narrow view of the grad."""
    numel = sum(p.numel for p in parts)
    dtype = parts[0].dtype
    tp.op(name, bytes_moved=2 * numel * dtype.size_bytes)
    out = tp.empty(f"{name}.out", numel, dtype)
    node = tp.record(name, parts, [], _cat_backward, numels=[p.numel for p in parts])
    return tp.output(out, node)


def _cat_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [tp.alias(grad, n, view=True) if inp is not None else None
            for inp, n in zip(node.inputs, node.ctx["numels"], strict=True)]


# ---- pointwise --------------------------------------------------------------------------------------------------
def mul(tp: Tape, name: str, a: Tensor, b: Tensor) -> Tensor:
    """a * b with broadcasting; MulBackward0 saves `b` if a needs grad and `a` if b needs grad."""
    numel = max(a.numel, b.numel)
    dtype = promote(a.dtype, b.dtype)
    tp.op(name, flops=numel, bytes_moved=(a.numel + b.numel + numel) * dtype.size_bytes)
    out = tp.empty(f"{name}.out", numel, dtype)
    saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])
    node = tp.record(name, [a, b], saved, _mul_backward, numel=numel, a=a, b=b)
    return tp.output(out, node)


def _mul_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    # mul_tensor_backward: (grad * other).to(self dtype), then sum_to the input's shape when it was broadcast.
    grads: list = []
    for target, other in ((node.ctx["a"], node.ctx["b"]), (node.ctx["b"], node.ctx["a"])):
        if not target.requires_grad:
            grads.append(None)
            continue
        dtype = promote(grad.dtype, other.dtype)
        g = _grad_for(tp, f"{node.name}.backward", node.ctx["numel"], dtype, target, flops=node.ctx["numel"])
        if g.dtype is not target.dtype and g.numel == node.ctx["numel"]:
            cast = _grad_for(tp, f"{node.name}.backward.to", g.numel, target.dtype, target)
            tp.drop(g)
            g = cast
        grads.append(g)
    return grads


def mul_scalar(tp: Tape, name: str, x: Tensor) -> Tensor:
    """x * python_scalar: saves nothing; backward is grad * scalar (a new tensor)."""
    tp.op(name, flops=x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [], _scale_backward, numel=x.numel)
    return tp.output(out, node)


def _scale_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [_grad_for(tp, f"{node.name}.backward", node.ctx["numel"], grad.dtype, node.inputs[0])]


def add(tp: Tape, name: str, a: Tensor, b: Tensor) -> Tensor:
    """a + b: saves nothing; AddBackward0 hands the same grad to both inputs."""
    numel = max(a.numel, b.numel)
    dtype = promote(a.dtype, b.dtype)
    tp.op(name, flops=numel, bytes_moved=(a.numel + b.numel + numel) * dtype.size_bytes)
    out = tp.empty(f"{name}.out", numel, dtype)
    node = tp.record(name, [a, b], [], _add_backward, numel=numel)
    return tp.output(out, node)


def add_(tp: Tape, name: str, a: Tensor, b: Tensor) -> Tensor:
    """a += b in place: no new tensor, `a` keeps its dtype (b is cast inside the kernel); the result is `a`'s
    storage with AddBackward0 as its history (saves nothing, hands the grad to both inputs)."""
    tp.op(name, flops=a.numel, bytes_moved=2 * a.size_bytes + b.size_bytes)
    node = tp.record(name, [a, b], [], _add_backward, numel=a.numel)
    return tp.output(tp.alias(a), node)


def _add_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    grads: list = []
    for target in node.inputs:
        if target is None:
            grads.append(None)
        elif target.numel < grad.numel:
            tp.op(f"{node.name}.backward.sum_to", bytes_moved=grad.size_bytes)
            grads.append(tp.empty(f"{node.name}.sum_to.out", target.numel, grad.dtype))
        else:
            grads.append(tp.alias(grad))
    return grads


def add_scalar(tp: Tape, name: str, x: Tensor) -> Tensor:
    """x + python_scalar: a new tensor; the grad passes through."""
    tp.op(name, flops=x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [], _passthrough_backward)
    return tp.output(out, node)


def neg(tp: Tape, name: str, x: Tensor) -> Tensor:
    tp.op(name, flops=x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [], _scale_backward, numel=x.numel)
    return tp.output(out, node)


def silu(tp: Tape, name: str, x: Tensor) -> Tensor:
    """F.silu: saves its input; silu_backward allocates the grad input."""
    tp.op(name, flops=4 * x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [x], _same_size_backward, numel=x.numel)
    return tp.output(out, node)


def _same_size_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    target = node.inputs[0]
    return [_grad_for(tp, f"{node.name}.backward", node.ctx["numel"], target.dtype, target, flops=node.ctx["numel"])]


def tanh(tp: Tape, name: str, x: Tensor) -> Tensor:
    """torch.tanh: TanhBackward0 saves its result; tanh_backward(grad, result) allocates the grad input."""
    tp.op(name, flops=4 * x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [out], _same_size_backward, numel=x.numel)
    return tp.output(out, node)


def softcap(tp: Tape, name: str, x: Tensor) -> Tensor:
    """Gemma 2's soft-capping, x = x / cap; x = torch.tanh(x); x = x * cap: three tensors of x's size and dtype
    in turn, each local rebound; only tanh's result is saved."""
    divided = mul_scalar(tp, f"{name}.div", x)
    capped = tanh(tp, f"{name}.tanh", divided)
    tp.drop(divided)
    out = mul_scalar(tp, f"{name}.mul", capped)
    tp.drop(capped)
    return out


def gelu(tp: Tape, name: str, x: Tensor) -> Tensor:
    """F.gelu: saves its input; gelu_backward allocates the grad input."""
    tp.op(name, flops=8 * x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [x], _same_size_backward, numel=x.numel)
    return tp.output(out, node)


def layer_norm(tp: Tape, name: str, x: Tensor, w: Tensor, b: Tensor, last: int) -> Tensor:
    """F.layer_norm (native_layer_norm): output plus fp32 mean and rstd per row, saving input, mean, rstd,
    weight and bias; backward allocates grad input, grad weight and grad bias."""
    rows = x.numel // last
    tp.op(name, flops=8 * x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    mean = tp.empty(f"{name}.mean", rows, F32)
    rstd = tp.empty(f"{name}.rstd", rows, F32)
    node = tp.record(name, [x, w, b], [x, mean, rstd, w, b], _layer_norm_backward, numel=x.numel)
    tp.drop(mean, rstd)
    return tp.output(out, node)


def _layer_norm_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    tp.op(f"{node.name}.backward", flops=10 * grad.numel, bytes_moved=3 * grad.size_bytes)
    return [tp.empty(f"{node.name}.backward.{part}", t.numel, t.dtype) if t is not None else None
            for part, t in zip(("input", "weight", "bias"), node.inputs, strict=True)]


def pow2(tp: Tape, name: str, x: Tensor) -> Tensor:
    """x.pow(2): saves x. pow_backward computes grad * (2 * x.pow(1)): three tensors of x's size."""
    tp.op(name, flops=x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [x], _pow2_backward, numel=x.numel)
    return tp.output(out, node)


def _pow2_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    # torch/csrc/autograd/FunctionsManual.cpp pow_backward: `grad * (exp * self.pow(exp - 1)).conj()`, one C++
    # full expression: self.pow(1) and the scaled copy are temporaries destroyed at its end, after the product
    # exists (measured on CPU: three x-sized buffers live at once, then two frees).
    numel, dtype = node.ctx["numel"], node.inputs[0].dtype
    tp.op(f"{node.name}.backward.pow1", bytes_moved=2 * numel * dtype.size_bytes)
    pow1 = tp.empty("pow1", numel, dtype)
    tp.op(f"{node.name}.backward.scale", bytes_moved=2 * numel * dtype.size_bytes)
    scaled = tp.empty("pow_scaled", numel, dtype)
    out = _grad_for(tp, f"{node.name}.backward", numel, dtype, node.inputs[0], flops=numel)
    tp.drop(pow1, scaled)
    return [out]


def rsqrt(tp: Tape, name: str, x: Tensor) -> Tensor:
    """torch.rsqrt: saves its result; backward -0.5 * grad * result.pow(3) makes three tensors of its size."""
    tp.op(name, flops=x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [out], _rsqrt_backward, numel=x.numel)
    return tp.output(out, node)


def _rsqrt_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    numel, dtype = node.ctx["numel"], node.inputs[0].dtype
    tp.op(f"{node.name}.backward.scale", bytes_moved=2 * numel * dtype.size_bytes)
    scaled = tp.empty("rsqrt_grad_scaled", numel, dtype)
    tp.op(f"{node.name}.backward.pow3", bytes_moved=2 * numel * dtype.size_bytes)
    cube = tp.empty("rsqrt_pow3", numel, dtype)
    out = _grad_for(tp, f"{node.name}.backward", numel, dtype, node.inputs[0], flops=numel)
    tp.drop(scaled, cube)
    return [out]


def mean_last(tp: Tape, name: str, x: Tensor, last: int) -> Tensor:
    """x.mean(-1, keepdim=True): saves nothing but sizes; backward grad.expand(shape) / n allocates x's size."""
    tp.op(name, flops=x.numel, bytes_moved=x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel // last, x.dtype)
    node = tp.record(name, [x], [], _mean_backward, numel=x.numel)
    return tp.output(out, node)


def _mean_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [_grad_for(tp, f"{node.name}.backward", node.ctx["numel"], grad.dtype, node.inputs[0])]


def dropout(tp: Tape, name: str, x: Tensor, p: float) -> Tensor:
    """F.dropout in training: p == 0 returns the input itself (ATen Dropout.cpp); else output + bool mask saved."""
    if p == 0.0:
        return tp.alias(x)
    tp.op(name, bytes_moved=3 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    mask = tp.empty(f"{name}.mask", x.numel, DType.BOOL)  # native_dropout keeps a bool mask
    node = tp.record(name, [x], [mask], _scale_backward, numel=x.numel)
    tp.drop(mask)
    return tp.output(out, node)


def softmax(tp: Tape, name: str, x: Tensor, dtype: DType | None = None) -> Tensor:
    """F.softmax(x, -1, dtype): ATen converts a bf16 input to `dtype` first (a copy; only Half→Float has a fused
    half_to_float kernel, aten/src/ATen/native/SoftMax.cpp), then _softmax saves its output."""
    source = x
    if dtype is not None and dtype is not x.dtype and x.dtype is not DType.FLOAT16:
        x = to_dtype(tp, f"{name}.to", x, dtype)
    out_dtype = dtype or x.dtype
    tp.op(name, flops=5 * x.numel, bytes_moved=x.numel * (x.dtype.size_bytes + out_dtype.size_bytes))
    out = tp.empty(f"{name}.out", x.numel, out_dtype)
    node = tp.record(name, [x], [out], _softmax_backward, numel=x.numel, dtype=x.dtype)
    if x is not source:
        tp.drop(x)
    return tp.output(out, node)


def _softmax_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    # _softmax_backward_data(grad, output, dim, input_dtype) returns the grad in the input's dtype.
    numel = node.ctx["numel"]
    return [_grad_for(tp, f"{node.name}.backward", numel, node.ctx["dtype"], node.inputs[0], flops=3 * numel)]


def log_softmax(tp: Tape, name: str, x: Tensor, dtype: DType | None = None) -> Tensor:
    """F.log_softmax(x, -1, dtype): the same buffers as softmax (aten/src/ATen/native/SoftMax.cpp log_softmax: the
    bf16 input converted to `dtype` first; _log_softmax saves its output, _log_softmax_backward_data allocates the
    grad input in the input's dtype)."""
    return softmax(tp, name, x, dtype)


def nll_loss(tp: Tape, name: str, log_probs: Tensor, target: Tensor) -> Tensor:
    """F.nll_loss (mean): a scalar plus total_weight; saves self and target; backward: zeros_like(self) + scatter."""
    tp.op(name, flops=target.numel, bytes_moved=target.size_bytes)
    out = tp.empty(f"{name}.out", 1, log_probs.dtype)
    total_weight = tp.empty(f"{name}.total_weight", 1, log_probs.dtype)
    node = tp.record(name, [log_probs], [log_probs, target, total_weight], _nll_backward, numel=log_probs.numel)
    tp.drop(total_weight)
    return tp.output(out, node)


def _nll_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [_grad_for(tp, f"{node.name}.backward", node.ctx["numel"], node.inputs[0].dtype, node.inputs[0])]


# ---- matmuls ----------------------------------------------------------------------------------------------------
def linear(tp: Tape, name: str, x: Tensor, w: Param | Tensor, in_features: int, out_features: int,
           bias: Tensor | None = None) -> Tensor:
    """F.linear on (tokens, in): addmm/mm. Saves x if the weight needs grad, the weight if x needs grad."""
    w_t = weight(w)
    tokens = x.numel // in_features
    tp.op(name, flops=2.0 * tokens * in_features * out_features,
          bytes_moved=(x.numel + w_t.numel + tokens * out_features) * x.dtype.size_bytes, kind=OpKind.GEMM)
    tp.first_gemm()
    if bias is not None:
        tp.cublaslt_gemm()
    out = tp.empty(f"{name}.out", tokens * out_features, x.dtype)
    b_t = bias
    saved = ([x] if w_t.requires_grad else []) + ([w_t] if x.requires_grad else [])
    node = tp.record(name, [x, w_t, b_t], saved, _linear_backward, tokens=tokens, inf=in_features,
                     outf=out_features)
    return tp.output(out, node)


def _linear_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    x, w, b = node.inputs
    tokens, inf, outf = node.ctx["tokens"], node.ctx["inf"], node.ctx["outf"]
    flops = 2.0 * tokens * inf * outf
    grads: list = [None, None, None]
    if x is not None:  # mm(grad, weight), reshaped back to (b, s, in): a view of the mm result
        grads[0] = _grad_for(tp, f"{node.name}.backward.input", tokens * inf, x.dtype, x, flops=flops,
                             kind=OpKind.GEMM)
        grads[0].is_view = True
    if w is not None:  # mm(grad.t(), input), laid out like the weight so AccumulateGrad can steal it
        grads[1] = _grad_for(tp, f"{node.name}.backward.weight", inf * outf, w.dtype, w, flops=flops,
                             kind=OpKind.GEMM)
    if b is not None:  # grad.sum(0)
        grads[2] = _grad_for(tp, f"{node.name}.backward.bias", outf, b.dtype, b, flops=tokens * outf)
    return grads


def bmm(tp: Tape, name: str, a: Tensor, b: Tensor, out_numel: int, flops: float) -> Tensor:
    """torch.matmul of batched 4-D tensors (bmm on merged batch dims, views only for contiguous operands)."""
    tp.op(name, flops=flops, bytes_moved=(a.numel + b.numel + out_numel) * a.dtype.size_bytes, kind=OpKind.GEMM)
    tp.first_gemm()
    out = tp.empty(f"{name}.out", out_numel, a.dtype)
    saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])
    node = tp.record(name, [a, b], saved, _bmm_backward, flops=flops)
    return tp.output(out, node)


def _bmm_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    grads: list = []
    for target in node.inputs:
        if target is None:
            grads.append(None)
        else:
            grads.append(_grad_for(tp, f"{node.name}.backward", target.numel, target.dtype, target,
                                   flops=node.ctx["flops"], kind=OpKind.GEMM))
    return grads


def embedding(tp: Tape, name: str, ids: Tensor, w: Param, vocab: int, hidden: int, on_host: bool = False) -> Tensor:
    """F.embedding: saves the indices. The backward allocates zeros (vocab, hidden) in the grad's dtype, and on CUDA
    for more than 3072 tokens the sort path's index arrays and fp32 partial sums (_embedding_backward). On a CPU
    host (`on_host`) embedding_dense_backward_cpu (aten/src/ATen/native/Embedding.cpp) allocates only the zeros
    (vocab, hidden) and index_add's the (already contiguous) grad rows into it."""
    tokens = ids.numel
    tp.op(name, bytes_moved=2 * tokens * hidden * w.tensor.dtype.size_bytes)
    out = tp.empty(f"{name}.out", tokens * hidden, w.tensor.dtype)
    node = tp.record(name, [w.tensor], [ids], _embedding_backward, tokens=tokens, vocab=vocab, hidden=hidden,
                     on_host=on_host)
    return tp.output(out, node)


# embedding_dense_backward_cuda takes the atomic feature kernel, which allocates only the zeros, for at most this
# many indices (aten/src/ATen/native/cuda/Embedding.cu: `num_indices <= 3072 && !scale_grad_by_freq`)
EMBEDDING_FEATURE_KERNEL_MAX_INDICES = 3072
# rows per partial segment (aten/src/ATen/native/cuda/EmbeddingBackwardKernel.cu NROWS_PER_THREAD)
EMBEDDING_ROWS_PER_PARTIAL = 10


def _embedding_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    """embedding_dense_backward_cuda (Embedding.cu) for more than 3072 indices: sorted_indices and orig_indices
    (int64, one per token, alive to the end), `range` = arange(tokens) freed after the radix sort; then
    embedding_backward_cuda_kernel (EmbeddingBackwardKernel.cu): grad_weight = zeros (vocab, hidden), segment_offsets
    (tokens), partials_per_segment and partials_per_segment_offset (max_segments = min(tokens, vocab) each),
    partial_segment_offset (max_partial_segment = tokens // 10 + max_segments) and grad_weight_per_segment
    (max_partial_segment, hidden) in fp32 for bf16/fp16 grads, plus two int64 scalars, all freed on return. These
    bounds replaced a `numel` bound in pytorch#78588 (2022, torch 1.13); earlier code sized them by a synchronising
    .item() count. Not modelled: cub's temporary storage for the radix sort, unique_by_key and exclusive_sum
    (sized inside cub), and the fused atomic variant pytorch#170589 adds for few, large segments."""
    tokens, vocab, hidden = node.ctx["tokens"], node.ctx["vocab"], node.ctx["hidden"]
    weight_dtype = node.inputs[0].dtype
    if node.ctx["on_host"] or tokens <= EMBEDDING_FEATURE_KERNEL_MAX_INDICES:  # only grad_weight = zeros
        tp.op(f"{node.name}.backward", bytes_moved=vocab * hidden * grad.dtype.size_bytes)
        return [tp.empty(f"{node.name}.backward.out", vocab * hidden, weight_dtype)]
    max_segments = min(tokens, vocab)
    max_partial_segment = tokens // EMBEDDING_ROWS_PER_PARTIAL + max_segments
    partial_dtype = grad.dtype if grad.dtype is DType.FLOAT64 else F32  # acc_type: fp32 but for fp64
    tp.op(f"{node.name}.backward.sort", bytes_moved=4 * tokens * I64.size_bytes)
    indices = [tp.empty("embedding_backward.sorted_indices", tokens, I64),
               tp.empty("embedding_backward.orig_indices", tokens, I64)]
    tp.drop(tp.empty("embedding_backward.range", tokens, I64))
    tp.op(f"{node.name}.backward", bytes_moved=vocab * hidden * grad.dtype.size_bytes
          + tokens * hidden * (grad.dtype.size_bytes + partial_dtype.size_bytes))
    out = tp.empty(f"{node.name}.backward.out", vocab * hidden, weight_dtype)
    scratch = [tp.empty("embedding_backward.segment_offsets", tokens, I64),
               tp.empty("embedding_backward.num_of_segments", 1, I64),
               tp.empty("embedding_backward.partials_per_segment", max_segments, I64),
               tp.empty("embedding_backward.partials_per_segment_offset", max_segments, I64),
               tp.empty("embedding_backward.num_of_partial_segments", 1, I64),
               tp.empty("embedding_backward.partial_segment_offset", max_partial_segment, I64),
               tp.empty("embedding_backward.grad_weight_per_segment", max_partial_segment * hidden, partial_dtype)]
    tp.drop(*reversed(scratch), *indices)
    return [out]


# ---- attention kernels ---------------------------------------------------------------------------------------------
def flash_attention(tp: Tape, name: str, q: Tensor, k: Tensor, v: Tensor, batch: int, heads: int, kv_heads: int,
                    seq: int, head_dim: int, flops: float, rounded_workspace: bool = True,
                    on_host: bool = False, mask: Tensor | None = None) -> Tensor:
    """A FlashAttention-2 kernel (flash_attn_func, or torch SDPA's flash backend): output + fp32 logsumexp
    (b, heads, seq) + rng state saved with q, k, v.  Backward (flash_api.cpp mha_bwd) allocates dq, dk, dv,
    dq_accum fp32 (b, round128(s), h, round32(d)), softmax_d fp32 (b, h, round128(s)) and, for GQA,
    dk/dv expanded to all heads before summing to the kv heads.
    On a CPU host (`on_host`) torch SDPA's flash backend is _scaled_dot_product_flash_attention_for_cpu instead:
    see `_cpu_flash_attention`, which alone takes an additive `mask` (the CUDA flash kernels take none)."""
    if on_host:
        return _cpu_flash_attention(tp, name, q, k, v, batch, heads, kv_heads, seq, head_dim, flops, mask)
    assert mask is None, "the CUDA flash kernels take no attn_mask"
    out_numel = batch * seq * heads * head_dim
    tp.op(name, flops=flops, bytes_moved=(q.numel + k.numel + v.numel + out_numel) * q.dtype.size_bytes,
          kind=OpKind.ATTENTION)
    out = tp.empty(f"{name}.out", out_numel, q.dtype)
    lse = tp.empty(f"{name}.softmax_lse", batch * heads * seq, F32)
    rng = tp.empty(f"{name}.rng_state", 2, I64)
    # backward runs 5 matmuls against forward's 2 (Dao, FlashAttention-2, 2023, §3.2): 2.5× the FLOPs
    node = tp.record(name, [q, k, v], [q, k, v, out, lse, rng], _flash_backward, batch=batch, heads=heads,
                     kv_heads=kv_heads, seq=seq, head_dim=head_dim, flops=2.5 * flops)
    tp.drop(lse, rng)
    return tp.output(out, node)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _flash_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    c = node.ctx
    b, h, kvh, s, d = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["head_dim"]
    q, k, v = node.inputs
    dtype = grad.dtype
    tp.op(f"{node.name}.backward", flops=c["flops"], bytes_moved=6 * b * s * h * d * dtype.size_bytes,
          kind=OpKind.ATTENTION)
    dq = tp.empty(f"{node.name}.dq", b * s * h * d, dtype)
    dk = tp.empty(f"{node.name}.dk", b * s * kvh * d, dtype)
    dv = tp.empty(f"{node.name}.dv", b * s * kvh * d, dtype)
    workspace = [
        tp.empty(f"{node.name}.softmax_d", b * h * _round_up(s, 128), F32),
        tp.empty(f"{node.name}.dq_accum", b * _round_up(s, 128) * h * _round_up(d, 32), F32),
    ]
    if kvh != h:
        workspace += [tp.empty(f"{node.name}.dk_expanded", b * s * h * d, dtype),
                      tp.empty(f"{node.name}.dv_expanded", b * s * h * d, dtype)]
    tp.drop(*workspace)
    grads = [dq if q is not None else None, dk if k is not None else None, dv if v is not None else None]
    tp.drop(*[g for g, t in zip((dq, dk, dv), (q, k, v)) if t is None])
    return grads


def _cpu_flash_splits(seq: int) -> tuple[int, int]:
    """(qSplitSize, kvSplitSize) of aten/src/ATen/native/cpu/FlashAttentionKernel.cpp: the kernel is instantiated
    with q_split 256 (s >= 768), 64 (s >= 192) or 32, kv_split 512, each capped at the sequence length."""
    q_split = 256 if seq >= 768 else 64 if seq >= 192 else 32
    return min(q_split, seq), min(512, seq)


def _cpu_flash_attention(tp: Tape, name: str, q: Tensor, k: Tensor, v: Tensor, batch: int, heads: int,
                         kv_heads: int, seq: int, head_dim: int, flops: float, mask: Tensor | None) -> Tensor:
    """_scaled_dot_product_flash_attention_for_cpu (aten/src/ATen/native/transformers/attention.cpp and
    native/cpu/FlashAttentionKernel.cpp cpu_flash_attention): output (b, s, heads, d) and an fp32 logsumexp
    (b, s, heads), both saved with q, k, v (no rng state); inside the kernel a per-thread fp32 buffer
    qSplit·kvSplit (qk) + 2·qSplit (max, sum) + qSplit·d (dst), and for bf16/fp16 a qSplit·kvSplit buffer in the
    input dtype, freed on return. GQA is native: k and v keep their kv heads. One thread (the calibration runs
    torch.set_num_threads(1)); each further thread adds one more of each buffer. An additive attn_mask is saved
    after v (ScaledDotProductFlashAttentionForCpuBackward0 holds it: measured on CPU, torch 2.13, it goes in the
    layer's backward); the kernel's buffers do not change with it."""
    out_numel = batch * seq * heads * head_dim
    dtype = q.dtype
    q_split, kv_split = _cpu_flash_splits(seq)
    tp.op(name, flops=flops, bytes_moved=(q.numel + k.numel + v.numel + out_numel) * dtype.size_bytes,
          kind=OpKind.ATTENTION)
    out = tp.empty(f"{name}.out", out_numel, dtype)
    lse = tp.empty(f"{name}.logsumexp", batch * heads * seq, F32)
    scratch = [tp.empty(f"{name}.buf", q_split * kv_split + 2 * q_split + q_split * head_dim, F32)]
    if dtype is not F32:
        scratch.append(tp.empty(f"{name}.buf_reduced", q_split * kv_split, dtype))
    tp.drop(*scratch)
    saved = [q, k, v, *([mask] if mask is not None else []), out, lse]
    node = tp.record(name, [q, k, v], saved, _cpu_flash_backward, batch=batch, heads=heads,
                     kv_heads=kv_heads, seq=seq, head_dim=head_dim, flops=2.5 * flops)
    tp.drop(lse)
    return tp.output(out, node)


def _cpu_flash_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    """_scaled_dot_product_flash_attention_cpu_backward: grad_q/k/v = at::zeros of q/k/v's (b, s, heads, d)
    sizes (kv heads for k and v), then cpu_flash_attention_backward's per-thread fp32 buffer 2·qSplit·kvSplit
    (attn, grad_attn), a reduced-dtype one of the same size for bf16/fp16, and an fp32 dsum of qSplit per
    parallel chunk; the scratch is freed on return."""
    c = node.ctx
    b, h, kvh, s, d = c["batch"], c["heads"], c["kv_heads"], c["seq"], c["head_dim"]
    q, k, v = node.inputs
    dtype = grad.dtype
    q_split, kv_split = _cpu_flash_splits(s)
    tp.op(f"{node.name}.backward", flops=c["flops"], bytes_moved=6 * b * s * h * d * dtype.size_bytes,
          kind=OpKind.ATTENTION)
    dq = tp.empty(f"{node.name}.backward.grad_q", b * s * h * d, dtype)
    dk = tp.empty(f"{node.name}.backward.grad_k", b * s * kvh * d, dtype)
    dv = tp.empty(f"{node.name}.backward.grad_v", b * s * kvh * d, dtype)
    scratch = [tp.empty(f"{node.name}.backward.buf", 2 * q_split * kv_split, F32)]
    if dtype is not F32:
        scratch.append(tp.empty(f"{node.name}.backward.buf_reduced", 2 * q_split * kv_split, dtype))
    scratch.append(tp.empty(f"{node.name}.backward.dsum", q_split, F32))
    tp.drop(*reversed(scratch))
    grads = [dq if q is not None else None, dk if k is not None else None, dv if v is not None else None]
    tp.drop(*[g for g, t in zip((dq, dk, dv), (q, k, v)) if t is None])
    return grads


def efficient_attention(tp: Tape, name: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, batch: int, heads: int,
                        seq: int, head_dim: int, flops: float, on_host: bool = False) -> Tensor:
    """torch SDPA's memory-efficient kernel, chosen when an explicit attn_mask is given: output + fp32
    logsumexp (b, heads, round32(s)) + philox seed/offset, saving q, k, v, the mask (attn_bias), out and lse.
    Backward (_efficient_attention_backward) allocates grad q, k, v, an fp32 delta (b, heads, s) and, on CUDA, the
    kernel's gradient-of-q workspace (_efficient_backward); a CPU host (`on_host`) has no such workspace."""
    out_numel = batch * seq * heads * head_dim
    tp.op(name, flops=flops, bytes_moved=(q.numel + k.numel + v.numel + out_numel) * q.dtype.size_bytes
          + mask.size_bytes, kind=OpKind.ATTENTION)
    out = tp.empty(f"{name}.out", out_numel, q.dtype)
    lse = tp.empty(f"{name}.logsumexp", batch * heads * _round_up(seq, 32), F32)
    rng = tp.empty(f"{name}.philox", 2, I64)
    # backward: 5 matmuls against forward's 2, as for flash attention
    node = tp.record(name, [q, k, v], [q, k, v, mask, out, lse, rng], _efficient_backward, batch=batch,
                     heads=heads, seq=seq, head_dim=head_dim, flops=2.5 * flops, on_host=on_host)
    tp.drop(lse, rng)
    return tp.output(out, node)


# the cutlass backward kernel (I x J tile) _efficient_attention_backward launches for bf16/fp16 with head_dim <= 128:
# the first of dispatch_cutlassB's aligned list whose kMaxK covers it is 128x128_k32/k64/k128 (seqaligned or not)
# (aten/src/ATen/native/transformers/cuda/mem_eff_attention/kernels/cutlassB.h, sm80 list, also used on sm90)
EFFICIENT_BACKWARD_BLOCK_I = 128
EFFICIENT_BACKWARD_BLOCK_J = 128


def efficient_backward_workspace_bytes(batch: int, heads: int, seq: int, head_dim: int) -> int:
    """p.workspace_size() of the mem-efficient backward (mem_eff_attention/kernel_backward.h): B · H ·
    workspace_strideBH · 4 B, strideBH = align4(gk + gv + gq) floats. gq = ceil(M / I) · ceil(K / J) ·
    sizeof(GradQTempStorage) / 4, GradQTempStorage being {lock, counter, pad[2]} (4 ints) + the I × J fp32 tile
    (MatmulGradQ::AccumTileGmem::kElementsStored = kNumThreads · 32 = I · J): I · J + 4 floats per tile.
    gq is needed for bf16/fp16 (kNeedsAccumGradQ: kEnableSplitKeys, and output_t is not fp32). gk and gv are 0 when
    kOutputInRF (half types and kMaxK <= I), true for head_dim <= 128 on the 128 × 128 kernel.
    Open, not modelled: for head_dim > 128 (the k256/k65536 kernels) gk = gv = num_splits_key · J · round_up(K, I)
    with num_splits_key = min(ceil(N / J), 200 / (B · H)); and on a device whose shared memory (sharedMemPerBlockOptin)
    cannot hold the 128 × 128 kernel, the next one (64 × 128, kOutputInRF false) adds those gk/gv terms too."""
    tiles = -(-seq // EFFICIENT_BACKWARD_BLOCK_I) * -(-head_dim // EFFICIENT_BACKWARD_BLOCK_J)
    grad_q_floats = tiles * (EFFICIENT_BACKWARD_BLOCK_I * EFFICIENT_BACKWARD_BLOCK_J + 4)
    return batch * heads * _round_up(grad_q_floats, 4) * 4


def _efficient_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    """_efficient_attention_backward (aten/src/ATen/native/transformers/cuda/attention_backward.cu, CUDA branch):
    grad q, k, v; in the launched kernel's lambda delta = at::empty({B, nH, M}, float) (kKernelComputesDelta for
    half types), freed when the lambda returns; the byte workspace at::empty({workspace_size()}) of
    efficient_backward_workspace_bytes, zeroed when split over keys, freed when the function returns."""
    c = node.ctx
    tp.op(f"{node.name}.backward", flops=c["flops"], bytes_moved=4 * grad.size_bytes, kind=OpKind.ATTENTION)
    grads = [tp.empty(f"{node.name}.grad", t.numel, t.dtype) if t is not None else None for t in node.inputs]
    delta = tp.empty(f"{node.name}.delta", c["batch"] * c["heads"] * c["seq"], F32)
    if c["on_host"]:
        tp.drop(delta)
        return grads
    workspace = tp.empty(f"{node.name}.workspace",
                         efficient_backward_workspace_bytes(c["batch"], c["heads"], c["seq"], c["head_dim"]),
                         DType.BOOL)
    tp.drop(delta, workspace)
    return grads


# ---- routing (mixture of experts) -----------------------------------------------------------------------------
def sigmoid(tp: Tape, name: str, x: Tensor) -> Tensor:
    """F.sigmoid: SigmoidBackward0 saves its result; sigmoid_backward(grad, result) allocates the grad input."""
    tp.op(name, flops=4 * x.numel, bytes_moved=2 * x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel, x.dtype)
    node = tp.record(name, [x], [out], _same_size_backward, numel=x.numel)
    return tp.output(out, node)


def untracked(tp: Tape, name: str, numel: int, dtype: DType, bytes_moved: int = 0) -> Tensor:
    """An op on integer or no-grad tensors (sort, floor_divide, histc, cumsum, arange): its one new output."""
    tp.op(name, bytes_moved=bytes_moved or numel * dtype.size_bytes)
    return tp.empty(f"{name}.out", numel, dtype)


def topk(tp: Tape, name: str, x: Tensor, rows: int, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(x, k, dim=-1) over `rows` rows: values in x's dtype and int64 indices, (rows, k) each.
    TopkBackward0 saves the indices (derivatives.yaml topk: value_selecting_reduction_backward); its backward
    allocates zeros of x's size and scatters the grad into an out-of-place copy of them (two tensors of x's size,
    the zeros freed once the scatter returns)."""
    tp.op(name, flops=x.numel, bytes_moved=x.size_bytes + rows * k * (x.dtype.size_bytes + I64.size_bytes))
    values = tp.empty(f"{name}.values", rows * k, x.dtype)
    indices = tp.empty(f"{name}.indices", rows * k, I64)
    node = tp.record(name, [x], [indices], _zeros_then_put_backward, numel=x.numel)
    return tp.output(values, node), indices


def _zeros_then_put_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    """grad.new_zeros(input size) then an out-of-place scatter/index_put of the grad into it (topk, index)."""
    numel, target = node.ctx["numel"], node.inputs[0]
    tp.op(f"{node.name}.backward.zeros", bytes_moved=numel * grad.dtype.size_bytes)
    zeros = tp.empty(f"{node.name}.backward.zeros", numel, grad.dtype)
    out = _grad_for(tp, f"{node.name}.backward.put", numel, grad.dtype, target)
    tp.drop(zeros)
    return [out]


def sum_last(tp: Tape, name: str, x: Tensor, last: int) -> Tensor:
    """x.sum(dim=-1, keepdim=True) (or a sum over a middle dim of size `last`): SumBackward0 saves only sizes; its
    backward is grad.expand(input size), a view."""
    tp.op(name, flops=x.numel, bytes_moved=x.size_bytes)
    out = tp.empty(f"{name}.out", x.numel // last, x.dtype)
    node = tp.record(name, [x], [], _expand_view_backward, numel=x.numel)
    return tp.output(out, node)


def _expand_view_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    return [tp.alias(grad, node.ctx["numel"], view=True)]


def div_(tp: Tape, name: str, a: Tensor, b: Tensor) -> Tensor:
    """a /= b in place with b broadcast over a's last dim. DivBackward0's formula for b reads the original self, so
    the in-place variant saves a clone of it (VariableType's original_self, made when b requires grad) and b.
    Backward: grad / b for a; for b -grad * ((self / b) / b) summed to b's size (observed on torch 2.13: div, neg,
    mul, div, then the sum), each of a's size."""
    if b.requires_grad:
        tp.op(f"{name}.original_self", bytes_moved=2 * a.size_bytes)
        original = tp.empty(f"{name}.original_self", a.numel, a.dtype)
    else:
        original = None
    tp.op(name, flops=a.numel, bytes_moved=2 * a.size_bytes + b.size_bytes)
    saved = [t for t in (original, b) if t is not None]
    node = tp.record(name, [a, b], saved, _div_backward, numel=a.numel)
    tp.drop(original)
    return tp.output(tp.alias(a), node)


def _div_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    a, b = node.inputs
    numel = node.ctx["numel"]
    grads: list = [None, None]
    if a is not None:
        grads[0] = _grad_for(tp, f"{node.name}.backward.self", numel, grad.dtype, a, flops=numel)
    if b is not None:
        ratio = _grad_for(tp, f"{node.name}.backward.self_div", numel, grad.dtype, grad, flops=numel)
        negated = _grad_for(tp, f"{node.name}.backward.neg", numel, grad.dtype, grad, flops=numel)
        product = _grad_for(tp, f"{node.name}.backward.mul", numel, grad.dtype, grad, flops=numel)
        tp.drop(ratio, negated)
        quotient = _grad_for(tp, f"{node.name}.backward.div", numel, grad.dtype, grad, flops=numel)
        tp.drop(product)
        tp.op(f"{node.name}.backward.sum_to", bytes_moved=quotient.size_bytes)  # summed to b's size
        grads[1] = tp.empty(f"{node.name}.backward.sum_to.out", b.numel, grad.dtype)
        tp.drop(quotient)
    return grads


def index_rows(tp: Tape, name: str, x: Tensor, index: Tensor, out_numel: int) -> Tensor:
    """x[index] with an int64 index over the first dim: a new tensor of the gathered rows. IndexBackward0 saves the
    index; its backward is grad.new_zeros(x's size).index_put(index, grad, accumulate=True), two x-sized tensors."""
    tp.op(name, bytes_moved=2 * out_numel * x.dtype.size_bytes + index.size_bytes)
    out = tp.empty(f"{name}.out", out_numel, x.dtype)
    node = tp.record(name, [x], [index], _zeros_then_put_backward, numel=x.numel)
    return tp.output(out, node)


def grouped_mm(tp: Tape, name: str, x: Tensor, w: Param, offsets: Tensor, rows: int, in_features: int,
               out_features: int) -> Tensor:
    """F.grouped_mm(x, w.transpose(-2, -1), offs): each expert's rows of x (rows in all) times its (out, in)
    slice of the 3-D weight, one (rows, out) output. derivatives.yaml _grouped_mm saves x when the weight needs
    grad, the weight when x does, and offs; the backward makes a grad of the whole 3-D weight (every expert, hit or
    not) laid out like the parameter (AccumulateGrad steals it: no clone measured on torch 2.13 CPU) and a grad of
    x's size."""
    w_t = weight(w)
    flops = 2.0 * rows * in_features * out_features
    tp.op(name, flops=flops, bytes_moved=(x.numel + w_t.numel + rows * out_features) * x.dtype.size_bytes,
          kind=OpKind.GEMM)
    tp.first_gemm()
    out = tp.empty(f"{name}.out", rows * out_features, x.dtype)
    saved = ([x] if w_t.requires_grad else []) + ([w_t] if x.requires_grad else []) + [offsets]
    node = tp.record(name, [x, w_t], saved, _grouped_mm_backward, flops=flops)
    return tp.output(out, node)


def _grouped_mm_backward(tp: Tape, node: Node, grad: Tensor) -> list:
    """The weight's grad first, then the input's (the order torch 2.13's _grouped_mm backward runs them)."""
    x, w = node.inputs
    flops = node.ctx["flops"]
    grad_w = _grad_for(tp, f"{node.name}.backward.weight", w.numel, w.dtype, w, flops=flops,
                       kind=OpKind.GEMM) if w is not None else None
    grad_x = _grad_for(tp, f"{node.name}.backward.input", x.numel, x.dtype, x, flops=flops,
                       kind=OpKind.GEMM) if x is not None else None
    return [grad_x, grad_w]
