"""The ops one rank runs: micro-batches × gradient accumulation, HF gradient checkpointing, the optimizer step,
for `simulation.steps` steps, on a symbolic autograd tape (sim/workload)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim.errors import ScenarioError, WorkTooLarge
from sim.ops import PHASES, OpKind, Phase, Schedule
from sim.plan import Plan
from sim.parallel.placement import ModelStates, choose_placement, module_hooks_for
from sim.strategies import SaveOnCpu, apply_transforms
from sim.workload import primitives as P
from sim.workload.architecture import ARCHITECTURES, Architecture
from sim.workload.context import RunContext
from sim.workload.save_on_cpu import SaveOnCpu as SaveOnCpuHooks
from sim.workload.tape import Tape


@dataclass(slots=True)
class BuiltSchedule:
    """One rank's schedule with the figures the report derives from the build."""

    schedule: Schedule
    model_states: ModelStates
    tokens_per_step: int  # this rank's tokens per optimizer step
    model_flops_per_step: float  # model FLOPs of one step, this rank (_model_flops)


def parameter_counts(plan: Plan) -> tuple[int, int]:
    """(all, trainable) parameter elements of the modelled model, adapters included, without running it."""
    ctx = _context(plan, Tape())
    ctx.tape.op("model.init")
    params = modelling_code(plan).build_model(ctx, plan.lora).params()
    return sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in params if p.tensor.requires_grad)


def _context(plan: Plan, tape: Tape) -> RunContext:
    """What the modelling code reads besides the tape, from the plan."""
    training = plan.training
    amp, lora = plan.amp, plan.lora
    return RunContext(tape, plan.model, training.micro_batch, training.seq_len, training.attn, plan.behaviour,
                      amp.dtype if amp is not None else None, lora.adapter_dtype if lora is not None else None,
                      plan.on_host, outputs_to_fp32=amp is not None and amp.outputs_to_fp32,
                      reentrant_checkpointing=training.use_reentrant)


# A layer's forward allocates at least ten tensors (q, k, v, attention output, o_proj, residual, norm, MLP up, act,
# down: sim/workload/hf_decoder.py) and frees each later: 20 events per layer and micro-batch at the very least.
_LEAST_EVENTS_PER_LAYER = 20
# Ops recorded before the first micro-batch has been counted: at most this share of the event budget (each op
# allocates or frees about two buffers on average: 341,228 ops, 616,740 events in the headline's 3-step prefix).
_OPS_PER_BUDGET_EVENT = 1 / 8


