"""The ops one rank runs: micro-batches × gradient accumulation, HF gradient checkpointing, the optimizer step,
for `simulation.steps` steps, on a symbolic autograd tape (sim/workload)."""

from dataclasses import dataclass

from sim.errors import ScenarioError
from sim.ops import Phase, Schedule
from sim.plan import Plan
from sim.vocab import ModelType
from sim.workload import hf_decoder, qwen1
from sim.workload import primitives as P
from sim.workload.behaviour import behaviour_for
from sim.parallel.data_parallel import Ddp, Zero12
from sim.parallel.zero3 import Zero3, Zero3Optimizer
from sim.workload.context import RunContext
from sim.workload.optimizer import Optimizer, zero_grad
from sim.workload.tape import Param, Tape

EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight")  # lookups, not matmuls: no 6·N FLOPs


@dataclass(frozen=True, slots=True)
class ModelStates:
    """Persistent per-rank state after the first optimizer step."""

    parameters: int
    trainable_parameters: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    host_bytes: int = 0  # offloaded state in pinned host memory


@dataclass(slots=True)
class BuiltSchedule:
    schedule: Schedule
    model_states: ModelStates
    tokens_per_step: int  # this rank's tokens per optimizer step
    model_flops_per_step: float  # 6·N·tokens + attention, this rank


def parameter_counts(plan: Plan) -> tuple[int, int]:
    """(all, trainable) parameter elements of the modelled model, adapters included, without running it."""
    ctx = _context(plan, Tape())
    ctx.tape.op("model.init")
    params = modelling_code(plan).build_model(ctx, plan.lora).params()
    return sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in params if p.tensor.requires_grad)


def _context(plan: Plan, tape: Tape) -> RunContext:
    training = plan.training
    return RunContext(tape, plan.model, training.micro_batch, training.seq_len, training.attn, plan.behaviour,
                      plan.autocast_dtype, plan.lora.adapter_dtype if plan.lora is not None else None, plan.on_host)


def build_schedule(plan: Plan, repeat: bool = True) -> BuiltSchedule:
    """The ops of one rank. `repeat=False` builds every micro-batch op by op instead of repeating identical
    ones (same schedule, slower: for tests)."""
    tape = Tape()
    workspaces = plan.workspaces
    tape.blas_workspace_bytes = workspaces.cublas_bytes
    tape.lt_workspace_bytes, tape.lt_workspace_persistent = workspaces.cublaslt_bytes, workspaces.cublaslt_persistent
    training = plan.training
    ctx = _context(plan, tape)
    zero = plan.zero
    if zero is not None and zero.stage == 3:
        ctx.zero3 = Zero3(tape, zero, plan.world.gpus, plan.weights_dtype, plan.weights_dtype,
                          zero.communication_dtype)
    tape.op("model.init")
    model = modelling_code(plan).build_model(ctx, plan.lora)
    params = model.params()
    trainable = [p for p in params if p.tensor.requires_grad]
    placement = _placement(ctx, plan, params, trainable)
    states_after_first_step = None
    template = None  # the latest micro-batch built after the first of a step: later ones repeat it when they can
    for step in range(training.steps):
        tape.step = step
        for micro in range(training.accumulation_steps):
            tape.micro_batch = micro
            last = micro == training.accumulation_steps - 1
            # micro-batches after the second repeat it exactly (grads exist) when nothing crosses its ends;
            # the last one of an accumulation differs where gradients are reduced only there (DDP, ZeRO-1)
            if repeat and micro >= 1 and template is not None and not (last and placement.syncs_last) and \
                    tape.replicate(*template, step, micro):
                continue
            start = tape.op_count()
            placement.before_micro_batch(last)
            _micro_batch(ctx, plan, model, placement.before_backward)
            placement.after_micro_batch(last)
            if micro >= 1 and not (last and placement.syncs_last):  # the latest built one is the template
                template = (start, tape.op_count())
        tape.phase, tape.layer = Phase.OPTIMIZER, None
        states = placement.step()
        states_after_first_step = states_after_first_step or states
    tokens = training.tokens_per_step
    return BuiltSchedule(tape.schedule(), states_after_first_step, tokens, _model_flops(plan, params, tokens))


