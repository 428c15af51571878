"""Memory over time as a stacked area chart by category, with the capacity line, phase bands and the peak, and
below it one lane per stream showing when its ops run. matplotlib is imported lazily (only `--plot` needs it)."""

import io

import numpy as np

from sim.ops import CATEGORIES, STREAMS, Phase
from sim.report import Run
from sim.units import GIB

_PHASE_COLOURS = {Phase.FORWARD: "#e8f0fe", Phase.BACKWARD: "#fdecea", Phase.RECOMPUTE: "#fff4e0",
                  Phase.OPTIMIZER: "#e6f4ea"}
_MAX_POINTS = 20_000
_LANE_BINS = 1500  # time bins of the stream lanes, about one per pixel


def render_memory_timeline(run: Run, result: dict) -> bytes:
    """PNG bytes of the allocated memory by category over simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = run.engine.trace
    deltas = np.zeros((len(CATEGORIES), len(trace)), dtype=np.int64)
    deltas[trace.category.astype(np.int64), np.arange(len(trace))] = trace.allocated_delta()
    stacked = np.cumsum(deltas, axis=1)
    keep = _sample(trace.allocated_bytes)
    seconds = trace.time_us[keep] / 1e6
    fig, (ax, lanes) = plt.subplots(2, 1, figsize=(12, 6.5), dpi=100, sharex=True,
                                    gridspec_kw={"height_ratios": [4, 1]})
    _phase_bands(ax, run)
    ax.stackplot(seconds, stacked[:, keep] / GIB, labels=[c.value for c in CATEGORIES], step="post", alpha=0.85)
    non_pytorch = run.non_pytorch_bytes / GIB
    if non_pytorch:
        ax.plot(seconds, (trace.reserved_bytes[keep] + run.non_pytorch_bytes) / GIB, color="black", lw=0.8,
                label="total incl. non-PyTorch")
    capacity = result["hardware"]["capacity_bytes"] / GIB
    ax.axhline(capacity, color="red", ls="--", lw=1, label=f"capacity {capacity:.1f} GiB")
    peak = result["peak"]
    ax.plot([peak["time_s"]], [peak["total_bytes"] / GIB], "v", color="red", ms=9)
    where = f" L{peak['layer']}" if peak["layer"] is not None else ""
    ax.annotate(f"peak {peak['total_bytes'] / GIB:.2f} GiB\n{peak['phase']}{where} {peak['op']}",
                (peak["time_s"], peak["total_bytes"] / GIB), textcoords="offset points", xytext=(8, 8), fontsize=8)
    _stream_lanes(lanes, run)
    lanes.set_xlabel("simulated time (s)")
    ax.set_ylabel("GiB")
    steady = run.steady
    ax.set_title(result["scenario"] if steady is None else
                 f"{result['scenario']}: steps {steady.first_repeat}-{steady.steps - 1} repeat step "
                 f"{steady.first_repeat - 1} exactly (not drawn)")
    ax.set_ylim(0, max(capacity, peak["total_bytes"] / GIB) * 1.08)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
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
    """One lane per stream used: the share of time its ops run, per pixel-wide bin (a stream's ops never
    overlap, so the running busy time is a cumulative sum over its ops in order)."""
    starts, ends = np.asarray(run.engine.op_start_us), np.asarray(run.engine.op_end_us)
    codes = run.schedule.stream_codes()
    used = [s for code, s in enumerate(STREAMS) if (codes == code).any()]
    edges = np.linspace(0, max(run.engine.end_time_us, 1), _LANE_BINS + 1)
    for row, stream in enumerate(used):
        mine = codes == STREAMS.index(stream)
        begin, finish = starts[mine], ends[mine]
        done = np.concatenate([[0], np.cumsum(finish - begin)])
        index = np.searchsorted(finish, edges, side="right")  # ops finished by each edge
        running = np.where(index < len(begin), np.clip(edges - begin[np.minimum(index, len(begin) - 1)], 0, None), 0)
        busy = done[index] + running
        share = np.diff(busy) / np.diff(edges)
        base = len(used) - 1 - row
        ax.fill_between(edges[:-1] / 1e6, base - 0.4, base - 0.4 + 0.8 * share, step="post", color=f"C{row}", lw=0)
    ax.set_yticks([len(used) - 1 - row for row in range(len(used))], [s.value for s in used])
    ax.set_ylim(-0.6, len(used) - 0.4)
    ax.set_ylabel("busy")


def _phase_bands(ax, run: Run) -> None:
    ops, starts = run.schedule.ops, run.engine.op_start_us
    if not ops:
        return
    begin, phase = starts[0], ops[0].phase
    for index in range(1, len(ops) + 1):
        current = ops[index].phase if index < len(ops) else None
        if current is not phase:
            end = starts[index] if index < len(ops) else run.engine.end_time_us
            ax.axvspan(begin / 1e6, end / 1e6, color=_PHASE_COLOURS[phase], lw=0)
            if index < len(ops):
                begin, phase = starts[index], current
