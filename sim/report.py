"""The result of a run (design.md §4): JSON-ready dict, and the summary table printed by `sim run`."""

from dataclasses import dataclass

import numpy as np

from sim.allocator.event_log import AllocatorEventLog
from sim.clocks import device_clock_memory, ops_in_flight
from sim.des import Link, link_of
from sim.engine import EngineResult
from sim.ingest.provenance import lookup
from sim.ops import CATEGORIES, PHASES, STREAMS, Phase, Schedule
from sim.plan import Holder, Plan
from sim.scenario import Scenario
from sim.schedule import BuiltSchedule
from sim.steady import SteadyState
from sim.units import format_bytes, format_count, us_to_seconds
from sim.vocab import AllocatorBackend

SCHEMA_VERSION = 1
ALLOC_CONF_IGNORED_WHY = "pinned host memory, the allocator's lock or graph-capture reuse"
LARGEST_TENSORS = 10  # live tensors listed at the allocated peak and before an OOM (issue #17)
LOW_HEADROOM = 0.05  # a job that fits with less than this share of the device free gets a warning line
_NOTHING = np.zeros(len(CATEGORIES), dtype=np.int64)  # bytes by category before the first event
PHASE_GROUPS = {"forward": (Phase.FORWARD,), "backward": (Phase.BACKWARD, Phase.RECOMPUTE),
                "optimizer": (Phase.OPTIMIZER,)}


@dataclass(frozen=True, slots=True)
class Run:
    """Everything a run produced, for the report, the plot and tests."""

    scenario: Scenario  # for the names the result reports
    plan: Plan
    built: BuiltSchedule
    engine: EngineResult
    allocator: object = None  # the backend after the run (its statistics)
    event_log: AllocatorEventLog | None = None  # the caching allocator's trace entries, placed in time (if asked)
    steady: SteadyState | None = None  # the steps after the simulated ones, repeats of the last (sim/steady.py)
    largest_free_block_before_oom_bytes: int | None = None  # the cache's largest free block at the first OOM

    @property
    def schedule(self) -> Schedule:
        return self.built.schedule

    @property
    def non_pytorch_bytes(self) -> int:
        """What the device runtime holds outside PyTorch's statistics (CUDA context, NCCL's buffers)."""
        return self.plan.runtime.non_pytorch_bytes()

    @property
    def nccl_bytes(self) -> int:
        """NCCL's buffers, part of non_pytorch_bytes."""
        return self.plan.runtime.non_pytorch_bytes(Holder.NCCL)


def _op_fields(run: Run, op_index: int) -> dict:
    if op_index < 0:
        return {"step": 0, "micro_batch": 0, "phase": "forward", "layer": None, "op": "model.init"}
    schedule = run.schedule
    op = schedule.ops[op_index]
    return {"step": schedule.op_step[op_index], "micro_batch": schedule.op_micro_batch[op_index],
            "phase": op.phase.value, "layer": op.layer, "op": op.name}


