"""The ops one rank runs: micro-batches × gradient accumulation, HF gradient checkpointing, the optimizer step,
for `simulation.steps` steps, on a symbolic autograd tape (sim/workload)."""

from dataclasses import dataclass

from sim.errors import ScenarioError
from sim.ops import Phase, Schedule
from sim.scenario import Scenario
from sim.vocab import AllocatorBackend, DType, ModelType, Optim
from sim.workload import primitives as P
from sim.workload.architecture import ARCHITECTURES, Architecture
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


def compute_dtype(scenario: Scenario) -> DType | None:
    """torch.autocast dtype when the Trainer's bf16/fp16 flag meets weights of another dtype (fp32 weights).
    Under DeepSpeed the engine converts the model itself and the Trainer runs no autocast."""
    if scenario.deepspeed is not None:
        return None
    weights = weights_dtype(scenario)
    wanted = DType.BFLOAT16 if scenario.training.bf16 else DType.FLOAT16 if scenario.training.fp16 else None
    return wanted if wanted is not None and wanted is not weights else None


def weights_dtype(scenario: Scenario) -> DType:
    """Config torch_dtype; Qwen1's remote code with no bf16/fp16/fp32 flag set autoselects bf16
    (modeling_qwen.py QWenLMHeadModel.__init__ autoset_precision) on bf16-capable GPUs. DeepSpeed converts the
    module to bf16/fp16 when its config enables them (engine.py _configure_distributed_model); a config without
    the section gets it from the Trainer's flag (accelerate DeepSpeedPlugin.set_mixed_precision adds
    {"bf16": {"enabled": true}} when the config has no bf16 key)."""
    if scenario.deepspeed is not None:
        extra = scenario.deepspeed.model_extra or {}
        for section, dtype in (("bf16", DType.BFLOAT16), ("fp16", DType.FLOAT16)):
            node = extra.get(section)
            flag = node.get("enabled", False) if isinstance(node, dict) else None
            if flag is True or (flag in ("auto", None) and getattr(scenario.training, section)):
                return dtype
        return DType.FLOAT32
    model = scenario.model
    if model.torch_dtype is None and model.model_type is ModelType.QWEN:
        extra = model.model_extra or {}
        if extra.get("fp16"):
            return DType.FLOAT16
        if extra.get("fp32"):
            return DType.FLOAT32
        return DType.BFLOAT16
    return model.weights_dtype


def communication_dtype(scenario: Scenario) -> DType:
    """DeepSpeed's `communication_data_type` for gradient reduction: "fp32", "fp16", or bf16 as "bfp16" up to
    0.14.0 and "bf16" from 0.14.1 (runtime/config.py get_communication_data_type raises on anything else);
    without it the model dtype (engine.py communication_data_type)."""
    value = (scenario.deepspeed.model_extra or {}).get("communication_data_type")
    if value is None:
        return weights_dtype(scenario)
    bf16 = "bfp16" if scenario.software.version("deepspeed") <= (0, 14, 0) else "bf16"
    names = {"fp32": DType.FLOAT32, "fp16": DType.FLOAT16, bf16: DType.BFLOAT16}
    if not isinstance(value, str) or value.lower() not in names:
        raise ScenarioError(f"deepspeed.communication_data_type: {value!r} is not one of {', '.join(names)} "
                            "(DeepSpeed's names for this version)")
    return names[value.lower()]


def on_host(scenario: Scenario) -> bool:
    """An inline device with no CUDA context and the exact allocator stands for a plain CPU host (design.md §3)."""
    return scenario.hardware.device.cuda_context_bytes == 0 and scenario.allocator.backend is AllocatorBackend.EXACT


def parameter_counts(scenario: Scenario) -> tuple[int, int]:
    """(all, trainable) parameter elements of the modelled model, adapters included, without running it."""
    ctx = _context(scenario, Tape())
    ctx.tape.op("model.init")
    params = modelling_code(scenario).build_model(ctx, scenario.lora).params()
    return sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in params if p.tensor.requires_grad)


def _context(scenario: Scenario, tape: Tape) -> RunContext:
    training = scenario.training
    behaviour = behaviour_for(scenario.software, scenario.model.model_type, training.gradient_checkpointing)
    dtype = weights_dtype(scenario)
    model_spec = scenario.model.model_copy(update={"torch_dtype": dtype})
    adapter_dtype = None
    if scenario.lora is not None:
        low_precision = dtype in (DType.BFLOAT16, DType.FLOAT16)
        adapter_dtype = DType.FLOAT32 if behaviour.peft_adapters_fp32 and low_precision else dtype
    return RunContext(tape, model_spec, training.per_device_train_batch_size, training.seq_len,
                      training.attn_implementation, behaviour, compute_dtype(scenario), adapter_dtype,
                      on_host(scenario))