def _placement(ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]):
    """Where parameters, gradients and optimizer states live: ZeRO-3, ZeRO-1/2, DDP, or whole on one device."""
    if ctx.zero3 is not None:
        return _Zero3Placement(ctx, plan, params, trainable)
    if plan.zero is not None and plan.zero.stage in (1, 2):
        return _Zero12Placement(ctx, plan, params, trainable)
    if plan.world.gpus > 1:
        return _DdpPlacement(ctx, plan, params, trainable)
    return _LocalPlacement(ctx, plan, params, trainable)


def _model_states(params: list[Param], trainable: list[Param], parameters_bytes: int, gradients_bytes: int,
                  optimizer_states_bytes: int, host_bytes: int = 0) -> ModelStates:
    return ModelStates(sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in trainable),
                       parameters_bytes, gradients_bytes, optimizer_states_bytes, host_bytes)


class _LocalPlacement:
    """Every parameter, gradient and optimizer state whole on this device (one GPU)."""

    syncs_last = False  # whether the last micro-batch of an accumulation differs from the others

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.params, self.trainable = ctx.tape, params, trainable
        training = plan.training
        self.clip = training.max_grad_norm > 0
        self.optimizer = Optimizer(training.optim, trainable, plan.on_host, training.weight_decay)

    def before_micro_batch(self, last: bool) -> None:
        pass

    def before_backward(self) -> None:
        pass

    def after_micro_batch(self, last: bool) -> None:
        pass

    def step(self) -> ModelStates:
        """clip_grad_norm_, optimizer.step(), model.zero_grad(); returns the model states at the step."""
        grads_bytes = sum(p.grad.size_bytes for p in self.trainable if p.grad is not None)
        if self.clip:
            self.optimizer.clip_grad_norm(self.tape)
        self.optimizer.step(self.tape)
        zero_grad(self.tape, self.trainable)
        return _model_states(self.params, self.trainable, sum(p.tensor.size_bytes for p in self.params), grads_bytes, self.optimizer.state_bytes())


class _DdpPlacement(_LocalPlacement):
    """torch DDP: the local placement plus the reducer's buckets and allreduces (sim/parallel/data_parallel.py)."""

    syncs_last = True

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        super().__init__(ctx, plan, params, trainable)
        self.ddp = Ddp(ctx.tape, plan.world.gpus, trainable)
        ctx.tape.post_grad_hook = self.ddp.on_grad_ready

    def before_micro_batch(self, last: bool) -> None:
        self.ddp.sync = last  # accelerate's accumulate(): no_sync except at the accumulation boundary

    def after_micro_batch(self, last: bool) -> None:
        if last:
            self.ddp.finalize()


class _Zero12Placement:
    """DeepSpeed ZeRO-1/2 (sim/parallel/data_parallel.py)."""

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.params, self.trainable = ctx.tape, params, trainable
        config = plan.zero
        self.zero = Zero12(ctx.tape, config, plan.world.gpus, trainable, plan.weights_dtype, plan.versions.deepspeed,
                           config.communication_dtype, config.inner_optimizer_temporaries)
        self.accumulation = plan.training.accumulation_steps
        # ZeRO-1 reduces only at the boundary; with offload the boundary copies gradients to the host
        self.syncs_last = config.stage == 1 or self.zero.offload
        if config.stage == 2:
            ctx.tape.grad_hook = self.zero.on_grad
        elif self.zero.overlap:  # ZeRO-1 reduces in the hooks at the boundary instead of after backward
            ctx.tape.post_grad_hook = self.zero.on_accumulated_grad

    def before_micro_batch(self, last: bool) -> None:
        self.zero.boundary = last

    def before_backward(self) -> None:
        self.zero.begin_backward()

    def after_micro_batch(self, last: bool) -> None:
        if self.zero.stage == 2 or last:
            # ZeRO-1's full bf16 gradients, held through the accumulation until this boundary
            self.full_grads_bytes = sum(p.grad.size_bytes for p in self.trainable if p.grad is not None)
            self.tape.op("zero.backward_epilogue")
            self.zero.end_of_backward([p for p in self.trainable if p.grad is not None])

    def step(self) -> ModelStates:
        grads = self.full_grads_bytes
        if self.zero.stage == 2:
            grads = 0 if self.zero.offload else self.zero.partition * self.zero.dtype.size_bytes
        self.zero.step()
        zero_grad(self.tape, self.trainable)
        return _model_states(self.params, self.trainable, sum(p.tensor.size_bytes for p in self.params), grads,
                             self.zero.state_bytes(), self.zero.host_bytes(self.accumulation))