def summarize(run: Run) -> dict:
    """The result JSON of schema_version 1."""
    sc, trace, states = run.scenario, run.engine.trace, run.built.model_states
    capacity = sc.hardware.device.capacity_bytes
    total = trace.reserved_bytes + run.non_pytorch_bytes
    peak_index = int(np.argmax(total))
    peak_total = int(total[peak_index])
    op_index = int(trace.op_index[peak_index])
    allocated = int(trace.allocated_bytes[peak_index])
    reserved = int(trace.reserved_bytes[peak_index])
    step_time_s = _step_time_s(run)
    tokens_all = run.built.tokens_per_step * sc.hardware.gpus
    peak_flops = run_peak_flops(run)
    fits = peak_total <= capacity
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": sc.name,
        "model": {"name": sc.model_name, "parameters": states.parameters,
                  "trainable_parameters": states.trainable_parameters},
        "hardware": {"device": sc.hardware.device_name, "gpus": sc.hardware.gpus, "capacity_bytes": capacity},
        "fits": fits,
        "max_memory": {"allocated_bytes": int(trace.allocated_bytes.max(initial=0)),
                       "reserved_bytes": int(trace.reserved_bytes.max(initial=0)),
                       "device_used_bytes": peak_total, "decides_oom": "device_used_bytes"},
        "peak": {"total_bytes": peak_total, "reserved_bytes": reserved, "allocated_bytes": allocated,
                 "non_pytorch_bytes": run.non_pytorch_bytes,
                 "time_s": us_to_seconds(int(trace.time_us[peak_index])), **_op_fields(run, op_index)},
        "phase_peaks": _phase_peaks(run),
        "breakdown_at_peak": trace.category_bytes_at(peak_index, _NOTHING),
        "allocated_peak": _allocated_peak(run),
        "device_clock": _device_clock(run),
        "headroom_bytes": capacity - peak_total,
        "model_states_bytes": {"parameters": states.parameters_bytes, "gradients": states.gradients_bytes,
                               "optimizer_states": states.optimizer_states_bytes},
        "fragmentation": {"reserved_minus_allocated_at_peak_bytes": reserved - allocated,
                          "ratio_at_peak": (reserved - allocated) / reserved if reserved else 0.0},
        "oom": _oom(run),
        "deficit_bytes": max(0, peak_total - capacity),
        "step_time_s": step_time_s,
        "tokens_per_s": tokens_all / step_time_s if step_time_s else 0.0,
        "mfu": (run.built.model_flops_per_step / step_time_s / peak_flops) if step_time_s else 0.0,
        "stream_busy_share": stream_busy_share(run),
        "host": host_fields(run),
        "non_pytorch": {"cuda_context_bytes": run.non_pytorch_bytes - run.nccl_bytes, "nccl_bytes": run.nccl_bytes,
                        "nccl_communicators": run.plan.nccl.communicators},
        "allocator": _allocator_fields(run),
        "events": len(trace) + (run.steady.repeated_steps * run.steady.events_per_step if run.steady else 0),
        "settings": settings(run),
        "ignored_keys": [{"path": item.path, "value": item.value, "why": item.why} for item in sc.ignored_keys]
        + [{"path": f"allocator.conf.{key}", "value": value, "why": ALLOC_CONF_IGNORED_WHY}
           for key, value in run.plan.allocator.conf.ignored],
    }


def settings(run: Run) -> dict[str, dict]:
    """Each setting that decided the result: its value as the run used it and where it came from."""
    sc, plan = run.scenario, run.plan
    dumped = sc.model_dump(mode="json")
    resolved = {
        "training.per_device_train_batch_size": plan.training.micro_batch,
        "training.gradient_accumulation_steps": plan.training.accumulation_steps,
        "training.seq_len": plan.training.seq_len,
        "training.gradient_checkpointing": plan.training.gradient_checkpointing,
        "training.gradient_checkpointing_kwargs.use_reentrant": plan.training.use_reentrant,
        "training.attn_implementation": plan.training.attn.value,
        "training.optim": plan.training.optim.value,
        "nccl.version": ".".join(str(part) for part in plan.nccl.version),
    }
    out = {path: {"value": resolved[path] if path in resolved else lookup(dumped, path), "from": origin}
           for path, origin in sc.origins.items()}
    out["weights_dtype"] = {"value": plan.model.weights_dtype.value,
                            "from": "deepspeed bf16/fp16 sections with the Trainer's flag" if sc.deepspeed
                            else "model.torch_dtype"}
    return out


def run_peak_flops(run: Run) -> float:
    flops = run.scenario.hardware.device.peak_flops
    return flops.get("bf16") or max(flops.values())


def _step_time_s(run: Run) -> float:
    """Duration of the last simulated step (start of its first op to the end of the run)."""
    steps, starts = run.schedule.op_step, run.engine.op_start_us
    last = steps[-1] if steps else 0
    first_index = steps.index(last) if steps else 0
    return us_to_seconds(run.engine.end_time_us - starts[first_index])


def stream_busy_share(run: Run) -> dict[str, float]:
    """Per stream, the share of the last step's time its ops were running (0..1; streams overlap)."""
    schedule, engine = run.schedule, run.engine
    if not schedule.ops:
        return {}
    codes = schedule.stream_codes()
    steps = np.asarray(schedule.op_step)
    first = int(np.searchsorted(steps, steps[-1]))
    span = engine.end_time_us - engine.op_start_us[first]
    durations = np.asarray(engine.op_end_us[first:]) - np.asarray(engine.op_start_us[first:])
    busy = np.bincount(codes[first:], weights=durations, minlength=len(STREAMS))
    used = set(codes[first:].tolist())
    return {s.value: float(busy[i]) / span if span else 0.0 for i, s in enumerate(STREAMS) if i in used}


