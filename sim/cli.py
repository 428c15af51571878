"""Command line (design.md §5). The only module that prints or writes files."""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from sim import __version__, catalog
from sim.errors import ScenarioError
from sim.ingest.files import shown

EXIT_OK, EXIT_OOM, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a job stopped by Ctrl-C


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other user error
        print(f"error: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _one_line(message: str) -> str:
    """An error message with its control characters escaped: argparse and some messages echo what the user typed,
    and a \\r or \\v in it would break the one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _event_budget(text: str) -> int:
    """--max-events: a whole number of events, 0 for no budget."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative: {value}")
    return value


class _ProgressBar:
    """simulate.Progress as a tqdm bar on stderr: drawn only on a terminal and only once a stage has run for two
    seconds (tqdm's delay), removed when done."""

    def __init__(self, delay_s: float = 2.0) -> None:
        self._bar, self._delay_s = None, delay_s

    def stage(self, description: str, total: int) -> None:
        self.close()
        if not sys.stderr.isatty():  # a pipe or a file: no bar, and no import of tqdm either
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=description, unit="micro-batch", delay=self._delay_s, leave=False)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sim", description="GPU memory of LLM training, simulated op by op.")
    parser.add_argument("--version", action="version", version=f"sim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="simulate a scenario and print the verdict, peak and breakdown")
    run.add_argument("scenario", help="a scenario file or shipped scenario name, a LLaMA-Factory or axolotl YAML")
    run.add_argument("--format", choices=["scenario", "llamafactory", "axolotl"], default=None,
                     help="the file's format (default: detected from its keys)")
    run.add_argument("--launch", metavar="PATH",
                     help="an accelerate config: GPU count, DeepSpeed plugin and mixed precision of the launch")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any scenario key, e.g. training.seq_len=8192 or model=qwen1.5-14b (repeatable)")
    run.add_argument("--json", dest="json_path", metavar="PATH", help="write the result JSON (docs/scenarios.md)")
    run.add_argument("--plot", dest="plot_path", metavar="PATH",
                     help="draw the memory timeline: png, svg or pdf by the extension")
    run.add_argument("--chrome-trace", dest="chrome_trace_path", metavar="PATH",
                     help="write a Chrome trace JSON (ops per stream, memory counters) for Perfetto or "
                          "chrome://tracing; gzip-compressed when PATH ends in .gz")
    run.add_argument("--snapshot", dest="snapshot_path", metavar="PATH",
                     help="write a PyTorch memory snapshot pickle (pytorch.org/memory_viz); simulates every step")
    run.add_argument("--fail-on-oom", action="store_true", help="exit 1 when the job does not fit")
    run.add_argument("--max-events", type=_event_budget, default=None, metavar="N",
                     help="simulate at most N allocator events (default 4,000,000, about 8 s; 0: no budget)")
    cmp = sub.add_parser("compare", help="two scenarios side by side: verdicts, peaks and the terms that differ")
    cmp.add_argument("scenarios", nargs=2, metavar="SCENARIO", help="two scenario files or shipped scenario names")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key in both scenarios (repeatable)")
    cmp.add_argument("--json", dest="json_path", metavar="PATH", help="write both results and the comparison")
    cmp.add_argument("--plot", dest="plot_path", metavar="PATH",
                     help="both timelines on one normalised time axis: png, svg or pdf by the extension")
    swp = sub.add_parser("sweep", help="run a scenario over a grid of values, a CSV row per variant")
    swp.add_argument("scenario", help="a scenario file or shipped scenario name")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="a key and the values to sweep (repeatable: the variants are the product)")
    swp.add_argument("--out", required=True, metavar="PATH", help="the CSV, a row written as each variant finishes")
    swp.add_argument("--resume", action="store_true", help="continue an interrupted sweep's CSV")
    swp.add_argument("--workers", type=int, default=1, metavar="N", help="run N variants at once (processes)")
    swp.add_argument("--executor", choices=["local", "dask"], default="local",
                     help="local processes (default) or a dask.distributed cluster (the dask extra)")
    swp.add_argument("--address", metavar="HOST:PORT", help="--executor dask: the scheduler's address")
    swp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key in every variant (repeatable)")
    swp.add_argument("--plot", dest="plot_path", metavar="PATH",
                     help="the peak over one swept key, or a heatmap over two: png, svg or pdf")
    adv = sub.add_parser("advise", help="try the standard remedies alone and in pairs; rank those that fit")
    adv.add_argument("scenario", help="a scenario file or shipped scenario name")
    adv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key (repeatable)")
    adv.add_argument("--json", dest="json_path", metavar="PATH", help="write every outcome as JSON")
    fit = sub.add_parser("fit", help="the largest sequence length or micro-batch that still fits, by bisection")
    fit.add_argument("scenario", help="a scenario file or shipped scenario name")
    fit.add_argument("--maximize", required=True, metavar="KEY",
                     help="training.seq_len or training.per_device_train_batch_size")
    fit.add_argument("--multiple", type=int, default=1, metavar="N", help="search multiples of N only (default 1)")
    fit.add_argument("--limit", type=int, default=1 << 24, metavar="N", help="search no higher than N")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key (repeatable)")
    fit.add_argument("--json", dest="json_path", metavar="PATH", help="write every probe and the answer as JSON")
    cat = sub.add_parser("catalog", help="list catalog models and hardware")
    cat.add_argument("kind", nargs="?", choices=["models", "hardware"], help="only the models or only the devices")
    cal = sub.add_parser("calibrate", help="measure real HF training steps (torch, CPU or CUDA) against the simulator")
    cal.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                     help="cpu (default): byte-exact CPU steps; cuda: torch.cuda's per-phase peaks on this GPU "
                          "(exit 1 when a configuration's child failed)")
    cal.add_argument("--config", dest="configs", action="append", default=[], metavar="NAME",
                     help="run only this configuration (repeatable); default: all, see --list")
    cal.add_argument("--ci", action="store_true", help="cpu: the representative subset the CI tests run")
    cal.add_argument("--list", action="store_true", help="list the configurations and exit")
    cal.add_argument("--json", dest="json_path", metavar="PATH", help="write the rows as JSON")
    cal.add_argument("--markdown", dest="markdown_path", metavar="PATH",
                     help="write the table as Markdown with versions and hardware "
                          "(validation/cpu-calibration.md, validation/cuda/cuda-calibration.md)")
    cal.add_argument("--max-error", type=float, default=None, metavar="FRACTION",
                     help="cpu: exit 1 when any per-phase |relative error| exceeds this (e.g. 0.03)")
    cal.add_argument("--python", default=None, metavar="PATH",
                     help="interpreter with torch/transformers/peft for the measured side (default: this one)")
    cal.add_argument("--snapshot-dir", metavar="PATH",
                     help="cuda: pickle torch.cuda.memory._snapshot() of each configuration here (memory_viz)")
    cal.add_argument("--measure-only", action="store_true",
                     help="cuda: record the measured side only (a GPU machine without the simulator's dependencies)")
    cal.add_argument("--measurements", metavar="PATH",
                     help="cuda: compare the measurements recorded in this JSON (--json's) instead of measuring")
    imp = sub.add_parser("import-snapshot", help="summarise a real PyTorch memory snapshot pickle and replay its "
                                                 "allocations under other PYTORCH_CUDA_ALLOC_CONF settings")
    imp.add_argument("snapshot", help="a pickle from torch.cuda.memory._dump_snapshot (read with builtins only)")
    imp.add_argument("--conf", action="append", default=[], metavar="PYTORCH_CUDA_ALLOC_CONF",
                     help="replay under this setting too (repeatable); the snapshot's own and "
                          "expandable_segments:True are always replayed")
    imp.add_argument("--device", type=int, default=0, metavar="N", help="which device's trace to replay (default 0)")
    imp.add_argument("--json", dest="json_path", metavar="PATH", help="write the summary and replays as JSON")
    imp.add_argument("--scenario", metavar="SCENARIO",
                     help="also simulate this scenario and set its prediction beside the snapshot")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of --scenario (repeatable)")
    imp.add_argument("--plot", dest="plot_path", metavar="PATH",
                     help="the snapshot's memory (and --scenario's) on one normalised time axis: png, svg or pdf")
    val = sub.add_parser("validate", help="simulate every published measurement under validation/ and compare")
    val.add_argument("--source", default=None, metavar="NAME",
                     help="only the points of this source (a folder of validation/)")
    val.add_argument("--markdown", dest="markdown_path", metavar="PATH", help="also write the table as Markdown")
    val.add_argument("--json", dest="json_path", metavar="PATH", help="write the rows as JSON")
    return parser


