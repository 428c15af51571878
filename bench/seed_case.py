"""The seed case (QwenLM/Qwen1.5 issue #300) as a table: verdict, peak and what it is made of for each model,
attention implementation and allocator backend on the headline set-up (scenarios/qwen32b_8xa800.yaml).

Usage: python bench/seed_case.py   (about a minute; docs/seed-case.md quotes its output)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.report import summarize  # noqa: E402
from sim.scenario import load_scenario  # noqa: E402
from sim.simulate import run_scenario  # noqa: E402
from sim.units import GIB  # noqa: E402

CASES = [(m, a, b) for m in ("qwen1.5-32b", "yi-34b") for a in ("eager", "sdpa") for b in ("exact", "caching")]
EXTRA = [
    ("scenarios/qwen32b_32xa800.yaml", []),
    ("scenarios/qwen72b_lora_8xa800.yaml", []),
    ("scenarios/qwen14b_8xa100.yaml", []),
    ("scenarios/qwen14b_8xa100.yaml", ["training.seq_len=32768"]),
    ("scenarios/codellama13b_8xa100.yaml", []),
    ("scenarios/qwen32b_8xa800.yaml", ["training.seq_len=2048"]),
    ("scenarios/qwen32b_8xa800.yaml", ["model=qwen1.5-14b"]),
    ("scenarios/qwen32b_8xa800.yaml", ["model=qwen-14b"]),
]


def row(label: str, path: str, overrides: list[str]) -> str:
    result = summarize(run_scenario(load_scenario(ROOT / path, overrides)))
    peak, parts = result["peak"], result["breakdown_at_peak"]
    where = "fits" if result["fits"] else "OOM at " + _where(result["oom"])
    states = sum(result["model_states_bytes"].values()) / GIB
    return (f"| {label} | {where} | {peak['total_bytes'] / GIB:.2f} | {peak['allocated_bytes'] / GIB:.2f} | "
            f"{states:.2f} | {parts['parameters'] / GIB:.2f} | {parts['activations'] / GIB:.2f} | "
            f"{parts['temporaries'] / GIB:.2f} | {_where(peak)} |")


def _where(event: dict) -> str:
    layer = f" L{event['layer']}" if event["layer"] is not None else ""
    return f"s{event['step']} mb{event['micro_batch']} {event['phase']}{layer} {event['op']}"


def main() -> None:
    print("| case | verdict | peak total GiB | allocated at peak GiB | model states GiB | params at peak | "
          "activations | temporaries | peak at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, attn, backend in CASES:
        overrides = [f"model={model}", f"training.attn_implementation={attn}", f"allocator.backend={backend}"]
        print(row(f"{model} {attn} {backend}", "scenarios/qwen32b_8xa800.yaml", overrides))
    for path, overrides in EXTRA:
        print(row(" ".join([Path(path).stem, *overrides]), path, overrides))


if __name__ == "__main__":
    main()