def host_fields(run: Run) -> dict:
    """The host thread in the last step: how far its issue runs ahead of each op's kernel (start minus issue, µs:
    the most and the median), the most ops in flight at an issue (sim/clocks.py), the share of the step it spends
    issuing, the share the GPU's link to its peers carries collectives, the share each direction of PCIe carries
    copies to or from the host, and which timeline laid the run out (sim/engine.py)."""
    schedule, engine = run.schedule, run.engine
    if not schedule.ops:
        return {"lead_max_us": 0, "lead_median_us": 0, "run_ahead_max_ops": 0, "busy_share": 0.0,
                "link_busy_share": 0.0,
                "pcie_busy_share": {Link.HOST_TO_DEVICE.value: 0.0, Link.DEVICE_TO_HOST.value: 0.0},
                "timeline": "recurrence"}
    steps = np.asarray(schedule.op_step)
    first = int(np.searchsorted(steps, steps[-1]))
    starts, ends = np.asarray(engine.op_start_us[first:]), np.asarray(engine.op_end_us[first:])
    issues, launches = np.asarray(engine.op_issue_us[first:]), np.asarray(engine.op_launch_us[first:])
    span = engine.end_time_us - int(starts.min(initial=engine.end_time_us))
    lead = starts - issues
    links = [link_of(op) for op in schedule.ops[first:]]

    def busy_share(link: Link) -> float:
        on_link = np.flatnonzero([each is link for each in links])
        return _covered_us(starts[on_link], ends[on_link]) / span if span else 0.0

    return {"lead_max_us": int(lead.max()), "lead_median_us": int(np.median(lead)),
            "run_ahead_max_ops": int(ops_in_flight(engine)[first:].max()),
            "busy_share": float((launches - issues).sum()) / span if span else 0.0,
            "link_busy_share": busy_share(Link.PEERS),
            "pcie_busy_share": {link.value: busy_share(link) for link in (Link.HOST_TO_DEVICE, Link.DEVICE_TO_HOST)},
            "timeline": "simpy (transfers share a link)" if engine.shared_link else "recurrence"}


def _pcie_shown(shares: dict) -> str:
    """PCIe's busy shares for the summary, where any copy used it."""
    if not any(shares.values()):
        return ""
    return (f", PCIe to device {100 * shares[Link.HOST_TO_DEVICE.value]:.0f}%, "
            f"to host {100 * shares[Link.DEVICE_TO_HOST.value]:.0f}%")


def _device_clock(run: Run) -> dict:
    """The most allocated on the device's clock (sim/clocks.py: what the kernels hold, allocations from their
    kernel's start, frees from the end of the freeing op's kernel) and when it is first reached."""
    peak_bytes, at_us = device_clock_memory(run.engine).peak()
    return {"allocated_peak_bytes": peak_bytes, "time_s": us_to_seconds(at_us)}


def _covered_us(starts: np.ndarray, ends: np.ndarray) -> int:
    """How long at least one of the intervals [start, end) covers."""
    covered, reach = 0, None
    for start, end in sorted(zip(starts.tolist(), ends.tolist())):
        if reach is None or start > reach:
            covered, reach = covered + end - start, end
        elif end > reach:
            covered, reach = covered + end - reach, end
    return covered


def _phase_peaks(run: Run) -> dict:
    trace = run.engine.trace
    phase_of_op = np.append(run.schedule.phase_codes(), -1)
    event_phase = phase_of_op[trace.op_index]  # op_index -1 picks -1: allocations before the first op
    starts = np.asarray(run.engine.op_issue_us)  # the trace is on the host's clock
    out = {}
    for group, phases in PHASE_GROUPS.items():
        codes = [PHASES.index(p) for p in phases]
        selected = np.isin(event_phase, codes)
        # what is held when the phase begins counts too (a phase may allocate nothing: an offloaded step), at the
        # start of each of its runs (every micro-batch's forward and backward, every step's optimizer)
        inside = np.isin(phase_of_op[:-1], codes)
        run_starts = np.nonzero(inside & ~np.concatenate([[False], inside[:-1]]))[0]
        if len(run_starts) and len(trace):
            before = np.searchsorted(trace.time_us, starts[run_starts], side="right") - 1
            selected[before[before >= 0]] = True
        out[group] = {
            "allocated_bytes": int(trace.allocated_bytes[selected].max()) if selected.any() else 0,
            "reserved_bytes": int(trace.reserved_bytes[selected].max()) if selected.any() else 0,
        }
    return out


