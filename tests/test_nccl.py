"""NCCL's buffers per communicator, hand-derived from NCCL's sources (sim/parallel/nccl.py cites them)."""

import json

import pytest
import yaml

from sim.cli import main
from sim.parallel import nccl
from sim.plan import Plan
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from tests.conftest import tiny_raw

MIB = 1 << 20


def scenario(device: str = "a100-sxm4-80gb", gpus: int = 8, torch: str = "2.2.2", deepspeed: bool = True, **settings):
    raw = tiny_raw()
    raw["hardware"] = {"device": device, "gpus_per_node": gpus}
    raw["software"]["torch"] = torch
    if deepspeed:
        raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    raw["nccl"] = settings
    return resolve_plan(build_scenario(raw))


def nccl_buffer_bytes(plan: Plan) -> int:
    return nccl.nccl_buffer_bytes(plan.nccl, plan.device, plan.world)


def test_a100_deepspeed_two_communicators_of_ring_and_tree() -> None:
    # torch 2.2.2 ships NCCL 2.19.3. A100 over NVLink reads peer memory (P2P read): the sender holds
    # 4 KiB + 4 MiB Simple -> 6 MiB, the receiver 4 KiB + 512 KiB LL + 4,800 KiB LL128 -> 6 MiB (2 MiB-aligned):
    # 12 MiB per connection; ring + tree (a chain in ring order) = 2 connections on each of 24 channels;
    # DeepSpeed: the world group and its clone.
    s = scenario()
    assert s.nccl.version == (2, 19, 3) and s.nccl.communicators == 2
    assert nccl_buffer_bytes(s) == 2 * 24 * 2 * 12 * MIB  # 1,207,959,552 B = 1.125 GiB


@pytest.mark.parametrize("torch, nvls_mib", [
    ("2.2.2", 8 * 16 * 2 * (4 + 2)),   # NCCL 2.19.3: 8 heads x 16 NVLS channels x 2 x (buffsize + 2 MiB) = 1536 MiB
    ("2.4.1", 8 * 24 * 2 * (4 + 2)),   # NCCL 2.20.5: x 24 (all) channels = 2304 MiB (vllm#9699 logs 2,415,919,104 B)
    ("2.6.0", 8 * 24 * 2 * (1 + 2)),   # NCCL 2.21.5: 1 MiB NVLS chunks = 1152 MiB
])
def test_h100_nvls_by_nccl_version(torch: str, nvls_mib: int) -> None:
    # H100 writes into the receiver: recv 4 KiB + 9.19 MiB -> 10 MiB, send 4 KiB -> 2 MiB: 12 MiB per connection.
    s = scenario("h100-sxm-80gb", torch=torch)
    assert nccl_buffer_bytes(s) == 2 * (24 * 2 * 12 * MIB + nvls_mib * MIB)


def test_runtime_connect_from_nccl_2_22_connects_the_ring_only() -> None:
    # torch 2.8 ships NCCL 2.27.3: the ring at its first use (24 x 12 MiB), NVLS 8 x 16 x 2 x 1 MiB = 256 MiB.
    s = scenario("h100-sxm-80gb", torch="2.8.0")
    assert nccl_buffer_bytes(s) == 2 * (24 * 12 * MIB + 256 * MIB)


def test_settings_override_the_defaults() -> None:
    # NCCL_BUFFSIZE 8 MiB on A100: sender 4 KiB + 8 MiB -> 10 MiB, receiver still 6 MiB: 16 MiB per connection.
    assert nccl_buffer_bytes(scenario(buffsize_bytes=8 * MIB)) == 2 * 24 * 2 * 16 * MIB
    assert nccl_buffer_bytes(scenario(channels=8, communicators=1)) == 8 * 2 * 12 * MIB
    assert nccl_buffer_bytes(scenario("h100-sxm-80gb", nvls=False)) == 2 * 24 * 2 * 12 * MIB


def test_one_gpu_has_none_and_ddp_one_communicator() -> None:
    assert nccl_buffer_bytes(scenario(gpus=1, deepspeed=False)) == 0
    assert scenario(deepspeed=False).nccl.communicators == 1


def test_nccl_buffers_count_outside_pytorch(tmp_path, capsys) -> None:
    raw = tiny_raw()
    raw["hardware"] = {"device": "a100-sxm4-80gb", "gpus_per_node": 8}
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "r.json"
    assert main(["run", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["non_pytorch"] == {"cuda_context_bytes": 400 * MIB, "nccl_bytes": 2 * 24 * 2 * 12 * MIB,
                                     "nccl_communicators": 2}
    assert result["peak"]["non_pytorch_bytes"] == 400 * MIB + 2 * 24 * 2 * 12 * MIB


@pytest.mark.parametrize("setting, message", [
    ("nccl.channels=0", "nccl.channels"),
    ("nccl.version=abc", "nccl.version"),
    ("nccl.buffer=1", "nccl.buffer"),
])
def test_bad_nccl_settings_are_one_line_errors(tmp_path, capsys, setting: str, message: str) -> None:
    raw = tiny_raw()
    raw["hardware"] = {"device": "a100-sxm4-80gb", "gpus_per_node": 2}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("device", ["h100-pcie-80gb", "h100-nvl-94gb"])
def test_no_nvls_without_nvswitch(device: str) -> None:
    # The same 8 Hopper GPUs on NCCL 2.21.5 (torch 2.6.0) without NVSwitch multicast (nvlink_sharp false): no NVLS
    # buffers at all, only the 24 x 2 x 12 MiB of ring and tree connections per communicator (the SXM part adds
    # 1152 MiB: 8 heads x 24 channels x 2 x (1 + 2) MiB)
    s = scenario(device, torch="2.6.0")
    assert not s.device.nvlink_sharp
    assert nccl_buffer_bytes(s) == 2 * 24 * 2 * 12 * MIB