def build_schedule(plan: Plan, repeat: bool = True, max_events: int | None = None,
                   on_micro_batch: Callable[[], None] | None = None) -> BuiltSchedule:
    """The ops of one rank, in the compact form where micro-batches repeat (Schedule). `repeat=False` builds every
    micro-batch op by op instead: the expanded form with its own buffer numbering, slower, the reference that
    Tape.replicate and Schedule.expand are checked against. A caller that wants every op calls expand().
    `max_events`: WorkTooLarge as soon as the run is known to need more allocator events (a bound from the layers
    before anything is built, then an estimate from the first micro-batch, whose own recording is capped).
    `on_micro_batch`: called as each micro-batch begins (for a progress bar)."""
    training = plan.training
    micro_batches = training.accumulation_steps * training.steps
    if max_events is not None:
        least = _LEAST_EVENTS_PER_LAYER * plan.model.num_hidden_layers * micro_batches
        if least > max_events:
            raise WorkTooLarge(f"the run would simulate at least {least:,} allocator events "
                               f"({_LEAST_EVENTS_PER_LAYER} per layer and micro-batch)")
    tape = Tape()
    if max_events is not None:
        tape.op_limit = int(max_events * _OPS_PER_BUDGET_EVENT)
    # ProcessGroupNCCL recordStream's collective tensors on its stream before torch 2.8, which stashes them on the
    # Work object instead (pytorch/pytorch #150398, in 2.8)
    tape.nccl_records_streams = plan.versions.torch < (2, 8)
    workspaces = plan.runtime.workspaces
    tape.blas_workspace_bytes = workspaces.cublas_bytes
    tape.lt_workspace_bytes, tape.lt_workspace_persistent = workspaces.cublaslt_bytes, workspaces.cublaslt_persistent
    ctx = _context(plan, tape)
    ctx.module_hooks = module_hooks_for(tape, plan)
    tape.op("model.init")
    architecture = modelling_code(plan)
    model = architecture.build_model(ctx, plan.lora)
    params = model.params()
    trainable = [p for p in params if p.tensor.requires_grad]
    placement = choose_placement(ctx, plan, params, trainable)
    states_after_first_step = None
    template = None  # the latest micro-batch built after the first of a step: later ones repeat it when they can
    for step in range(training.steps):
        tape.step = step
        for micro in range(training.accumulation_steps):
            tape.micro_batch = micro
            last = micro == training.accumulation_steps - 1
            if on_micro_batch is not None:
                on_micro_batch()
            # micro-batches after the second repeat it exactly (grads exist) when nothing crosses its ends;
            # the last one of an accumulation differs where gradients are reduced only there (DDP, ZeRO-1)
            if repeat and micro >= 1 and template is not None and not (last and placement.syncs_last) and \
                    tape.replicate(*template, step, micro):
                continue
            start = tape.op_count()
            placement.before_micro_batch(last)
            _micro_batch(ctx, plan, architecture, model, placement.before_backward)
            placement.after_micro_batch(last)
            if micro >= 1 and not (last and placement.syncs_last):  # the latest built one is the template
                template = (start, tape.op_count())
            if max_events is not None and step == 0 and micro == 0:
                _check_estimate(tape, start, micro_batches, max_events)
        tape.phase, tape.layer = Phase.OPTIMIZER, None
        states = placement.step()
        states_after_first_step = states_after_first_step or states
    schedule = apply_transforms(tape.schedule(), plan.strategies)
    return BuiltSchedule(schedule, states_after_first_step, training.tokens_per_step, _model_flops(plan, schedule))


def _check_estimate(tape: Tape, first_micro_batch: int, micro_batches: int, max_events: int) -> None:
    """WorkTooLarge unless the events recorded so far plus every later micro-batch as many as the first (tape ops
    from `first_micro_batch` on) stay within `max_events`; the recording cap is lifted once this holds."""
    per_micro_batch = tape.events_since(first_micro_batch)
    estimate = tape.events_since(0) + per_micro_batch * (micro_batches - 1)
    if estimate > max_events:
        raise WorkTooLarge(f"the run would simulate about {estimate:,} allocator events ({per_micro_batch:,} per "
                           "micro-batch)")
    tape.op_limit = 1 << 62


def modelling_code(plan: Plan) -> Architecture:
    """The Architecture registered for the model_type (sim/workload/architecture.py). LoRA module names are checked
    against it, as PEFT does ("Target modules ... not found in the base model")."""
    code = ARCHITECTURES[plan.model.model_type]
    lora = plan.lora
    if lora is not None:
        kind = plan.model.model_type.value
        if lora.target_modules != "all-linear":
            unknown = [t for t in lora.target_modules if t not in code.LINEAR_MODULES]
            if unknown:
                raise ScenarioError(f"lora.target_modules: {unknown[0]!r} is not a linear module of model_type "
                                    f"{kind} (it has: {', '.join(code.LINEAR_MODULES)})")
        unknown = [t for t in lora.modules_to_save if t not in code.SAVABLE_MODULES]
        if unknown:
            raise ScenarioError(f"lora.modules_to_save: {unknown[0]!r} is not modelled for model_type {kind} "
                                f"(modelled: {', '.join(code.SAVABLE_MODULES)})")
    return code