def cublas_workspace_bytes(scenario: Scenario) -> int:
    """Default CUBLAS_WORKSPACE_CONFIG as PyTorch sets it (aten/src/ATen/cuda/CublasHandlePool.cpp):
    ":4096:2:16:8" = 2·4096 KiB + 8·16 KiB = 8,519,680 B; ":4096:8" = 32 MiB on Hopper (compute capability 9)
    from torch 2.1. None on a host."""
    if on_host(scenario):
        return 0
    capability = scenario.hardware.device.compute_capability or "8.0"
    hopper = int(capability.split(".")[0]) >= 9 and scenario.software.version("torch") >= (2, 1, 0)
    return 8 * 4096 * 1024 if hopper else 2 * 4096 * 1024 + 8 * 16 * 1024


def cublaslt_workspace(scenario: Scenario) -> tuple[int, bool]:
    """(bytes, kept per thread) of the cuBLASLt workspace a bias linear (addmm → gemm_and_bias) uses; none on a
    host, and none under ZeRO-3, whose linear (deepspeed/runtime/zero/linear.py) runs matmul then adds the bias.
    CUBLASLT_WORKSPACE_SIZE defaults to 1024 KiB (pytorch#101145); allocated per call through the caching
    allocator before torch 2.8, kept per (handle, stream) from 2.8 (pytorch#156495), and from 2.10 cuBLASLt
    shares the cuBLAS workspace by default (pytorch#168175)."""
    zero3 = scenario.deepspeed is not None and scenario.deepspeed.zero_optimization.stage == 3
    torch = scenario.software.version("torch")
    if on_host(scenario) or zero3 or torch >= (2, 10, 0):
        return 0, False
    return 1024 * 1024, torch >= (2, 8, 0)


def build_schedule(scenario: Scenario, repeat: bool = True) -> BuiltSchedule:
    """The ops of one rank. `repeat=False` builds every micro-batch op by op instead of repeating identical
    ones (same schedule, slower: for tests)."""
    tape = Tape()
    tape.blas_workspace_bytes = cublas_workspace_bytes(scenario)
    tape.lt_workspace_bytes, tape.lt_workspace_persistent = cublaslt_workspace(scenario)
    training = scenario.training
    ctx = _context(scenario, tape)
    zero = scenario.deepspeed.zero_optimization if scenario.deepspeed is not None else None
    if zero is not None and zero.stage == 3:
        ctx.zero3 = Zero3(tape, zero, scenario.hardware.gpus, weights_dtype(scenario), weights_dtype(scenario),
                          communication_dtype(scenario))
    tape.op("model.init")
    model = modelling_code(scenario).build_model(ctx, scenario.lora)
    params = model.params()
    trainable = [p for p in params if p.tensor.requires_grad]
    placement = _placement(ctx, scenario, params, trainable)
    states_after_first_step = None
    template = None  # the latest micro-batch built after the first of a step: later ones repeat it when they can
    for step in range(scenario.simulation.steps):
        tape.step = step
        for micro in range(training.gradient_accumulation_steps):
            tape.micro_batch = micro
            last = micro == training.gradient_accumulation_steps - 1
            # micro-batches after the second repeat it exactly (grads exist) when nothing crosses its ends;
            # the last one of an accumulation differs where gradients are reduced only there (DDP, ZeRO-1)
            if repeat and micro >= 1 and template is not None and not (last and placement.syncs_last) and \
                    tape.replicate(*template, step, micro):
                continue
            start = tape.op_count()
            placement.before_micro_batch(last)
            _micro_batch(ctx, scenario, model, placement.before_backward)
            placement.after_micro_batch(last)
            if micro >= 1 and not (last and placement.syncs_last):  # the latest built one is the template
                template = (start, tape.op_count())
        tape.phase, tape.layer = Phase.OPTIMIZER, None
        states = placement.step()
        states_after_first_step = states_after_first_step or states
    tokens = training.per_device_train_batch_size * training.seq_len * training.gradient_accumulation_steps
    return BuiltSchedule(tape.schedule(), states_after_first_step, tokens, _model_flops(scenario, params, tokens))


def _placement(ctx: RunContext, scenario: Scenario, params: list[Param], trainable: list[Param]):
    zero = scenario.deepspeed.zero_optimization if scenario.deepspeed is not None else None
    if ctx.zero3 is not None:
        return _Zero3Placement(ctx, scenario, params, trainable)
    if zero is not None and zero.stage in (1, 2):
        return _Zero12Placement(ctx, scenario, params, trainable)
    if scenario.hardware.gpus > 1:
        return _DdpPlacement(ctx, scenario, params, trainable)
    return _LocalPlacement(ctx, scenario, params, trainable)


def _model_states(params: list[Param], trainable: list[Param], parameters_bytes: int, gradients_bytes: int,
                  optimizer_states_bytes: int, host_bytes: int = 0) -> ModelStates:
    return ModelStates(sum(p.tensor.numel for p in params), sum(p.tensor.numel for p in trainable),
                       parameters_bytes, gradients_bytes, optimizer_states_bytes, host_bytes)