def _oom(run: Run) -> dict | None:
    """The first failing allocation, and what was live just before it: the state a user cuts from."""
    oom = run.engine.oom
    if oom is None:
        return None
    trace, before = run.engine.trace, oom.event_index - 1
    live = {"allocated_bytes": int(trace.allocated_bytes[before]) if before >= 0 else 0,
            "reserved_bytes": int(trace.reserved_bytes[before]) if before >= 0 else 0,
            "largest_free_block_bytes": run.largest_free_block_before_oom_bytes,
            "by_category": trace.category_bytes_at(before, _NOTHING) if before >= 0 else
            {c.value: 0 for c in CATEGORIES},
            "largest_tensors": largest_live_tensors(run, before)}
    return {"time_s": us_to_seconds(oom.time_us), **_op_fields(run, oom.op_index),
            "requested_bytes": oom.requested_bytes, "message": oom.message, "live_before": live}


def _allocated_peak(run: Run) -> dict:
    """The first event with the most allocated (torch.cuda.max_memory_allocated): what the tensors themselves need,
    by category, and the largest of them."""
    trace = run.engine.trace
    index = int(np.argmax(trace.allocated_bytes)) if len(trace) else -1
    if index < 0:
        return {"allocated_bytes": 0, "time_s": 0.0, **_op_fields(run, -1),
                "breakdown": {c.value: 0 for c in CATEGORIES}, "largest_tensors": []}
    return {"allocated_bytes": int(trace.allocated_bytes[index]), "time_s": us_to_seconds(int(trace.time_us[index])),
            **_op_fields(run, int(trace.op_index[index])), "breakdown": trace.category_bytes_at(index, _NOTHING),
            "largest_tensors": largest_live_tensors(run, index)}


def largest_live_tensors(run: Run, index: int, count: int = LARGEST_TENSORS) -> list[dict]:
    """The `count` largest buffers live just after trace row `index` (none before the first row): name, bytes,
    category, and the op that allocated it."""
    if index < 0:
        return []
    trace, buffers = run.engine.trace, run.schedule.buffers
    ids = trace.buffer_id[:index + 1]
    _, from_end = np.unique(ids[::-1], return_index=True)  # each buffer's last event up to the row
    last = index - from_end
    allocations = last[trace.delta_bytes[last] > 0]
    # largest first, equal sizes in the order they were allocated (not by buffer id, which numbering forms differ in)
    largest = allocations[np.lexsort((allocations, -trace.delta_bytes[allocations]))[:count]]
    out = []
    for row in largest.tolist():
        buffer = buffers[int(trace.buffer_id[row])]
        op = _op_fields(run, int(trace.op_index[row]))
        out.append({"name": buffer.name, "size_bytes": int(trace.delta_bytes[row]), "category": buffer.category.value,
                    "op": op["op"], "layer": op["layer"], "step": op["step"], "micro_batch": op["micro_batch"]})
    return out


def _allocator_fields(run: Run) -> dict:
    """The caching allocator's counters (PyTorch's names where it has one); only the backend for `exact`."""
    allocator, spec = run.allocator, run.scenario.allocator
    fields = {"backend": spec.backend.value, "conf": spec.conf}
    if run.plan.allocator.backend is AllocatorBackend.CACHING:
        fields.update({"num_alloc_retries": allocator.num_alloc_retries,
                       "num_alloc_retries_before_oom": allocator.retries_before_first_oom,
                       "num_device_alloc": allocator.num_device_alloc, "segments_at_end": allocator.num_segments,
                       "largest_free_block_at_peak_bytes": run.engine.largest_free_block_at_peak_bytes})
    return fields


