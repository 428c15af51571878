"""A whole run's event log (run_scenario(event_log=True)) on every golden case with the caching allocator: it
balances against the allocator's end state and sits at its events' times, and the compiled core's log is the
Python model's, entry for entry, wherever the core runs (tests/test_compiled_caching.py: the same on random runs)."""

from functools import cache

import numpy as np
import pytest

from golden_record import case_paths
from sim.allocator import caching, make_allocator
from sim.allocator.event_log import AllocatorAction
from sim.resolve import resolve_plan
from sim.scenario import build_scenario, load_scenario
from sim.simulate import run_scenario
from sim.vocab import AllocatorBackend
from tests.conftest import tiny_raw

A = AllocatorAction
CASES = case_paths()
# the golden cases: about 3 million events, most of them twice (once through the Python model), ~20 s in all
golden = pytest.mark.slow


def test_a_run_keeps_a_log_only_when_asked_and_only_with_the_caching_allocator() -> None:
    """Run.event_log is None unless asked for; the exact allocator refuses one; a caching run logs every event."""
    raw = tiny_raw()
    assert run_scenario(build_scenario(raw)).event_log is None
    with pytest.raises(ValueError, match="the exact allocator keeps no event log"):
        run_scenario(build_scenario(raw), event_log=True)
    raw["allocator"] = {"backend": "caching"}
    run = run_scenario(build_scenario(raw), event_log=True)
    assert len(run.event_log) > 0 and run.event_log.events == len(run.engine.trace)


def caching_plan(name: str):
    """The case's plan; skips the case where the exact allocator runs it (it keeps no log)."""
    plan = resolve_plan(load_scenario(CASES[name]))
    if plan.allocator.backend is AllocatorBackend.EXACT:
        pytest.skip("the exact allocator keeps no event log")
    return plan


@cache
def logged_run(name: str, compiled: bool) -> tuple[dict[str, np.ndarray], int, dict, np.ndarray, np.ndarray]:
    """The case run with an event log, through the compiled core where it applies (`compiled`) or the Python model
    event by event: the log's columns, its event count, the allocator's end statistics, and the trace's event
    times and reserved bytes."""
    core = caching._sim_caching
    if not compiled:
        caching._sim_caching = None
    try:
        run = run_scenario(load_scenario(CASES[name]), event_log=True)
    finally:
        caching._sim_caching = core
    assert run.engine.repeated_events == 0  # every event reached the allocator
    return (run.event_log.columns(), run.event_log.events, run.allocator.memory_stats(),
            run.engine.trace.time_us, run.engine.trace.reserved_bytes)


@golden
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_runs_log_balances_and_sits_at_its_events(name: str) -> None:
    """The log adds up to the allocator's end state and counters, and each entry sits at its event's time."""
    caching_plan(name)
    columns, events, stats, time_us, _ = logged_run(name, True)
    action, size, event = columns["action"], columns["size_bytes"], columns["event_index"]

    def total(*actions: AllocatorAction) -> int:
        """The bytes the entries of `actions` add up to."""
        return int(size[np.isin(action, actions)].sum())

    # segments in minus segments out is what stays reserved; the sizes of alloc and free_completed entries are
    # requested sizes (PyTorch logs block.requested_size), so what they leave is the requested bytes still active
    assert total(A.SEGMENT_ALLOC, A.SEGMENT_MAP) - total(A.SEGMENT_FREE, A.SEGMENT_UNMAP) == \
        stats["reserved_bytes.all.current"]
    assert total(A.ALLOC) - total(A.FREE_COMPLETED) == stats["requested_bytes.all.current"]
    assert (action == A.ALLOC).sum() - (action == A.FREE_REQUESTED).sum() == stats["allocation.all.current"]
    # one entry per cudaMalloc (or page mapping), cudaFree (or unmapping) and OOM the allocator counted
    assert np.isin(action, [A.SEGMENT_ALLOC, A.SEGMENT_MAP]).sum() == stats["num_device_alloc"]
    assert np.isin(action, [A.SEGMENT_FREE, A.SEGMENT_UNMAP]).sum() == stats["num_device_free"]
    assert (action == A.OOM).sum() == stats["num_ooms"]
    # every event is one malloc (its alloc entry) or one free (its free_requested entry), in order
    assert events == len(time_us)
    assert np.array_equal(event[np.isin(action, [A.ALLOC, A.FREE_REQUESTED])], np.arange(events))
    assert np.array_equal(columns["time_us"], time_us[event])


@golden
@pytest.mark.skipif(caching._sim_caching is None, reason="the compiled core is not built")
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_compiled_core_logs_what_the_python_model_logs(name: str) -> None:
    """Where the core takes the case's configuration, its log is the Python model's, every column."""
    plan = caching_plan(name)
    if not make_allocator(plan.allocator.backend, plan.allocator.conf, 0, 0, plan.versions.torch
                          ).can_replay_compiled():
        pytest.skip("the compiled core does not take this configuration: the Python model runs it anyway")
    compiled, python = logged_run(name, True), logged_run(name, False)
    for name_of_column, column in compiled[0].items():
        assert np.array_equal(column, python[0][name_of_column]), name_of_column
    assert compiled[1:3] == python[1:3]
    assert np.array_equal(compiled[4], python[4])