def _micro_batch(ctx: RunContext, plan: Plan, architecture: Architecture, model, before_backward) -> None:
    """Trainer.training_step: inputs to the device, forward with labels, loss / accumulation, backward
    (`before_backward`: what the engine's backward does before autograd runs, e.g. DeepSpeed's IPG buffers)."""
    tp = ctx.tape
    tp.phase, tp.layer = Phase.FORWARD, None
    ids = P.input_tensor(tp, "input_ids", ctx.tokens)
    labels = P.input_tensor(tp, "labels", ctx.tokens)
    mask_2d = P.input_tensor(tp, "attention_mask", ctx.tokens)
    offload = any(isinstance(strategy, SaveOnCpu) for strategy in plan.strategies)
    outer, tp.saved_tensors_hooks = tp.saved_tensors_hooks, SaveOnCpuHooks() if offload else tp.saved_tensors_hooks
    loss = architecture.forward_loss(ctx, model, ids, labels, plan.training.gradient_checkpointing)
    tp.saved_tensors_hooks = outer  # `with save_on_cpu(): loss = model(**inputs).loss` (strategies: save_on_cpu)
    if plan.training.accumulation_steps > 1:  # accelerate's backward divides the loss
        scaled = P.mul_scalar(tp, "loss.div_accumulation", loss)
        tp.drop(loss)
        loss = scaled
    tp.phase = Phase.BACKWARD
    before_backward()
    tp.op("loss.backward.ones_like")
    seed = tp.empty("loss.grad_seed", 1, loss.dtype)
    tp.backward(loss, seed)
    tp.layer = None
    tp.op("training_step.end")
    tp.drop(loss, ids, labels, mask_2d)
    if plan.training.loss_check_syncs:
        # Trainer._inner_training_loop, logging_nan_inf_filter (default True): `torch.isnan(tr_loss_step) or
        # torch.isinf(tr_loss_step)` takes bool() of a CUDA tensor, a copy to the host that waits for the compute
        # stream, every micro-batch. (Its one-element results, 512 B blocks freed at once, are not modelled.)
        tp.op("trainer.loss_isnan", bytes_moved=loss.dtype.size_bytes + 1)
        tp.host_sync()
        tp.op("trainer.loss_isnan.item")


# hf_decoder._eager's two attention matmuls (and their backward ops): GEMM-kind ops that belong to the attention term
_EAGER_ATTENTION_GEMMS = (".matmul_qk", ".matmul_pv")
_FORWARD, _BACKWARD = PHASES.index(Phase.FORWARD), PHASES.index(Phase.BACKWARD)


def _model_flops(plan: Plan, schedule: Schedule) -> float:
    """Model FLOPs of the last step, PaLM's MFU numerator (Chowdhery et al. 2022, App. B: the forward and backward
    the model needs, recomputation excluded) for frozen weights too: every linear GEMM the step's forward and
    backward run (2·N·tokens forward; the activation gradient 2·N·tokens only where the linear's input needs a
    gradient; the weight gradient 2·N·tokens only for a trainable weight, LoRA adapters included), plus causal
    attention per layer, 2·b·a·s²·d forward and 4·b·a·s²·d backward where the layer's attention backward runs."""
    m, t = plan.model, plan.training
    causal_forward = 2.0 * t.micro_batch * m.num_attention_heads * t.seq_len * t.seq_len * m.head_size
    phases, steps = schedule.phase_codes(), np.asarray(schedule.op_step)
    counted = np.flatnonzero((steps == steps[-1]) & ((phases == _FORWARD) | (phases == _BACKWARD)))
    dense = 0.0
    attention: set[tuple[int, int | None, int]] = set()  # (micro-batch, layer, phase) where attention ran
    ops, micro_batches = schedule.ops, schedule.op_micro_batch
    for i in counted.tolist():
        op = ops[i]
        if op.kind is OpKind.ATTENTION or (op.kind is OpKind.GEMM and
                                           any(part in op.name for part in _EAGER_ATTENTION_GEMMS)):
            attention.add((micro_batches[i], op.layer, int(phases[i])))
        elif op.kind is OpKind.GEMM:
            dense += op.flops
    return dense + sum(causal_forward if phase == _FORWARD else 2 * causal_forward for _, _, phase in attention)
