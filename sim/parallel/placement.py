"""Where one rank keeps its parameters, gradients and optimizer states, as hook sets on the training step: the whole
model on one device, torch DDP, DeepSpeed ZeRO-1/2, or ZeRO-3. Each placement is a `Placement`: what runs at the
micro-batch boundaries and at the optimizer step, plus the gradient hooks it sets on the tape (sim/workload/hooks.py
lists every seam). #16's strategies hook in through the same seams."""

from dataclasses import dataclass
from typing import Protocol

from sim.parallel.data_parallel import Ddp, Zero12
from sim.parallel.zero3 import Zero3, Zero3Optimizer
from sim.plan import Plan
from sim.workload.context import RunContext
from sim.workload.optimizer import (Optimizer, adamw_foreach_denom_list, bnb_block_elements, bnb_embeddings_in_fp32,
                                    zero_grad)
from sim.workload.tape import Param, Tape


@dataclass(frozen=True, slots=True)
class ModelStates:
    """Persistent per-rank state after the first optimizer step."""

    parameters: int
    trainable_parameters: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    host_bytes: int = 0  # offloaded state in pinned host memory


class Placement(Protocol):
    """What the training loop (sim/schedule.py) calls around each micro-batch and at the optimizer step."""

    syncs_last: bool  # the last micro-batch of an accumulation differs from the others (it cannot repeat them)

    def before_micro_batch(self, last: bool) -> None:
        """Before the micro-batch's forward; `last`: it closes a gradient accumulation."""

    def before_backward(self) -> None:
        """After the loss, before autograd runs (DeepSpeed's engine.backward prologue)."""

    def after_micro_batch(self, last: bool) -> None:
        """After the micro-batch's backward."""

    def step(self) -> ModelStates:
        """Clipping, the optimizer step and zero_grad; returns the model states at the step."""


def module_hooks_for(tape: Tape, plan: Plan) -> Zero3 | None:
    """ZeRO-3's module hooks (gathers and releases around every module), set before the model is built: its
    parameters are then partitioned, not resident. None for every other placement."""
    zero = plan.zero
    if zero is None or zero.stage != 3:
        return None
    return Zero3(tape, zero, plan.world.gpus, plan.weights_dtype, plan.weights_dtype, zero.communication_dtype)


def choose_placement(ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> Placement:
    """Where parameters, gradients and optimizer states live: ZeRO-3, ZeRO-1/2, DDP, or whole on one device."""
    if isinstance(ctx.module_hooks, Zero3):
        return Zero3Placement(ctx, plan, params, trainable)
    if plan.zero is not None and plan.zero.stage in (1, 2):
        return Zero12Placement(ctx, plan, params, trainable)
    if plan.world.gpus > 1:
        return DdpPlacement(ctx, plan, params, trainable)
    return LocalPlacement(ctx, plan, params, trainable)


def _model_states(params: list[Param], trainable: list[Param], parameters_bytes: int, gradients_bytes: int,
                  optimizer_states_bytes: int, host_bytes: int = 0) -> ModelStates:
    """The model states with the parameter counts of `params` and `trainable`."""
    return ModelStates(sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in trainable),
                       parameters_bytes, gradients_bytes, optimizer_states_bytes, host_bytes)


class LocalPlacement:
    """Every parameter, gradient and optimizer state whole on this device (one GPU)."""

    syncs_last = False  # whether the last micro-batch of an accumulation differs from the others

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.params, self.trainable = ctx.tape, params, trainable
        training = plan.training
        self.clip = training.max_grad_norm > 0
        self.optimizer = Optimizer(training.optim, trainable, plan.on_host, training.weight_decay,
                                   adamw_foreach_denom_list(plan.versions.torch),
                                   bnb_block_elements(plan.versions.bitsandbytes),
                                   bnb_embeddings_in_fp32(plan.versions.transformers))

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
        return _model_states(self.params, self.trainable, sum(p.tensor.size_bytes for p in self.params), grads_bytes,
                             self.optimizer.state_bytes())


class DdpPlacement(LocalPlacement):
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


class Zero12Placement:
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
            self.tape.op("zero.backward_epilogue")
            self.zero.end_of_backward([p for p in self.trainable if p.grad is not None])

    def step(self) -> ModelStates:
        """The optimizer step; the gradients at it are this rank's 16-bit partition for stage 1 as for stage 2
        (stage_1_and_2.py step: the parameters' full gradients are freed, free_grad_in_param_list, and
        averaged_gradients, the partition, is flattened and cast to fp32 for the inner optimizer), none on the GPU
        with offload."""
        grads = 0 if self.zero.offload else self.zero.partition * self.zero.dtype.size_bytes
        self.zero.step()
        zero_grad(self.tape, self.trainable)
        return _model_states(self.params, self.trainable, sum(p.tensor.size_bytes for p in self.params), grads,
                             self.zero.state_bytes(), self.zero.host_bytes(self.accumulation))


class Zero3Placement:
    """DeepSpeed ZeRO-3: partitions, gathers and reduce-scatters (sim/parallel/zero3.py)."""

    syncs_last = False

    def __init__(self, ctx: RunContext, plan: Plan, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.zero, self.params, self.trainable = ctx.tape, ctx.module_hooks, params, trainable
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
        return _model_states(self.params, self.trainable, lp + persistent, grads, self.optimizer.state_bytes(),
                             self.optimizer.host_bytes())
