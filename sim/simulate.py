"""Scenario in, Run out: schedule → engine ⇄ allocator → trace. No printing, no files."""

import gc
from contextlib import contextmanager

from sim.allocator import make_allocator
from sim.cost import CostModel
from sim.engine import Engine
from sim.errors import ScenarioError
from sim.parallel.nccl import nccl_buffer_bytes, nccl_channels, nccl_version
from sim.report import Run
from sim.scenario import Scenario
from sim.vocab import DType
from sim.schedule import build_schedule, compute_dtype, weights_dtype


# deepspeed/runtime/config.py DtypeEnum: the names data_types.grad_accum_dtype accepts
_DEEPSPEED_DTYPES = {name: dtype for dtype, names in (
    (DType.FLOAT16, ("torch.float16", "fp16", "float16", "half")),
    (DType.FLOAT32, ("torch.float32", "fp32", "float32", "float")),
    (DType.BFLOAT16, ("torch.bfloat16", "bf16", "bfloat16"))) for name in names}


def check_supported(scenario: Scenario) -> None:
    """Refuse, with a clear message, what is not modelled yet rather than simulate it wrongly."""
    if scenario.deepspeed is not None:
        zero = scenario.deepspeed.zero_optimization
        for key in ("offload_param", "offload_optimizer"):
            config = getattr(zero, key) or {}
            device = config.get("device", "none")
            if device == "none":
                continue
            if device != "cpu" or (key == "offload_param" and zero.stage != 3):
                raise ScenarioError(f"deepspeed.zero_optimization.{key}.device: {device!r} offload is not modelled "
                                    f"yet with stage {zero.stage} (cpu offload is: of the optimizer with stages 1-3, "
                                    "of the parameters with stage 3)")
            if config.get("ratio", 1.0) != 1.0:
                raise ScenarioError(f"deepspeed.zero_optimization.{key}.ratio: partial offload ({config['ratio']!r}) "
                                    "is not modelled yet")
        if not zero.reduce_scatter:
            raise ScenarioError("deepspeed.zero_optimization.reduce_scatter: false is not modelled yet (gradients are "
                                "reduced as with the default, true)")
        accumulation = ((scenario.deepspeed.model_extra or {}).get("data_types") or {}).get("grad_accum_dtype")
        if accumulation is not None and _DEEPSPEED_DTYPES.get(str(accumulation).lower()) is not weights_dtype(scenario):
            raise ScenarioError(f"deepspeed.data_types.grad_accum_dtype: {accumulation!r} is not modelled yet "
                                f"(gradients are accumulated in the model dtype, {weights_dtype(scenario).value})")
    if scenario.strategies:
        raise ScenarioError(f"strategies: unknown strategy kind {scenario.strategies[0].kind!r} (none are defined yet)")


@contextmanager
def _no_cyclic_gc():
    """A run creates hundreds of thousands of long-lived objects; Python's cyclic collector would rescan them
    again and again (a quarter of the run time, measured in bench/). Reference counting still frees as usual;
    the few cycles (autograd nodes and their tensors) are collected when the collector is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_scenario(scenario: Scenario, repeat: bool = True) -> Run:
    """Simulate a scenario (`repeat=False`: build every micro-batch op by op, for checking the repetition)."""
    check_supported(scenario)
    with _no_cyclic_gc():
        return _run(scenario, repeat)


def _run(scenario: Scenario, repeat: bool) -> Run:
    built = build_schedule(scenario, repeat)
    device = scenario.hardware.device
    nccl = nccl_buffer_bytes(scenario)
    non_pytorch = device.cuda_context_bytes + nccl
    allocator = make_allocator(scenario.allocator, max(device.capacity_bytes - non_pytorch, 0),
                               device.capacity_bytes, scenario.software.version("torch"))
    cost = CostModel(device, compute_dtype(scenario) or weights_dtype(scenario) or DType.FLOAT32,
                     scenario.hardware.gpus_per_node, scenario.hardware.nodes, nccl_version(scenario),
                     nccl_channels(scenario))
    result = Engine(built.schedule, allocator, cost, repeat).run()
    return Run(scenario, built, result, non_pytorch, allocator, nccl)
