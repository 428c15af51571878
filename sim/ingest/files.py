"""The one reader of every file a user gives (scenario, config.json, DeepSpeed JSON, catalog entries): a regular
file under a size cap, UTF-8 text, YAML or JSON holding one mapping, nested no deeper than a cap, with no key
written twice. Each refusal is one line naming the key path that led to the file and what is wrong with it."""

import json
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from sim.errors import ScenarioError

# Caps on what a hand-written input can need, so that a wrong file is refused instead of read for minutes. The
# largest real inputs are far below them: a config.json is a few KiB (Qwen/Qwen2.5-72B's is 0.7 KiB), a DeepSpeed
# JSON or a trainer YAML a few KiB, nested 3-4 levels (zero_optimization.offload_optimizer.device).
MAX_INPUT_BYTES = 8 * 2**20
MAX_NESTING_DEPTH = 64
MAX_VALUES = 1_000_000  # scalars, mappings and lists after YAML aliases are expanded (a 'billion laughs' file)
SHOWN_CHARS = 120  # an echoed path or key is cut to this many characters


def shown(value: Any) -> str:
    """`value` as an error line shows it: repr, cut to SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


def load_yaml_mapping(path: Path, key_path: str) -> dict:
    """Parse a YAML (or JSON, by its .json suffix) file that must hold a mapping."""
    text = _read_text(path, key_path)
    name = shown(str(path))
    data = _parse_json(text, name, key_path) if path.suffix == ".json" else _parse_yaml(text, name, key_path)
    if not isinstance(data, dict):
        raise ScenarioError(f"{key_path}: {name} must hold a mapping, got {type(data).__name__}")
    if _expanded_values(data) > MAX_VALUES:
        raise ScenarioError(f"{key_path}: {name} holds more than {MAX_VALUES:,} values once its YAML aliases are "
                            "expanded")
    return data


def read_regular_file(path: Path, limit_bytes: int, prefix: str = "", what: str = "an input file") -> bytes:
    """The bytes of a regular file (not a device, pipe or directory) of at most `limit_bytes`; each refusal one line
    starting with `prefix` (a key path and ': ', or nothing) and naming the file."""
    name = shown(str(path))
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ScenarioError(f"{prefix}{name} is not a regular file")
        if info.st_size > limit_bytes:
            raise ScenarioError(f"{prefix}{name} is {info.st_size:,} bytes, more than the {limit_bytes:,} {what} "
                                "may have")
        with path.open("rb") as handle:
            raw = handle.read(limit_bytes + 1)
    except OSError as exc:
        raise ScenarioError(f"{prefix}cannot read {name}: {exc.strerror}") from None
    if len(raw) > limit_bytes:  # grew while being read
        raise ScenarioError(f"{prefix}{name} is more than the {limit_bytes:,} bytes {what} may have")
    return raw


def _read_text(path: Path, key_path: str) -> str:
    """The file's text: a regular file of at most MAX_INPUT_BYTES (read_regular_file), UTF-8."""
    name = shown(str(path))
    raw = read_regular_file(path, MAX_INPUT_BYTES, f"{key_path}: ")
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark, as Windows editors write it, is dropped
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{key_path}: {name} is not UTF-8 text: byte {exc.start} is 0x{raw[exc.start]:02x}") \
            from None


class _TooDeep(Exception):
    """Raised inside the YAML composer when a node lies deeper than MAX_NESTING_DEPTH."""

    def __init__(self, line: int) -> None:
        self.line = line


class _DuplicateKey(Exception):
    """Raised inside the YAML constructor when a mapping holds a key twice."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (the last would silently win) and nodes
    nested deeper than MAX_NESTING_DEPTH (PyYAML composes recursively)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_NESTING_DEPTH:
            raise _TooDeep(self.peek_event().start_mark.line + 1)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges may override on purpose; non-scalar keys fail in the schema
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_seen:
                raise _DuplicateKey(key_node.value, first_seen[key], line)
            first_seen[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, name: str, key_path: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooDeep as exc:
        raise ScenarioError(f"{key_path}: {name} nests deeper than {MAX_NESTING_DEPTH} levels (line {exc.line})") \
            from None
    except _DuplicateKey as exc:
        raise ScenarioError(f"{key_path}: {name} has the key {shown(exc.key)} twice in one mapping (lines "
                            f"{exc.first_line} and {exc.second_line}); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ScenarioError(f"{key_path}: {name} is not valid YAML/JSON:{where}: {problem}") from None


def _parse_json(text: str, name: str, key_path: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                first, second = _lines_of_key(text, key)
                raise ScenarioError(f"{key_path}: {name} has the key {shown(key)} twice in one object (lines "
                                    f"{first} and {second}); keep one")
            out[key] = value
        return out

    def constant(word: str) -> Any:
        raise ScenarioError(f"{key_path}: {name} holds {word}, which is not a JSON number")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise ScenarioError(f"{key_path}: {name} nests deeper than {MAX_NESTING_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(
            f"{key_path}: {name} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if _depth(data) > MAX_NESTING_DEPTH:
        raise ScenarioError(f"{key_path}: {name} nests deeper than {MAX_NESTING_DEPTH} levels")
    return data


def _lines_of_key(text: str, key: str) -> tuple[int, int]:
    """The lines of the first two places `key` is written as an object key in JSON `text` (0 when not found)."""
    pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
    lines = [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)][:2]
    return (lines + [0, 0])[0], (lines + [0, 0])[1]


def _depth(data: Any) -> int:
    """How many mappings and lists `data` nests, counted without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            todo += [(child, level + 1) for child in (value.values() if isinstance(value, dict) else value)]
    return deepest


def _expanded_values(data: Any) -> int:
    """How many values `data` holds counting every path, as a consumer walking it meets them: YAML aliases make a
    shared value count once per reference, and a value that contains itself counts as too many. Linear in the
    distinct values (a post-order walk memoised by identity)."""
    counts: dict[int, int] = {}
    open_ids: set[int] = set()
    todo: list[tuple[Any, bool]] = [(data, False)]
    while todo:
        value, children_counted = todo.pop()
        children = [c for c in (value.values() if isinstance(value, dict) else value) if isinstance(c, dict | list)]
        if children_counted:
            scalars = len(value) - len(children)
            counts[id(value)] = min(MAX_VALUES + 1, 1 + scalars + sum(counts[id(c)] for c in children))
            open_ids.discard(id(value))
            continue
        if id(value) in counts:
            continue
        if any(id(c) in open_ids or c is value for c in children):
            return MAX_VALUES + 1  # an alias to a value that holds it: endless to a consumer
        open_ids.add(id(value))
        todo.append((value, True))
        todo += [(c, False) for c in children if id(c) not in counts]
    return counts[id(data)]
