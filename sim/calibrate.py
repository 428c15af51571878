"""Calibration against PyTorch on the CPU: real HF training steps measured byte by byte, next to the simulator.

For each configuration a small randomly initialised Hugging Face model (Qwen2ForCausalLM, LlamaForCausalLM,
MistralForCausalLM, built from a config object: nothing is downloaded) runs one training step on the CPU as
HF Trainer would (forward with labels, backward, AdamW with Trainer's two parameter groups, zero_grad). Every
allocation and free of c10's CPU allocator is recorded with torch.profiler(profile_memory=True): the
profiler's reporter wraps the allocator itself, so it sees kernel-internal buffers too, and its running sum
equals the allocator's own total at every event. The same configuration then runs through the simulator on
a plain host device (inline device, cuda_context_bytes 0, allocator backend exact: `sim.resolve.on_host`),
with the installed torch / transformers / peft versions as `software`.

Per phase (forward, backward incl. recompute, optimizer without zero_grad) both sides report the peak above
the live bytes at the phase start. The forward starts once the three int64 batch tensors exist.

The measured side runs in a child process (`python -c "import sim.calibrate; sim.calibrate.child_main()"`),
one per configuration, so nothing of torch is ever imported into the simulator's process.
"""

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

PHASES = ("forward", "backward", "optimizer")
TOLERANCE = 0.03  # per-phase relative error allowed by the calibration tests (issue #4)


@dataclass(frozen=True, slots=True)
class Config:
    """One calibration run: a tiny decoder and one training step. Defaults are the base configuration."""

    name: str = "base"
    factor: str = "base"  # which factor this configuration varies from the base
    model_type: str = "qwen2"
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 1000
    seq: int = 32
    batch: int = 2
    attn: str = "eager"
    gc: bool = False
    dtype: str = "fp32"
    tied: bool = False
    lora_r: int = 0
    lora_targets: str = "all-linear"  # target_modules: "all-linear" or comma-separated module names
    reentrant: bool = True  # gradient_checkpointing_kwargs.use_reentrant (False: the saved-tensor-hooks path)
    experts: int = 4  # routed experts of the MoE model types (num_local_experts / num_experts; dense ones ignore it)
    top_k: int = 2  # num_experts_per_tok
    moe_intermediate: int = 64  # Qwen2/3-MoE: moe_intermediate_size (Mixtral's experts use `intermediate`)
    shared_intermediate: int = 96  # Qwen2-MoE: shared_expert_intermediate_size
    norm_topk: bool = False  # Qwen2/3-MoE: norm_topk_prob (Mixtral always renormalises)
    window: int = 0  # config sliding_window, written into both configs where set (0: the family's default)

    @property
    def head_dim(self) -> int:
        """hidden / heads, written out for the families whose config class defaults head_dim otherwise
        (Qwen3Config: 128)."""
        return self.hidden // self.heads


def _vary(name: str, factor: str, **changes) -> Config:
    return replace(Config(), name=name, factor=factor, **changes)