class _Zero3Placement:
    """DeepSpeed ZeRO-3: partitions, gathers and reduce-scatters (sim/parallel/zero3.py)."""

    syncs_last = False

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.zero, self.params, self.trainable = ctx.tape, ctx.zero3, params, trainable
        self.zero.register(params)
        self.zero.init_buffers(trainable)
        self.optimizer = Zero3Optimizer(self.zero, trainable, plan.zero.inner_optimizer_temporaries,
                                        plan.versions.deepspeed < (0, 13, 2))
        self.zero.finish_engine_init(trainable)
        self.tape.grad_hook = self.zero.on_grad

    def before_micro_batch(self, last: bool) -> None:
        pass

    def before_backward(self) -> None:
        pass

    def after_micro_batch(self, last: bool) -> None:
        self.tape.op("zero3.backward_epilogue")
        self.zero.end_of_backward()
        self.zero.end_of_forward_backward()

    def step(self) -> ModelStates:
        zero = self.zero
        self.tape.op("zero3.partition_all_parameters")
        zero.release_and_reset_all()
        self.optimizer.step()
        persistent = sum(z.param.tensor.size_bytes for z in zero.states.values() if z.persist)
        lp = 0 if zero.offload_param else zero.partition_numel(self.params) * zero.dtype.size_bytes
        grads = 0 if zero.offload_optimizer else zero.partition_numel(self.trainable) * zero.grad_dtype.size_bytes
        return _model_states(self.params, self.trainable, lp + persistent, grads, self.optimizer.state_bytes(), self.optimizer.host_bytes())


def modelling_code(plan: Plan):
    """The module that models the scenario's model_type: HF's qwen2/llama/mistral code, or Qwen1's remote code.
    LoRA module names are checked against it, as PEFT does ("Target modules ... not found in the base model")."""
    code = qwen1 if plan.model.model_type is ModelType.QWEN else hf_decoder
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


def _micro_batch(ctx: RunContext, plan: Plan, model, before_backward) -> None:
    """Trainer.training_step: inputs to the device, forward with labels, loss / accumulation, backward
    (`before_backward`: what the engine's backward does before autograd runs, e.g. DeepSpeed's IPG buffers)."""
    tp = ctx.tape
    tp.phase, tp.layer = Phase.FORWARD, None
    ids = P.input_tensor(tp, "input_ids", ctx.tokens)
    labels = P.input_tensor(tp, "labels", ctx.tokens)
    mask_2d = P.input_tensor(tp, "attention_mask", ctx.tokens)
    loss = modelling_code(plan).forward_loss(ctx, model, ids, labels, plan.training.gradient_checkpointing)
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


def _model_flops(plan: Plan, params: list[Param], tokens: int) -> float:
    """6·N·tokens (Kaplan et al. 2020) plus causal attention 6·2·b·s²·h·L/2 per micro-batch, forward+backward."""
    m, t = plan.model, plan.training
    dense = 6.0 * sum(p.tensor.numel for p in params if not p.name.endswith(EMBEDDING_NAMES)) * tokens
    attention = 6.0 * t.seq_len * t.seq_len * m.num_attention_heads * m.head_size * m.num_hidden_layers
    return dense + attention * t.micro_batch * t.accumulation_steps
