"""Calibration against PyTorch on a CUDA GPU: real HF training steps measured by torch.cuda, next to the simulator.

For each configuration a randomly initialised Hugging Face model (Qwen2ForCausalLM, LlamaForCausalLM,
MistralForCausalLM, built from a config object on the GPU: nothing is downloaded) runs one training step as the HF
Trainer would (accelerate's autocast and fp32 outputs under the bf16 flag, forward with labels, backward, AdamW
over Trainer's two parameter groups, zero_grad) in a child process of its own. At each phase boundary the child
synchronises, reads torch.cuda.memory_stats and torch.cuda.mem_get_info and resets the peak statistics, so each
phase has its own max_memory_allocated / max_memory_reserved; torch.cuda.memory._record_memory_history runs
throughout and its snapshot is pickled per configuration for pytorch.org/memory_viz.

The simulator runs the same configuration on the catalog device of the measured GPU with the caching allocator and
reports allocated / reserved per phase (result `phase_peaks`) and `max_memory` (allocated, reserved, device used).
This module holds the configurations, the simulated side, the comparison and its tables, and starts the children;
the child's code is sim/calibrate_cuda_child.py. Nothing of torch is imported into the simulator's process.
"""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

from sim.versions import nearest_release
from sim.vocab import AttnImplementation, DType, ModelType

PHASES = ("forward", "backward", "optimizer")  # compared; "build" and "inputs" are recorded, not compared


class Status(Enum):
    """What became of one configuration on the measured side."""

    MEASURED = "measured"
    SKIPPED = "skipped"  # a requirement is missing: flash-attn or peft, memory
    FAILED = "failed"  # the child failed or ran out of time; the reason is its last line


@dataclass(frozen=True, slots=True)
class CudaConfig:
    """One CUDA calibration run: a decoder built from a config object and one training step."""

    name: str
    factor: str  # what this configuration is there to check
    model_type: ModelType
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    attn: AttnImplementation
    gc: bool
    weights: DType  # the dtype the weights are loaded in (from_pretrained's torch_dtype)
    bf16: bool  # TrainingArguments.bf16: accelerate's autocast around the forward and fp32 outputs
    tied: bool = False
    lora_r: int = 0
    lora_dropout: float = 0.0

    def parameters(self) -> int:
        """Parameters of the HF model (LoRA adapters excluded): embeddings, layers, final norm, untied head."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        bias = self.hidden + 2 * kv if self.model_type is ModelType.QWEN2 else 0  # Qwen2's q/k/v biases
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + bias
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * layer + self.hidden

    def lora_parameters(self) -> int:
        """PEFT adapters on every linear layer but the head ("all-linear"): r·(in + out) each."""
        if not self.lora_r:
            return 0
        kv = self.kv_heads * (self.hidden // self.heads)
        shapes = [(self.hidden, self.hidden), (self.hidden, kv), (self.hidden, kv), (self.hidden, self.hidden),
                  (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]
        return self.layers * sum(self.lora_r * (i + o) for i, o in shapes)

    def model_states_bytes(self) -> int:
        """Weights, gradients and AdamW's two moments (in the trainable parameters' dtype) after one step."""
        width = self.weight_element_bytes()
        trainable = self.lora_parameters() if self.lora_r else self.parameters()
        trainable_width = 4 if self.lora_r else width  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
        return self.parameters() * width + self.lora_parameters() * 4 + 3 * trainable * trainable_width

    def weight_element_bytes(self) -> int:
        """Bytes per weight element."""
        return {DType.FLOAT32: 4, DType.BFLOAT16: 2}[self.weights]

    def step_flops(self) -> float:
        """Model FLOPs of the step: 2·N per token forward, 2·N backward for activations, 2·N for weight gradients
        of full fine-tuning, a second forward under checkpointing, plus attention's 4·s·h per token per layer."""
        tokens = self.batch * self.seq
        forward = 2 * self.parameters() * tokens + 4 * self.layers * tokens * self.seq * self.hidden / 2  # causal
        backward = 2 * forward if not self.lora_r else forward + 4 * self.layers * tokens * self.seq * self.hidden / 2
        return forward * (2 if self.gc else 1) + backward

    def estimated_s(self) -> float:
        """Estimated wall-clock seconds of this configuration's child on one H100 (see CHILD_FIXED_S)."""
        fast = self.bf16 or self.weights is DType.BFLOAT16
        rate = H100_BF16_FLOPS_PER_S if fast else H100_FP32_FLOPS_PER_S
        return CHILD_FIXED_S + self.step_flops() / (ASSUMED_EFFICIENCY * rate)


