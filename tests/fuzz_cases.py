"""The fuzz suite's cases and properties (issue #19 item 6), shared by tests/test_fuzz.py (short, deterministic) and
bench/fuzz.py (long, one forked process per case).

Strategies build whole valid scenarios (tiny models, catalog and inline devices, data parallelism with ZeRO, LoRA,
allocator settings, versions) and mutate them: wrong types, out-of-bound numbers, unknown keys, malformed files,
`--set` syntax and command-line argument lists. `check` runs one case and raises `Violation` when a property fails;
any other exception is a traceback the user would have seen.
"""

import contextlib
import copy
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hypothesis import strategies as st

from sim import cli
from sim.errors import ScenarioError
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from sim.versions import _RELEASES

EXIT_CODES = {cli.EXIT_OK, cli.EXIT_OOM, cli.EXIT_BAD_INPUT}


class Category(Enum):
    VALID = "valid"
    TYPES = "wrong types"
    BOUNDS = "bounds"
    UNKNOWN_KEYS = "unknown keys"
    FILES = "malformed files"
    SET = "--set syntax"
    ARGV = "CLI arguments"


class Violation(AssertionError):
    """A property of the contract that a case broke (not a traceback: the check itself found it)."""


@dataclass(frozen=True)
class Case:
    """One fuzz input: a raw scenario for the API, or files and an argument list for the command line."""

    category: Category
    raw: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # name -> content, written to a fresh directory
    argv: tuple[str, ...] = ()  # {dir} in an argument is that directory
    doubled: str = ""  # a valid case: the training key whose doubling must not lower the peak


def _releases(package: str, since: tuple[int, ...]) -> list[str]:
    """The known releases of a package from `since` on (older ones refuse the tiny models' architectures)."""
    return [r for r in _RELEASES[package].split() if tuple(int(p) for p in r.split(".")) >= since]


DEVICES = ["a100-sxm4-80gb", "a100-sxm4-40gb", "h100-sxm-80gb", "h200-sxm-141gb", "a800-sxm4-80gb"]
ALLOC_CONFS = ["", "expandable_segments:True", "max_split_size_mb:128", "garbage_collection_threshold:0.6",
               "roundup_power2_divisions:4", "max_split_size_mb:64,garbage_collection_threshold:0.8"]


@st.composite
def valid_scenarios(draw) -> dict:
    """A whole valid scenario on a tiny model: runs in tens of milliseconds."""
    model_type = draw(st.sampled_from(["qwen2", "llama", "mistral", "qwen"]))
    heads = draw(st.sampled_from([2, 4]))
    kv = heads if model_type == "qwen" else draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    model = {"model_type": model_type, "hidden_size": 16 * heads, "intermediate_size": draw(st.sampled_from([32, 64])),
             "num_hidden_layers": draw(st.integers(1, 2)), "num_attention_heads": heads, "num_key_value_heads": kv,
             "vocab_size": draw(st.sampled_from([128, 1000])), "max_position_embeddings": 256,
             "tie_word_embeddings": draw(st.booleans()),
             "torch_dtype": draw(st.sampled_from(["bfloat16", "float16", "float32"]))}
    device = draw(st.sampled_from(DEVICES))
    if draw(st.integers(0, 4)) == 0:  # an inline device, a small one so that some runs do not fit
        device = {"name": "toy", "capacity_bytes": draw(st.sampled_from([10**6, 10**7, 10**8, 10**9])),
                  "peak_flops": {"bf16": 1e14, "fp32": 1e13}, "hbm_bytes_per_s": 1e12,
                  "cuda_context_bytes": draw(st.sampled_from([0, 10**5]))}
    gpus = draw(st.sampled_from([1, 1, 2, 4]))
    precision = draw(st.sampled_from(["bf16", "fp16", "none"]))
    raw = {
        "name": "fuzz",
        "model": model,
        "hardware": {"device": device, "gpus_per_node": gpus, "nodes": 1},
        "software": {"torch": draw(st.sampled_from(_releases("torch", (2, 1)))),
                     "transformers": draw(st.sampled_from(_releases("transformers", (4, 37)))),
                     "peft": draw(st.sampled_from(_releases("peft", (0, 7))))},
        "training": {"per_device_train_batch_size": draw(st.integers(1, 3)),
                     "gradient_accumulation_steps": draw(st.integers(1, 2)), "seq_len": draw(st.integers(4, 48)),
                     "bf16": precision == "bf16", "fp16": precision == "fp16",
                     "gradient_checkpointing": draw(st.booleans()),
                     "attn_implementation": draw(st.sampled_from(["eager", "sdpa", "flash_attention_2"])),
                     "optim": draw(st.sampled_from(["adamw_torch", "adamw_torch_fused", "adamw_torch_foreach",
                                                    "sgd"]))},
        "allocator": {"backend": draw(st.sampled_from(["exact", "caching"]))},
        "simulation": {"steps": draw(st.integers(1, 6))},  # past 3: the steady-state shortcut
    }
    if raw["allocator"]["backend"] == "caching":
        raw["allocator"]["conf"] = draw(st.sampled_from(ALLOC_CONFS))
    if draw(st.booleans()):
        targets = ["c_attn", "w2"] if model_type == "qwen" else ["q_proj", "v_proj", "down_proj"]
        raw["lora"] = {"r": draw(st.sampled_from([1, 4, 8])), "lora_alpha": draw(st.sampled_from([8, 16.0])),
                       "target_modules": draw(st.sampled_from([targets, targets[:1], "all-linear"]))}
    if gpus > 1 and draw(st.booleans()):
        raw["deepspeed"] = {"zero_optimization": {"stage": draw(st.sampled_from([1, 2, 3])),
                                                  "reduce_bucket_size": draw(st.sampled_from([10**4, 5 * 10**8]))}}
        raw["software"]["deepspeed"] = draw(st.sampled_from(_releases("deepspeed", (0, 10))))
    elif isinstance(device, str) and draw(st.integers(0, 3)) == 0:  # bitsandbytes: on CUDA, without DeepSpeed
        raw["training"]["optim"] = "adamw_bnb_8bit"
        raw["software"]["bitsandbytes"] = draw(st.sampled_from(_releases("bitsandbytes", (0, 41))))
    return raw


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path in a nested mapping (mappings and their leaves)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


