"""`sim import-snapshot`: a snapshot pickle from elsewhere, read with builtins only (a pickle that would run a
command is refused and the command does not run), summarised, and replayed under other allocator settings."""

import os
import pickle
from pathlib import Path

import pytest

from sim.cli import main
from sim.errors import ScenarioError
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from sim.snapshot import memory_snapshot, snapshot_bytes
from sim.snapshot_import import read_snapshot, replay_trace, summarize_snapshot, trace_series
from tests.conftest import tiny_raw

MIB = 2**20
A = 0x7F0000000000


def _write(tmp_path: Path, data: bytes, name: str = "s.pickle") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _entry(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0, "frames": []}


def fragmenting_trace() -> dict:
    """30 MiB at A, 30 MiB at B, B freed, then 40 MiB: a real trace's shape (addresses as PyTorch reported them)."""
    b, c = A + 30 * MIB, A + 60 * MIB
    trace = [_entry("segment_alloc", A, 30 * MIB), _entry("alloc", A, 30 * MIB),
             _entry("segment_alloc", b, 30 * MIB), _entry("alloc", b, 30 * MIB),
             _entry("free_requested", b, 30 * MIB), _entry("free_completed", b, 30 * MIB),
             _entry("segment_alloc", c, 40 * MIB), _entry("alloc", c, 40 * MIB)]
    segments = [{"device": 0, "address": address, "total_size": size, "stream": 0, "blocks": [
        {"address": address, "size": size, "requested_size": size if held else 0,
         "state": "active_allocated" if held else "inactive", "frames": []}]}
        for address, size, held in ((A, 30 * MIB, True), (b, 30 * MIB, False), (c, 40 * MIB, True))]
    return {"segments": segments, "device_traces": [trace],
            "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": ""}}


def test_replay_of_a_fragmenting_trace_by_hand() -> None:
    snapshot = fragmenting_trace()
    default, _ = replay_trace(snapshot, "")
    # requests over 10 MiB take a segment of their size rounded to 2 MiB (CUDACachingAllocator.cpp get_allocation_size):
    # 30 + 30, then the freed 30 MiB block cannot hold 40 MiB: a third segment, 100 MiB reserved, 70 MiB at most live
    assert (default.max_reserved_bytes, default.max_allocated_bytes, default.cuda_mallocs) == (100 * MIB, 70 * MIB, 3)
    expandable, _ = replay_trace(snapshot, "expandable_segments:True")
    # one segment per stream mapped in 20 MiB pages (kLargeBuffer): 30 MiB maps 40, the next 30 MiB maps 20 more
    # (60 mapped); B's 30 MiB, freed at the end of the mapped range, grows into the 40 MiB request by one more page:
    # 80 MiB mapped at most
    assert expandable.max_reserved_bytes == 80 * MIB and expandable.max_allocated_bytes == 70 * MIB
    assert summarize_snapshot(snapshot)["devices"]["0"]["reserved_bytes"] == 100 * MIB