# Time estimate on one H100. The step's FLOPs over a quarter of the dense peak (small GEMMs, eager kernels and the
# first step's lazy kernel loading stay far below the peak), plus a fixed cost per child: importing torch and
# transformers, creating the CUDA context, building the model and pickling the snapshot. The fixed cost is an
# assumption, not a measurement: each row of the JSON records its child's wall_s to replace it.
H100_BF16_FLOPS_PER_S = 989.5e12  # hardware/h100-sxm-80gb.yaml peak_flops.bf16 (datasheet, dense)
H100_FP32_FLOPS_PER_S = 67.0e12  # hardware/h100-sxm-80gb.yaml peak_flops.fp32 (torch keeps fp32 matmul off TF32)
ASSUMED_EFFICIENCY = 0.25
CHILD_FIXED_S = 15.0


def _tiny(name: str, factor: str, **changes) -> CudaConfig:
    """The CPU calibration's base shape (sim/calibrate.py Config) with some factors changed, on the GPU."""
    base = CudaConfig(name=name, factor=factor, model_type=ModelType.QWEN2, hidden=64, intermediate=176, layers=2,
                      heads=4, kv_heads=2, vocab=1000, seq=32, batch=2, attn=AttnImplementation.EAGER, gc=False,
                      weights=DType.FLOAT32, bf16=False)
    return replace(base, **changes)


QWEN2_0_5B = dict(model_type=ModelType.QWEN2, hidden=1024, intermediate=2816, layers=24, heads=16, kv_heads=16,
                  vocab=151936, tied=True)  # Qwen/Qwen1.5-0.5B config.json
QWEN2_1_5B = dict(model_type=ModelType.QWEN2, hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                  vocab=151936, tied=True)  # Qwen/Qwen2-1.5B config.json
LLAMA_1_1B = dict(model_type=ModelType.LLAMA, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                  vocab=32000)  # TinyLlama/TinyLlama-1.1B config.json
# Qwen-1.8B's widths (Qwen/Qwen-1_8B config.json: hidden 2048, ffn 11008 = 2 × 5504, 16 heads, no GQA, vocab
# 151936, untied) with 16 of its 24 layers, through the Qwen2 code: Qwen1's modelling is remote code, which is not
# downloaded; Qwen2 has Qwen1's q/k/v biases and the same parameters.
QWEN1_WIDTHS = dict(model_type=ModelType.QWEN2, hidden=2048, intermediate=5504, layers=16, heads=16, kv_heads=16,
                    vocab=151936)

_SDPA, _EAGER, _FA2 = AttnImplementation.SDPA, AttnImplementation.EAGER, AttnImplementation.FLASH_ATTENTION_2
_BF16, _FP32 = DType.BFLOAT16, DType.FLOAT32

