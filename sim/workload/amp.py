"""Mixed precision around the forward as the HF Trainer runs it through accelerate: torch.autocast's fp32 ops, and
convert_outputs_to_fp32's copies of the forward's half-precision outputs."""

from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.context import RunContext


def fp32_op_dtype(ctx: RunContext) -> DType | None:
    """The dtype autocast passes to an op of its fp32_set_opt_dtype list (log_softmax, softmax, sum, ...) on a
    floating CUDA input: float32 when autocast is on, unless the call names a dtype itself (set_opt_dtype keeps it),
    else none. The list: KERNEL2 / KERNEL_CUDA2 lines of aten/src/ATen/autocast_mode.cpp up to torch 2.2,
    AT_FORALL_FP32_SET_OPT_DTYPE of autocast_mode.h from 2.3 (read in the 2.13 wheel's header). Ops of its fp32 list
    (nll_loss, pow, rsqrt: AT_FORALL_FP32) get fp32 inputs in the modelled code, so autocast casts nothing there,
    except nll_loss on the half log-probs of CrossEntropyLoss on half logits (sim/workload/loss.py)."""
    return DType.FLOAT32 if ctx.autocast is not None else None


def convert_outputs(ctx: RunContext) -> None:
    """convert_outputs_to_fp32 once the autocast-wrapped forward has returned: every bf16/fp16 tensor of the output
    (a ModelOutput is a Mapping, a legacy past_key_values a tuple of tuples: recursively_apply) becomes
    tensor.float(), a new fp32 tensor held by the new output until Trainer.compute_loss returns; the original output,
    and with it the half logits unless saved for backward, goes when the call returns (accelerate/utils/operations.py
    convert_to_fp32, v0.20 ... v1.x). In field order: logits, then each layer's key and value where the output holds
    the cache as a tuple (a DynamicCache, neither tuple nor Mapping, is left alone). The loss is fp32 already under
    autocast (nll_loss on autocast's fp32 list)."""
    if not ctx.outputs_to_fp32:
        return
    logits, ctx.output_logits = ctx.output_logits, None
    fields = [("logits", logits)] if logits is not None else []
    if ctx.behaviour.legacy_cache_output:
        fields += [(f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}", t) for i, t in enumerate(ctx.kv_cache)]
    halves = [(name, t) for name, t in fields if t.dtype in (DType.BFLOAT16, DType.FLOAT16)]
    if halves:
        ctx.clear_cast_cache()  # the autocast region around the forward has exited
    for name, tensor in halves:
        ctx.output_copies.append(P.to_dtype(ctx.tape, f"accelerate.convert_to_fp32.{name}", tensor, DType.FLOAT32))
    ctx.tape.drop(logits)
