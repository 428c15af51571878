"""Byte and time units, and their formatting (binary units: a GiB is 2**30 bytes)."""

import math

KIB = 1024
MIB = 1024**2
GIB = 1024**3
US_PER_S = 1_000_000


def seconds_to_us(seconds: float) -> int:
    """Round a duration up to whole microseconds, so an op with any work never takes 0 µs."""
    if seconds <= 0:
        return 0
    return max(1, math.ceil(seconds * US_PER_S))


def us_to_seconds(duration_us: int) -> float:
    return duration_us / US_PER_S


def format_bytes(size_bytes: int) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    sign = "-" if size_bytes < 0 else ""
    value = abs(size_bytes)
    if value < KIB:
        return f"{sign}{value} B"
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if value >= scale:
            return f"{sign}{value / scale:.2f} {unit}"
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """Parameter counts as 7.72B / 160.0M."""
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    return str(count)