CUDA_CONFIGS: tuple[CudaConfig, ...] = (
    # the CPU calibration's shapes (its CI subset's factors), moved to the GPU
    _tiny("tiny_base", "CPU base shape"),
    _tiny("tiny_sdpa_gc", "attention + checkpointing", attn=_SDPA, gc=True),
    _tiny("tiny_bf16", "bf16 weights, Trainer bf16", weights=_BF16, bf16=True),
    _tiny("tiny_lora", "LoRA", lora_r=8),
    _tiny("tiny_llama", "model type", model_type=ModelType.LLAMA),
    _tiny("tiny_mistral", "model type", model_type=ModelType.MISTRAL),
    # ~0.5B
    CudaConfig("q05_sdpa_2k", "bf16, sdpa", **QWEN2_0_5B, seq=2048, batch=1, attn=_SDPA, gc=False, weights=_BF16,
               bf16=True),
    CudaConfig("q05_eager_2k", "eager attention", **QWEN2_0_5B, seq=2048, batch=1, attn=_EAGER, gc=False,
               weights=_BF16, bf16=True),
    CudaConfig("q05_fa2_2k", "flash_attention_2", **QWEN2_0_5B, seq=2048, batch=1, attn=_FA2, gc=False,
               weights=_BF16, bf16=True),
    CudaConfig("q05_amp_2k", "fp32 weights under bf16 autocast", **QWEN2_0_5B, seq=2048, batch=1, attn=_SDPA,
               gc=False, weights=_FP32, bf16=True),
    CudaConfig("q05_b8_512", "batch, short sequence", **QWEN2_0_5B, seq=512, batch=8, attn=_SDPA, gc=False,
               weights=_BF16, bf16=True),
    CudaConfig("q05_gc_8k", "checkpointing, long sequence", **QWEN2_0_5B, seq=8192, batch=1, attn=_SDPA, gc=True,
               weights=_BF16, bf16=True),
    CudaConfig("q05_lora_4k", "LoRA with dropout + checkpointing", **QWEN2_0_5B, seq=4096, batch=1, attn=_SDPA,
               gc=True, weights=_BF16, bf16=True, lora_r=16, lora_dropout=0.05),
    # ~1.1–1.5B
    CudaConfig("q15_gc_4k", "GQA, checkpointing", **QWEN2_1_5B, seq=4096, batch=1, attn=_SDPA, gc=True,
               weights=_BF16, bf16=True),
    CudaConfig("q15_amp_gc_2k", "fp32 weights under bf16 autocast", **QWEN2_1_5B, seq=2048, batch=1, attn=_SDPA,
               gc=True, weights=_FP32, bf16=True),
    CudaConfig("llama11_eager_1k", "llama, eager", **LLAMA_1_1B, seq=1024, batch=1, attn=_EAGER, gc=False,
               weights=_BF16, bf16=True),
    CudaConfig("llama11_lora_8k", "llama, LoRA with dropout, long sequence", **LLAMA_1_1B, seq=8192, batch=1,
               attn=_SDPA, gc=True, weights=_BF16, bf16=True, lora_r=16, lora_dropout=0.05),
    CudaConfig("qwen1w_gc_4k", "Qwen1's widths (MHA, untied)", **QWEN1_WIDTHS, seq=4096, batch=1, attn=_SDPA,
               gc=True, weights=_BF16, bf16=True),
)


def config_by_name(name: str) -> CudaConfig:
    """The CUDA configuration of that name (KeyError otherwise)."""
    for config in CUDA_CONFIGS:
        if config.name == name:
            return config
    raise KeyError(name)


def config_to_json(config: CudaConfig) -> dict:
    """The configuration as JSON values (enums by their value)."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(config).items()}


def config_from_json(raw: dict) -> CudaConfig:
    """The inverse of config_to_json."""
    enums = {"model_type": ModelType, "attn": AttnImplementation, "weights": DType}
    return CudaConfig(**{k: enums[k](v) if k in enums else v for k, v in raw.items()})


def describe(config: CudaConfig) -> str:
    """A short label of the configuration's settings."""
    parts = [config.model_type.value, f"h{config.hidden}", f"L{config.layers}", f"kv{config.kv_heads}/{config.heads}",
             f"V{config.vocab}", f"s{config.seq}", f"b{config.batch}", config.attn.value,
             "gc" if config.gc else "nogc", f"w:{config.weights.value}", "bf16-amp" if config.bf16 else "no-amp"]
    if config.tied:
        parts.append("tied")
    if config.lora_r:
        parts.append(f"lora{config.lora_r}/p{config.lora_dropout}")
    return " ".join(parts)


# ---- the simulated side ------------------------------------------------------------------------------------
# first match wins: torch names the parts "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3"
CATALOG_BY_NAME = (("H200", "h200-sxm-141gb"), ("H100 PCIe", "h100-pcie-80gb"), ("H100 NVL", "h100-nvl-94gb"),
                   ("H100", "h100-sxm-80gb"), ("A100", "a100-sxm4-80gb"))