class _LocalPlacement:
    """Every parameter, gradient and optimizer state whole on this device (one GPU)."""

    syncs_last = False  # whether the last micro-batch of an accumulation differs from the others

    def __init__(self, ctx: RunContext, scenario: Scenario, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.params, self.trainable = ctx.tape, params, trainable
        training = scenario.training
        self.clip = training.max_grad_norm > 0
        self.optimizer = Optimizer(training.optim or ctx.behaviour.default_optim, trainable, on_host(scenario),
                                   training.weight_decay)

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

    def __init__(self, ctx: RunContext, scenario: Scenario, params: list[Param], trainable: list[Param]) -> None:
        super().__init__(ctx, scenario, params, trainable)
        self.ddp = Ddp(ctx.tape, scenario.hardware.gpus, trainable)
        ctx.tape.post_grad_hook = self.ddp.on_grad_ready

    def before_micro_batch(self, last: bool) -> None:
        self.ddp.sync = last  # accelerate's accumulate(): no_sync except at the accumulation boundary

    def after_micro_batch(self, last: bool) -> None:
        if last:
            self.ddp.finalize()


class _Zero12Placement:
    """DeepSpeed ZeRO-1/2 (sim/parallel/data_parallel.py)."""

    def __init__(self, ctx: RunContext, scenario: Scenario, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.params, self.trainable = ctx.tape, params, trainable
        config = scenario.deepspeed.zero_optimization
        self.zero = Zero12(ctx.tape, config, scenario.hardware.gpus, trainable, weights_dtype(scenario),
                           scenario.software.version("deepspeed"), communication_dtype(scenario),
                           _inner_optimizer_temporaries(ctx, scenario))
        self.accumulation = scenario.training.gradient_accumulation_steps
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

    def __init__(self, ctx: RunContext, scenario: Scenario, params: list[Param], trainable: list[Param]) -> None:
        self.tape, self.zero, self.params, self.trainable = ctx.tape, ctx.zero3, params, trainable
        self.zero.register(params)
        self.zero.init_buffers(trainable)
        self.optimizer = Zero3Optimizer(self.zero, trainable, _inner_optimizer_temporaries(ctx, scenario),
                                        scenario.software.version("deepspeed") < (0, 13, 2))
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


def _inner_optimizer_temporaries(ctx: RunContext, scenario: Scenario) -> int:
    """fp32 temporaries of the sub-group size in the inner optimizer's step: DeepSpeed's own optimizer (config
    "optimizer" section → FusedAdam) and torch's fused AdamW make none; torch AdamW foreach makes
    exp_avg_sq_sqrt (_multi_tensor_adamw)."""
    if (scenario.deepspeed.model_extra or {}).get("optimizer"):
        return 0
    optim = scenario.training.optim or ctx.behaviour.default_optim
    return 0 if optim in (Optim.ADAMW_TORCH_FUSED, Optim.SGD) else 1


def modelling_code(scenario: Scenario) -> Architecture:
    """The Architecture registered for the scenario's model_type (sim/workload/architecture.py). LoRA module names
    are checked against it, as PEFT does ("Target modules ... not found in the base model")."""
    code = ARCHITECTURES[scenario.model.model_type]
    lora = scenario.lora
    if lora is not None:
        kind = scenario.model.model_type.value
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


def _micro_batch(ctx: RunContext, scenario: Scenario, model, before_backward) -> None:
    """Trainer.training_step: inputs to the device, forward with labels, loss / accumulation, backward
    (`before_backward`: what the engine's backward does before autograd runs, e.g. DeepSpeed's IPG buffers)."""
    tp = ctx.tape
    tp.phase, tp.layer = Phase.FORWARD, None
    ids = P.input_tensor(tp, "input_ids", ctx.tokens)
    labels = P.input_tensor(tp, "labels", ctx.tokens)
    mask_2d = P.input_tensor(tp, "attention_mask", ctx.tokens)
    loss = modelling_code(scenario).forward_loss(ctx, model, ids, labels, scenario.training.gradient_checkpointing)
    if scenario.training.gradient_accumulation_steps > 1:  # accelerate's backward divides the loss
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


def _model_flops(scenario: Scenario, params: list[Param], tokens: int) -> float:
    """6·N·tokens (Kaplan et al. 2020) plus causal attention 6·2·b·s²·h·L/2 per micro-batch, forward+backward."""
    m, t = scenario.model, scenario.training
    dense = 6.0 * sum(p.tensor.numel for p in params if not p.name.endswith(EMBEDDING_NAMES)) * tokens
    attention = 6.0 * t.seq_len * t.seq_len * m.num_attention_heads * m.head_size * m.num_hidden_layers
    return dense + attention * t.per_device_train_batch_size * t.gradient_accumulation_steps
