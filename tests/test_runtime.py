"""The device runtime resolved once (sim/runtime.py): reservations outside PyTorch and library workspaces,
hand-derived from the sources sim/runtime.py, sim/parallel/nccl.py and docs/cuda-context.md cite."""

import json

import pytest
import yaml

from sim.cli import main
from sim.plan import Holder, ModuleLoading
from sim.resolve import cuda_of_torch, resolve_plan
from sim.runtime import module_loading
from sim.scenario import build_scenario
from sim.vocab import AllocatorBackend
from tests.conftest import tiny_raw

MIB = 1 << 20
# pytorch/pytorch#86509: the same script at 666,632,192 B used with eager loading and 287,047,680 B with lazy
EAGER_MODULES = 666_632_192 - 287_047_680  # = 379,584,512 B


def plan_of(device: str = "a100-sxm4-80gb", gpus: int = 1, torch: str = "2.2.2", stage: int | None = None, **raw):
    scenario = tiny_raw(**raw.pop("training", {}))
    scenario["hardware"] = {"device": device, "gpus_per_node": gpus}
    scenario["software"]["torch"] = torch
    scenario["allocator"] = {"backend": "caching"}
    if stage is not None:
        scenario["deepspeed"] = {"zero_optimization": {"stage": stage}}
    scenario.update(raw)
    return resolve_plan(build_scenario(scenario))


def test_a100_zero3_holds_its_context_and_two_communicators() -> None:
    # A100, torch 2.2.2 (NCCL 2.19.3), 8 GPUs, DeepSpeed: the world group and its clone, each 24 channels × ring +
    # tree × 12 MiB per connection (tests/test_nccl.py derives the 12 MiB).
    runtime = plan_of(gpus=8, stage=3).runtime
    names = [(r.holder, r.name) for r in runtime.reservations]
    assert names == [(Holder.CUDA_CONTEXT, "cuda_context"), (Holder.NCCL, "nccl.communicator[0]"),
                     (Holder.NCCL, "nccl.communicator[1]")]
    assert runtime.non_pytorch_bytes(Holder.NCCL) == 2 * 24 * 2 * 12 * MIB
    context = runtime.reservations[0].size_bytes
    assert context == 400 * MIB  # torch 2.2.2 loads modules lazily: the lazy context (pytorch#109888)
    assert runtime.non_pytorch_bytes() == context + 2 * 24 * 2 * 12 * MIB
    # cuBLAS ":4096:2:16:8" = 2 × 4 MiB + 8 × 16 KiB on sm80; ZeRO-3's linear has no cuBLASLt bias GEMM
    assert (runtime.workspaces.cublas_bytes, runtime.workspaces.cublaslt_bytes) == (2 * 4 * MIB + 8 * 16 * 1024, 0)


def test_hopper_workspaces_by_torch_version() -> None:
    # sm90 from torch 2.1: ":4096:8" = 32 MiB; cuBLASLt 1 MiB per bias GEMM call before 2.8, kept from 2.8,
    # sharing cuBLAS's from 2.10
    by_torch = {torch: plan_of("h100-sxm-80gb", torch=torch).runtime.workspaces for torch in ("2.2.2", "2.8.0", "2.10.0")}
    assert [(w.cublas_bytes, w.cublaslt_bytes, w.cublaslt_persistent) for w in by_torch.values()] == [
        (32 * MIB, MIB, False), (32 * MIB, MIB, True), (32 * MIB, 0, False)]


def test_one_gpu_holds_no_nccl_and_a_host_holds_nothing() -> None:
    assert plan_of().runtime.non_pytorch_bytes(Holder.NCCL) == 0
    host = {"name": "host", "capacity_bytes": 10**12, "cuda_context_bytes": 0, "peak_flops": {"fp32": 1e12},
            "hbm_bytes_per_s": 1e11}
    runtime = plan_of(hardware={"device": host}, allocator={"backend": "exact"}).runtime
    assert runtime.reservations == () and runtime.non_pytorch_bytes() == 0
    assert (runtime.workspaces.cublas_bytes, runtime.workspaces.cublaslt_bytes) == (0, 0)


HOST = {"name": "host", "capacity_bytes": 10**12, "peak_flops": {"fp32": 1e12}, "hbm_bytes_per_s": 1e11}