def catalog_device(device_name: str, total_bytes: int) -> str | None:
    """The catalog device of a measured GPU by its torch name (an A100 only in its 80 GB form); None: none fits."""
    for marker, entry in CATALOG_BY_NAME:
        if marker in device_name and (marker != "A100" or total_bytes > 60 * 2**30):
            return entry
    return None


def hardware_mapping(device: dict) -> dict:
    """`hardware` of the scenario: the catalog device, or an inline one with the measured total memory and the
    measured CUDA context (what the child saw used before any tensor)."""
    entry = catalog_device(device["name"], device["total_bytes"])
    if entry is not None:
        return {"device": entry}
    return {"device": {"name": device["name"], "capacity_bytes": device["total_bytes"],
                       "cuda_context_bytes": device["context_bytes"],
                       "peak_flops": {"bf16": H100_BF16_FLOPS_PER_S, "fp32": H100_FP32_FLOPS_PER_S},
                       "hbm_bytes_per_s": 3.35e12}}


def _release(package: str, version: str) -> str:
    """The release a measured version is simulated as: '2.11.0+cu130' → '2.11.0' (the CUDA build tag left out: every
    torch the GPU machines run loads modules lazily), and a version later than the simulator knows → the newest it
    knows (sim/versions.py nearest_release; the row keeps the measured versions beside it)."""
    return nearest_release(package, version.split("+", 1)[0])


def scenario_mapping(config: CudaConfig, versions: dict[str, str], device: dict) -> dict:
    """The scenario (design.md §3 vocabulary) that describes `config` on the measured GPU."""
    model = {"model_type": config.model_type.value, "hidden_size": config.hidden,
             "intermediate_size": config.intermediate, "num_hidden_layers": config.layers,
             "num_attention_heads": config.heads, "num_key_value_heads": config.kv_heads,
             "vocab_size": config.vocab, "max_position_embeddings": max(2 * config.seq, 128),
             "tie_word_embeddings": config.tied, "torch_dtype": config.weights.value}
    raw = {
        "name": f"calibrate cuda {config.name}",
        "model": model,
        "hardware": hardware_mapping(device),
        "software": {k: _release(k, versions[k]) for k in ("torch", "transformers", "peft") if k in versions},
        "training": {"per_device_train_batch_size": config.batch, "gradient_accumulation_steps": 1,
                     "seq_len": config.seq, "bf16": config.bf16, "gradient_checkpointing": config.gc,
                     "gradient_checkpointing_kwargs": {"use_reentrant": True},
                     "attn_implementation": config.attn.value, "optim": "adamw_torch", "weight_decay": 0.0,
                     "max_grad_norm": 0.0},
        "allocator": {"backend": "caching"},
        "simulation": {"steps": 1},
    }
    if config.lora_r:
        raw["lora"] = {"r": config.lora_r, "lora_alpha": 2 * config.lora_r, "lora_dropout": config.lora_dropout,
                       "target_modules": "all-linear"}
    return raw


def simulate(config: CudaConfig, versions: dict[str, str], device: dict) -> dict:
    """The simulator's allocated / reserved per phase and its max_memory fields for `config` on `device`."""
    from sim.report import summarize
    from sim.scenario import build_scenario
    from sim.simulate import run_scenario

    result = summarize(run_scenario(build_scenario(scenario_mapping(config, versions, device))))
    return {"device": result["hardware"]["device"],
            "phases": {p: dict(result["phase_peaks"][p]) for p in PHASES},
            "max_allocated_bytes": result["max_memory"]["allocated_bytes"],
            "max_reserved_bytes": result["max_memory"]["reserved_bytes"],
            "device_used_bytes": result["max_memory"]["device_used_bytes"],
            "non_pytorch_bytes": result["peak"]["non_pytorch_bytes"]}


# ---- the measured side: one child process per configuration (sim/calibrate_cuda_child.py) ----------------
RESULT_MARK = "CALIBRATE-CUDA-RESULT "  # the child's result line on its stdout


