"""The golden record: what every shipped scenario and a set of small ones covering each path (DDP, ZeRO-1/2/3,
offload, LoRA, checkpointing, each allocator and alloc-conf path, each architecture) produce, kept so that a rebuild
of the engine room can show it changes no result.

Per case it keeps the result JSON and the printed summary whole, and a sha256 per column of everything too large to
commit: the trace, the ops' host issue and launch times and kernel start and end times, where pending frees
return, the streams' busy time and the allocator's end state (its
statistics and segments, block addresses included). `tests/test_golden.py` compares a fresh run with
tests/golden/expected/; `python tests/golden_record.py --write` rewrites them (only for a change that is meant to
change results, and said so in its commit).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
EXPECTED = GOLDEN / "expected"


def case_paths() -> dict[str, Path]:
    """Case name -> scenario file: every file in scenarios/ and in tests/golden/scenarios/."""
    files = sorted((ROOT / "scenarios").glob("*.yaml")) + sorted((GOLDEN / "scenarios").glob("*.yaml"))
    return {path.stem: path for path in files}


def _digest(value) -> str:
    """sha256 of an array's int64 bytes, or of a JSON-able value's canonical JSON."""
    if isinstance(value, np.ndarray) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        data = np.ascontiguousarray(np.asarray(value, dtype=np.int64)).tobytes()
    else:
        data = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def record(path: Path) -> dict:
    """Run one scenario and return its record (JSON-able)."""
    from sim.allocator import CachingAllocator
    from sim.report import allocator_summary, format_summary, summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario

    run = run_scenario(load_scenario(path))
    result = summarize(run)
    engine, trace = run.engine, run.engine.trace
    digests = {f"trace.{name}": _digest(getattr(trace, name)) for name in
               ("time_us", "op_index", "buffer_id", "delta_bytes", "category", "allocated_bytes", "reserved_bytes")}
    digests["op_issue_us"] = _digest(engine.op_issue_us)
    digests["op_launch_us"] = _digest(engine.op_launch_us)
    digests["op_start_us"] = _digest(engine.op_start_us)
    digests["op_end_us"] = _digest(engine.op_end_us)
    digests["release_at"] = _digest(engine.release_at)
    digests["busy_us"] = _digest({stream.value: us for stream, us in engine.busy_us.items()})
    allocator = run.allocator
    if isinstance(allocator, CachingAllocator):
        digests["allocator.memory_stats"] = _digest(allocator.memory_stats())
        digests["allocator.segments"] = _digest(allocator.segments())
    return {"result": result, "summary": format_summary(result, allocator_summary(run)),
            "end_time_us": engine.end_time_us, "repeated_events": engine.repeated_events, "digests": digests}


def expected_path(name: str) -> Path:
    return EXPECTED / f"{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/golden/expected/ from this code")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    paths = case_paths()
    names = args.cases or list(paths)
    differing = 0
    for name in names:
        got = record(paths[name])
        target = expected_path(name)
        if args.write:
            EXPECTED.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
            print(f"wrote {target.relative_to(ROOT)}")
        elif json.loads(json.dumps(got)) != json.loads(target.read_text()):
            differing += 1
            print(f"DIFFERS {name}")
        else:
            print(f"same    {name}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
