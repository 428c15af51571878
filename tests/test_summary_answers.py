"""The summary and JSON answer the user's question first (issue #17 deliverable 1): at an OOM, what was live just
before the first failing allocation; otherwise the allocated peak with its breakdown and largest tensors; a warning
when a job fits with little headroom."""

import numpy as np

from sim.report import LARGEST_TENSORS, allocator_summary, format_summary, largest_live_tensors, summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw


def _live_at(run, row: int) -> dict[int, int]:
    """Buffer id -> size of every buffer live just after trace row `row`, by replaying the trace (the slow way)."""
    trace, live = run.engine.trace, {}
    for buffer_id, delta in zip(trace.buffer_id[:row + 1].tolist(), trace.delta_bytes[:row + 1].tolist()):
        if delta > 0:
            live[buffer_id] = delta
        else:
            live.pop(buffer_id, None)
    return live


def test_allocated_peak_is_max_memory_allocated_with_its_largest_live_tensors() -> None:
    raw = tiny_raw(gradient_accumulation_steps=2)
    raw["simulation"] = {"steps": 2}
    run = run_scenario(build_scenario(raw))
    result = summarize(run)
    top = result["allocated_peak"]
    assert top["allocated_bytes"] == result["max_memory"]["allocated_bytes"]
    assert sum(top["breakdown"].values()) == top["allocated_bytes"]
    row = int(np.argmax(run.engine.trace.allocated_bytes))
    live = _live_at(run, row)
    expected = sorted(live.values(), reverse=True)[:LARGEST_TENSORS]
    assert [t["size_bytes"] for t in top["largest_tensors"]] == expected
    names = {run.schedule.buffers[b].name for b, size in live.items()}
    assert all(t["name"] in names for t in top["largest_tensors"])
    assert largest_live_tensors(run, -1) == []


def test_an_oom_reports_what_was_live_just_before_it() -> None:
    raw = tiny_raw()
    raw["allocator"] = {"backend": "caching"}
    raw["hardware"]["device"] = {"name": "toy", "capacity_bytes": 3 * 2**20, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    run = run_scenario(build_scenario(raw))
    result = summarize(run)
    oom = result["oom"]
    assert oom is not None and not result["fits"]
    before = run.engine.oom.event_index - 1
    live = oom["live_before"]
    trace = run.engine.trace
    assert live["allocated_bytes"] == int(trace.allocated_bytes[before]) == sum(live["by_category"].values())
    assert live["reserved_bytes"] == int(trace.reserved_bytes[before])
    # the cache's largest free block then: cached bytes not in use, at most all of them
    assert 0 <= live["largest_free_block_bytes"] <= live["reserved_bytes"] - live["allocated_bytes"]
    assert [t["size_bytes"] for t in live["largest_tensors"]] == \
        sorted(_live_at(run, before).values(), reverse=True)[:LARGEST_TENSORS]
    printed = format_summary(result, allocator_summary(run))
    first = printed.index("first OOM")
    assert first < printed.index("memory     max allocated") < printed.index("allocated peak")
    assert "live just before: allocated" in printed and "largest tensors live just before:" in printed


def _on_device(capacity_bytes: int) -> dict:
    raw = tiny_raw()  # the exact backend: what is allocated does not depend on the capacity, short of an OOM
    raw["hardware"]["device"] = {"name": "snug", "capacity_bytes": capacity_bytes, "peak_flops": {"bf16": 1e14},
                                 "hbm_bytes_per_s": 1e12, "cuda_context_bytes": 0}
    return summarize(run_scenario(build_scenario(raw)))


def test_little_headroom_is_a_warning_line() -> None:
    roomy = _on_device(2**34)
    assert roomy["fits"] and "warning" not in format_summary(roomy)
    peak = roomy["peak"]["total_bytes"]
    snug = _on_device(int(peak * 1.02))  # the same run with 2% of the device free: under the 5% line
    assert snug["fits"] and snug["peak"]["total_bytes"] == peak
    assert snug["headroom_bytes"] == int(peak * 1.02) - peak
    assert "warning    fits with" in format_summary(snug) and "(2.0% of the device" in format_summary(snug)