# One factor at a time from the base (qwen2, hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 1000, s 32, b 2,
# eager, no checkpointing, fp32, untied, full fine-tuning).
CONFIGS: tuple[Config, ...] = (
    Config(),
    _vary("seq64", "sequence length", seq=64),
    _vary("seq128", "sequence length", seq=128),
    _vary("vocab4000", "vocabulary size", vocab=4000),
    _vary("sdpa", "attention", attn="sdpa"),
    _vary("gc", "gradient checkpointing", gc=True),
    _vary("sdpa_gc", "attention + checkpointing", attn="sdpa", gc=True),
    _vary("batch1", "batch size", batch=1),
    _vary("batch4", "batch size", batch=4),
    _vary("layers4", "layers", layers=4),
    _vary("mha", "GQA (kv heads = heads)", kv_heads=4),
    _vary("mqa", "GQA (one kv head)", kv_heads=1),
    _vary("sdpa_mqa", "attention + GQA", attn="sdpa", kv_heads=1),
    _vary("tied", "tied embeddings", tied=True),
    _vary("bf16", "dtype", dtype="bf16"),
    _vary("sdpa_bf16", "attention + dtype", attn="sdpa", dtype="bf16"),
    _vary("gc_bf16", "checkpointing + dtype", gc=True, dtype="bf16"),
    _vary("lora", "LoRA (PEFT)", lora_r=8),
    _vary("lora_gc", "LoRA + checkpointing", lora_r=8, gc=True),
    _vary("llama", "model type", model_type="llama"),
    _vary("llama_sdpa_gc", "model type + attention + checkpointing", model_type="llama", attn="sdpa", gc=True),
    _vary("mistral", "model type", model_type="mistral"),
    _vary("qwen3", "model type", model_type="qwen3"),
    _vary("qwen3_sdpa_gc", "model type + attention + checkpointing", model_type="qwen3", attn="sdpa", gc=True),
    _vary("qwen3_bf16", "model type + dtype", model_type="qwen3", dtype="bf16"),
    _vary("qwen3_lora", "model type + LoRA", model_type="qwen3", lora_r=8),
    # small vocabulary, longer sequence: the forward peak sits in the layers, where the q/k norms live
    _vary("qwen3_s128_v64", "model type + sequence + vocabulary", model_type="qwen3", seq=128, vocab=64),
    _vary("gemma", "model type", model_type="gemma"),
    # frozen embeddings under checkpointing: enable_input_require_grads' hook on the (4.x: unscaled) embedding output
    _vary("gemma_lora_gc", "model type + LoRA + checkpointing", model_type="gemma", lora_r=8, gc=True),
    _vary("gemma_sdpa_bf16", "model type + attention + dtype", model_type="gemma", attn="sdpa", dtype="bf16"),
    _vary("gemma2", "model type", model_type="gemma2"),  # soft-capping: eager (SDPA refuses it)
    _vary("gemma2_gc_bf16", "model type + checkpointing + dtype", model_type="gemma2", gc=True, dtype="bf16"),
    _vary("gemma3", "model type", model_type="gemma3_text"),  # 2 layers: both sliding (pattern 6)
    _vary("gemma3_layers7_gc", "model type + layers + checkpointing", model_type="gemma3_text", layers=7, gc=True),
    _vary("gemma3_s128_v64", "model type + sequence + vocabulary", model_type="gemma3_text", seq=128, vocab=64),
    _vary("phi3", "model type", model_type="phi3"),
    _vary("phi3_sdpa_gc", "model type + attention + checkpointing", model_type="phi3", attn="sdpa", gc=True),
    _vary("phi3_lora", "model type + LoRA", model_type="phi3", lora_r=8),
    _vary("phi3_s128_v64", "model type + sequence + vocabulary", model_type="phi3", seq=128, vocab=64),
    # use_reentrant=False: torch.utils.checkpoint's saved-tensor-hooks path (transformers 5.x's default)
    _vary("gc_nr", "non-reentrant checkpointing", gc=True, reentrant=False),
    _vary("sdpa_gc_nr", "attention + non-reentrant checkpointing", attn="sdpa", gc=True, reentrant=False),
    _vary("gc_nr_bf16", "non-reentrant checkpointing + dtype", gc=True, reentrant=False, dtype="bf16"),
    _vary("lora_gc_nr", "LoRA + non-reentrant checkpointing", lora_r=8, gc=True, reentrant=False),
    _vary("layers4_gc_nr", "layers + non-reentrant checkpointing", layers=4, gc=True, reentrant=False),
    _vary("gemma3_layers7_gc_nr", "model type + layers + non-reentrant checkpointing", model_type="gemma3_text",
          layers=7, gc=True, reentrant=False),
    _vary("phi3_sdpa_gc_nr", "model type + attention + non-reentrant checkpointing", model_type="phi3",
          attn="sdpa", gc=True, reentrant=False),
    # mixture of experts (transformers 5.24's default grouped_mm experts): 4 experts, top 2; s128 v64 puts the
    # forward and backward peaks inside a MoE block
    _vary("mixtral", "model type (MoE)", model_type="mixtral"),
    _vary("mixtral_bf16", "model type (MoE) + dtype", model_type="mixtral", dtype="bf16"),
    _vary("mixtral_sdpa_gc", "model type (MoE) + attention + checkpointing", model_type="mixtral",
          attn="sdpa", gc=True),
    _vary("mixtral_s128_v64", "model type (MoE) + sequence + vocabulary", model_type="mixtral", seq=128,
          vocab=64),
    _vary("qwen2_moe", "model type (MoE, shared expert)", model_type="qwen2_moe"),
    _vary("qwen2_moe_bf16_norm", "model type (MoE) + dtype + norm_topk_prob", model_type="qwen2_moe",
          dtype="bf16", norm_topk=True),
    _vary("mixtral_lora_attn", "model type (MoE) + LoRA on attention", model_type="mixtral", lora_r=8,
          lora_targets="q_proj,k_proj,v_proj,o_proj"),
    _vary("qwen2_moe_lora", "model type (MoE) + LoRA", model_type="qwen2_moe", lora_r=8),
    _vary("qwen3_moe", "model type (MoE, q/k norms)", model_type="qwen3_moe"),
    _vary("qwen3_moe_gc_nr_bf16", "model type (MoE) + non-reentrant checkpointing + dtype", model_type="qwen3_moe",
          gc=True, reentrant=False, dtype="bf16"),
    # sliding_window 16 < seq 32: SDPA gets the sliding layers' materialised bool mask (masking_utils.sdpa_mask)
    _vary("gemma3_sdpa_w16", "model type + attention + sliding window", model_type="gemma3_text", attn="sdpa",
          window=16),
    _vary("gemma3_layers7_sdpa_w16", "model type + layers + attention + window (layer 5 full: no mask)",
          model_type="gemma3_text", layers=7, attn="sdpa", window=16),
    _vary("gemma3_sdpa_w16_bf16", "model type + attention + window + dtype", model_type="gemma3_text", attn="sdpa",
          dtype="bf16", window=16),
    _vary("gemma2_w16", "model type + sliding window", model_type="gemma2", window=16),  # eager: SDPA refused
    _vary("phi3_sdpa_w16", "model type + attention + sliding window", model_type="phi3", attn="sdpa", window=16),
    _vary("phi3_sdpa_w16_gc_nr", "model type + attention + window + non-reentrant checkpointing",
          model_type="phi3", attn="sdpa", gc=True, reentrant=False, window=16),
    _vary("mistral_sdpa_w16", "model type + attention + sliding window", model_type="mistral", attn="sdpa",
          window=16),
    _vary("mistral_sdpa_w32_gc", "model type + attention + window (= seq) + checkpointing", model_type="mistral",
          attn="sdpa", gc=True, window=32),
    # s 128: each sliding layer's SDPA keeps its own (b, 1, s, s) fp32 copy of the mask, 128 KiB here
    _vary("gemma3_s128_sdpa_w64", "model type + sequence + attention + window", model_type="gemma3_text", seq=128,
          attn="sdpa", window=64),
)

