"""The long fuzz run (issue #19 item 6): `python bench/fuzz.py --cases N` draws N cases across the categories of
tests/fuzz_cases.py and prints, per category, the cases, the outcomes, the tracebacks, the runs over 10 s, the runs
over 3 GiB and the property violations. Cases are drawn in this process and each is run in a fork of it (no new
interpreter): its time and peak memory are its own, and one over 10 s is stopped there and counted."""

import argparse
import collections
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzz_cases import Case, Category, Violation, cases, check  # noqa: E402

SLOW_S = 10.0  # issue #19: a run over 10 s is a defect (stopped at this point)
BIG_BYTES = 3 << 30  # issue #19: a run over 3 GiB is a defect
LIMIT_AS_BYTES = 8 << 30  # each fork's address-space limit: a runaway case fails (and is counted), the machine lives
REPORT_BYTES = 8192  # what a fork sends back: the outcome, or the end of its traceback


def run_forked(case: Case) -> dict:
    """One case in a fork: {'outcome' | 'violation' | 'traceback': text, 'seconds', 'max_rss_bytes', 'slow'}."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS_BYTES, LIMIT_AS_BYTES))
        signal.alarm(int(3 * SLOW_S))  # ends the fork by itself should this process die before stopping it
        try:
            report = {"outcome": check(case)}
        except Violation as exc:
            report = {"violation": str(exc)}
        except BaseException:  # noqa: BLE001 - every other exception is what the suite counts
            report = {"traceback": traceback.format_exc()[-REPORT_BYTES // 2:]}
        os.write(write_end, json.dumps(report).encode()[:REPORT_BYTES])
        os._exit(0)
    os.close(write_end)
    slow = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - started > SLOW_S:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            slow = True
            break
        time.sleep(0.002)
    seconds = time.monotonic() - started
    with os.fdopen(read_end, "rb") as handle:
        data = handle.read()
    try:
        report = json.loads(data) if data else {"traceback": f"fork ended with status {status} and no report"}
    except ValueError:
        report = {"traceback": data.decode(errors="replace")}
    if slow:
        report = {"outcome": "stopped"}
    return report | {"seconds": seconds, "max_rss_bytes": usage.ru_maxrss * 1024, "slow": slow}


def run_category(category: Category, n: int, seed_value: int) -> dict:
    """Draw and run `n` cases of one category; the figures and a sample of what went wrong."""
    figures = collections.Counter()
    problems: list[str] = []
    slowest = [0.0]

    @seed(seed_value)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases(category, big=True))
    def one(case: Case) -> None:
        report = run_forked(case)
        figures["cases"] += 1
        slowest[0] = max(slowest[0], report["seconds"])
        if "outcome" in report:
            figures[report["outcome"]] += 1
        for kind in ("traceback", "violation"):
            if kind in report:
                figures[kind + "s"] += 1
                problems.append(f"{kind}: {report[kind].strip().splitlines()[-1][:300]} <- {_short(case)}")
        figures["over 10 s"] += report["slow"]
        figures["over 3 GiB"] += report["max_rss_bytes"] > BIG_BYTES
        if report["slow"] or report["max_rss_bytes"] > BIG_BYTES:
            problems.append(f"{report['seconds']:.1f} s, {report['max_rss_bytes'] / 2**30:.2f} GiB <- {_short(case)}")

    one()
    return {"figures": figures, "problems": problems, "slowest_s": slowest[0]}


def _short(case: Case) -> str:
    """The case, short enough for one line."""
    text = json.dumps(case.raw, default=str) if case.raw is not None else " ".join(case.argv)
    return text[:400]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases in all, split evenly across the categories")
    parser.add_argument("--seed", type=int, default=19, help="hypothesis seed (the same seed draws the same cases)")
    parser.add_argument("--category", choices=[c.name.lower() for c in Category], action="append",
                        help="only this category (repeatable)")
    args = parser.parse_args()
    chosen = [c for c in Category if not args.category or c.name.lower() in args.category]
    per_category = max(1, args.cases // len(chosen))
    started = time.monotonic()
    totals = collections.Counter()
    print(f"{'category':<16}{'cases':>7}{'ran':>6}{'refused':>8}{'exit 0/1/2':>12}{'tracebacks':>11}"
          f"{'over 10 s':>10}{'over 3 GiB':>11}{'violations':>11}{'slowest s':>10}")
    all_problems = []
    for category in chosen:
        result = run_category(category, per_category, args.seed)
        f = result["figures"]
        totals.update(f)
        exits = "/".join(str(f[f"exit {code}"]) for code in (0, 1, 2))
        print(f"{category.value:<16}{f['cases']:>7}{f['ran']:>6}{f['refused']:>8}{exits:>12}{f['tracebacks']:>11}"
              f"{f['over 10 s']:>10}{f['over 3 GiB']:>11}{f['violations']:>11}{result['slowest_s']:>10.2f}",
              flush=True)
        all_problems += [f"[{category.value}] {p}" for p in result["problems"]]
    print(f"{'all':<16}{totals['cases']:>7}{totals['ran']:>6}{totals['refused']:>8}{'':>12}{totals['tracebacks']:>11}"
          f"{totals['over 10 s']:>10}{totals['over 3 GiB']:>11}{totals['violations']:>11}"
          f"   ({time.monotonic() - started:.0f} s)")
    for line in all_problems[:40]:
        print(line)
    return 1 if totals["tracebacks"] or totals["violations"] or totals["over 10 s"] or totals["over 3 GiB"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
