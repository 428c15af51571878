"""Scenario in, Run out: the plan resolved once → schedule → engine ⇄ allocator → trace. Prints nothing."""

import gc
from contextlib import contextmanager

import numpy as np

from sim.allocator import make_allocator
from sim.allocator.event_log import AllocatorEventLog
from sim.cost import CostModel
from sim.engine import Engine
from sim.errors import MAX_TENSOR_BYTES, ScenarioError, TensorTooLarge
from sim.plan import Plan
from sim.report import Run
from sim.resolve import resolve_plan
from sim.scenario import Scenario
from sim.schedule import BuiltSchedule, build_schedule


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


def run_scenario(scenario: Scenario, event_log: bool = False) -> Run:
    """Simulate a scenario: its compact schedule (repeated micro-batches recorded once) through the engine
    (`event_log=True`: keep the caching allocator's event log of the whole run in Run.event_log; ValueError with the
    exact allocator, which has none)."""
    plan = resolve_plan(scenario)
    with _no_cyclic_gc():
        try:
            built = build_schedule(plan)
        except TensorTooLarge as exc:
            raise TensorTooLarge(f"{exc}; its shape comes from {_shapes(scenario)}") from None
        return run_built(scenario, plan, built, event_log=AllocatorEventLog() if event_log else None)


def _shapes(scenario: Scenario) -> str:
    """The scenario keys tensor shapes are made of, with their values, for an error line."""
    t, m = scenario.training, scenario.model
    return (f"training.seq_len ({t.seq_len}), training.per_device_train_batch_size ({t.per_device_train_batch_size}) "
            f"and the model's widths (hidden_size {m.hidden_size}, intermediate_size {m.intermediate_size}, "
            f"vocab_size {m.vocab_size}, num_attention_heads {m.num_attention_heads})")


def run_built(scenario: Scenario, plan: Plan, built: BuiltSchedule, repeat: bool = True,
              event_log: AllocatorEventLog | None = None) -> Run:
    """Run a built schedule, compact or expanded (Schedule.expand), on the plan's device, allocator and links
    (`repeat=False`: call the allocator for every event even where a window repeats, for checking; `event_log`:
    written by the caching allocator)."""
    held_at_most_bytes = float(built.schedule.buffer_sizes().sum(dtype=np.float64))  # each buffer live once at a time
    if held_at_most_bytes > MAX_TENSOR_BYTES:  # the traces and the allocator count bytes in int64
        raise ScenarioError(f"the run's tensors add up to {held_at_most_bytes:.3e} bytes, more than the 2^62 bytes "
                            f"any device could address; they are sized by {_shapes(scenario)}")
    device = plan.device
    non_pytorch = plan.runtime.non_pytorch_bytes()
    allocator = make_allocator(plan.allocator.backend, plan.allocator.conf,
                               max(device.capacity_bytes - non_pytorch, 0), device.capacity_bytes, plan.versions.torch,
                               event_log)
    cost = CostModel(device, plan.compute_dtype, plan.world.gpus_per_node, plan.world.nodes, plan.nccl.version,
                     plan.nccl.channels)
    result = Engine(built.schedule, allocator, cost, repeat).run()
    return Run(scenario, plan, built, result, allocator, event_log)