def lora_targets(config: Config) -> "str | list[str]":
    """PEFT's target_modules of a LoRA configuration, the same for both sides."""
    return "all-linear" if config.lora_targets == "all-linear" else config.lora_targets.split(",")


def moe_keys(config: Config) -> dict:
    """The config.json keys of a MoE configuration (none for a dense one), the same for both sides."""
    if config.model_type == "mixtral":
        return {"num_local_experts": config.experts, "num_experts_per_tok": config.top_k}
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        keys = {"num_experts": config.experts, "num_experts_per_tok": config.top_k,
                "moe_intermediate_size": config.moe_intermediate, "norm_topk_prob": config.norm_topk}
        if config.model_type == "qwen2_moe":
            keys["shared_expert_intermediate_size"] = config.shared_intermediate
        return keys
    return {}


# Families whose config.json carries head_dim (the scenario and the HF config both get it written out).
_EXPLICIT_HEAD_DIM = frozenset({"qwen3", "gemma", "gemma2", "gemma3_text", "qwen3_moe"})
_GELU = frozenset({"gemma", "gemma2", "gemma3_text"})  # hidden_act gelu_pytorch_tanh (the config classes' default)

# The subset the `calibrate` pytest marker runs in CI: every factor at least once, a few minutes in all.
CI_SUBSET = ("base", "seq64", "sdpa", "gc", "sdpa_gc", "batch1", "mha", "tied", "bf16", "lora", "llama", "mistral", "qwen3",
             "qwen3_s128_v64", "gemma", "gemma2", "gemma3_layers7_gc", "phi3", "phi3_sdpa_gc", "gc_nr",
             "lora_gc_nr", "mixtral_s128_v64", "qwen2_moe", "gemma3_layers7_sdpa_w16", "mistral_sdpa_w32_gc")


def config_by_name(name: str) -> Config:
    for config in CONFIGS:
        if config.name == name:
            return config
    raise KeyError(name)


class MeasureError(RuntimeError):
    """The measured side could not run (torch/transformers missing, or the child failed)."""


