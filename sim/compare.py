"""Two runs side by side (`sim compare A B`): their verdicts and peaks, and the terms that make the difference: the
allocated peak's breakdown by category, the model states, the reserve and the memory outside PyTorch, each as
B − A, largest first (issue #17; the seed case: Qwen1.5-32B against Yi-34B)."""

from sim.units import format_bytes


def _terms(result: dict) -> dict[str, int]:
    """Every additive term of a run's device-used peak worth comparing, by name."""
    top = result["allocated_peak"]
    terms = {f"allocated peak: {name}": value for name, value in top["breakdown"].items()}
    terms["reserved but unallocated at the peak"] = result["fragmentation"]["reserved_minus_allocated_at_peak_bytes"]
    terms["non-PyTorch (CUDA context, NCCL)"] = result["peak"]["non_pytorch_bytes"]
    return terms


def compare_results(a: dict, b: dict) -> dict:
    """The comparison of two results (summarize's dicts): headline figures of each and B − A, and the terms of
    the peaks ordered by how much they differ."""
    figures = {
        "device_used_peak_bytes": (a["peak"]["total_bytes"], b["peak"]["total_bytes"]),
        "allocated_peak_bytes": (a["allocated_peak"]["allocated_bytes"], b["allocated_peak"]["allocated_bytes"]),
        "reserved_peak_bytes": (a["max_memory"]["reserved_bytes"], b["max_memory"]["reserved_bytes"]),
        "capacity_bytes": (a["hardware"]["capacity_bytes"], b["hardware"]["capacity_bytes"]),
    }
    states = {f"model states: {name}": (a["model_states_bytes"][name], b["model_states_bytes"][name])
              for name in a["model_states_bytes"]}
    terms_a, terms_b = _terms(a), _terms(b)
    terms = sorted(((name, terms_a[name], terms_b[name]) for name in terms_a),
                   key=lambda item: -abs(item[2] - item[1]))
    return {
        "a": {"scenario": a["scenario"], "fits": a["fits"]},
        "b": {"scenario": b["scenario"], "fits": b["fits"]},
        "figures": {name: {"a": x, "b": y, "b_minus_a": y - x} for name, (x, y) in {**figures, **states}.items()},
        "terms": [{"term": name, "a": x, "b": y, "b_minus_a": y - x} for name, x, y in terms],
    }


def format_comparison(comparison: dict) -> str:
    """The table `sim compare` prints."""
    a, b = comparison["a"], comparison["b"]
    verdict = {True: "FITS", False: "OUT OF MEMORY"}
    lines = [f"A  {a['scenario']}: {verdict[a['fits']]}", f"B  {b['scenario']}: {verdict[b['fits']]}", "",
             f"{'':<44}{'A':>14}{'B':>14}{'B - A':>14}"]
    for name, row in comparison["figures"].items():
        label = name.replace("_bytes", "").replace("_", " ")
        lines.append(f"{label:<44}{format_bytes(row['a']):>14}{format_bytes(row['b']):>14}"
                     f"{_signed(row['b_minus_a']):>14}")
    lines += ["", "what makes the difference (terms of the peaks, largest first)"]
    for row in comparison["terms"]:
        lines.append(f"  {row['term']:<42}{format_bytes(row['a']):>14}{format_bytes(row['b']):>14}"
                     f"{_signed(row['b_minus_a']):>14}")
    return "\n".join(lines)


def _signed(value: int) -> str:
    return ("+" if value > 0 else "-" if value < 0 else "") + format_bytes(abs(value))
