"""`sim fit`: the largest value of one key (sequence length, micro-batch) with which a job still fits, and the first
with which it does not, each with its peak: galloping from the scenario's own value (doubling up while it fits,
halving down while it does not), then bisection between the last fitting and the first failing value, in steps of
`multiple` (issue #16). It assumes the peak does not fall as the value grows, which holds on one GPU (the fuzz
suite's doubling property, docs/validation.md) and may not where communication overlaps compute."""

from collections.abc import Callable
from dataclasses import dataclass

from sim.errors import ScenarioError

MAXIMIZABLE = ("training.seq_len", "training.per_device_train_batch_size")


@dataclass(frozen=True, slots=True)
class Probe:
    """One simulated value: whether it fits and its device-used peak."""

    value: int
    fits: bool
    peak_bytes: int


@dataclass(frozen=True, slots=True)
class FitResult:
    """The search's answer: the largest fitting value and the first failing one (None: none found within the
    bounds), and every value simulated on the way, in order."""

    key: str
    largest_fitting: Probe | None
    first_failing: Probe | None
    probes: tuple[Probe, ...]


def search_fit(key: str, start: int, probe: Callable[[int], Probe], multiple: int = 1,
               limit: int = 1 << 24) -> FitResult:
    """Gallop then bisect over the multiples of `multiple` from `multiple` to `limit` (start rounded to one)."""
    if key not in MAXIMIZABLE:
        raise ScenarioError(f"--maximize: {key!r} is not a key fit searches (it searches {', '.join(MAXIMIZABLE)})")
    if multiple < 1 or limit < multiple:
        raise ScenarioError(f"--multiple {multiple} and --limit {limit}: need 1 <= multiple <= limit")
    seen: dict[int, Probe] = {}

    def at(value: int) -> Probe:
        if value not in seen:
            seen[value] = probe(value)
        return seen[value]

    value = min(max(multiple, start // multiple * multiple), limit // multiple * multiple)
    if at(value).fits:
        low, high = value, None
        while high is None and low < limit // multiple * multiple:
            bigger = min(low * 2, limit // multiple * multiple)
            if at(bigger).fits:
                low = bigger
            else:
                high = bigger
    else:
        low, high = None, value
        while low is None and high > multiple:
            smaller = max(high // 2 // multiple * multiple, multiple)
            if at(smaller).fits:
                low = smaller
            else:
                high = smaller
    if low is not None and high is not None:
        while high - low > multiple:
            middle = (low + high) // 2 // multiple * multiple
            if at(middle).fits:
                low = middle
            else:
                high = middle
    return FitResult(key, seen[low] if low is not None else None, seen[high] if high is not None else None,
                     tuple(seen.values()))
