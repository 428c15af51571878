"""Bounded, visible work (issue #19 item 6, deliverable 3): the event budget refuses a run before the work with one
line naming what drives it, `--max-events` moves it, and a long run reports progress (a bar only on a terminal)."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import _ProgressBar, main
from sim.cost import CostModel
from sim.errors import ClockOverflow, WorkTooLarge
from sim.ops import Op, OpKind, Phase, Stream
from sim.resolve import device_plan
from sim.scenario import DeviceSpec
from sim.vocab import DType
from sim.scenario import build_scenario, load_scenario
from sim.schedule import build_schedule
from sim.resolve import resolve_plan
from sim.simulate import MAX_EVENTS, run_scenario
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = ROOT / "scenarios" / "qwen32b_8xa800.yaml"


def test_too_many_layers_are_refused_before_anything_is_built() -> None:
    # 20 events per layer and micro-batch at least: 10^6 layers x 8 micro-batches x 2 steps = 3.2e8 > 4e6
    scenario = load_scenario(HEADLINE, ["model.num_hidden_layers=1000000"])
    with pytest.raises(WorkTooLarge, match=r"at least 320,000,000 allocator events .*model\.num_hidden_layers "
                                           r"\(1000000\), training\.gradient_accumulation_steps \(8\)"):
        run_scenario(scenario)


def test_the_estimate_from_the_first_micro_batch_counts_every_micro_batch() -> None:
    # the tiny model's first micro-batch makes E events; 50 micro-batches x 2 steps make about 100 E, so a budget
    # of 50 E refuses the run, one of 200 E lets it through
    raw = tiny_raw(gradient_accumulation_steps=50)
    raw["simulation"] = {"steps": 2}
    plan = resolve_plan(build_scenario(raw))
    one = tiny_raw()
    one["simulation"] = {"steps": 1}
    first = run_scenario(build_scenario(one))
    per_micro_batch = len(first.engine.trace)  # one micro-batch and one optimizer step: an upper bound of E
    with pytest.raises(WorkTooLarge, match=r"about [\d,]+ allocator events \([\d,]+ per micro-batch\)"):
        build_schedule(plan, max_events=per_micro_batch * 50)
    built = build_schedule(plan, max_events=per_micro_batch * 200)
    assert built.schedule.op_step[-1] == 1


def test_a_huge_first_micro_batch_stops_while_recording() -> None:
    # 4,000 layers record far more than 500,000 ops (the cap: an eighth of the 4e6 budget) before the first
    # micro-batch ends; the layer bound (20 x 4,000 x 16 = 1.28e6) alone lets it start
    scenario = load_scenario(HEADLINE, ["model.num_hidden_layers=4000"])
    with pytest.raises(WorkTooLarge, match=r"first micro-batch alone records more than 500,000 ops"):
        run_scenario(scenario)


def test_cli_refusal_is_one_line_and_the_flag_lifts_it(capsys) -> None:
    args = ["run", str(HEADLINE), "--set", "model.num_hidden_layers=2", "--set", "simulation.steps=1"]
    assert main(args + ["--max-events", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-events raises the budget" in err and "over the budget of 100;" in err
    assert main(args + ["--max-events", "0"]) == 0  # 0: no budget
    with pytest.raises(SystemExit, match="2"):
        main(args + ["--max-events", "many"])
    assert capsys.readouterr().err.splitlines()[-1] == "error: argument --max-events: not a whole number: 'many'"


def test_the_default_budget_passes_every_shipped_scenario() -> None:
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        run = run_scenario(load_scenario(path), max_events=MAX_EVENTS)
        assert len(run.engine.trace) <= MAX_EVENTS, path.name


class RecordedProgress:
    def __init__(self) -> None:
        self.stages: list[tuple[str, int]] = []
        self.advanced: list[int] = []

    def stage(self, description: str, total: int) -> None:
        self.stages.append((description, total))
        self.advanced.append(0)

    def advance(self) -> None:
        self.advanced[-1] += 1


def test_progress_counts_every_micro_batch_and_the_engine() -> None:
    # 3 micro-batches x 3 prefix steps, then the engine: 10 units, all reported; the tiny model's steps are shorter
    # than the launch queue, so 3 steps prove nothing (tests/test_steady.py) and the prefix doubles: 3 x 6 + 1 = 19
    # units; then 12 steps take the shortcut
    raw = tiny_raw(gradient_accumulation_steps=3)
    raw["simulation"] = {"steps": 12}
    progress = RecordedProgress()
    run = run_scenario(build_scenario(raw), progress=progress)
    assert run.steady is not None and run.steady.first_repeat == 6
    assert progress.stages == [("building 3 of 12 steps", 10), ("building 6 of 12 steps", 19)]
    assert progress.advanced == [10, 19]


class FakeStderr(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_is_drawn_on_a_terminal_only(monkeypatch, terminal: bool) -> None:
    # without the two seconds' delay, a terminal shows the stage at once; a pipe or file never gets a bar
    stream = FakeStderr(terminal)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = _ProgressBar(delay_s=0.0)
    bar.stage("building 3 of 12 steps", 10)
    bar.advance()
    bar.close()
    assert ("building 3 of 12 steps" in stream.getvalue()) is terminal


def test_a_pipe_gets_no_bar_from_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "sim", "run", str(HEADLINE), "--set", "simulation.steps=5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stderr == ""


def test_a_run_longer_than_the_clock_counts_is_refused_naming_its_shape() -> None:
    # tiny model, 2^40 tokens: eager-free sdpa attention costs ~4·b·a·s²·d = 4·2·4·2^80·16 FLOPs forward, about
    # 1.2e13 s at the A100's rates: past the 2^62 µs (1.5e5 years) the int64 µs clock holds, once summed
    raw = tiny_raw(seq_len=2**40)
    raw["model"]["max_position_embeddings"] = 2**40
    with pytest.raises(ClockOverflow, match=r"more than the 2\^62 µs the simulated clock counts; the ops are sized "
                                            r"by training\.seq_len \(1099511627776\)"):
        run_scenario(build_scenario(raw))


def test_one_op_past_the_clock_is_refused_by_the_cost_model() -> None:
    # 1e30 FLOPs at a 1e6 FLOP/s peak: 1e24 s, beyond int64 µs; without the check the cast gave a negative time
    device = device_plan(DeviceSpec(name="toy", capacity_bytes=1000, peak_flops={"bf16": 1e6}, hbm_bytes_per_s=1e12))
    op = Op("huge", Stream.COMPUTE, Phase.FORWARD, None, (), (), 1e30, 0, (), 0, OpKind.GEMM)
    with pytest.raises(ClockOverflow, match="an op would run for"):
        CostModel(device, DType.BFLOAT16).durations_us([op])
