"""A GPT layer configured as Korthikanti et al. (arXiv:2205.05198, §4.1 and Eq. 1) assume: fp16, LayerNorm,
fused QKV, 4h GeLU MLP, dropout after attention scores, attention output and MLP, no recomputation.
They count sbh(34 + 5as/h) bytes of activations per layer; the tape's primitives must reproduce that, plus
the per-token fp32 mean and rstd each LayerNorm keeps (2 norms × 8 bytes × s·b), which the paper neglects."""

import pytest

from sim.ops import Category
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.tape import Tape

FP16 = DType.FLOAT16


def gpt_layer_saved_bytes(s: int, b: int, h: int, a: int) -> int:
    tp = Tape()
    tp.op("init")
    param = {name: tp.parameter(name, numel, FP16, True).tensor for name, numel in {
        "ln1.w": h, "ln1.b": h, "qkv.w": 3 * h * h, "qkv.b": 3 * h, "proj.w": h * h, "proj.b": h,
        "ln2.w": h, "ln2.b": h, "fc1.w": 4 * h * h, "fc1.b": 4 * h, "fc2.w": 4 * h * h, "fc2.b": h}.items()}
    tp.op("input")
    x = tp.empty("x", s * b * h, FP16)
    x.requires_grad = True
    n = s * b
    ln1 = P.layer_norm(tp, "ln1", x, param["ln1.w"], param["ln1.b"], h)
    qkv = P.linear(tp, "qkv", ln1, param["qkv.w"], h, 3 * h, param["qkv.b"])
    q, k, v = (P.view(tp, qkv, n * h) for _ in range(3))  # views into the fused output
    scores = P.bmm(tp, "qk", q, k, b * a * s * s, 2.0 * b * a * s * s * h / a)  # baddbmm with alpha = 1/√d
    probs = P.softmax(tp, "softmax", scores)  # Megatron's fused fp16 softmax saves its fp16 output
    dropped = P.dropout(tp, "attention_dropout", probs, 0.1)
    context = P.bmm(tp, "pv", dropped, v, n * h, 2.0 * b * a * s * s * h / a)
    merged = P.contiguous_copy(tp, "merge_heads", context)
    out = P.linear(tp, "proj", merged, param["proj.w"], h, h, param["proj.b"])
    out = P.dropout(tp, "hidden_dropout", out, 0.1)
    x2 = P.add(tp, "residual", x, out)
    ln2 = P.layer_norm(tp, "ln2", x2, param["ln2.w"], param["ln2.b"], h)
    h1 = P.linear(tp, "fc1", ln2, param["fc1.w"], h, 4 * h, param["fc1.b"])
    g = P.gelu(tp, "gelu", h1)
    h2 = P.linear(tp, "fc2", g, param["fc2.w"], 4 * h, h, param["fc2.b"])
    P.dropout(tp, "mlp_dropout", h2, 0.1)
    saved = {st.buffer_id: st for node in tp._nodes for st in node.saved if st.category is not Category.PARAMETERS}
    return sum(st.size_bytes for st in saved.values())


@pytest.mark.parametrize("s, b, h, a", [(16, 2, 64, 4), (128, 1, 256, 8), (2048, 1, 1024, 16)])
def test_reproduces_34_plus_5as_over_h(s: int, b: int, h: int, a: int) -> None:
    paper = s * b * h * 34 + 5 * a * s * s * b  # sbh(34 + 5as/h)
    layer_norm_stats = 2 * 2 * 4 * s * b  # mean and rstd, fp32, per token, two LayerNorms
    assert gpt_layer_saved_bytes(s, b, h, a) == paper + layer_norm_stats
