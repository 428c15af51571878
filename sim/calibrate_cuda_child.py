"""The measuring child of the CUDA calibration (sim/calibrate_cuda.py): one training step on this process's GPU.

`python -c "import sim.calibrate_cuda_child as c; c.child_main()"` reads a configuration on stdin, builds the model on
the GPU, runs the step with its phases bounded by torch.cuda's statistics (through a MemoryProbe, which tests replace
on the CPU), pickles the memory-history snapshot where it is asked to, and writes its result as one JSON line. This is
the only module of the calibration that imports torch, and only inside its functions.
"""

import json
import subprocess
import sys
from contextlib import contextmanager
from typing import Protocol

from sim.calibrate_cuda import RESULT_MARK, CudaConfig, Status, config_from_json
from sim.vocab import AttnImplementation, DType, ModelType

HISTORY_MAX_ENTRIES = 200_000  # allocator trace entries kept by _record_memory_history (the newest win)


class MemoryProbe(Protocol):
    """The device calls the child makes at phase boundaries; CudaProbe is torch.cuda's, tests substitute others."""

    device_type: str

    def synchronize(self) -> None:
        """Wait for the device's queued work."""

    def reset_peak(self) -> None:
        """torch.cuda.reset_peak_memory_stats."""

    def stats(self) -> dict[str, int]:
        """allocated, reserved, max_allocated, max_reserved (bytes) and alloc_retries, as memory_stats has them."""

    def device_used_bytes(self) -> int:
        """total − free of torch.cuda.mem_get_info: everything on the device, other processes included."""


class CudaProbe:
    """MemoryProbe over torch.cuda (imports torch)."""

    device_type = "cuda"

    def __init__(self) -> None:
        """Bind torch.cuda."""
        import torch

        self._cuda = torch.cuda

    def synchronize(self) -> None:
        """torch.cuda.synchronize."""
        self._cuda.synchronize()

    def reset_peak(self) -> None:
        """torch.cuda.reset_peak_memory_stats."""
        self._cuda.reset_peak_memory_stats()

    def stats(self) -> dict[str, int]:
        """The current and peak allocated / reserved bytes and the cudaMalloc retries of memory_stats."""
        s = self._cuda.memory_stats()
        return {"allocated": s.get("allocated_bytes.all.current", 0),
                "reserved": s.get("reserved_bytes.all.current", 0),
                "max_allocated": s.get("allocated_bytes.all.peak", 0),
                "max_reserved": s.get("reserved_bytes.all.peak", 0),
                "alloc_retries": s.get("num_alloc_retries", 0)}

    def device_used_bytes(self) -> int:
        """total − free of torch.cuda.mem_get_info."""
        free, total = self._cuda.mem_get_info()
        return int(total - free)


class PhaseRecorder:
    """Bounds the phases of a step: at entry synchronise and reset the peaks; at exit synchronise and read them."""

    def __init__(self, probe: MemoryProbe) -> None:
        """Record through `probe`."""
        self.probe = probe
        self.phases: dict[str, dict] = {}

    @contextmanager
    def phase(self, name: str):
        """Measure the block as phase `name`: its start, its peaks and the device use at its end."""
        probe = self.probe
        probe.synchronize()
        probe.reset_peak()
        start = probe.stats()
        yield
        probe.synchronize()
        end = probe.stats()
        self.phases[name] = {
            "start_allocated_bytes": start["allocated"], "start_reserved_bytes": start["reserved"],
            "max_allocated_bytes": end["max_allocated"], "max_reserved_bytes": end["max_reserved"],
            "end_allocated_bytes": end["allocated"], "end_reserved_bytes": end["reserved"],
            "end_device_used_bytes": probe.device_used_bytes(),
            "alloc_retries": end["alloc_retries"] - start["alloc_retries"]}


