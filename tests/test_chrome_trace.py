"""`sim run --chrome-trace`: the Trace Event Format file Perfetto opens, checked for content."""

import gzip
import json
from pathlib import Path

from sim.chrome_trace import chrome_trace
from sim.cli import main
from sim.ops import CATEGORIES, STREAMS
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.test_zero3 import zero_raw

ROOT = Path(__file__).resolve().parent.parent


def test_every_op_is_a_slice_on_its_stream_and_the_counters_end_at_the_run_s_bytes() -> None:
    run = run_scenario(build_scenario(zero_raw()))
    events = chrome_trace(run)["traceEvents"]
    slices = [e for e in events if e["ph"] == "X" and e["cat"] != "host"]
    assert len(slices) == len(run.schedule.ops)
    codes = run.schedule.stream_codes().tolist()
    assert [e["tid"] for e in slices] == codes and all(e["dur"] >= 0 for e in slices)
    assert [e["ts"] for e in slices] == run.engine.op_start_us
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    host = len(STREAMS)
    assert threads == {**{code: STREAMS[code].value for code in set(codes)}, host: "host"}
    assert len(threads) == 5  # ZeRO-3: 3 streams, the default process group's NCCL stream and the host
    # the host's slices: each op it spends time on, from its issue to its launch, in program order
    issued = [e for e in events if e["ph"] == "X" and e["cat"] == "host"]
    engine = run.engine
    spent = [i for i in range(len(codes)) if engine.op_launch_us[i] > engine.op_issue_us[i]]
    assert [(e["ts"], e["dur"]) for e in issued] == [
        (engine.op_issue_us[i], engine.op_launch_us[i] - engine.op_issue_us[i]) for i in spent] and spent
    assert all(e["tid"] == host for e in issued)
    allocated = [e for e in events if e["name"] == "allocated bytes"]
    reserved = [e for e in events if e["name"] == "reserved bytes"]
    times = [e["ts"] for e in allocated]
    assert times == sorted(set(times))  # one counter sample per distinct time, in order
    trace = run.engine.trace
    assert sum(allocated[-1]["args"].values()) == int(trace.allocated_bytes[-1])
    assert set(allocated[-1]["args"]) == {c.value for c in CATEGORIES}
    assert max(e["args"]["reserved"] for e in reserved) == int(trace.reserved_bytes.max())


def test_cli_writes_json_and_gzip(tmp_path: Path) -> None:
    scenario = ROOT / "scenarios" / "qwen7b_lora_1xa100.yaml"
    small = ["--set", "model.num_hidden_layers=1", "--set", "training.seq_len=64"]
    plain, packed = tmp_path / "t.json", tmp_path / "t.json.gz"
    assert main(["run", str(scenario), "--chrome-trace", str(plain)] + small) == 0
    assert main(["run", str(scenario), "--chrome-trace", str(packed)] + small) == 0
    assert json.loads(plain.read_bytes()) == json.loads(gzip.decompress(packed.read_bytes()))
    assert json.loads(plain.read_bytes())["otherData"]["clock"] == "simulated µs from the run's start"