def _replace(raw: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(raw)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


WRONG_TYPES = st.one_of(st.booleans(), st.none(), st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
                        st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))
# Out-of-bound numbers: zero, negatives, past int64 and the schema's bounds, non-finite, tiny, huge strings
BOUNDS = st.sampled_from([0, -1, -(2**63), 2**62 + 1, 2**63, 2**64, 10**30, "1e30", 1e20, 1e-300, 0.5,
                          float("inf"), float("-inf"), float("nan"), ".inf", "1e400", 2**1000, True])
# Valid but enormous (bench/fuzz.py only: a case may run long, and the long run times it; issue #19 item 3 bounds
# the work): a million layers, tokens or a billion-row vocabulary must still get an answer, never a traceback
BIG = st.sampled_from([2**20, 10**6, 10**9, 2**40])
UNKNOWN = st.from_regex(r"\A[a-z_]{1,12}\Z")


@st.composite
def mutated_scenarios(draw, category: Category, big: bool = False) -> dict:
    """A valid scenario with one key's value (or a new key) changed as `category` says; `big`: enormous valid
    values among the bounds."""
    raw = draw(valid_scenarios())
    paths = _paths(raw)
    if category is Category.TYPES:
        return _replace(raw, draw(st.sampled_from(paths)), draw(WRONG_TYPES))
    if category is Category.BOUNDS:
        numeric = [p for p in paths if _leaf_is_number(raw, p)]
        return _replace(raw, draw(st.sampled_from(numeric)), draw(st.one_of(BOUNDS, BIG) if big else BOUNDS))
    mappings = [()] + [p for p in paths if isinstance(_leaf(raw, p), dict)]
    where = draw(st.sampled_from(mappings))
    return _replace(raw, (*where, draw(UNKNOWN)), draw(st.one_of(st.integers(0, 9), st.text(max_size=5))))


def _leaf(raw: dict, path: tuple):
    node = raw
    for key in path:
        node = node[key]
    return node


def _leaf_is_number(raw: dict, path: tuple) -> bool:
    value = _leaf(raw, path)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _yaml(raw: dict) -> bytes:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False).encode()