def test_an_exported_run_replays_to_its_own_figures(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["allocator"] = {"backend": "caching"}
    raw["simulation"] = {"steps": 2}
    run = run_scenario(build_scenario(raw), event_log=True)
    snapshot = read_snapshot(_write(tmp_path, snapshot_bytes(memory_snapshot(run))))
    replay, allocator = replay_trace(snapshot, "")
    trace = run.engine.trace
    assert replay.carried == 0 and replay.max_allocated_bytes == int(trace.allocated_bytes.max())
    assert replay.max_reserved_bytes == int(trace.reserved_bytes.max())
    assert replay.segments_at_end == len(snapshot["segments"]) == run.allocator.num_segments
    assert replay.reserved_at_end_bytes == sum(s["total_size"] for s in snapshot["segments"])
    # the same allocator model fed the same calls: the very segments the run exported, addresses and blocks included
    # (the stream aside: the replay registers the snapshot's stream numbers after the simulator's three streams)
    exported = [{**seg, "stream": None, "blocks": [{**b, "frames": []} for b in seg["blocks"]]}
                for seg in snapshot["segments"]]
    assert [{**seg, "stream": None} for seg in allocator.segments()] == exported


def test_a_ring_buffer_that_lost_its_start_makes_the_survivors_first() -> None:
    # the trace starts after 30 MiB at A was allocated (its alloc entry lost); A is freed in the trace
    snapshot = fragmenting_trace()
    snapshot["device_traces"][0] = snapshot["device_traces"][0][2:] + [_entry("free_completed", A, 30 * MIB)]
    snapshot["segments"][0]["blocks"][0]["state"] = "inactive"
    replay, _ = replay_trace(snapshot, "")
    assert replay.carried == 1 and replay.max_reserved_bytes == 100 * MIB


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    path = _write(tmp_path, pickle.dumps({"segments": [], "x": _RunsACommand(marker)}, protocol=4))
    assert main(["import-snapshot", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "system" in err and "holds builtins only" in err
    assert not marker.exists()


@pytest.mark.parametrize("data, message", [
    (pickle.dumps(fragmenting_trace(), protocol=4)[:-40], "truncated"),
    (b"", "ends early"),
    (b"segments: []\n", "not a memory snapshot pickle"),
    (pickle.dumps([1, 2], protocol=4), "no 'segments' list"),
    (pickle.dumps({"segments": [{"address": 0, "total_size": 1, "blocks": [{"address": 0}]}]}, protocol=4),
     r"segments\[0\]\.blocks\[0\] is not a block"),
    (pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "size": -1, "addr": 0}]]}, protocol=4),
     r"device_traces\[0\]\[0\] is not a trace entry"),
])
def test_bad_files_are_one_clear_line(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        read_snapshot(_write(tmp_path, data))


def test_a_directory_or_a_device_is_not_read(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not a regular file"):
        read_snapshot(tmp_path)
    with pytest.raises(ScenarioError, match="not a regular file"):
        read_snapshot(Path("/dev/zero"))


def test_cli_prints_the_replays_and_writes_json(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, pickle.dumps(fragmenting_trace(), protocol=4))
    out = tmp_path / "r.json"
    assert main(["import-snapshot", str(path), "--conf", "max_split_size_mb:20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "defaults (the snapshot's own)" in printed and "expandable_segments:True" in printed
    assert [r["conf"] for r in __import__("json").loads(out.read_text())["replays"]] == \
        ["", "expandable_segments:True", "max_split_size_mb:20"]
    assert main(["import-snapshot", str(path), "--conf", "max_split_size_mb:banana"]) == 2


def test_the_trace_s_own_memory_by_hand() -> None:
    # entries: seg+30, alloc 30, seg+30, alloc 30, free_requested, free_completed 30, seg+40, alloc 40 (MiB)
    times, reserved, requested = trace_series(fragmenting_trace())
    assert (reserved // MIB).tolist() == [30, 30, 60, 60, 60, 60, 100, 100]
    assert (requested // MIB).tolist() == [0, 30, 30, 60, 60, 30, 30, 70]
    # a trace that lost its first two entries still ends at the final state: the counts start from 30 MiB held
    snapshot = fragmenting_trace()
    snapshot["device_traces"][0] = snapshot["device_traces"][0][2:]
    _, reserved, requested = trace_series(snapshot)
    assert (reserved // MIB).tolist() == [60, 60, 60, 60, 100, 100] and requested[0] == 30 * MIB


def test_cli_sets_a_prediction_beside_the_snapshot(tmp_path: Path, capsys) -> None:
    raw = tiny_raw()
    raw["allocator"] = {"backend": "caching"}
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(__import__("yaml").safe_dump(raw))
    run = run_scenario(build_scenario(raw), event_log=True)
    path = _write(tmp_path, snapshot_bytes(memory_snapshot(run)))
    svg = tmp_path / "o.svg"
    assert main(["import-snapshot", str(path), "--scenario", str(scenario), "--plot", str(svg)]) == 0
    printed = capsys.readouterr().out
    assert "snapshot against prediction" in printed
    text = svg.read_text()
    assert "reserved snapshot: s.pickle" in text and "device used prediction: tiny" in text
