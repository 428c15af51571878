"""What-if strategies (issue #16): memory ideas applied to a run, chosen in a scenario's `strategies:` list by a
built-in `kind` or by `package.module:Class` (user code).

A built-in strategy changes how the modelling code runs (a flag the workload reads: sim/workload). A user strategy
is a pure transform of the built schedule: `transform(schedule)` takes the expanded Schedule (every op its own,
final buffer ids) and returns one, whose invariants are checked before the engine sees it (`check_schedule`):
every buffer is allocated and freed in turn, starting with an allocation, persistent ones never by an op;
dependencies point back to existing ops (so they are acyclic); streams are the simulator's, the host CPU's work
allocates no device memory and a collective on ProcessGroupNCCL's stream names the stream it allocates on; per-op
step and micro-batch columns match the ops. examples/free_logits_early.py is a user strategy with its test."""

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from sim.errors import ScenarioError
from sim.ops import STREAMS, Schedule, Stream


@dataclass(frozen=True, slots=True)
class SaveOnCpu:
    """`kind: save_on_cpu`: torch.autograd.graph.save_on_cpu around the model's forward (sim/workload/save_on_cpu.py):
    activation CPU offload. `pin_memory` (default true, as torch's) changes no device byte."""

    pin_memory: bool = True


BUILT_IN = {"save_on_cpu": SaveOnCpu}


@runtime_checkable
class ScheduleTransform(Protocol):
    """A user strategy: a pure transform of the expanded schedule."""

    def transform(self, schedule: Schedule) -> Schedule:
        """The schedule with the strategy applied (the argument is not to be changed in place)."""


def load_strategy(index: int, kind: str, options: Mapping) -> object:
    """A built-in strategy by kind, or `package.module:Class(**options)`; one clear line naming strategies[index]."""
    where = f"strategies[{index}]"
    if kind in BUILT_IN:
        try:
            return BUILT_IN[kind](**options)
        except TypeError as exc:
            raise ScenarioError(f"{where}: {kind}: {exc}") from None
    module_name, sep, class_name = kind.partition(":")
    if not sep or not module_name or not class_name:
        raise ScenarioError(f"{where}.kind: {kind!r} is neither a built-in strategy ({', '.join(BUILT_IN)}) nor "
                            "package.module:Class")
    try:
        strategy = getattr(importlib.import_module(module_name), class_name)(**options)
    except (ImportError, AttributeError) as exc:
        raise ScenarioError(f"{where}.kind: cannot load {kind!r}: {exc}") from None
    except TypeError as exc:
        raise ScenarioError(f"{where}: {kind}: {exc}") from None
    if not isinstance(strategy, ScheduleTransform):
        raise ScenarioError(f"{where}.kind: {kind!r} has no transform(schedule) method")
    return strategy


def apply_transforms(schedule: Schedule, strategies: tuple) -> Schedule:
    """Every user strategy's transform in order, each result checked; the schedule as it is without any."""
    for index, strategy in enumerate(strategies):
        if isinstance(strategy, ScheduleTransform):
            schedule = strategy.transform(schedule.expand())
            problem = check_schedule(schedule)
            if problem:
                raise ScenarioError(f"strategies[{index}] ({type(strategy).__name__}): its transform broke the "
                                    f"schedule: {problem}")
    return schedule


def check_schedule(schedule: Schedule) -> str:
    """The first broken invariant of an expanded schedule (module docstring), or ''."""
    if not schedule.is_expanded:
        return "a transform must return the expanded form (Schedule.expand)"
    ops = schedule.ops
    if len(schedule.op_step) != len(ops) or len(schedule.op_micro_batch) != len(ops):
        return f"{len(ops)} ops but {len(schedule.op_step)} steps and {len(schedule.op_micro_batch)} micro-batches"
    known = len(schedule.buffer_sizes())
    live = np.zeros(known, dtype=bool)
    persistent = set(schedule.persistent)
    live[list(persistent)] = True
    for index, op in enumerate(ops):
        if op.stream not in STREAMS:
            return f"op {index} ({op.name}) runs on an unknown stream {op.stream!r}"
        if op.stream is Stream.CPU and op.allocs:
            return f"op {index} ({op.name}) runs on the host CPU but allocates device memory"
        if op.stream in (Stream.NCCL_WORLD, Stream.NCCL_DP) and op.allocs and op.alloc_stream is None:
            return f"op {index} ({op.name}) allocates on ProcessGroupNCCL's stream: name the caller's (alloc_stream)"
        if any(d >= 0 or index + d < 0 for d in op.deps):
            return f"op {index} ({op.name}) depends on {op.deps}: dependencies point back to earlier ops"
        for buffer_id in op.allocs:
            if not 0 <= buffer_id < known or live[buffer_id]:
                return f"op {index} ({op.name}) allocates buffer {buffer_id}, unknown or already allocated"
            live[buffer_id] = True
        for buffer_id in op.frees:
            if not 0 <= buffer_id < known or not live[buffer_id] or buffer_id in persistent:
                return f"op {index} ({op.name}) frees buffer {buffer_id}, unknown, not allocated or persistent"
            live[buffer_id] = False
    return ""
