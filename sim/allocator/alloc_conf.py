"""PYTORCH_CUDA_ALLOC_CONF parsing for the caching allocator backend.

Semantics follow c10/core/AllocatorConfig.cpp (and the older c10/cuda/CUDAAllocatorConfig.cpp): the string is split
into tokens at ',', ':', '[' and ']' (spaces dropped) and read as `key:value` pairs separated by commas.
Every error is a ScenarioError whose one-line message starts with `allocator.conf:` and names the offending piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.errors import ScenarioError

MiB = 1024 * 1024
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer: minimum for max_split_size_mb and max_non_split_rounding_mb
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: interval i covers [2**(20+i), 2**(21+i)) bytes
UNLIMITED = (1 << 64) - 1  # SIZE_MAX: max_split_size when unset

# Keys PyTorch accepts that change nothing the simulator models (pinned host memory, lock behaviour, graph reuse).
_IGNORED_BOOL_KEYS = frozenset(
    {
        "release_lock_on_cudamalloc",
        "release_lock_on_hipmalloc",
        "pinned_use_cuda_host_register",
        "pinned_use_hip_host_register",
        "pinned_use_background_threads",
        "graph_capture_record_stream_reuse",
    }
)
_IGNORED_INT_KEYS = frozenset({"pinned_num_register_threads", "pinned_reserve_segment_size_mb"})


@dataclass(frozen=True, slots=True)
class AllocConf:
    """The allocator settings the simulator models; defaults are PyTorch's."""

    max_split_size_bytes: int | None = None  # None: unlimited (SIZE_MAX), blocks of any size may be split
    max_non_split_rounding_bytes: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = field(default=(0,) * ROUNDUP_INTERVALS)
    garbage_collection_threshold: float = 0.0  # 0: off
    expandable_segments: bool = False
    raw: str = ""  # the string as given, for snapshots
    ignored: tuple[tuple[str, str], ...] = ()  # (key, value) accepted that change nothing modelled, for the result

    @property
    def max_split_size(self) -> int:
        """max_split_size in bytes as the C++ code sees it (SIZE_MAX when unset)."""
        return UNLIMITED if self.max_split_size_bytes is None else self.max_split_size_bytes

    def divisions_for(self, size: int) -> int:
        """roundup_power2_divisions(size): the setting of the power-of-two interval holding `size`."""
        index = size.bit_length() - 1 - 20
        index = 0 if index < 0 else (ROUNDUP_INTERVALS - 1 if index >= ROUNDUP_INTERVALS else index)
        return self.roundup_power2_divisions[index]

    def allocator_settings(self) -> dict[str, object]:
        """The `allocator_settings` dict of a memory snapshot (torch/csrc/cuda/memory_snapshot.cpp)."""
        return {
            "PYTORCH_CUDA_ALLOC_CONF": self.raw,
            "max_split_size": self.max_split_size if self.max_split_size_bytes is not None else -1,
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "expandable_segments": self.expandable_segments,
            "pinned_num_register_threads": 1,
            "release_lock_on_cudamalloc": False,
            "pinned_use_cuda_host_register": False,
            "roundup_power2_divisions": {
                str(1 << i): d for i, d in enumerate(self.roundup_power2_divisions)
            },
        }


def _fail(message: str) -> ScenarioError:
    return ScenarioError(f"allocator.conf: {message}")


def _lex(text: str) -> list[str]:
    tokens: list[str] = []
    buf: list[str] = []
    for ch in text:
        if ch in ",:[]":
            if buf:
                tokens.append("".join(buf))
                buf.clear()
            tokens.append(ch)
        elif not ch.isspace():
            buf.append(ch)
    if buf:
        tokens.append("".join(buf))
    return tokens


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Reader:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.i = 0

    def more(self) -> bool:
        return self.i < len(self.tokens)

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, what: str) -> str:
        if self.i >= len(self.tokens):
            raise _fail(f"expected {what} at the end")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, ch: str, after: str) -> None:
        tok = self.take(f"'{ch}' after {after}")
        if tok != ch:
            raise _fail(f"expected '{ch}' after {after} (got {tok!r})")

    def value(self, key: str) -> str:
        self.expect(":", key)
        tok = self.take(f"a value for {key}")
        if tok in ",:[]":
            raise _fail(f"expected a value for {key} (got {tok!r})")
        return tok