@st.composite
def malformed_files(draw) -> Case:
    """A scenario (or the model config.json it points at) that is not a well-formed file."""
    raw = draw(valid_scenarios())
    text = _yaml(raw)
    broken = draw(st.sampled_from(["truncate", "bytes", "non-utf8", "deep", "duplicate", "tab", "empty",
                                   "model-json", "alias-bomb"]))
    files = {"s.yaml": text}
    if broken == "truncate":
        files["s.yaml"] = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif broken == "bytes":
        files["s.yaml"] = draw(st.binary(max_size=200))
    elif broken == "non-utf8":
        at = draw(st.integers(0, len(text)))
        files["s.yaml"] = text[:at] + b"\xff\xfe" + text[at:]
    elif broken == "deep":
        depth = draw(st.sampled_from([50, 500, 5000]))
        files["s.yaml"] = text + b"extra: " + b"[" * depth + b"]" * depth + b"\n"
    elif broken == "duplicate":
        files["s.yaml"] = text + b"name: again\n"
    elif broken == "tab":
        files["s.yaml"] = text.replace(b"  ", b"\t", 1)
    elif broken == "empty":
        files["s.yaml"] = b""
    elif broken == "model-json":
        files["s.yaml"] = _yaml({**raw, "model": "config.json"})
        files["config.json"] = draw(st.sampled_from([b"{", b"[]", b'{"model_type": "llama"}', b"\xff",
                                                     b'{"hidden_size": NaN}', b'{"a": 1, "a": 2}']))
    else:
        files["s.yaml"] = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n".encode()
            for p, c in zip("abcdefgh", "bcdefghi")) + text
    return Case(Category.FILES, files=files, argv=("run", "{dir}/s.yaml"))


SET_KEYS = ["model.hidden_size", "model.num_hidden_layers", "model", "model.dtype", "training.seq_len",
            "training.max_seq_length", "training.per_device_train_batch_size", "lora.r", "lora", "lora.target_modules",
            "hardware.device", "hardware.device.capacity_bytes", "hardware.gpus_per_node", "deepspeed",
            "deepspeed.zero_optimization.stage", "software.torch", "software.deepspeed", "allocator.conf",
            "allocator.backend", "simulation.steps", "training", "nccl.channels", "training.deepspeed"]
VALID_SETS = ["training.seq_len=8", "model.num_hidden_layers=1", "simulation.steps=1", "allocator.backend=caching",
              "allocator.conf=expandable_segments:True", "lora.r=2", "training.max_seq_length=16",
              "hardware.device=h100-sxm-80gb", "model.dtype=float32", "training.gradient_checkpointing=true",
              "lora.target_modules=all-linear", "hardware.device.capacity_bytes=1000000"]
SET_VALUES = st.one_of(st.sampled_from(["", "1e30", ".inf", "[]", "{}", "[1,", "true", "null", "-1", "0", "2",
                                        "bfloat16", "a100-sxm4-80gb", "all-linear", "expandable_segments:True",
                                        "{r: 1e30}", "x" * 300, "{stage: 3}", "!!python/object:os.system ls"]),
                       st.text(max_size=20))


@st.composite
def set_cases(draw) -> Case:
    """A valid scenario file run with `--set` arguments of any syntax."""
    sets = draw(st.lists(st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SET_KEYS), SET_VALUES),
        st.sampled_from(VALID_SETS), st.sampled_from(VALID_SETS), st.text(max_size=20)), min_size=1, max_size=3))
    argv = ("run", "{dir}/s.yaml", *[part for item in sets for part in ("--set", item)])
    return Case(Category.SET, files={"s.yaml": _yaml(draw(valid_scenarios()))}, argv=argv)


ARG_TOKENS = ["run", "catalog", "models", "hardware", "validate", "calibrate", "--json", "--plot", "--set",
              "--fail-on-oom", "--version", "--help", "-h", "{dir}/s.yaml", "{dir}/missing.yaml", "{dir}", "",
              "{dir}/out.json", "/dev/null", "--source", "--list", "--config", "x=1", "--device", "gpu", "-",
              "{dir}/" + "n" * 300, "--markdown", "--max-error", "nan"]


@st.composite
def argv_cases(draw) -> Case:
    """A command line drawn from the real subcommands and flags, in any order, with the scenario file present."""
    argv = draw(st.lists(st.one_of(st.sampled_from(ARG_TOKENS), st.text(max_size=8)), max_size=6))
    # validate and calibrate run long, real work (every published point, torch children): not fuzzed here
    argv = [a for a in argv if a not in ("validate", "calibrate")]
    return Case(Category.ARGV, files={"s.yaml": _yaml(draw(valid_scenarios()))}, argv=tuple(argv))


