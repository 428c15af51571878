"""Memory over time as a stacked area chart by category, with the reserved, device-used and capacity lines, the
allocated bytes on the device's clock (sim/clocks.py), phase bands, step ticks, the peak and the first OOM, and below
it one lane per stream showing when its ops run (where there is more than one). matplotlib is imported lazily (only
`--plot` needs it)."""

import io
from dataclasses import dataclass

import numpy as np

from sim.clocks import device_clock_memory
from sim.errors import ScenarioError
from sim.ingest.files import shown
from sim.ops import CATEGORIES, PHASES, STREAMS, Phase
from sim.report import Run
from sim.units import GIB

_PHASE_COLOURS = {Phase.FORWARD: "#e8f0fe", Phase.BACKWARD: "#fdecea", Phase.RECOMPUTE: "#fff4e0",
                  Phase.OPTIMIZER: "#e6f4ea"}
_MAX_POINTS = 20_000
_LANE_BINS = 1500  # time bins of the stream lanes, about one per pixel


FORMATS = ("png", "svg", "pdf")  # what --plot writes, by the path's extension


def plot_format(path: str) -> str:
    """The format a --plot path names by its extension (none: png); ScenarioError for any other."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else "png"
    if suffix not in FORMATS:
        raise ScenarioError(f"--plot: {shown(path)} names format {suffix!r}; --plot writes {', '.join(FORMATS)}")
    return suffix


def render_memory_timeline(run: Run, result: dict, fmt: str = "png") -> bytes:
    """The memory timeline in `fmt` (FORMATS): allocated memory stacked by category, the reserved and device-used
    lines, the capacity, the peak and the first OOM marked, phase bands with a legend, step and micro-batch ticks,
    and, where more than one stream runs, a lane per stream showing when it is busy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trace = run.engine.trace
    deltas = np.zeros((len(CATEGORIES), len(trace)), dtype=np.int64)
    deltas[trace.category.astype(np.int64), np.arange(len(trace))] = trace.allocated_delta()
    stacked = np.cumsum(deltas, axis=1)
    keep = _sample(np.maximum(trace.allocated_bytes, trace.reserved_bytes))
    seconds = trace.time_us[keep] / 1e6
    streams = len(set(run.schedule.stream_codes().tolist()))
    if streams > 1:
        fig, (ax, lanes) = plt.subplots(2, 1, figsize=(14, 6.5), dpi=100, sharex=True,
                                        gridspec_kw={"height_ratios": [4, 1]})
    else:
        fig, ax = plt.subplots(figsize=(14, 5.5), dpi=100)
        lanes = None
    phases = _phase_bands(ax, run)
    _step_ticks(ax, run)
    ax.stackplot(seconds, stacked[:, keep] / GIB, labels=[c.value for c in CATEGORIES], step="post", alpha=0.85)
    ax.plot(seconds, trace.reserved_bytes[keep] / GIB, color="dimgray", lw=0.8, drawstyle="steps-post",
            label="reserved")
    if run.non_pytorch_bytes:
        ax.plot(seconds, (trace.reserved_bytes[keep] + run.non_pytorch_bytes) / GIB, color="black", lw=0.8,
                drawstyle="steps-post", label="device used (reserved + non-PyTorch)")
    on_device = device_clock_memory(run.engine)
    shown_device = _sample(on_device.allocated_bytes)
    ax.plot(on_device.time_us[shown_device] / 1e6, on_device.allocated_bytes[shown_device] / GIB, color="navy",
            lw=0.4, ls=":", alpha=0.5, drawstyle="steps-post", label="allocated, device clock (as kernels hold it)")
    capacity = result["hardware"]["capacity_bytes"] / GIB
    ax.axhline(capacity, color="red", ls="--", lw=1, label=f"capacity {capacity:.1f} GiB")
    peak = result["peak"]
    ax.plot([peak["time_s"]], [peak["total_bytes"] / GIB], "v", color="red", ms=9)
    where = f" L{peak['layer']}" if peak["layer"] is not None else ""
    ax.annotate(f"peak {peak['total_bytes'] / GIB:.2f} GiB\n{peak['phase']}{where} {peak['op']}",
                (peak["time_s"], peak["total_bytes"] / GIB), textcoords="offset points", xytext=(8, 8), fontsize=8)
    oom = result["oom"]
    if oom is not None:
        at = run.engine.oom.event_index
        level = (trace.reserved_bytes[at] + run.non_pytorch_bytes) / GIB
        ax.plot([oom["time_s"]], [level], "X", color="darkred", ms=11, label="first OOM")
        where = f" L{oom['layer']}" if oom["layer"] is not None else ""
        ax.annotate(f"first OOM: {oom['phase']}{where} {oom['op']}", (oom["time_s"], level),
                    textcoords="offset points", xytext=(8, -16), fontsize=8, color="darkred")
    if lanes is not None:
        _stream_lanes(lanes, run)
    (lanes if lanes is not None else ax).set_xlabel(
        "simulated time (s): memory and phases as the host issues them (dotted: as the GPU's kernels hold it), "
        "kernels as the GPU runs them")
    ax.set_ylabel("GiB")
    steady = run.steady
    ax.set_title(result["scenario"] if steady is None else
                 f"{result['scenario']}: steps {steady.first_repeat}-{steady.steps - 1} repeat step "
                 f"{steady.first_repeat - 1} exactly (not drawn)")
    ax.set_ylim(0, max(capacity, peak["total_bytes"] / GIB) * 1.08)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=_PHASE_COLOURS[phase], label=f"{phase.value} phase") for phase in phases]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _figure_bytes(fig, fmt)


