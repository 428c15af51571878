"""Wall time of a 100-variant sweep of the headline scenario (issue #16: under 60 s on 2 cores); prints figures.

Usage: python bench/bench_sweep.py [--workers N]
The grid: 10 sequence lengths x 10 micro-batch/accumulation splits of the same 8 sequences per step.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.sweep import Grid, run_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    grid = Grid.parse(["training.seq_len=1024,1536,2048,2560,3072,3584,4096,5120,6144,8192",
                       "training.gradient_accumulation_steps=1,2,3,4,5,6,7,8,9,10"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.csv"
        start = time.perf_counter()
        ran = run_sweep(str(ROOT / "scenarios" / "qwen32b_8xa800.yaml"), [], grid, out, workers=args.workers)
        seconds = time.perf_counter() - start
    print(f"sweep of the headline: {ran} variants, {args.workers} workers, {seconds:.1f} s "
          f"({seconds / ran:.2f} s a variant)")


if __name__ == "__main__":
    main()