# ---- the simulated side ------------------------------------------------------------------------------------
def scenario_mapping(config: Config, versions: dict[str, str]) -> dict:
    """The scenario (design.md §3 vocabulary) that describes `config` on a plain CPU host."""
    model = {
        "model_type": config.model_type, "hidden_size": config.hidden, "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads, "vocab_size": config.vocab,
        "max_position_embeddings": max(2 * config.seq, 128), "tie_word_embeddings": config.tied,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[config.dtype],
        "use_cache": False,  # as the measured side's config: no DynamicCache in a 4.x training forward
    }
    if config.model_type in _EXPLICIT_HEAD_DIM:
        model["head_dim"] = config.head_dim
    if config.model_type in _GELU:
        model["hidden_act"] = "gelu_pytorch_tanh"
    model.update(moe_keys(config))
    if config.window:
        model["sliding_window"] = config.window
    raw = {
        "name": f"calibrate {config.name}",
        "model": model,
        "hardware": {"device": {"name": "cpu-host", "capacity_bytes": 1 << 40, "cuda_context_bytes": 0,
                                "peak_flops": {"fp32": 1.0e12, "bf16": 1.0e12}, "hbm_bytes_per_s": 1.0e11}},
        "software": {k: versions[k] for k in ("torch", "transformers", "peft") if k in versions},
        "training": {"per_device_train_batch_size": config.batch, "gradient_accumulation_steps": 1,
                     "seq_len": config.seq, "bf16": config.dtype == "bf16",
                     "gradient_checkpointing": config.gc, "gradient_checkpointing_kwargs": {"use_reentrant": config.reentrant},
                     "attn_implementation": config.attn, "optim": "adamw_torch", "weight_decay": 0.0,
                     "max_grad_norm": 0.0},
        "allocator": {"backend": "exact"},
        "simulation": {"steps": 1},
    }
    if config.lora_r:
        raw["lora"] = {"r": config.lora_r, "lora_alpha": 2 * config.lora_r, "lora_dropout": 0.0,
                       "target_modules": lora_targets(config)}
    return raw


INPUT_OPS = frozenset({"input_ids.to_device", "labels.to_device", "attention_mask.to_device"})


def simulate(config: Config, versions: dict[str, str]) -> dict:
    """{phase: {"start_bytes", "peak_bytes"}} of the simulated step, phases bounded as on the measured side."""
    from sim.ops import Phase
    from sim.scenario import build_scenario
    from sim.resolve import on_host
    from sim.simulate import run_scenario

    scenario = build_scenario(scenario_mapping(config, versions))
    assert on_host(scenario)
    run = run_scenario(scenario)
    ops, trace = run.schedule.ops, run.engine.trace

    def group(op) -> str:
        if op.name in INPUT_OPS:
            return "inputs"
        if op.phase in (Phase.BACKWARD, Phase.RECOMPUTE):
            return "backward"
        if op.phase is Phase.OPTIMIZER:
            return "zero_grad" if op.name == "zero_grad" else "optimizer"
        return op.phase.value

    live = int(trace.allocated_bytes[0] - trace.delta_bytes[0]) if len(trace) else 0
    stats: dict[str, dict] = {}
    for row in range(len(trace)):
        index = int(trace.op_index[row])
        name = "build" if index < 0 else group(ops[index])
        entry = stats.setdefault(name, {"start_bytes": live, "peak_bytes": live})
        live = int(trace.allocated_bytes[row])
        entry["peak_bytes"] = max(entry["peak_bytes"], live)
    return {phase: stats[phase] for phase in PHASES}


# ---- the measured side (child process) ---------------------------------------------------------------------
_PHASE_MARK = "calibrate:"


def _build(config: Config):
    """The model as Trainer would train it, built from a config object (random weights, seed 0)."""
    import torch
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                              GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM), "gemma": (GemmaConfig, GemmaForCausalLM),
                             "gemma2": (Gemma2Config, Gemma2ForCausalLM),
                             "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
                             "phi3": (Phi3Config, Phi3ForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM),
                             "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
                             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[config.model_type]
    extra = {"head_dim": config.head_dim} if config.model_type in _EXPLICIT_HEAD_DIM else {}
    if config.model_type == "phi3":  # Phi3Config's pad_token_id 32000 lies outside the tiny vocabulary
        extra["pad_token_id"] = 0
    if config.window:
        extra["sliding_window"] = config.window
    hf_config = config_cls(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        tie_word_embeddings=config.tied, max_position_embeddings=max(2 * config.seq, 128), use_cache=False,
        **extra, **moe_keys(config))
    hf_config._attn_implementation = config.attn
    torch.manual_seed(0)
    model = model_cls(hf_config)
    if config.dtype == "bf16":
        model = model.to(torch.bfloat16)
    if config.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": config.reentrant})
    if config.lora_r:  # get_peft_model after enabling checkpointing makes the embedding output require grad
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                                 target_modules=lora_targets(config), bias="none",
                                                 task_type="CAUSAL_LM"))
    model.train()
    return model