@dataclass(frozen=True)
class MemorySeries:
    """One memory curve for an overlay: time (any origin, µs), reserved (or device used) and allocated bytes after
    each event, the capacity line (None: none) and a label."""

    label: str
    time_us: np.ndarray
    upper_bytes: np.ndarray  # device used for a run, reserved for a snapshot
    allocated_bytes: np.ndarray
    upper_name: str
    capacity_bytes: int | None = None


def run_series(run: Run, result: dict, label: str) -> MemorySeries:
    """A simulated run's device used and allocated over its simulated time."""
    trace = run.engine.trace
    return MemorySeries(f"{label}: {result['scenario']}", trace.time_us, trace.reserved_bytes + run.non_pytorch_bytes,
                        trace.allocated_bytes, "device used", result["hardware"]["capacity_bytes"])


def render_comparison(series: list[MemorySeries], fmt: str = "png") -> bytes:
    """Several memory curves on one axis of normalised time (each series' first event to its last): the upper
    (device used or reserved) and allocated lines of each, each capacity, each maximum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5.5), dpi=100)
    top = 0.0
    for index, curve in enumerate(series):
        keep = _sample(curve.upper_bytes)
        start, span = int(curve.time_us[0]) if len(curve.time_us) else 0, 1
        if len(curve.time_us):
            span = max(int(curve.time_us[-1]) - start, 1)
        fraction = (curve.time_us[keep] - start) / span
        colour = f"C{index}"
        ax.plot(fraction, curve.upper_bytes[keep] / GIB, color=colour, lw=1, drawstyle="steps-post",
                label=f"{curve.upper_name} {curve.label}")
        ax.plot(fraction, curve.allocated_bytes[keep] / GIB, color=colour, lw=0.8, ls="--", drawstyle="steps-post",
                label=f"allocated {curve.label}")
        if curve.capacity_bytes is not None:
            ax.axhline(curve.capacity_bytes / GIB, color=colour, ls=":", lw=1,
                       label=f"capacity {curve.capacity_bytes / GIB:.1f} GiB")
            top = max(top, curve.capacity_bytes / GIB)
        if len(keep):
            most = int(np.argmax(curve.upper_bytes))
            at, level = (int(curve.time_us[most]) - start) / span, curve.upper_bytes[most] / GIB
            ax.plot([at], [level], "v", color=colour, ms=9)
            ax.annotate(f"{curve.upper_name} max {level:.2f} GiB", (at, level), textcoords="offset points",
                        xytext=(6, 6 + 12 * index), fontsize=8, color=colour)
            top = max(top, level)
    ax.set_xlabel("fraction of each one's time")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(top, 1e-9) * 1.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _figure_bytes(fig, fmt)


def render_sweep(keys: tuple[str, ...], rows: list[dict], fmt: str = "png") -> bytes:
    """A sweep's summary: over one key, the device-used peak per value with the capacity and each variant's fit
    marked; over two, a heatmap of the peak as a share of the capacity, the cells that do not fit hatched. Refused
    variants (no peak) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row["device_used_peak_bytes"]]
    if len(keys) not in (1, 2):
        raise ScenarioError(f"--plot: a sweep plot shows one or two swept keys, not {len(keys)}")
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    if len(keys) == 1:
        labels = [row[keys[0]] for row in done]
        peaks = [int(row["device_used_peak_bytes"]) / GIB for row in done]
        ax.plot(range(len(done)), peaks, "-", color="C0", label="device-used peak")
        for index, row in enumerate(done):
            ax.plot([index], [peaks[index]], "o" if row["fits"] == "true" else "X",
                    color="C2" if row["fits"] == "true" else "C3", ms=8)
        if done:
            ax.axhline(int(done[0]["capacity_bytes"]) / GIB, color="red", ls="--", lw=1, label="capacity")
        ax.set_xticks(range(len(done)), labels, rotation=45 if len(done) > 8 else 0)
        ax.set_xlabel(keys[0])
        ax.set_ylabel("GiB")
        ax.legend(loc="upper left", fontsize=8)
    else:
        columns = list(dict.fromkeys(row[keys[1]] for row in rows))
        lines = list(dict.fromkeys(row[keys[0]] for row in rows))
        share = np.full((len(lines), len(columns)), np.nan)
        for row in done:
            share[lines.index(row[keys[0]]), columns.index(row[keys[1]])] = \
                int(row["device_used_peak_bytes"]) / int(row["capacity_bytes"])
        image = ax.imshow(share, cmap="RdYlGn_r", vmin=0, vmax=max(1.2, np.nanmax(share) if done else 1.2),
                          aspect="auto")
        fig.colorbar(image, ax=ax, label="device-used peak / capacity")
        for i, j in zip(*np.nonzero(share > 1)):
            ax.text(j, i, "OOM", ha="center", va="center", fontsize=8)
        for i, j in zip(*np.nonzero(share <= 1)):
            ax.text(j, i, f"{share[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(lines)), lines)
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
    ax.set_title("sweep: device-used peak")
    return _figure_bytes(fig, fmt)


def _figure_bytes(fig, fmt: str) -> bytes:
    """The figure laid out and saved in `fmt`, then closed. SVG keeps its text as text (searchable, editable) and
    its ids stable from run to run."""
    import matplotlib
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sim"}):
        fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()


def _sample(allocated: np.ndarray) -> np.ndarray:
    """Indices of about _MAX_POINTS events: in each window, its first and its highest-memory event."""
    count = len(allocated)
    if count <= _MAX_POINTS:
        return np.arange(count)
    window = -(-count // (_MAX_POINTS // 2))
    padded = np.full(window * -(-count // window), -1, dtype=np.int64)
    padded[:count] = allocated
    starts = np.arange(0, count, window)
    highs = starts + padded.reshape(-1, window).argmax(axis=1)
    return np.unique(np.concatenate([starts, highs, [count - 1]]))


def _stream_lanes(ax, run: Run) -> None:
    """One lane for the host thread (the share of time it spends issuing ops) and one per stream used (the share of
    time its kernels run on the device), per pixel-wide bin: a lane's spans never overlap, so its running busy time
    is a cumulative sum over them in order. Memory and phases are on the host's clock: where the host runs ahead,
    the stream lanes lag behind them."""
    starts, ends = np.asarray(run.engine.op_start_us), np.asarray(run.engine.op_end_us)
    codes = run.schedule.stream_codes()
    lanes = [("host", np.asarray(run.engine.op_issue_us), np.asarray(run.engine.op_launch_us))]
    lanes += [(s.value, starts[codes == code], ends[codes == code]) for code, s in enumerate(STREAMS)
              if (codes == code).any()]
    edges = np.linspace(0, max(run.engine.end_time_us, 1), _LANE_BINS + 1)
    for row, (_, begin, finish) in enumerate(lanes):
        done = np.concatenate([[0], np.cumsum(finish - begin)])
        index = np.searchsorted(finish, edges, side="right")  # spans finished by each edge
        running = np.where(index < len(begin), np.clip(edges - begin[np.minimum(index, len(begin) - 1)], 0, None), 0)
        busy = done[index] + running
        share = np.diff(busy) / np.diff(edges)
        base = len(lanes) - 1 - row
        ax.fill_between(edges[:-1] / 1e6, base - 0.4, base - 0.4 + 0.8 * share, step="post", color=f"C{row}", lw=0)
    ax.set_yticks([len(lanes) - 1 - row for row in range(len(lanes))], [name for name, _, _ in lanes])
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_ylabel("busy")


def _phase_bands(ax, run: Run) -> list[Phase]:
    """A band per run of ops of one phase, drawn per phase in one call (a checkpointed backward alternates phases
    thousands of times), on the host's clock as the memory is; the phases drawn, for the legend."""
    codes = run.schedule.phase_codes()
    if not len(codes):
        return []
    starts = np.asarray(run.engine.op_issue_us, dtype=np.int64)
    change = np.flatnonzero(np.append(True, codes[1:] != codes[:-1]))
    begin = starts[change]
    end = np.append(begin[1:], run.engine.end_time_us)
    drawn = []
    for code, phase in enumerate(PHASES):
        mine = codes[change] == code
        if mine.any():
            spans = list(zip((begin[mine] / 1e6).tolist(), ((end[mine] - begin[mine]) / 1e6).tolist()))
            ax.broken_barh(spans, (0, 1), transform=ax.get_xaxis_transform(), color=_PHASE_COLOURS[phase], lw=0)
            drawn.append(phase)
    return drawn


def _step_ticks(ax, run: Run) -> None:
    """A solid line where the host begins each step and a dotted one where it begins each later micro-batch (at
    most 200 of those: beyond, only the steps)."""
    steps, micro_batches = np.asarray(run.schedule.op_step), np.asarray(run.schedule.op_micro_batch)
    if not len(steps):
        return
    starts = np.asarray(run.engine.op_issue_us) / 1e6
    step_first = np.flatnonzero(np.append(True, steps[1:] != steps[:-1]))
    micro_first = np.flatnonzero(np.append(False, (micro_batches[1:] != micro_batches[:-1]) &
                                           (steps[1:] == steps[:-1]) & (micro_batches[1:] > micro_batches[:-1])))
    for x in starts[step_first].tolist():
        ax.axvline(x, color="gray", lw=0.8)
    if len(micro_first) <= 200:
        for x in starts[micro_first].tolist():
            ax.axvline(x, color="gray", lw=0.5, ls=":")