def context_parts(torch: str, **device) -> list[tuple[str, int]]:
    """The CUDA context's named parts on one A100 (or an inline device) under the named torch build."""
    hardware = {"device": {**HOST, "name": "gpu", **device}} if device else None
    plan = plan_of(torch=torch, **({"hardware": hardware} if hardware else {}))
    return [(r.name, r.size_bytes) for r in plan.runtime.reservations if r.holder is Holder.CUDA_CONTEXT]


@pytest.mark.parametrize("torch, parts", [
    # torch >= 1.13 sets CUDA_MODULE_LOADING=LAZY and its PyPI wheels are CUDA >= 11.7: lazy, 400 MiB (#109888)
    ("2.2.2", [("cuda_context", 400 * MIB)]),
    ("1.13.1", [("cuda_context", 400 * MIB)]),
    ("2.1.0+cu118", [("cuda_context", 400 * MIB)]),
    ("1.13.1+cu117", [("cuda_context", 400 * MIB)]),
    # CUDA 11.6 has no lazy loading (CUDA < 12.2 loads eagerly by default): 400 MiB + 379,584,512 B
    ("1.13.1+cu116", [("cuda_context", 400 * MIB), ("cuda_context.eager_modules", EAGER_MODULES)]),
])
def test_context_by_torch_and_cuda_version(torch: str, parts: list[tuple[str, int]]) -> None:
    assert context_parts(torch) == parts


def test_torch_before_1_13_loads_eagerly() -> None:
    # torch 1.12 sets no CUDA_MODULE_LOADING (scenarios refuse it as older than the versions known, sim/versions.py,
    # but the rule itself holds): eager whatever its CUDA
    assert module_loading((1, 12, 1), None) is ModuleLoading.EAGER
    assert module_loading((1, 12, 1), (11, 7)) is ModuleLoading.EAGER


def test_a_stated_context_overrides_the_model_whatever_the_versions() -> None:
    # an inline device stating 300 MiB holds 300 MiB as one part, lazy or eager
    for torch in ("2.2.2", "1.13.1+cu116"):
        assert context_parts(torch, cuda_context_bytes=300 * MIB) == [("cuda_context", 300 * MIB)]
    # an inline device that states none gets the modelled context
    assert context_parts("2.2.2", compute_capability="8.0") == [("cuda_context", 400 * MIB)]
    # 0 on the caching allocator: a GPU whose context is not counted
    assert context_parts("2.2.2", cuda_context_bytes=0) == []


def test_only_a_stated_zero_context_makes_a_plain_host() -> None:
    # the allocator by default: exact on an inline device stating cuda_context_bytes 0, caching where none is stated
    backends = []
    for device in ({**HOST, "cuda_context_bytes": 0}, HOST):
        raw = tiny_raw()
        raw["hardware"] = {"device": device}
        del raw["allocator"]
        backends.append(build_scenario(raw).allocator.backend)
    assert backends == [AllocatorBackend.EXACT, AllocatorBackend.CACHING]


def test_cuda_runtime_from_the_torch_build() -> None:
    # torch.__version__'s local part: "+cu118" = 11.8, "+cu121" = 12.1, "+cu130" = 13.0; none, or a CPU build: None
    assert [cuda_of_torch(t) for t in ("2.1.0+cu118", "2.5.1+cu121", "2.9.0+cu130", "2.2.2", "2.2.2+cpu")] == [
        (11, 8), (12, 1), (13, 0), None, None]


def test_result_and_summary_name_the_eager_context(tmp_path, capsys) -> None:
    # one A100, torch 1.13.1+cu116 (eager): non_pytorch = the context alone, 400 MiB + 379,584,512 B = 799,014,912 B
    raw = tiny_raw()
    raw["software"]["torch"] = "1.13.1+cu116"
    raw["allocator"] = {"backend": "caching"}
    path, out = tmp_path / "s.yaml", tmp_path / "r.json"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["non_pytorch"]["cuda_context_bytes"] == 400 * MIB + EAGER_MODULES == 799_014_912
    assert result["peak"]["non_pytorch_bytes"] == 799_014_912
    # device used = reserved + the context, and it decides the OOM
    assert result["max_memory"]["device_used_bytes"] == result["max_memory"]["reserved_bytes"] + 799_014_912
    assert "CUDA context 762.00 MiB" in capsys.readouterr().out


def test_a_negative_context_is_one_line_naming_the_key(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    assert main(["run", str(path), "--set", "hardware.device.cuda_context_bytes=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hardware.device.cuda_context_bytes" in err and "-1" in err