def cases(category: Category, big: bool = False):
    """The strategy of one category's cases (`big`: enormous valid values among the bounds)."""
    if category is Category.VALID:
        return st.builds(lambda raw, key: Case(category, raw=raw, doubled=key), valid_scenarios(),
                         st.sampled_from(["seq_len", "per_device_train_batch_size"]))
    if category in (Category.TYPES, Category.BOUNDS, Category.UNKNOWN_KEYS):
        return mutated_scenarios(category, big).map(lambda raw: Case(category, raw=raw))
    return {Category.FILES: malformed_files, Category.SET: set_cases, Category.ARGV: argv_cases}[category]()


def check(case: Case) -> str:
    """Run one case and check every property; 'refused', 'ran' or 'exit N'. Raises Violation (or the traceback)."""
    if case.raw is not None:
        return _check_api(case.raw, case.doubled)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in case.files.items():
            (Path(tmp) / name).write_bytes(content)
        return _check_cli([arg.replace("{dir}", tmp) for arg in case.argv])


def _check_api(raw: dict, doubled: str = "") -> str:
    try:
        scenario = build_scenario(raw)
        first = summarize(run_scenario(scenario))
    except ScenarioError as exc:
        if "\n" in str(exc):
            raise Violation(f"input error on more than one line: {str(exc)!r}") from None
        return "refused"
    check_result(first)
    again = summarize(run_scenario(build_scenario(raw)))
    if json.dumps(again, allow_nan=False) != json.dumps(first, allow_nan=False):
        raise Violation("a rerun of the same scenario gave a different result")
    if doubled and first["fits"] and first["hardware"]["gpus"] == 1:
        _check_doubling(raw, first, doubled)
    return "ran"


def _check_doubling(raw: dict, first: dict, key: str) -> None:
    """On one GPU, twice the sequence or the micro-batch never lowers the peak allocated, with either allocator
    (every activation grows or stays, the model states stay); with the exact allocator reserved is allocated, so its
    reserve cannot drop either. Not checked, as docs/validation.md "Reliability" derives: with several GPUs, how
    many gradients await their reduction depends on how long compute takes (the peak falls with the exact
    allocator too); the caching allocator's reserve depends on how blocks pack into segments (PyTorch's
    CUDACachingAllocator.cpp rounding: 20 MiB kLargeBuffer for 1-10 MiB requests, 2 MiB steps above), so a larger
    request can take a tighter segment."""
    data = copy.deepcopy(raw)
    data["training"][key] *= 2
    try:
        second = summarize(run_scenario(build_scenario(data)))
    except ScenarioError:
        return  # twice the size may pass a bound (max_position_embeddings): refused, nothing to compare
    if not second["fits"]:
        return  # a run stops at its OOM: its peaks are those up to the failing op
    metrics = ["allocated_bytes"] + (["reserved_bytes"] if raw["allocator"]["backend"] == "exact" else [])
    for metric in metrics:
        if second["max_memory"][metric] < first["max_memory"][metric]:
            raise Violation(f"twice training.{key}: max {metric} {second['max_memory'][metric]} below "
                            f"{first['max_memory'][metric]}")


def check_result(result: dict) -> None:
    """The properties of a run's result (issue #19 item 6)."""
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise Violation(f"result is not finite JSON: {exc}") from None
    most, peak = result["max_memory"], result["peak"]
    if most["reserved_bytes"] < most["allocated_bytes"] or peak["reserved_bytes"] < peak["allocated_bytes"]:
        raise Violation(f"reserved below allocated: {most}, {peak}")
    if peak["total_bytes"] < peak["reserved_bytes"]:
        raise Violation(f"device total below reserved: {peak}")
    if not 0.0 <= result["mfu"] <= 1.0 or not math.isfinite(result["step_time_s"]) or result["step_time_s"] < 0:
        raise Violation(f"mfu {result['mfu']}, step time {result['step_time_s']} s")
    if result["fits"] != (result["oom"] is None):
        raise Violation(f"fits {result['fits']} but oom {result['oom']}")
    states = sum(result["model_states_bytes"].values())
    if result["fits"] and most["allocated_bytes"] < states:
        raise Violation(f"max allocated {most['allocated_bytes']} below the model states {states} it reports")


def _check_cli(argv: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.console(argv)
        except SystemExit as exc:  # argparse: --help, --version and usage errors
            code = exc.code
    if code not in EXIT_CODES:
        raise Violation(f"exit code {code!r} for {argv}: {err.getvalue()[-300:]!r}")
    if code == cli.EXIT_BAD_INPUT and len(err.getvalue().splitlines()) != 1:
        raise Violation(f"exit 2 with {len(err.getvalue().splitlines())} lines on stderr for {argv}: "
                        f"{err.getvalue()[:300]!r}")
    return f"exit {code}"