def build_model(config: CudaConfig, device_type: str):
    """The model as the Trainer would train it, built on the device in the weights' dtype (random, seed 0)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    config_cls, model_cls = {ModelType.QWEN2: (Qwen2Config, Qwen2ForCausalLM),
                             ModelType.LLAMA: (LlamaConfig, LlamaForCausalLM),
                             ModelType.MISTRAL: (MistralConfig, MistralForCausalLM)}[config.model_type]
    hf_config = config_cls(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        tie_word_embeddings=config.tied, max_position_embeddings=max(2 * config.seq, 128), use_cache=False)
    hf_config._attn_implementation = config.attn.value
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype({DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16}[config.weights])
    try:
        with torch.device(device_type):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(default)
    if config.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if config.lora_r:  # get_peft_model after enabling checkpointing makes the embedding output require grad
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r,
                                                 lora_dropout=config.lora_dropout, target_modules="all-linear",
                                                 bias="none", task_type="CAUSAL_LM"))
    model.train()
    return model


def outputs_to_fp32(out):
    """accelerate's convertoutputs_to_fp32: every bf16/fp16 tensor of the forward's output copied to fp32."""
    import torch

    for key, value in list(out.items()):
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
            out[key] = value.float()
    return out


def run_step(config: CudaConfig, probe: MemoryProbe) -> tuple[dict, float]:
    """Build, then one training step with its phases recorded through `probe`; (phases, loss). Imports torch."""
    import torch

    from sim.calibrate import trainer_optimizer  # Trainer.create_optimizer, shared with the CPU calibration

    recorder = PhaseRecorder(probe)
    with recorder.phase("build"):
        model = build_model(config, probe.device_type)
        optimizer = trainer_optimizer(model)
    with recorder.phase("inputs"):
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=generator)
        input_ids = input_ids.to(probe.device_type)
        attention_mask = torch.ones(config.batch, config.seq, dtype=torch.long, device=probe.device_type)
        labels = input_ids.clone()
    with recorder.phase("forward"):
        if config.bf16:
            with torch.autocast(probe.device_type, dtype=torch.bfloat16):
                out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out = outputs_to_fp32(out)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = out.loss
        del out  # Trainer.compute_loss returns the loss only; the logits go before backward
    with recorder.phase("backward"):
        loss.backward()
    loss_value = float(loss.detach())
    del loss
    with recorder.phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return recorder.phases, loss_value


def missing_requirement(config: CudaConfig, free_bytes: int) -> str | None:
    """Why `config` cannot run here (flash-attn missing, too little free memory), or None."""
    import importlib.util

    if config.attn is AttnImplementation.FLASH_ATTENTION_2 and importlib.util.find_spec("flash_attn") is None:
        return "flash_attention_2 needs the flash-attn package, which is not installed"
    if config.lora_r and importlib.util.find_spec("peft") is None:
        return "LoRA needs the peft package, which is not installed"
    if config.model_states_bytes() > free_bytes:
        return (f"needs at least {config.model_states_bytes():,} B for the model states; "
                f"{free_bytes:,} B free on the device")
    return None


def installed_versions() -> dict[str, str]:
    """torch, CUDA, driver, transformers, peft and flash-attn versions where present (imports torch)."""
    import importlib.metadata as md
    import platform
    import shutil

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for package, key in (("transformers", "transformers"), ("peft", "peft"), ("flash-attn", "flash_attn")):
        try:
            out[key] = md.version(package)
        except md.PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False, timeout=30)
        if query.returncode == 0 and query.stdout.strip():
            out["driver"] = query.stdout.strip().splitlines()[0]
    return out


def measure_in_process(config: CudaConfig, snapshot_path: str | None) -> dict:
    """The measured side of `config` on this process's GPU (imports torch); a skipped result names its reason."""
    import pickle

    import torch

    free_bytes, total_bytes = torch.cuda.mem_get_info()  # creates the context; no tensor exists yet
    context_bytes = int(total_bytes - free_bytes) - torch.cuda.memory_reserved()
    device = {"name": torch.cuda.get_device_name(), "total_bytes": int(total_bytes), "context_bytes": context_bytes}
    versions = installed_versions()
    reason = missing_requirement(config, int(free_bytes))
    if reason is not None:
        return {"status": Status.SKIPPED.value, "reason": reason, "device": device, "versions": versions}
    # Python stacks of allocations only: the op that allocated each block, at a size the device tool can return
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=HISTORY_MAX_ENTRIES)
    probe = CudaProbe()
    try:
        phases, loss = run_step(config, probe)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.memory._record_memory_history(enabled=None)
        return {"status": Status.SKIPPED.value, "reason": f"out of memory: {str(exc).splitlines()[0]}",
                "device": device, "versions": versions}
    probe.synchronize()
    end_used = probe.device_used_bytes()
    if snapshot_path:
        with open(snapshot_path, "wb") as handle:  # the child's own file, named by the parent (--snapshot-dir)
            pickle.dump(torch.cuda.memory._snapshot(), handle)
    torch.cuda.memory._record_memory_history(enabled=None)
    return {"status": Status.MEASURED.value, "device": device, "versions": versions, "phases": phases,
            "loss": loss, "end_non_pytorch_bytes": end_used - torch.cuda.memory_reserved(),
            **overall(phases)}


def overall(phases: dict[str, dict]) -> dict:
    """The run's max allocated / reserved (the peaks are reset per phase) and the largest device use seen at a
    phase end; that is the device's peak only where no phase gave memory back (alloc_retries 0)."""
    return {"max_allocated_bytes": max(p["max_allocated_bytes"] for p in phases.values()),
            "max_reserved_bytes": max(p["max_reserved_bytes"] for p in phases.values()),
            "max_device_used_bytes": max(p["end_device_used_bytes"] for p in phases.values()),
            "alloc_retries": sum(p["alloc_retries"] for p in phases.values())}


def child_main() -> None:
    """Entry of the measuring child: a JSON request on stdin, a JSON result on stdout."""
    request = json.loads(sys.stdin.read())
    result = measure_in_process(config_from_json(request["config"]), request.get("snapshot_path"))
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
