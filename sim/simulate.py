"""Scenario in, Run out: the plan resolved once → schedule → engine ⇄ allocator → trace. Prints nothing."""

import gc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

import numpy as np

from sim.allocator import make_allocator
from sim.allocator.base import Allocator
from sim.allocator.event_log import AllocatorEventLog
from sim.cost import CostModel
from sim.engine import Engine, EngineResult
from sim.errors import MAX_TENSOR_BYTES, ClockOverflow, ScenarioError, TensorTooLarge, WorkTooLarge
from sim.plan import Plan
from sim.report import Run
from sim.resolve import resolve_plan
from sim.scenario import Scenario
from sim.schedule import BuiltSchedule, build_schedule
from sim.steady import FIRST_PREFIX_STEPS, events_of, steady_state


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


# The default event budget: about 2 µs and 320 bytes per event on a 2-core machine (bench/bench_scenarios.py; the
# headline's 3-step prefix is 616,740 events in 1.0 s and 240 MB), so about 8 s and 1.3 GB at most. A larger run is
# refused, naming what drives its events, unless the caller raises the budget (`sim run --max-events`).
MAX_EVENTS = 4_000_000


class Progress(Protocol):
    """Where a long run reports how far it is (the CLI draws a bar from it on a terminal)."""

    def stage(self, description: str, total: int) -> None:
        """A new stage of `total` units begins."""

    def advance(self) -> None:
        """One unit of the current stage is done."""


def run_scenario(scenario: Scenario, event_log: bool = False, steady_state: bool = True,
                 max_events: int | None = MAX_EVENTS, progress: Progress | None = None) -> Run:
    """Simulate a scenario: its compact schedule (repeated micro-batches recorded once) through the engine
    (`event_log=True`: keep the caching allocator's event log of the whole run in Run.event_log; ValueError with the
    exact allocator, which has none). With `steady_state` (and no event log), a run of many steps simulates a prefix
    of them and counts the rest as repeats of its last step once that step is proven to repeat (sim/steady.py),
    doubling the prefix until it is; the result is the full simulation's. `max_events`: the event budget of what is
    simulated (None: none), WorkTooLarge beyond it. `progress`: told of each micro-batch built and of the engine."""
    plan = resolve_plan(scenario)
    steps = plan.training.steps
    simulated = steps if event_log or not steady_state else min(steps, FIRST_PREFIX_STEPS)
    with _no_cyclic_gc():
        while True:
            prefix = plan if simulated == steps else replace(plan, training=replace(plan.training, steps=simulated))
            if progress is not None:
                progress.stage(f"building {simulated} of {steps} steps",
                               simulated * plan.training.accumulation_steps + 1)
            built = _build(scenario, prefix, max_events, progress.advance if progress is not None else None)
            run = run_built(scenario, prefix, built, steps_total=steps,
                            event_log=AllocatorEventLog() if event_log else None)
            if progress is not None:
                progress.advance()
            if simulated == steps or run.steady is not None:
                return replace(run, plan=plan)
            # an allocator whose state no signature captures never repeats: simulate every step at once
            simulated = min(steps, 2 * simulated) if run.allocator.can_repeat() else steps


def _build(scenario: Scenario, plan: Plan, max_events: int | None,
           on_micro_batch: Callable[[], None] | None) -> BuiltSchedule:
    """build_schedule, a tensor too large or a run over the event budget named by the scenario keys behind it."""
    try:
        return build_schedule(plan, max_events=max_events, on_micro_batch=on_micro_batch)
    except TensorTooLarge as exc:
        raise TensorTooLarge(f"{exc}; its shape comes from {_shapes(scenario)}") from None
    except WorkTooLarge as exc:
        training = plan.training
        simulated = training.steps if training.steps == scenario.simulation.steps else \
            f"{training.steps} simulated of simulation.steps {scenario.simulation.steps}, the rest repeating the last"
        raise WorkTooLarge(f"{exc}, over the budget of {max_events:,}; events grow with model.num_hidden_layers "
                           f"({plan.model.num_hidden_layers}), training.gradient_accumulation_steps "
                           f"({training.accumulation_steps}) and the steps ({simulated}); --max-events raises the "
                           "budget") from None


def _shapes(scenario: Scenario) -> str:
    """The scenario keys tensor shapes are made of, with their values, for an error line."""
    t, m = scenario.training, scenario.model
    return (f"training.seq_len ({t.seq_len}), training.per_device_train_batch_size ({t.per_device_train_batch_size}) "
            f"and the model's widths (hidden_size {m.hidden_size}, intermediate_size {m.intermediate_size}, "
            f"vocab_size {m.vocab_size}, num_attention_heads {m.num_attention_heads})")


def run_built(scenario: Scenario, plan: Plan, built: BuiltSchedule, repeat: bool = True,
              event_log: AllocatorEventLog | None = None, steps_total: int | None = None) -> Run:
    """Run a built schedule, compact or expanded (Schedule.expand), on the plan's device, allocator and links
    (`repeat=False`: call the allocator for every event even where a window repeats, for checking; `event_log`:
    written by the caching allocator; `steps_total`: the run's steps where the schedule holds a prefix of them: the
    Run says whether the rest repeat its last step, Run.steady)."""
    held_at_most_bytes = float(built.schedule.buffer_sizes().sum(dtype=np.float64))  # each buffer live once at a time
    if held_at_most_bytes > MAX_TENSOR_BYTES:  # the traces and the allocator count bytes in int64
        raise ScenarioError(f"the run's tensors add up to {held_at_most_bytes:.3e} bytes, more than the 2^62 bytes "
                            f"any device could address; they are sized by {_shapes(scenario)}")
    allocator = _allocator(plan, event_log)
    cost = CostModel(plan.device, plan.compute_dtype, plan.world.gpus_per_node, plan.world.nodes, plan.nccl.version,
                     plan.nccl.channels, synchronous=plan.on_host)
    try:
        engine = Engine(built.schedule, allocator, cost, repeat)
    except ClockOverflow as exc:
        raise ClockOverflow(f"{exc}; the ops are sized by {_shapes(scenario)}") from None
    result = engine.run()
    steady = None
    if steps_total is not None and steps_total > plan.training.steps:
        steady = steady_state(engine, result, allocator, lambda: _allocator(plan, None), steps_total)
    return Run(scenario, plan, built, result, allocator, event_log, steady,
               _largest_free_block_before_oom(plan, engine, result))


def _largest_free_block_before_oom(plan: Plan, engine: Engine, result: EngineResult) -> int | None:
    """The largest cached free block just before the first OOM (what the cache could still serve), read by
    replaying the events before it on a fresh allocator; None without an OOM or a cache."""
    if result.oom is None:
        return None
    entered = _allocator(plan, None)
    engine.replay(entered, events_of(result).head(result.oom.event_index))
    return entered.largest_free_block_bytes()


def _allocator(plan: Plan, event_log: AllocatorEventLog | None) -> Allocator:
    """A fresh allocator of the plan's backend for its device: PyTorch gets what the runtime leaves."""
    device = plan.device
    non_pytorch = plan.runtime.non_pytorch_bytes()
    return make_allocator(plan.allocator.backend, plan.allocator.conf, max(device.capacity_bytes - non_pytorch, 0),
                          device.capacity_bytes, plan.versions.torch, event_log)
