"""The device runtime resolved once (sim/runtime.py): reservations outside PyTorch and library workspaces,
hand-derived from the sources sim/runtime.py and sim/parallel/nccl.py cite."""

from sim.plan import Holder
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from tests.conftest import tiny_raw

MIB = 1 << 20


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
    assert context == 400 * MIB  # hardware/a100-sxm4-80gb.yaml (pytorch#109888)
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