def _child_env() -> dict[str, str]:
    """The child's environment: offline, quiet, this checkout first on the path."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _last_line(proc: subprocess.CompletedProcess) -> str:
    """The last line the child wrote on stderr (its error)."""
    return (proc.stderr.strip().splitlines() or ["(no output)"])[-1]


def cuda_unavailable_reason(python: str | None = None) -> str | None:
    """Why the measured side cannot run on a GPU here, asked of a child (torch never enters this process)."""
    proc = subprocess.run([python or sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
                          capture_output=True, text=True, env=_child_env(), timeout=300, check=False)
    if proc.returncode != 0:
        return f"torch cannot be imported ({_last_line(proc)})"
    if proc.stdout.strip().splitlines()[-1:] != ["1"]:
        return "torch.cuda.is_available() is False: no CUDA GPU, or a CPU build of torch"
    return None


def measure(config: CudaConfig, snapshot_path: Path | None, python: str | None = None,
            timeout_s: float = 600.0) -> dict:
    """Run the measured side of `config` in a child Python process; its result with the child's wall_s, or a
    failed one with the child's last line (one configuration's failure does not end the run)."""
    request = {"config": config_to_json(config), "snapshot_path": str(snapshot_path) if snapshot_path else None}
    started = time.monotonic()
    try:
        proc = subprocess.run([python or sys.executable, "-c", "import sim.calibrate_cuda_child as c; c.child_main()"],
                              input=json.dumps(request), capture_output=True, text=True, env=_child_env(),
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": Status.FAILED.value, "reason": f"no result within {timeout_s:.0f} s",
                "wall_s": round(time.monotonic() - started, 1)}
    wall_s = round(time.monotonic() - started, 1)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "wall_s": wall_s}
    return {"status": Status.FAILED.value, "reason": f"child exit {proc.returncode}: {_last_line(proc)}",
            "wall_s": wall_s}


# ---- comparison ----------------------------------------------------------------------------------------------
def _error(simulated: int, measured: int) -> float | None:
    """(simulated − measured) / measured; None where nothing was measured."""
    return (simulated - measured) / measured if measured else None


def compare(config: CudaConfig, measured: dict) -> dict:
    """One row: the configuration, its measured side and, where it was measured, the simulated side and errors."""
    row = {"config": config_to_json(config), "measured": measured}
    if measured["status"] != Status.MEASURED.value:
        return row
    simulated = simulate(config, measured["versions"], measured["device"])
    errors = {p: {kind: _error(simulated["phases"][p][f"{kind}_bytes"], measured["phases"][p][f"max_{kind}_bytes"])
                  for kind in ("allocated", "reserved")} for p in PHASES}
    errors["max"] = {"allocated": _error(simulated["max_allocated_bytes"], measured["max_allocated_bytes"]),
                     "reserved": _error(simulated["max_reserved_bytes"], measured["max_reserved_bytes"]),
                     "device_used": _error(simulated["device_used_bytes"], measured["max_device_used_bytes"])}
    row.update(simulated=simulated, errors=errors)
    return row


def _pct(value: float | None) -> str:
    """An error as a signed percentage."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.2f}%"


def _mib(value: int) -> str:
    """Bytes as MiB with two decimals."""
    return f"{value / 2**20:,.2f}"