def trainer_optimizer(model):
    """Trainer.create_optimizer: torch AdamW (foreach=None: the for-loop on CPU tensors, foreach on CUDA ones)
    over a weight-decay group and a no-decay group (biases and norm weights), Trainer.get_decay_parameter_names'."""
    import re

    import torch

    forbidden = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not any(f.search(n.lower()) for f in forbidden)]
    no_decay = [p for n, p in named if any(f.search(n.lower()) for f in forbidden)]
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-3)


def measure_in_process(config: Config) -> dict:
    """Run one step under the profiler; {phase: {"start_bytes", "peak_bytes"}} plus "losses". Imports torch."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(1)

    def mark(phase: str):
        return record_function(_PHASE_MARK + phase)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        with mark("build"):
            model = _build(config)
            optimizer = trainer_optimizer(model)
        with mark("inputs"):
            generator = torch.Generator().manual_seed(1)
            input_ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=generator)
            attention_mask = torch.ones(config.batch, config.seq, dtype=torch.long)
            labels = input_ids.clone()
        with mark("forward"):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            loss = out.loss
            del out  # Trainer.compute_loss returns the loss only; the logits go before backward
        with mark("backward"):
            loss.backward()
        loss_value = float(loss.detach())
        del loss
        with mark("optimizer"):
            optimizer.step()
        with mark("zero_grad"):
            optimizer.zero_grad(set_to_none=True)

    events = []  # (time, id, bytes, phase)

    def walk(node, phase):
        kind = node.typed[0].name
        if kind == "Allocation":
            fields_ = node.typed[1]
            if fields_.device.type == "cpu":
                events.append((node.start_time_ns, fields_.id, int(fields_.alloc_size), phase,
                               int(fields_.total_allocated)))
            return
        if node.name.startswith(_PHASE_MARK):
            phase = node.name[len(_PHASE_MARK):]
        for child in node.children:
            walk(child, phase)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, "none")
    events.sort(key=lambda e: (e[0], e[1]))
    stats: dict[str, dict] = {}
    live, exact = 0, True
    for _, _, nbytes, phase, total in events:
        entry = stats.setdefault(phase, {"start_bytes": live, "peak_bytes": live})
        live += nbytes
        exact &= live == total
        entry["peak_bytes"] = max(entry["peak_bytes"], live)
    if not exact:
        raise MeasureError("profiler trace does not add up to the allocator's total_allocated")
    result = {phase: stats[phase] for phase in PHASES}
    result["loss"] = loss_value
    return result


def installed_versions() -> dict[str, str]:
    """torch / transformers / peft versions of this interpreter (imports them), plus python."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def child_main() -> None:
    """Entry of the measuring child: a JSON Config on stdin, a JSON result on stdout."""
    request = json.loads(sys.stdin.read())
    config = Config(**request["config"])
    result = measure_in_process(config)
    result["versions"] = installed_versions()
    sys.stdout.write("\n" + _RESULT_MARK + json.dumps(result) + "\n")


_RESULT_MARK = "CALIBRATE-RESULT "