def allocator_summary(run: Run) -> str:
    """One line on the allocator: backend, cudaMalloc retries (DeepSpeed's "cache flushes"), OOMs."""
    backend = run.scenario.allocator.backend.value
    allocator = run.allocator
    if run.plan.allocator.backend is not AllocatorBackend.CACHING:
        return f"allocator  {backend}: live bytes only (no caching, no fragmentation)"
    conf = run.scenario.allocator.conf or "defaults"
    before = allocator.retries_before_first_oom
    retries = f"{allocator.num_alloc_retries} cudaMalloc retries (cache flushes" + \
        (f", {before} before the first OOM)" if before is not None else ")")
    largest = run.engine.largest_free_block_at_peak_bytes
    return (f"allocator  {backend} ({conf}): {retries}, {allocator.num_device_alloc} cudaMalloc calls, "
            f"{allocator.num_segments} segments at the end; largest free block at the peak "
            f"{format_bytes(largest or 0)}")


def steady_summary(run: Run) -> str:
    """One line on the steps the steady-state shortcut counted without simulating (sim/steady.py); "" if none."""
    steady = run.steady
    if steady is None:
        return ""
    last = steady.first_repeat - 1
    return (f"steady     steps {steady.first_repeat}-{steady.steps - 1} repeat step {last} exactly (same ops, "
            f"events and allocator state): counted, not simulated; {steady.events_per_step} events each")