def table_lines(rows: list[dict]) -> list[str]:
    """One line per configuration: per phase allocated and reserved, then the run's maxima; MiB (err)."""
    lines = []
    for row in rows:
        name, measured = row["config"]["name"], row["measured"]
        if "simulated" not in row:
            reason = measured.get("reason") or "measured; not simulated (see --measurements)"
            lines.append(f"| {name} | {measured['status']}: {reason} |" + " |" * 8)
            continue
        cells = []
        for p in PHASES:
            for kind in ("allocated", "reserved"):
                cells.append(f"{_mib(measured['phases'][p][f'max_{kind}_bytes'])} / "
                             f"{_mib(row['simulated']['phases'][p][f'{kind}_bytes'])} "
                             f"({_pct(row['errors'][p][kind])})")
        sim = row["simulated"]
        for kind, m_key, s_key in (("allocated", "max_allocated_bytes", "max_allocated_bytes"),
                                   ("reserved", "max_reserved_bytes", "max_reserved_bytes"),
                                   ("device_used", "max_device_used_bytes", "device_used_bytes")):
            cells.append(f"{_mib(measured[m_key])} / {_mib(sim[s_key])} ({_pct(row['errors']['max'][kind])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


TABLE_HEAD = ("| config | forward alloc | forward reserved | backward alloc | backward reserved | optimizer alloc "
              "| optimizer reserved | max alloc | max reserved | device used |")


def format_table(rows: list[dict]) -> str:
    """The table `python -m sim calibrate --device cuda` prints: measured / simulated MiB (error) per cell."""
    return "\n".join([TABLE_HEAD, "|---|" + "---:|" * 9] + table_lines(rows))


def format_markdown(rows: list[dict], command: str) -> str:
    """validation/cuda/cuda-calibration.md: the table with the command, versions and hardware that produced it."""
    measured = [r["measured"] for r in rows if "versions" in r["measured"]]
    versions, device = (measured[0]["versions"], measured[0]["device"]) if measured else ({}, {})
    version_text = ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "unknown"
    lines = [
        "# CUDA calibration: measured PyTorch vs simulated, per phase",
        "",
        f"Command: `{command}`",
        "",
        f"Versions: {version_text}.",
        f"Hardware: {device.get('name', 'unknown')}, total {device.get('total_bytes', 0):,} B as "
        f"torch.cuda.mem_get_info reports it; CUDA context before any tensor {device.get('context_bytes', 0):,} B.",
        "",
        "Each cell: measured / simulated MiB (err = (simulated − measured) / measured). Per phase: torch.cuda's",
        "max_memory_allocated / max_memory_reserved with the peaks reset at the phase start (forward starts once",
        "the batch is on the device; backward includes the recompute; optimizer includes zero_grad). Max: the run's",
        "(model build included); device used: mem_get_info's total − free, the largest seen at a phase end, against",
        "the simulator's max_memory.device_used_bytes (reserved + CUDA context and other non-PyTorch memory).",
        "",
        TABLE_HEAD,
        "|---|" + "---:|" * 9,
        *table_lines(rows),
        "",
        "Context: mem_get_info used before any tensor; at the end: used − reserved after the step (the context",
        "with the kernels loaded since, cuBLAS handles). MiB.",
        "",
        "| config | checks | settings | child wall s | loss | alloc retries | context | non-PyTorch at the end |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        config, measured = config_from_json(row["config"]), row["measured"]
        loss = f"{measured['loss']:.4f}" if "loss" in measured else ""
        end = _mib(measured["end_non_pytorch_bytes"]) if "end_non_pytorch_bytes" in measured else ""
        context = _mib(measured["device"]["context_bytes"]) if "device" in measured else ""
        lines.append(f"| {config.name} | {config.factor} | {describe(config)} | {measured.get('wall_s', '')} "
                     f"| {loss} | {measured.get('alloc_retries', '')} | {context} | {end} |")
    return "\n".join(lines) + "\n"


def list_lines() -> list[str]:
    """`--list`: each configuration with its size and estimated time on one H100."""
    lines = [f"{'name':<18} {'params':>8} {'states GiB':>10} {'tokens':>7} {'TFLOP':>7} {'est s':>6}  settings"]
    for c in CUDA_CONFIGS:
        lines.append(f"{c.name:<18} {c.parameters() / 1e9:>7.3f}B {c.model_states_bytes() / 2**30:>10.2f} "
                     f"{c.batch * c.seq:>7} {c.step_flops() / 1e12:>7.1f} {c.estimated_s():>6.1f}  {describe(c)}")
    total = sum(c.estimated_s() for c in CUDA_CONFIGS)
    lines.append(f"{len(CUDA_CONFIGS)} configurations, estimated {total:.0f} s on one H100 "
                 f"({CHILD_FIXED_S:.0f} s fixed per child (assumed) + FLOPs at {ASSUMED_EFFICIENCY:.0%} of the "
                 "dense peak)")
    return lines