def _int(key: str, tok: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise _fail(f"{key} must be an integer (got {tok!r})") from None


def _bool(key: str, tok: str) -> bool:
    if tok not in ("True", "False"):
        raise _fail(f"{key} must be True or False (got {tok!r})")
    return tok == "True"


def _mb_at_least_20(key: str, tok: str) -> int:
    mb = _int(key, tok)
    if mb < K_LARGE_BUFFER // MiB:
        raise _fail(f"{key} must be >= {K_LARGE_BUFFER // MiB} (got {mb})")
    return mb * MiB


def _divisions_value(tok: str) -> int:
    d = _int("roundup_power2_divisions", tok)
    if d != 0 and not _is_pow2(d):
        raise _fail(f"roundup_power2_divisions: divisions must be a power of 2 or 0 (got {d})")
    return d


def _parse_divisions(r: _Reader) -> tuple[int, ...]:
    r.expect(":", "roundup_power2_divisions")
    tok = r.take("a value for roundup_power2_divisions")
    if tok != "[":
        d = _divisions_value(tok)
        if d == 0:
            raise _fail("roundup_power2_divisions must be a power of 2 (got 0)")
        return (d,) * ROUNDUP_INTERVALS
    # `[256:1,512:2,1024:4,>:8]`: keys are sizes in MiB (powers of 2); interval index = log2(key MiB), clamped to
    # [0, 15]. The first key also fills every lower interval; '>' fills from the LAST KEY'S interval (inclusive,
    # as PyTorch's std::fill from last_index does) to the end.
    div = [0] * ROUNDUP_INTERVALS
    first = True
    last_index = 0
    while True:
        key = r.take("']' closing roundup_power2_divisions")
        if key == "]":
            break
        r.expect(":", f"roundup_power2_divisions key {key!r}")
        d = _divisions_value(r.take(f"a value for roundup_power2_divisions key {key!r}"))
        if key == ">":
            for j in range(last_index, ROUNDUP_INTERVALS):
                div[j] = d
        else:
            mb = _int("roundup_power2_divisions key", key)
            if not _is_pow2(mb):
                raise _fail(f"roundup_power2_divisions: interval keys must be powers of 2 in MB (got {key!r})")
            index = min(mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first:
                for j in range(index):
                    div[j] = d
                first = False
            div[index] = d
            last_index = index
        nxt = r.peek()
        if nxt == ",":
            r.i += 1
        elif nxt is None:
            raise _fail("expected ']' closing roundup_power2_divisions at the end")
        elif nxt != "]":
            raise _fail(f"roundup_power2_divisions: expected ',' or ']' (got {nxt!r})")
    return tuple(div)


def parse_alloc_conf(text: str | None) -> AllocConf:
    """Parse a PYTORCH_CUDA_ALLOC_CONF string; None or '' gives the defaults."""
    if not text or not text.strip():
        return AllocConf(raw=text or "")
    r = _Reader(_lex(text))
    values: dict[str, object] = {}
    ignored: list[tuple[str, str]] = []
    while r.more():
        key = r.take("a key")
        if key in ",:[]":
            raise _fail(f"expected a key (got {key!r}) in {text!r}")
        if key == "max_split_size_mb":
            values["max_split_size_bytes"] = _mb_at_least_20(key, r.value(key))
        elif key == "max_non_split_rounding_mb":
            values["max_non_split_rounding_bytes"] = _mb_at_least_20(key, r.value(key))
        elif key == "garbage_collection_threshold":
            tok = r.value(key)
            try:
                t = float(tok)
            except ValueError:
                raise _fail(f"garbage_collection_threshold must be a number in (0, 1) (got {tok!r})") from None
            if not 0.0 < t < 1.0:
                raise _fail(f"garbage_collection_threshold must be in (0, 1) (got {tok})")
            values["garbage_collection_threshold"] = t
        elif key == "roundup_power2_divisions":
            values["roundup_power2_divisions"] = _parse_divisions(r)
        elif key == "expandable_segments":
            values["expandable_segments"] = _bool(key, r.value(key))
        elif key == "backend":
            tok = r.value(key)
            if tok == "cudaMallocAsync":
                raise _fail("backend:cudaMallocAsync is a different allocator and is not modelled; use backend:native")
            if tok != "native":
                raise _fail(f"backend must be native or cudaMallocAsync (got {tok!r})")
        elif key in _IGNORED_BOOL_KEYS:
            tok = r.value(key)
            _bool(key, tok)
            ignored.append((key, tok))
        elif key in _IGNORED_INT_KEYS:
            tok = r.value(key)
            _int(key, tok)
            ignored.append((key, tok))
        else:
            raise _fail(f"unrecognized option {key!r}")
        if r.more():
            tok = r.take("','")
            if tok != ",":
                raise _fail(f"expected ',' after {key} (got {tok!r})")
    return AllocConf(raw=text, ignored=tuple(ignored), **values)  # type: ignore[arg-type]
