"""Replay a synthetic training-like trace through CachingAllocator and print malloc/free pairs per second.

The trace mimics a transformer step: per layer a burst of activations (mixed 512 B .. 100 MiB) freed in roughly
LIFO order during "backward", plus short-lived temporaries on the compute stream and gathered params on a second
stream. Run: .venv/bin/python bench/bench_caching_allocator.py [pairs]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.allocator.alloc_conf import parse_alloc_conf
from sim.allocator.caching import CachingAllocator
from sim.ops import STREAMS, Stream

MiB = 1024 * 1024


def make_trace(pairs: int, seed: int = 0) -> list[tuple[int, int, int, Stream]]:
    """Events (op, buffer_id, size, stream): op 1 = malloc, 0 = free."""
    rng = random.Random(seed)
    sizes = [512, 4096, 65536, 700_000, 3 * MiB, 12 * MiB + 4096, 40 * MiB, 100 * MiB]
    weights = [20, 20, 15, 10, 15, 10, 7, 3]
    events: list[tuple[int, int, int, Stream]] = []
    next_id = 0
    saved: list[int] = []
    n = 0
    while n < pairs:
        # forward of one layer: saved activations + temporaries
        for _ in range(rng.randint(8, 16)):
            size = rng.choices(sizes, weights)[0] + rng.randrange(0, 4096, 512) * rng.randint(0, 1)
            events.append((1, next_id, size, Stream.COMPUTE))
            saved.append(next_id)
            next_id += 1
            n += 1
            tmp = next_id
            next_id += 1
            events.append((1, tmp, rng.choices(sizes, weights)[0], Stream.COMPUTE))
            events.append((0, tmp, 0, Stream.COMPUTE))
            n += 1
        gathered = next_id
        next_id += 1
        events.append((1, gathered, 40 * MiB, Stream.ALLGATHER))
        events.append((0, gathered, 0, Stream.ALLGATHER))
        n += 1
        # backward: free saved activations LIFO-ish once enough layers are in flight
        if len(saved) > 400 or rng.random() < 0.1:
            while saved and rng.random() < 0.97:
                j = len(saved) - 1 - min(rng.randint(0, 2), len(saved) - 1)
                events.append((0, saved.pop(j), 0, Stream.COMPUTE))
    for bid in saved:
        events.append((0, bid, 0, Stream.COMPUTE))
    return events


def run(events: list[tuple[int, int, int, Stream]], conf: str = "") -> tuple[float, CachingAllocator]:
    alloc = CachingAllocator(80 * 1024 * MiB, parse_alloc_conf(conf))
    malloc, free = alloc.malloc, alloc.free
    t0 = time.perf_counter()
    for op, bid, size, stream in events:
        if op:
            malloc(bid, size, stream)
        else:
            free(bid)
    return time.perf_counter() - t0, alloc


def run_compiled(events: list[tuple[int, int, int, Stream]], conf: str = "") -> tuple[float, CachingAllocator]:
    """The same events through the compiled core (sim/allocator/caching_core.c) in one call, as the engine drives it."""
    alloc = CachingAllocator(80 * 1024 * MiB, parse_alloc_conf(conf))
    signed = np.array([bid if op else ~bid for op, bid, _, _ in events], dtype=np.int64)
    sizes = np.array([size for _, _, size, _ in events], dtype=np.int64)
    codes = np.array([STREAMS.index(stream) for _, _, _, stream in events], dtype=np.int64)
    t0 = time.perf_counter()
    alloc.replay_compiled(signed, sizes, codes)
    return time.perf_counter() - t0, alloc


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 250_000
    events = make_trace(pairs)
    n_pairs = sum(1 for e in events if e[0] == 1)
    for conf in ("", "expandable_segments:True", "max_split_size_mb:128,roundup_power2_divisions:4"):
        best = min(run(events, conf)[0] for _ in range(3))
        _, a = run(events, conf)
        print(
            f"conf={conf or '(default)':<52} {n_pairs / best:>10,.0f} pairs/s  ({n_pairs} pairs, {best:.3f} s)  "
            f"peak reserved {a.peak_reserved_bytes / MiB:,.0f} MiB, "
            f"peak allocated {a.peak_allocated_bytes / MiB:,.0f} MiB"
        )
        if CachingAllocator(MiB, parse_alloc_conf(conf)).can_replay_compiled():
            best = min(run_compiled(events, conf)[0] for _ in range(3))
            _, c = run_compiled(events, conf)
            assert c.memory_stats() == a.memory_stats()
            print(f"  compiled core: {n_pairs / best:>10,.0f} pairs/s  ({best:.3f} s, the same statistics)")


if __name__ == "__main__":
    main()
