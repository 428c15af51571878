"""The hardware catalog (hardware/*.yaml): every device loads and runs a tiny scenario, each capacity is the byte
count of the printout its file cites, and every field names its source."""

import pytest
import yaml

from sim import catalog
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

DEVICES = catalog.names("hardware")
MIB = 1_048_576

# capacity_bytes against the printout each file cites: torch prints total_memory in MiB ("81008MB" is
# 81008 × 1,048,576 bytes); deviceQuery and cudaDeviceProp.totalGlobalMem print the bytes themselves.
CITED_CAPACITY_BYTES = {
    "a10-24gb": 23_609_475_072,  # deviceQuery "22516 MBytes (23609475072 bytes)", = 22,515.75 MiB
    "a100-sxm4-40gb": 42_298_834_944,  # deviceQuery "40339 MBytes (42298834944 bytes)"
    "a100-sxm4-80gb": 84_987_740_160,  # deviceQuery "81051 MBytes (84987740160 bytes)"
    "h100-nvl-94gb": 95_330 * MIB,  # totalGlobalMem 99,960,750,080 bytes = 95,330 MiB exactly
    "h100-pcie-80gb": 81_008 * MIB,  # total_memory=81008MB -> 84,943,044,608
    "h100-sxm-80gb": 81_089 * MIB,  # total_memory=81089MB -> 85,027,979,264
    "h20-96gb": 97_285 * MIB,  # total_memory=97285MB -> 102,010,716,160
    "h200-sxm-141gb": 143_156 * MIB,  # total_memory=143156MB -> 150,109,945,856
    "l40s-48gb": 45_589 * MIB,  # total_memory=45589MB -> 47,803,531,264
    "rtx4090-24gb": 24_563 * MIB,  # total_memory=24563MB -> 25,756,172,288
}
# Left out, having no printout of their own (their files say so): a800-sxm4-80gb (from an OOM message's rounded
# 79.33 GiB) and h800-sxm-80gb (the H100's value assumed).


def device_yaml(name: str) -> dict:
    return yaml.safe_load((catalog.data_dir("hardware") / f"{name}.yaml").read_text())


def test_the_rented_devices_are_in_the_catalog():
    """Issue #14's list beside SXM: H100 PCIe/NVL, H20, L40S, A10, RTX 4090 (MI300X left out: docs/scenarios.md)."""
    assert {"h100-pcie-80gb", "h100-nvl-94gb", "h20-96gb", "l40s-48gb", "a10-24gb", "rtx4090-24gb"} <= set(DEVICES)


@pytest.mark.parametrize("name", DEVICES)
def test_every_device_runs_a_tiny_scenario(name):
    """A 2-layer model on 2 GPUs of each device: loads, fits, has a step time, and the CUDA context is modelled
    (no catalog device states cuda_context_bytes, so torch 2.2.2's lazy loading gives the 400 MiB context)."""
    raw = tiny_raw()
    raw["hardware"] = {"device": name, "gpus_per_node": 2}
    result = summarize(run_scenario(build_scenario(raw)))
    assert result["hardware"] == {"device": name, "gpus": 2, "capacity_bytes": device_yaml(name)["capacity_bytes"]}
    assert result["fits"] is True
    assert result["step_time_s"] > 0 and 0 < result["mfu"] < 1
    assert result["non_pytorch"]["cuda_context_bytes"] == 400 * MIB


@pytest.mark.parametrize("name, capacity_bytes", sorted(CITED_CAPACITY_BYTES.items()))
def test_capacity_is_the_cited_printout(name, capacity_bytes):
    """capacity_bytes is the byte count of the torch or deviceQuery printout the file cites, not a rounded size."""
    assert device_yaml(name)["capacity_bytes"] == capacity_bytes


@pytest.mark.parametrize("name", DEVICES)
def test_every_field_names_its_source(name):
    """Each value line of a catalog file carries a `# source:` comment (house rule: every constant cites its source)."""
    lines = (catalog.data_dir("hardware") / f"{name}.yaml").read_text().splitlines()
    values = [line for line in lines if ":" in line and not line.lstrip().startswith("#")
              and line.split("#")[0].split(":", 1)[1].strip() and not line.startswith(("name:", "description:"))]
    assert values
    assert [line for line in values if "# source:" not in line] == []


@pytest.mark.parametrize("name", DEVICES)
def test_catalog_devices_state_no_cuda_context(name):
    """The context is modelled from the versions (docs/cuda-context.md); no file carries a reading that would
    override it, since none was published for these GPUs."""
    assert "cuda_context_bytes" not in device_yaml(name)
