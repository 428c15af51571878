"""Wall time of whole runs (load, schedule, engine, summary) for the shipped scenarios; prints figures.

Usage: python bench/bench_scenarios.py [SCENARIO ...] [--repeat N] [--cold N]
Reports the best and median of N in-process runs and the median of N cold `python -m sim run` (imports included),
then the steady-state shortcut (sim/steady.py) on the headline: 2 against 100 steps (issue #19: 100 steps must cost
less than 3x two), and 8 steps with the shortcut against all 8 simulated; then the headline's engine with each
timeline (issue #15): the recurrence (the fast path), the simpy engine (the general path: collectives share the
link) and the one the engine picks.
The caching allocator's compiled core (`pip install .` or `python setup.py build_ext --inplace`) is used where it
is built; the first line says which. Virtual machines drift in speed by a factor of two or more within minutes, so
it also prints the time of a fixed pure-Python loop before and after: compare runs across machines or moments in
units of it.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.allocator import caching  # noqa: E402
from sim.report import summarize  # noqa: E402
from sim.scenario import load_scenario  # noqa: E402
from sim.simulate import run_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", nargs="*", default=sorted(str(p) for p in (ROOT / "scenarios").glob("*.yaml")))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", type=int, default=3)
    args = parser.parse_args()
    core = "built" if caching._sim_caching is not None else "not built: the caching allocator runs in Python"
    print(f"compiled allocator core (sim/allocator/caching_core.c): {core}")
    print(f"reference loop: {reference_loop_s():.3f} s")
    print(f"{'scenario':<40}{'events':>9}{'best s':>9}{'median s':>10}{'cold CLI s':>12}")
    for path in args.scenarios:
        scenario = load_scenario(path)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = summarize(run_scenario(scenario))
            times.append(time.perf_counter() - start)
        colds = []
        for _ in range(args.cold):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sim", "run", path], cwd=ROOT, check=True, capture_output=True)
            colds.append(time.perf_counter() - start)
        print(f"{Path(path).name:<40}{result['events']:>9}{min(times):>9.3f}{statistics.median(times):>10.3f}"
              f"{statistics.median(colds):>12.3f}")
    steps_figures(args.repeat)
    timeline_figures(args.repeat)
    plot_figures()
    print(f"reference loop: {reference_loop_s():.3f} s")


def timeline_figures(repeat: int) -> None:
    """Best time of the headline's engine (timeline, event order, allocator) with each timeline, the schedule built
    once."""
    from sim.cost import CostModel
    from sim.des import SimpyTimeline
    from sim.engine import Engine
    from sim.resolve import resolve_plan
    from sim.schedule import build_schedule
    from sim.simulate import _allocator
    from sim.timeline import ListTimeline

    plan = resolve_plan(load_scenario(ROOT / "scenarios" / "qwen32b_8xa800.yaml"))
    schedule = build_schedule(plan).schedule
    cost = CostModel(plan.device, plan.compute_dtype, plan.world.gpus_per_node, plan.world.nodes, plan.nccl.version,
                     plan.nccl.channels)
    print(f"{'headline engine, timeline':<40}{'shared link':>12}{'best s':>9}")
    for name, make in (("recurrence (fast path)", ListTimeline), ("simpy (general path)", SimpyTimeline),
                       ("picked by the engine", lambda: None)):
        times = []
        for _ in range(repeat):
            engine = Engine(schedule, _allocator(plan, None), cost, timeline=make())
            start = time.perf_counter()
            result = engine.run()
            times.append(time.perf_counter() - start)
        print(f"{name:<40}{str(result.shared_link):>12}{min(times):>9.3f}")


def plot_figures() -> None:
    """Issue #17: the plot time of the 72B-LoRA scenario at 10 steps (goal: under 5 s), each format."""
    from sim.plot import render_memory_timeline

    scenario = load_scenario(ROOT / "scenarios" / "qwen72b_lora_8xa800.yaml", ["simulation.steps=10"])
    for steady in (True, False):  # 3 steps drawn, or all 10 (about 4M events)
        run = run_scenario(scenario, steady_state=steady, max_events=None)
        result = summarize(run)
        for fmt in ("png", "svg", "pdf"):
            start = time.perf_counter()
            render_memory_timeline(run, result, fmt)
            print(f"plot of qwen72b_lora_8xa800 at 10 steps ({len(run.engine.trace)} events drawn), {fmt}: "
                  f"{time.perf_counter() - start:.2f} s")


def steps_figures(repeat: int) -> None:
    """Best in-process time of the headline at 2, 8 and 100 steps, with and without the steady-state shortcut."""
    headline = ROOT / "scenarios" / "qwen32b_8xa800.yaml"
    print(f"{'headline, steps':<40}{'events':>11}{'best s':>9}")
    for steps, steady in ((2, True), (8, False), (8, True), (100, True)):
        scenario = load_scenario(headline, [f"simulation.steps={steps}"])
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = summarize(run_scenario(scenario, steady_state=steady))
            times.append(time.perf_counter() - start)
        label = f"{steps} steps, " + ("steady-state shortcut" if steady else "every step simulated")
        print(f"{label:<40}{result['events']:>11}{min(times):>9.3f}")


def reference_loop_s() -> float:
    """Best of three timings of ten million integer additions in a Python loop: the machine's speed right now."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
