"""The LM head and the causal-LM loss, as each transformers version computes them."""

from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.amp import fp32_op_dtype
from sim.workload.context import RunContext
from sim.workload.modules import plain_linear
from sim.workload.tape import Param, Tensor


def lm_head_loss(ctx: RunContext, lm_head: Param, hidden: Tensor, labels: Tensor) -> Tensor:
    """logits = lm_head(hidden); then the version's upcast / shift / cross-entropy. Returns the loss tensor.

    Everything the forward binds to a local (logits, shift_logits) lives until ForCausalLM.forward returns;
    the returned output object (holding `logits`) is dropped by Trainer.compute_loss, i.e. before backward.
    Where accelerate converts the outputs, half-precision returned logits stay in ctx.output_logits for
    amp.convert_outputs (fp32 ones it leaves alone). Under autocast the loss runs in fp32:
    log_softmax(x, -1, dtype=float32), then nll_loss on its fp32 output (sim/workload/amp.py).
    """
    tp, m, beh = ctx.tape, ctx.model, ctx.behaviour
    logits = plain_linear(ctx, "lm_head", hidden, lm_head, m.hidden_size, m.vocab_size)
    if m.final_logit_softcapping is not None:  # Gemma2ForCausalLM.forward, in the logits' dtype
        capped = P.softcap(tp, "logits.softcap", logits)
        tp.drop(logits)
        logits = capped
    if beh.logits_upcast_in_model:  # logits = logits.float(): the half-precision logits are released
        upcast = P.to_dtype(tp, "logits.float", logits, DType.FLOAT32)
        tp.drop(logits)
        logits = upcast
    held = [logits]
    source = logits
    if beh.loss_upcasts_logits:  # ForCausalLMLoss: logits = logits.float() inside the loss function
        source = P.to_dtype(tp, "loss.logits.float", logits, DType.FLOAT32)
        held.append(source)
    if beh.loss_shifts_logits:  # shift_logits = logits[..., :-1, :].contiguous()
        shifted_numel = ctx.batch * (ctx.seq - 1) * m.vocab_size
        sliced = P.slice_view(tp, source, shifted_numel)
        shift_logits = P.contiguous_copy(tp, "loss.shift_logits", sliced)
        tp.drop(sliced)
        label_count = ctx.batch * (ctx.seq - 1)
    else:  # labels = pad(labels, (0, 1), value=-100); shift_labels = labels[..., 1:]; logits used as they are
        shift_logits = tp.alias(source)
        label_count = ctx.tokens
        tp.op("loss.pad_labels", bytes_moved=2 * ctx.batch * (ctx.seq + 1) * 8)
        held.append(tp.empty("padded_labels", ctx.batch * (ctx.seq + 1), DType.INT64))
    held.append(shift_logits)
    tp.op("loss.shift_labels", bytes_moved=2 * label_count * 8)
    shift_labels = tp.empty("shift_labels", label_count, DType.INT64)
    if ctx.autocast is not None and not ctx.on_host and shift_logits.dtype is not DType.FLOAT32:
        log_probs = _cuda_autocast_cross_entropy_log_probs(ctx, shift_logits)
    else:
        log_probs = P.log_softmax(tp, "loss.log_softmax", shift_logits, fp32_op_dtype(ctx))
    loss = P.nll_loss(tp, "loss.nll_loss", log_probs, shift_labels)
    tp.drop(log_probs, shift_labels)
    if ctx.outputs_to_fp32 and logits.dtype is not DType.FLOAT32:  # half logits outlive the forward's locals
        tp.drop(*held[1:])
        ctx.output_logits = logits
    else:
        tp.drop(*held)
    return loss


def _cuda_autocast_cross_entropy_log_probs(ctx: RunContext, logits: Tensor) -> Tensor:
    """nn.CrossEntropyLoss on half-precision logits under CUDA autocast: aten's cross_entropy_loss calls
    log_softmax(x, 1, x.scalar_type()) (aten/src/ATen/native/LossNLL.cpp cross_entropy_loss_symint), a dtype that
    autocast's fp32_set_opt_dtype keeps, so log_softmax runs and saves its output in the logits' dtype; nll_loss, on
    autocast's CUDA fp32 list (KERNEL_CUDA(nll_loss, fp32) in autocast_mode.cpp; AT_FORALL_FP32 of autocast_mode.h
    from 2.3, which has no cross_entropy_loss for CUDA), then takes an fp32 copy of the log-probs, which it saves.
    (Autocast's CPU list has cross_entropy_loss itself, so a host casts the logits first: the other branch.)"""
    tp = ctx.tape
    log_probs = P.log_softmax(tp, "loss.log_softmax", logits, logits.dtype)
    upcast = P.to_dtype(tp, "loss.nll_loss.autocast_to_fp32", log_probs, DType.FLOAT32)
    tp.drop(log_probs)
    return upcast