def format_summary(result: dict, allocator_line: str = "", host_bytes: int = 0, steady_line: str = "") -> str:
    """The table `sim run` prints."""
    peak, cap = result["peak"], result["hardware"]["capacity_bytes"]
    lines = [
        f"scenario   {result['scenario']}",
        f"model      {result['model']['name']}: {format_count(result['model']['parameters'])} parameters, "
        f"{format_count(result['model']['trainable_parameters'])} trainable",
        f"hardware   {result['hardware']['gpus']} x {result['hardware']['device']} "
        f"({format_bytes(cap)} each)",
        "",
        f"verdict    {'FITS' if result['fits'] else 'OUT OF MEMORY'}: peak {format_bytes(peak['total_bytes'])} "
        f"of {format_bytes(cap)} ({100 * peak['total_bytes'] / cap:.1f}%)"
        + ("" if result["fits"] else f", short by {format_bytes(result['deficit_bytes'])}"),
    ]
    headroom = result["headroom_bytes"]
    if result["fits"] and headroom < LOW_HEADROOM * cap:
        lines.append(f"warning    fits with {format_bytes(headroom)} free ({100 * headroom / cap:.1f}% of the device, "
                     f"under {LOW_HEADROOM:.0%}): a longer sample, allocator rounding or another process can tip it")
    if result["oom"]:
        oom = result["oom"]
        live = oom["live_before"]
        lines += ["", f"first OOM  step {oom['step']}, micro-batch {oom['micro_batch']}, {oom['phase']}, "
                      f"{_where(oom)}op {oom['op']}: tried to allocate {format_bytes(oom['requested_bytes'])}",
                  f"           live just before: allocated {format_bytes(live['allocated_bytes'])} ("
                  + ", ".join(f"{name} {format_bytes(value)}" for name, value in live["by_category"].items() if value)
                  + f"), reserved {format_bytes(live['reserved_bytes'])}"
                  + ("" if live["largest_free_block_bytes"] is None else
                     f", largest cached free block {format_bytes(live['largest_free_block_bytes'])}"),
                  f"           PyTorch would say: {oom['message']}"]
        lines += _tensor_lines("largest tensors live just before", live["largest_tensors"])
    most = result["max_memory"]
    lines += ["", f"memory     max allocated {format_bytes(most['allocated_bytes'])} (torch max_memory_allocated), "
                  f"max reserved {format_bytes(most['reserved_bytes'])} (max_memory_reserved),",
              f"           device used {format_bytes(most['device_used_bytes'])} (nvidia-smi: reserved + non-PyTorch "
              "memory; this one decides the OOM)"]
    top = result["allocated_peak"]
    lines += ["", f"allocated peak {format_bytes(top['allocated_bytes'])} at {top['time_s']:.3f} s: "
                  f"step {top['step']}, micro-batch {top['micro_batch']}, {top['phase']}, {_where(top)}op {top['op']} "
                  "(what the tensors need: cut from here)"]
    lines += [f"  {name:<20}{format_bytes(value):>14}" for name, value in top["breakdown"].items()]
    lines += _tensor_lines("largest tensors then", top["largest_tensors"])
    lines += ["", f"peak at    {peak['time_s']:.3f} s: step {peak['step']}, micro-batch {peak['micro_batch']}, "
                  f"{peak['phase']}, {_where(peak)}op {peak['op']} (device used: reserved + non-PyTorch)"]
    lines += [f"{'at the peak':<22}{'bytes':>14}"]
    lines += [f"  {name:<20}{format_bytes(value):>14}" for name, value in result["breakdown_at_peak"].items()]
    lines += [f"  {'allocated':<20}{format_bytes(peak['allocated_bytes']):>14}",
              f"  {'reserved':<20}{format_bytes(peak['reserved_bytes']):>14}",
              f"  {'non-PyTorch':<20}{format_bytes(peak['non_pytorch_bytes']):>14}"
              f"  (CUDA context {format_bytes(result['non_pytorch']['cuda_context_bytes'])}, NCCL "
              f"{format_bytes(result['non_pytorch']['nccl_bytes'])} in {result['non_pytorch']['nccl_communicators']}"
              f" communicators)",
              "", f"{'phase peaks':<22}{'allocated':>14}{'reserved':>14}"]
    for phase, values in result["phase_peaks"].items():
        lines.append(f"  {phase:<20}{format_bytes(values['allocated_bytes']):>14}"
                     f"{format_bytes(values['reserved_bytes']):>14}")
    states = result["model_states_bytes"]
    lines += ["", "model states (per GPU, first optimizer step)"]
    lines += [f"  {name:<20}{format_bytes(value):>14}" for name, value in states.items()]
    if host_bytes:
        lines.append(f"  {'host (offloaded)':<20}{format_bytes(host_bytes):>14}")
    frag = result["fragmentation"]
    lines += ["", f"fragmentation at the peak: {format_bytes(frag['reserved_minus_allocated_at_peak_bytes'])} "
                  f"reserved but unallocated ({100 * frag['ratio_at_peak']:.1f}% of reserved)"]
    if allocator_line:
        lines.append(allocator_line)
    busy = ", ".join(f"{stream} {100 * share:.0f}%" for stream, share in result["stream_busy_share"].items())
    host_side = result["host"]
    lines += ["", "assumed (each setting that decided the result: value, where it came from)"]
    lines += [f"  {path} = {_shown(entry['value'])}  ({entry['from']})" for path, entry in result["settings"].items()]
    by_reason: dict[str, list[str]] = {}
    for item in result["ignored_keys"]:
        by_reason.setdefault(item["why"], []).append(item["path"])
    if by_reason:
        lines.append("accepted, no memory effect:")
        lines += [f"  {', '.join(paths)} ({why})" for why, paths in by_reason.items()]
    lines += ["", f"step time  {result['step_time_s']:.3f} s, {result['tokens_per_s']:.0f} tokens/s, "
                  f"MFU {100 * result['mfu']:.1f}% (roofline at measured efficiencies, NCCL cost model)",
              f"busy       {busy} of the step; link {100 * host_side['link_busy_share']:.0f}%"
              + _pcie_shown(host_side["pcie_busy_share"]),
              f"host       issuing {100 * host_side['busy_share']:.0f}% of the step, up to "
              f"{host_side['lead_max_us'] / 1e3:.1f} ms and {host_side['run_ahead_max_ops']} ops ahead of the "
              f"kernels (median "
              f"{host_side['lead_median_us'] / 1e3:.1f} ms); timeline: {host_side['timeline']}",
              f"events     {result['events']}"]
    if steady_line:
        lines.append(steady_line)
    return "\n".join(lines)


def _where(fields: dict) -> str:
    """'layer N, ' for an op inside a decoder layer, else ''."""
    return f"layer {fields['layer']}, " if fields["layer"] is not None else ""


def _tensor_lines(title: str, tensors: list[dict]) -> list[str]:
    """The largest live tensors as summary lines: size, name, category, the op that made it."""
    if not tensors:
        return []
    return [f"  {title}:"] + [f"  {format_bytes(t['size_bytes']):>14}  {t['name']} ({t['category']}; {_where(t)}"
                              f"step {t['step']} micro-batch {t['micro_batch']} op {t['op']})" for t in tensors]


def _shown(value) -> str:
    """A setting's value in the summary: lists joined, null as 'none', the empty string quoted."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return "none" if value is None else '""' if value == "" else str(value)