def torch_available() -> bool:
    """Whether the measured side can run: torch and transformers importable (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def measure(config: Config, python: str | None = None, timeout_s: float = 900.0) -> dict:
    """Run the measured side of `config` in a child Python process (the simulator never imports torch)."""
    if config.lora_r and python is None:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise MeasureError(f"{config.name}: needs peft (pip install '.[calibrate]')")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([python or sys.executable, "-c", "import sim.calibrate as c; c.child_main()"],
                          input=json.dumps({"config": asdict(config)}), capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise MeasureError(f"{config.name}: measuring child failed (exit {proc.returncode}): {tail}")


# ---- comparison ----------------------------------------------------------------------------------------------
def compare(config: Config, python: str | None = None) -> dict:
    """Measured and simulated per-phase peaks above the phase baseline, and the relative errors."""
    measured = measure(config, python)
    versions = measured.pop("versions")
    simulated = simulate(config, versions)
    row = {"config": asdict(config), "versions": versions, "loss": measured.pop("loss"), "phases": {}}
    for phase in PHASES:
        m = measured[phase]["peak_bytes"] - measured[phase]["start_bytes"]
        s = simulated[phase]["peak_bytes"] - simulated[phase]["start_bytes"]
        row["phases"][phase] = {"measured_bytes": m, "simulated_bytes": s, "rel_error": (s - m) / m if m else 0.0,
                                "measured_start_bytes": measured[phase]["start_bytes"],
                                "simulated_start_bytes": simulated[phase]["start_bytes"]}
    return row


def max_abs_error(row: dict) -> float:
    return max(abs(p["rel_error"]) for p in row["phases"].values())


def describe(config: Config) -> str:
    """A short label of the configuration's settings."""
    parts = [config.model_type, f"s{config.seq}", f"b{config.batch}", f"L{config.layers}",
             f"kv{config.kv_heads}/{config.heads}", f"V{config.vocab}", config.attn, "gc" if config.gc else "nogc",
             config.dtype]
    if moe_keys(config):
        parts.append(f"E{config.experts} k{config.top_k}" + (" norm" if config.norm_topk else ""))
    if config.tied:
        parts.append("tied")
    if config.lora_r:
        parts.append(f"lora{config.lora_r}" + ("" if config.lora_targets == "all-linear" else
                                               f"[{config.lora_targets}]"))
    if config.gc and not config.reentrant:
        parts.append("non-reentrant")
    if config.window:
        parts.append(f"window{config.window}")
    return " ".join(parts)


def format_table(rows: list[dict]) -> str:
    """The side-by-side table `python -m sim calibrate` prints (bytes above the phase's starting live bytes)."""
    head = f"{'config':<14}{'settings':<48}"
    for phase in PHASES:
        head += f"{phase + ' meas':>16}{'sim':>12}{'err':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        config = Config(**row["config"])
        line = f"{config.name:<14}{describe(config):<48}"
        for phase in PHASES:
            p = row["phases"][phase]
            line += f"{p['measured_bytes']:>16,}{p['simulated_bytes']:>12,}{100 * p['rel_error']:>+7.2f}%"
        lines.append(line)
    if rows:
        worst = max(rows, key=max_abs_error)
        lines += ["", f"largest |error|: {100 * max_abs_error(worst):.2f}% ({worst['config']['name']}); "
                      f"tolerance {100 * TOLERANCE:.0f}%"]
    return "\n".join(lines)


def format_markdown(rows: list[dict], command: str) -> str:
    """validation/cpu-calibration.md: the table with the command, versions and hardware that produced it."""
    versions = rows[0]["versions"] if rows else {}
    lines = [
        "# CPU calibration: measured PyTorch vs simulated, per phase",
        "",
        f"Command: `{command}`",
        "",
        f"Versions: python {versions.get('python', '?')}, torch {versions.get('torch', '?')}, "
        f"transformers {versions.get('transformers', '?')}, peft {versions.get('peft', '?')}; 1 thread.",
        f"Hardware: {cpu_model()} ({platform.machine()}).",
        "",
        "Bytes above the live bytes at the phase start (forward starts once the three int64 batch tensors exist;",
        "backward includes the recompute; optimizer excludes zero_grad). err = (simulated − measured) / measured.",
        "Measured: torch.profiler(profile_memory=True) over c10's CPU allocator. Simulated: inline host device,",
        "cuda_context_bytes 0, allocator exact. Base: qwen2, hidden 64, intermediate 176, 2 layers, 4 heads /",
        "2 kv heads, vocab 1000, seq 32, batch 2, eager, no checkpointing, fp32, untied, full fine-tuning.",
        "",
        "| config | varies | settings | forward meas / sim (err) | backward meas / sim (err) "
        "| optimizer meas / sim (err) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        config = Config(**row["config"])
        cells = [f"{p['measured_bytes']:,} / {p['simulated_bytes']:,} ({100 * p['rel_error']:+.2f}%)"
                 for p in (row["phases"][ph] for ph in PHASES)]
        lines.append(f"| {config.name} | {config.factor} | {describe(config)} | " + " | ".join(cells) + " |")
    if rows:
        worst = max(rows, key=max_abs_error)
        lines += ["", f"Largest |error|: {100 * max_abs_error(worst):.2f}% ({worst['config']['name']})."]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def config_names() -> list[str]:
    return [c.name for c in CONFIGS]


def config_fields() -> list[str]:
    return [f.name for f in fields(Config)]