def console(argv: list[str] | None = None) -> int:
    """The command line as a process runs it (`python -m sim` and the `sim` script): `main`, and the two ways a
    user ends it early, each without a traceback. Output files are written atomically (`_write_atomic`), so an
    interrupted run leaves none half-written."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the reader went away (`| head`): point stdout at devnull so the exit flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `python -m sim`: the usage, and the one error line
        parser.print_help()
        print("error: give a command (python -m sim COMMAND --help for its options)", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    commands = {"run": _run, "catalog": lambda a: _catalog(a.kind), "calibrate": _calibrate, "validate": _validate,
                "import-snapshot": _import_snapshot, "compare": _compare, "fit": _fit, "sweep": _sweep,
                "advise": _advise}
    try:
        return commands[args.command](args)
    except ScenarioError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    from sim.report import allocator_summary, format_summary, steady_summary, summarize
    from sim.ingest.formats import Format
    from sim.scenario import load_scenario
    from sim.simulate import MAX_EVENTS, run_scenario

    fmt = Format(args.format) if args.format else None
    scenario = load_scenario(catalog.scenario_path(args.scenario), args.overrides, fmt, args.launch)
    _check_outputs(("--json", args.json_path), ("--plot", args.plot_path), ("--snapshot", args.snapshot_path),
                   ("--chrome-trace", args.chrome_trace_path))
    if args.snapshot_path is not None:
        from sim.snapshot import check_exportable

        check_exportable(scenario.allocator.backend)
    if args.plot_path is not None:
        from sim.plot import plot_format

        plot_format(args.plot_path)
    budget = MAX_EVENTS if args.max_events is None else (args.max_events or None)
    progress = _ProgressBar()
    try:
        run = run_scenario(scenario, event_log=args.snapshot_path is not None, max_events=budget, progress=progress)
    finally:
        progress.close()
    result = summarize(run)
    if args.json_path is not None:
        _write_output("--json", Path(args.json_path), (json.dumps(result, indent=2) + "\n").encode())
    if args.plot_path is not None:
        from sim.plot import plot_format, render_memory_timeline

        _write_output("--plot", Path(args.plot_path),
                      render_memory_timeline(run, result, plot_format(args.plot_path)))
    if args.chrome_trace_path is not None:
        from sim.chrome_trace import chrome_trace_bytes

        path = Path(args.chrome_trace_path)
        _write_output("--chrome-trace", path, chrome_trace_bytes(run, gzipped=path.suffix == ".gz"))
    if args.snapshot_path is not None:
        from sim.snapshot import memory_snapshot, snapshot_bytes

        _write_output("--snapshot", Path(args.snapshot_path), snapshot_bytes(memory_snapshot(run)))
    print(format_summary(result, allocator_summary(run), run.built.model_states.host_bytes, steady_summary(run)))
    if args.fail_on_oom and not result["fits"]:
        return EXIT_OOM
    return EXIT_OK


def _advise(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sim.advise import advise, combinations, remedies_for
    from sim.report import summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario
    from sim.units import format_bytes

    _check_outputs(("--json", args.json_path))
    path = catalog.scenario_path(args.scenario)
    scenario = load_scenario(path, args.overrides)
    base = summarize(run_scenario(scenario))
    found = remedies_for(scenario)
    progress = _ProgressBar()
    progress.stage("advise", len(combinations(found)))

    def simulate(overrides: tuple[str, ...]) -> dict:
        try:
            return summarize(run_scenario(load_scenario(path, [*args.overrides, *overrides])))
        finally:
            progress.advance()

    try:
        outcomes = advise(base, found, simulate)
    finally:
        progress.close()
    capacity = base["hardware"]["capacity_bytes"]
    verdict = "fits" if base["fits"] else "does not fit"
    lines = [f"as it is   {verdict}: peak {format_bytes(base['peak']['total_bytes'])} of {format_bytes(capacity)}, "
             f"step {base['step_time_s']:.2f} s", "", "remedies that fit, fastest first:"]
    costs = {remedy.name: remedy.cost for remedy in found}
    fitting = [o for o in outcomes if o.fits]
    for outcome in fitting:
        changed = sorted(outcome.breakdown_change.items(), key=lambda item: abs(item[1]), reverse=True)[:3]
        lines.append(f"  {' + '.join(outcome.remedies)}: peak {format_bytes(outcome.peak_bytes)}, headroom "
                     f"{format_bytes(outcome.headroom_bytes)}, step {outcome.step_time_s:.2f} s; allocated peak "
                     + ", ".join(f"{name} {'+' if delta > 0 else '-'}{format_bytes(abs(delta))}"
                                 for name, delta in changed if delta))
        lines += [f"      cost: {costs[name]}" for name in outcome.remedies]
    if not fitting:
        lines.append("  none of them, alone or in pairs")
    lines += ["", "remedies that do not fit alone:"]
    lines += [f"  {o.remedies[0]}: peak {format_bytes(o.peak_bytes)}" + (f" (refused: {o.error})" if o.error else "")
              for o in outcomes if not o.fits and len(o.remedies) == 1]
    print("\n".join(lines))
    if args.json_path is not None:
        document = {"base": base, "outcomes": [asdict(o) for o in outcomes]}
        _write_output("--json", Path(args.json_path), (json.dumps(document, indent=2) + "\n").encode())
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    import csv

    from sim.plot import plot_format, render_sweep
    from sim.scenario import load_scenario
    from sim.sweep import Grid, run_sweep

    grid = Grid.parse(args.grid)
    if args.workers < 1:
        raise ScenarioError(f"--workers: {args.workers}; at least 1")
    if (args.executor == "dask") != (args.address is not None):
        raise ScenarioError("--executor dask and --address HOST:PORT go together")
    _check_outputs(("--out", args.out), ("--plot", args.plot_path))
    if args.plot_path is not None:
        plot_format(args.plot_path)
    path = str(catalog.scenario_path(args.scenario))
    load_scenario(path, args.overrides)  # the base scenario's own errors before any variant runs
    out = Path(args.out)
    progress = _ProgressBar()
    progress.stage(f"sweep of {len(grid.variants())} variants", len(grid.variants()))
    try:
        ran = run_sweep(path, args.overrides, grid, out, args.resume, args.workers, progress.advance, args.address)
    finally:
        progress.close()
    with out.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    refused = sum(1 for row in rows if row["error"])
    fitting = sum(1 for row in rows if row["fits"] == "true")
    print(f"sweep      {len(rows)} variants in {out} ({ran} run now): {fitting} fit, "
          f"{len(rows) - fitting - refused} do not, {refused} refused")
    if args.plot_path is not None:
        _write_output("--plot", Path(args.plot_path), render_sweep(grid.keys, rows, plot_format(args.plot_path)))
    return EXIT_OK


def _fit(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sim.fit import Probe, search_fit
    from sim.report import summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario
    from sim.units import format_bytes

    _check_outputs(("--json", args.json_path))
    path = catalog.scenario_path(args.scenario)
    base = load_scenario(path, args.overrides)
    section, name = args.maximize.split(".", 1) if "." in args.maximize else ("", args.maximize)
    start = getattr(getattr(base, section, None), name, None) if section == "training" else None
    progress = _ProgressBar()
    progress.stage(f"fit {args.maximize}", 0)

    def probe(value: int) -> Probe:
        try:
            result = summarize(run_scenario(load_scenario(path, [*args.overrides, f"{args.maximize}={value}"])))
        except ScenarioError as exc:
            raise ScenarioError(f"fit: {args.maximize}={value}: {exc}") from None
        progress.advance()
        return Probe(value, result["fits"], result["peak"]["total_bytes"])

    try:
        found = search_fit(args.maximize, int(start or args.multiple), probe, args.multiple, args.limit)
    finally:
        progress.close()
    shown_probe = lambda p: "none within the bounds" if p is None else \
        f"{p.value} (peak {format_bytes(p.peak_bytes)})"  # noqa: E731
    print(f"{args.maximize}: largest that fits {shown_probe(found.largest_fitting)}; first that does not "
          f"{shown_probe(found.first_failing)}; {len(found.probes)} simulations")
    if args.json_path is not None:
        _write_output("--json", Path(args.json_path), (json.dumps(asdict(found), indent=2) + "\n").encode())
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from sim.compare import compare_results, format_comparison
    from sim.plot import plot_format, render_comparison, run_series
    from sim.report import summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario

    scenarios = [load_scenario(catalog.scenario_path(name), args.overrides) for name in args.scenarios]
    _check_outputs(("--json", args.json_path), ("--plot", args.plot_path))
    if args.plot_path is not None:
        plot_format(args.plot_path)
    runs = [run_scenario(scenario) for scenario in scenarios]
    results = [summarize(run) for run in runs]
    comparison = compare_results(*results)
    if args.json_path is not None:
        document = {"a": results[0], "b": results[1], "comparison": comparison}
        _write_output("--json", Path(args.json_path), (json.dumps(document, indent=2) + "\n").encode())
    if args.plot_path is not None:
        series = [run_series(run, result, label) for run, result, label in zip(runs, results, "AB")]
        _write_output("--plot", Path(args.plot_path), render_comparison(series, plot_format(args.plot_path)))
    print(format_comparison(comparison))
    return EXIT_OK


def _import_snapshot(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sim.allocator.alloc_conf import parse_alloc_conf
    from sim.plot import MemorySeries, plot_format, render_comparison, run_series
    from sim.report import summarize
    from sim.scenario import load_scenario
    from sim.simulate import run_scenario
    from sim.snapshot_import import read_snapshot, replay_trace, summarize_snapshot, trace_series
    from sim.units import format_bytes

    _check_outputs(("--json", args.json_path), ("--plot", args.plot_path))
    for conf in args.conf:
        parse_alloc_conf(conf)  # a bad setting is refused before the file is read
    if args.plot_path is not None:
        plot_format(args.plot_path)
    scenario = load_scenario(catalog.scenario_path(args.scenario), args.overrides) if args.scenario else None
    snapshot = read_snapshot(Path(args.snapshot))
    summary = summarize_snapshot(snapshot)
    own = str(snapshot.get("allocator_settings", {}).get("PYTORCH_CUDA_ALLOC_CONF", "") or "")
    confs = list(dict.fromkeys([own, "expandable_segments:True", *args.conf]))
    replays = [replay_trace(snapshot, conf, args.device)[0] for conf in confs]
    lines = [f"snapshot   {args.snapshot}: {summary['trace_entries']} trace entries"]
    for device, figures in summary["devices"].items():
        lines.append(f"device {device}   {figures['segments']} segments: reserved "
                     f"{format_bytes(figures['reserved_bytes'])}, allocated "
                     f"{format_bytes(figures['allocated_bytes'])}, fragmentation "
                     f"{100 * figures['fragmentation_ratio']:.1f}% at the end")
    if summary["largest_allocations"]:
        lines += ["", "largest allocations alive at the end"]
        lines += [f"  {format_bytes(item['size_bytes']):>12}  {item['frame']}"
                  for item in summary["largest_allocations"]]
    lines += ["", f"replayed (device {args.device}){'':<20}{'max allocated':>16}{'max reserved':>16}{'cudaMalloc':>12}"]
    for replay in replays:
        label = (replay.conf or "defaults") + (" (the snapshot's own)" if replay.conf == own else "")
        lines.append(f"  {label:<38}{format_bytes(replay.max_allocated_bytes):>16}"
                     f"{format_bytes(replay.max_reserved_bytes):>16}{replay.cuda_mallocs:>12}")
    if replays and replays[0].carried:
        lines.append(f"  ({replays[0].carried} allocations were alive before the trace begins: made first, by address)")
    times, reserved, requested = trace_series(snapshot, args.device)
    series = [MemorySeries(f"snapshot: {Path(args.snapshot).name}", times, reserved, requested, "reserved")]
    predicted = None
    if scenario is not None:
        run = run_scenario(scenario)
        predicted = summarize(run)
        series.append(run_series(run, predicted, "prediction"))
        most = predicted["max_memory"]
        lines += ["", f"{'snapshot against prediction':<38}{'max allocated':>16}{'max reserved':>16}",
                  f"  {'snapshot (its own settings)':<36}{format_bytes(replays[0].max_allocated_bytes):>16}"
                  f"{format_bytes(int(reserved.max()) if len(reserved) else 0):>16}",
                  f"  {predicted['scenario'][:36]:<36}{format_bytes(most['allocated_bytes']):>16}"
                  f"{format_bytes(most['reserved_bytes']):>16}"]
    print("\n".join(lines))
    if args.plot_path is not None:
        _write_output("--plot", Path(args.plot_path), render_comparison(series, plot_format(args.plot_path)))
    if args.json_path is not None:
        result = {"summary": summary, "replays": [asdict(replay) for replay in replays], "prediction": predicted}
        _write_output("--json", Path(args.json_path), (json.dumps(result, indent=2) + "\n").encode())
    return EXIT_OK


def _check_outputs(*flags_and_paths: tuple[str, str | None]) -> None:
    """Refuse, before the work, an output path given that cannot be written: empty, a directory, or in a directory
    that does not exist or is not writable. A device or pipe that exists (`--json /dev/stdout`) is written in place."""
    for flag, path in flags_and_paths:
        if path is not None:
            _check_output(flag, path)


def _check_output(flag: str, path: str) -> None:
    """One output path of `_check_outputs`."""
    if not path:
        raise ScenarioError(f"{flag}: empty path")
    target = Path(path)
    if target.is_dir():
        raise ScenarioError(f"{flag}: {shown(path)} is a directory, not a file path")
    if target.exists() and not target.is_file():
        return
    parent = target.resolve().parent
    if not parent.is_dir():
        raise ScenarioError(f"{flag}: output directory does not exist: {shown(str(target.parent))}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScenarioError(f"{flag}: cannot write in directory {shown(str(parent))}")


def _write_output(flag: str, path: Path, data: bytes) -> None:
    """Write an output file atomically, or a device or pipe (`/dev/stdout`) directly; a failure is one line."""
    try:
        if path.exists() and not path.is_file():
            with path.open("wb") as handle:
                handle.write(data)
        else:
            _write_atomic(path, data)
    except OSError as exc:
        raise ScenarioError(f"{flag}: cannot write {shown(str(path))}: {exc.strerror}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: nothing half-written on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _catalog(kind: str | None) -> int:
    from sim.scenario import ModelSpec

    if kind in (None, "models"):
        print("models (name: type, hidden x layers, heads/kv, vocab)")
        for name in catalog.names("models"):
            m = ModelSpec(**catalog.load_entry("models", name, "model"))
            print(f"  {name:<16} {m.model_type.value:<8} {m.hidden_size}x{m.num_hidden_layers}  "
                  f"{m.num_attention_heads}/{m.kv_heads}  {m.vocab_size}")
    if kind in (None, "hardware"):
        from sim.units import format_bytes

        print("hardware (name: capacity as torch reports it, bf16 peak, HBM)")
        for name in catalog.names("hardware"):
            d = catalog.load_entry("hardware", name, "hardware.device")
            print(f"  {name:<16} {format_bytes(d['capacity_bytes']):>10}  "
                  f"{d['peak_flops'].get('bf16', 0) / 1e12:6.1f} TFLOP/s  {d['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    """Measured (torch on the CPU, in a child process) vs simulated per-phase peaks; see sim/calibrate.py."""
    from sim import calibrate

    if args.device == "cuda":
        return _calibrate_cuda(args)
    for flag, value in (("--snapshot-dir", args.snapshot_dir), ("--measure-only", args.measure_only),
                        ("--measurements", args.measurements)):
        if value:
            raise ScenarioError(f"{flag}: only with --device cuda")
    if args.list:
        for config in calibrate.CONFIGS:
            subset = " [ci]" if config.name in calibrate.CI_SUBSET else ""
            print(f"{config.name:<14} {config.factor:<40} {calibrate.describe(config)}{subset}")
        return EXIT_OK
    names = list(args.configs) or (list(calibrate.CI_SUBSET) if args.ci else calibrate.config_names())
    unknown = [n for n in names if n not in calibrate.config_names()]
    if unknown:
        raise ScenarioError(f"--config: unknown configuration {unknown[0]!r} (see --list)")
    _check_outputs(("--json", args.json_path), ("--markdown", args.markdown_path))
    if args.python is None and not calibrate.torch_available():
        raise ScenarioError("calibrate: torch and transformers are not installed; pip install '.[calibrate]'")
    rows = []
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(calibrate.compare(calibrate.config_by_name(name), args.python))
        except calibrate.MeasureError as exc:
            raise ScenarioError(f"calibrate: {exc}") from None
    print(calibrate.format_table(rows))
    if args.json_path is not None:
        _write_output("--json", Path(args.json_path), (json.dumps(rows, indent=2) + "\n").encode())
    if args.markdown_path is not None:
        command = "python -m sim calibrate" + "".join(f" --config {n}" for n in args.configs) + (
            " --ci" if args.ci and not args.configs else "")
        _write_output("--markdown", Path(args.markdown_path), calibrate.format_markdown(rows, command).encode())
    if args.max_error is not None and any(calibrate.max_abs_error(r) > args.max_error for r in rows):
        return EXIT_OOM  # 1: outside the tolerance
    return EXIT_OK


def _calibrate_cuda(args: argparse.Namespace) -> int:
    """Measured (torch.cuda, one child process per configuration) vs simulated; see sim/calibrate_cuda.py."""
    from sim import calibrate_cuda as cc

    if args.list:
        print("\n".join(cc.list_lines()))
        return EXIT_OK
    for flag, value in (("--ci", args.ci), ("--max-error", args.max_error is not None)):
        if value:
            raise ScenarioError(f"{flag}: only with --device cpu")
    if args.measurements and (args.measure_only or args.snapshot_dir):
        flag = "--measure-only" if args.measure_only else "--snapshot-dir"
        raise ScenarioError(f"{flag}: not with --measurements (which compares what was measured before)")
    known = [c.name for c in cc.CUDA_CONFIGS]
    unknown = [n for n in args.configs if n not in known]
    if unknown:
        raise ScenarioError(f"--config: unknown configuration {unknown[0]!r} (see --device cuda --list)")
    _check_outputs(("--json", args.json_path), ("--markdown", args.markdown_path))
    if args.snapshot_dir and not Path(args.snapshot_dir).is_dir():
        raise ScenarioError(f"--snapshot-dir: not a directory: {args.snapshot_dir!r}")
    if args.measurements:
        recorded = _recorded_measurements(Path(args.measurements))
        names = list(args.configs) or [n for n in known if n in recorded]
        missing = [n for n in names if n not in recorded]
        if missing:
            raise ScenarioError(f"--measurements: no measurement of {missing[0]!r} in {args.measurements!r}")
        pending = [(cc.config_by_name(n), recorded[n]) for n in names]
    else:
        reason = cc.cuda_unavailable_reason(args.python)
        if reason is not None:
            raise ScenarioError(f"calibrate --device cuda: {reason}")
        pending = [(cc.config_by_name(n), None) for n in (list(args.configs) or known)]
    rows = []
    for config, measured in pending:
        if measured is None:
            print(f"measuring {config.name} ...", file=sys.stderr, flush=True)
            snapshot = Path(args.snapshot_dir) / f"{config.name}.pickle" if args.snapshot_dir else None
            measured = cc.measure(config, snapshot, args.python)
        rows.append({"config": cc.config_to_json(config), "measured": measured} if args.measure_only
                    else cc.compare(config, measured))
        if args.json_path is not None:  # after every configuration: a run cut short keeps what it measured
            _write_output("--json", Path(args.json_path), (json.dumps(rows, indent=2) + "\n").encode())
    print(cc.format_table(rows))
    if args.markdown_path is not None:
        command = "python -m sim calibrate --device cuda" + "".join(f" --config {n}" for n in args.configs)
        if args.measurements:
            command += f" --measurements {args.measurements}"
        _write_output("--markdown", Path(args.markdown_path), cc.format_markdown(rows, command).encode())
    failed = [r["config"]["name"] for r in rows if r["measured"]["status"] == cc.Status.FAILED.value]
    if failed:
        print(f"failed: {', '.join(failed)} (reasons in the table)", file=sys.stderr)
        return EXIT_OOM  # 1: a configuration's child failed
    return EXIT_OK


def _recorded_measurements(path: Path) -> dict[str, dict]:
    """{configuration name: measured side} from a JSON that --json wrote; a bad file is one line."""
    try:
        rows = json.loads(path.read_text())
        return {row["config"]["name"]: row["measured"] for row in rows}
    except OSError as exc:
        raise ScenarioError(f"--measurements: cannot read {str(path)!r}: {exc.strerror}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ScenarioError(f"--measurements: {str(path)!r} is not a calibrate --device cuda JSON ({exc!r})") from None


def _validate(args: argparse.Namespace) -> int:
    """Every point (or one source's) simulated and compared; exit 1 when one is not as its file expects."""
    from sim import validate

    _check_outputs(("--json", args.json_path), ("--markdown", args.markdown_path))
    rows = validate.validate(validate.load_points(source=args.source))
    table = validate.format_table(rows)
    print(table)
    if args.json_path is not None:
        _write_output("--json", Path(args.json_path), (json.dumps(validate.rows_json(rows), indent=2) + "\n").encode())
    if args.markdown_path is not None:
        _write_output("--markdown", Path(args.markdown_path), (table + "\n").encode())
    return EXIT_OK if all(row.as_expected for row in rows) else EXIT_OOM  # 1: a point not as its file expects
