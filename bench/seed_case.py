"""The seed case (QwenLM/Qwen1.5 issue #300) as a table: verdict, peak and what it is made of for each observation of
the thread (its points in validation/qwen-issue-300/, run by sim/validate.py) and for the comparisons
docs/seed-case.md adds (live bytes alone, Qwen1 against Qwen1.5).

Usage: python bench/seed_case.py   (under a minute; docs/seed-case.md quotes its output)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.report import summarize  # noqa: E402
from sim.scenario import load_scenario  # noqa: E402
from sim.simulate import run_scenario  # noqa: E402
from sim.units import GIB  # noqa: E402
from sim.validate import load_points, validate  # noqa: E402

SOURCE = "qwen-issue-300"
HEADLINE = "scenarios/qwen32b_8xa800.yaml"
# Not published: the headline set-up with live bytes only (no caching allocator), and Qwen1 against Qwen1.5 at 14B.
COMPARISONS = [*((f"{m} {a} exact", [f"model={m}", f"training.attn_implementation={a}", "allocator.backend=exact"])
                 for m in ("qwen1.5-32b", "yi-34b") for a in ("eager", "sdpa")),
               ("qwen1.5-14b eager caching", ["model=qwen1.5-14b"]), ("qwen-14b eager caching", ["model=qwen-14b"])]


def line(label: str, reported: str, result: dict) -> str:
    """One row of the table from a run's result JSON."""
    peak, parts = result["peak"], result["breakdown_at_peak"]
    where = "fits" if result["fits"] else "OOM at " + _where(result["oom"])
    states = sum(result["model_states_bytes"].values()) / GIB
    return (f"| {label} | {reported} | {where} | {peak['total_bytes'] / GIB:.2f} | "
            f"{peak['allocated_bytes'] / GIB:.2f} | {states:.2f} | {parts['parameters'] / GIB:.2f} | "
            f"{parts['activations'] / GIB:.2f} | "
            f"{parts['temporaries'] / GIB:.2f} | {_where(peak)} |")


def _where(event: dict) -> str:
    """Step, micro-batch, phase, layer and op of a peak or an OOM."""
    layer = f" L{event['layer']}" if event["layer"] is not None else ""
    return f"s{event['step']} mb{event['micro_batch']} {event['phase']}{layer} {event['op']}"


def main() -> None:
    """Print the table: the thread's points first, then the comparisons."""
    print("| case | reported | simulated | peak total GiB | allocated at peak GiB | model states GiB | "
          "params at peak | activations | temporaries | peak at |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in validate(load_points(source=SOURCE)):
        print(line(row.key.removeprefix(f"{SOURCE}/"), row.point.measured.value, row.result))
    for label, overrides in COMPARISONS:
        print(line(label, "—", summarize(run_scenario(load_scenario(ROOT / HEADLINE, overrides)))))


if __name__ == "__main__":
    main()
