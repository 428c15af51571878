"""Host-side cost of issuing one op in PyTorch eager mode, without the device: Python, the dispatcher and autograd's
bookkeeping, on tiny CPU tensors so the kernel itself is negligible. sim/cost.py's HOST_DISPATCH_US comes from this.

    python bench/bench_host_overhead.py        (needs torch; any build, the CPU one is enough)
"""

import time

import torch


def per_call_us(call, calls: int = 20000) -> float:
    """Mean wall time of one call (µs), after a warm-up."""
    for _ in range(1000):
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    x = torch.ones(1, requires_grad=True)
    w = torch.ones(1, 1, requires_grad=True)
    print(f"torch {torch.__version__}")
    figures = {"add (autograd)": per_call_us(lambda: x + x), "mul (autograd)": per_call_us(lambda: x * x),
               "linear (autograd)": per_call_us(lambda: torch.nn.functional.linear(x, w)),
               "softmax (autograd)": per_call_us(lambda: torch.softmax(x, -1))}
    with torch.no_grad():
        figures["add (no grad)"] = per_call_us(lambda: x + x)
    for name, micros in figures.items():
        print(f"{name:20s} {micros:6.2f} µs")
    ordered = sorted(figures.values())
    print(f"median               {ordered[len(ordered) // 2]:6.2f} µs")


if __name__ == "__main__":
    main()
