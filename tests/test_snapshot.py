"""`sim run --snapshot`: the PyTorch memory snapshot a run exports, checked against what memory_viz requires
(../shared/reference/runtime-semantics.md §2.2: MemoryViz.js's unpickler and its state replay) and, where torch
is installed, read by torch.cuda._memory_viz itself."""

import io
import pickle
from pathlib import Path

import pytest
from hypothesis import given

from sim.cli import main
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from sim.snapshot import memory_snapshot, snapshot_bytes
from tests.conftest import tiny_raw
from tests.fuzz_cases import valid_scenarios

ACTIONS = {"alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
           "segment_unmap", "oom", "snapshot"}
STATES = {"active_allocated", "active_pending_free", "inactive"}


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise AssertionError(f"the snapshot pickles a class: {module}.{name} (memory_viz reads builtins only)")


def _frames_ok(frames) -> None:
    assert isinstance(frames, list)
    for frame in frames:  # MemoryViz.js filters frames with name.includes / filename.includes
        assert isinstance(frame["name"], str) and isinstance(frame["filename"], str) and isinstance(frame["line"], int)


def check_memory_viz(data: bytes) -> dict:
    """What memory_viz needs of a snapshot file, the replay included; returns the snapshot."""
    assert data[:1] == b"\x80" and 2 <= data[1] <= 4, "MemoryViz.js reads pickle protocols 2-4 only"
    snapshot = _NoGlobals(io.BytesIO(data)).load()
    segments, traces = snapshot["segments"], snapshot["device_traces"]
    assert isinstance(segments, list) and isinstance(traces, list) and all(isinstance(t, list) for t in traces)
    final_allocations, final_segments = {}, {}
    for segment in segments:
        assert {"device", "address", "total_size", "stream", "blocks"} <= segment.keys()
        _frames_ok(segment["frames"])
        address = segment["address"]
        for block in segment["blocks"]:  # contiguous, in address order, sizes summing to the segment's
            assert block["address"] == address and block["state"] in STATES
            _frames_ok(block["frames"])
            if block["state"] == "active_allocated":
                final_allocations[block["address"]] = block["requested_size"]
            address += block["size"]
        assert address == segment["address"] + segment["total_size"]
        final_segments[segment["address"]] = segment["total_size"]
    expandable = any(segment["is_expandable"] for segment in segments)
    # replay forward: every allocation inside a live segment; the end state is the final `segments`
    allocations, live_segments = {}, {}
    for entry in traces[0] if traces else []:
        assert entry["action"] in ACTIONS and isinstance(entry["size"], int) and isinstance(entry["stream"], int)
        _frames_ok(entry.get("frames", []))
        if entry["action"] == "oom":
            assert "device_free" in entry
            continue
        addr, size = entry["addr"], entry["size"]
        if entry["action"] in ("segment_alloc", "segment_map"):
            live_segments[addr] = size
        elif entry["action"] in ("segment_free", "segment_unmap"):
            assert live_segments.pop(addr) == size
            assert not any(addr <= a < addr + size for a in allocations), "a segment freed under an allocation"
        elif entry["action"] == "alloc":
            assert addr not in allocations
            assert expandable or any(s <= addr < s + n for s, n in live_segments.items()), "alloc outside segments"
            allocations[addr] = size
        elif entry["action"] == "free_completed":
            assert allocations.pop(addr) == size
    if traces and traces[0]:
        assert allocations == final_allocations
        if not expandable:
            assert live_segments == final_segments
    return snapshot


def _export(raw: dict) -> bytes:
    run = run_scenario(build_scenario(raw), event_log=True)
    return snapshot_bytes(memory_snapshot(run))


def test_tiny_run_exports_a_snapshot_memory_viz_reads() -> None:
    raw = tiny_raw()
    raw["allocator"] = {"backend": "caching"}
    raw["simulation"] = {"steps": 2}
    snapshot = check_memory_viz(_export(raw))
    trace = snapshot["device_traces"][0]
    assert [e["action"] for e in trace[:2]] == ["segment_alloc", "alloc"]
    # each entry names its tensor and its op: the first cudaMalloc is for the first parameter, at model.init
    assert trace[0]["frames"][1] == {"name": "model.init", "filename": "before the first op", "line": 0}
    names = {e["frames"][1]["name"] for e in trace if e["action"] == "alloc"}
    assert "model.layers.1.mlp.down_proj" in names or any(n.startswith("model.layers.1.") for n in names)
    held = [b for s in snapshot["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert held and all(b["frames"] for b in held)  # the weights and Adam states alive at the end, named
    assert snapshot["allocator_settings"]["expandable_segments"] is False


@given(valid_scenarios())
def test_every_caching_run_exports_a_valid_snapshot(raw: dict) -> None:
    raw["allocator"] = {"backend": "caching", "conf": raw["allocator"].get("conf", "")}
    try:
        data = _export(raw)
    except Exception as exc:  # noqa: BLE001 - only the project's input errors may stop a run
        from sim.errors import ScenarioError

        assert isinstance(exc, ScenarioError)
        return
    check_memory_viz(data)


def test_torch_memory_viz_reads_it() -> None:
    memory_viz = pytest.importorskip("torch.cuda._memory_viz")
    raw = tiny_raw()
    raw["allocator"] = {"backend": "caching"}
    snapshot = pickle.loads(_export(raw))
    assert "Summary of segments" in memory_viz.segsum(snapshot)
    assert "cudaMalloc" in memory_viz.trace(snapshot)
    assert "<html>" in memory_viz.trace_plot(snapshot).lower()  # the `stats`, `trace`, `trace_plot` and
    assert "<html>" in memory_viz.segment_plot(snapshot).lower()  # `segment_plot` commands (no network needed)


def test_cli_writes_the_snapshot_and_refuses_the_exact_backend(tmp_path: Path, capsys) -> None:
    scenario = Path(__file__).resolve().parent.parent / "scenarios" / "qwen7b_lora_1xa100.yaml"  # exact backend
    out = tmp_path / "s.pickle"
    small = ["--set", "model.num_hidden_layers=1", "--set", "training.seq_len=64"]
    assert main(["run", str(scenario), "--snapshot", str(out)] + small) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()
    assert main(["run", str(scenario), "--snapshot", str(out), "--set", "allocator.backend=caching"] + small) == 0
    check_memory_viz(out.read_bytes())
