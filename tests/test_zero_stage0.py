"""DeepSpeed ZeRO stage 0 in half precision is refused, not simulated as torch DDP (issue #19, item 9b)."""

import subprocess
import sys

import pytest
import yaml

from sim.errors import ScenarioError
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw


def stage0(dtype: str | None) -> dict:
    """tiny_raw on 2 GPUs under DeepSpeed ZeRO stage 0, its config enabling `dtype` (None: fp32, no section)."""
    raw = tiny_raw(bf16=False)
    raw["model"]["torch_dtype"] = "float32"
    raw["hardware"] = {"device": "a100-sxm4-80gb", "gpus_per_node": 2}
    raw["deepspeed"] = {"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": 2}
    if dtype is not None:  # HF's Trainer requires its own flag to match DeepSpeed's (trainer_config_process)
        raw["deepspeed"][dtype] = {"enabled": True}
        raw["training"][dtype] = True
    return raw


@pytest.mark.parametrize("dtype, wrapper", [("bf16", "BF16_Optimizer"), ("fp16", "FP16_Optimizer")])
def test_stage0_half_precision_is_refused(dtype: str, wrapper: str) -> None:
    # Simulated as DDP, stage 0 with bf16 held bf16 AdamW states and no fp32 master: for a 13.0B model
    # 2 states × 2 B × 13.0e9 = 52.0e9 B = 48.4 GiB per GPU. DeepSpeed's BF16_Optimizer instead holds, per GPU on
    # 8 GPUs, fp32 gradient buffers of the full size, 4 B × 13.0e9 = 52.0e9 B, plus fp32 master weights and Adam's
    # two fp32 states on 1/8 of them, 12 B × 13.0e9 / 8 = 19.5e9 B: 71.5e9 B, more than ZeRO-1's fp32 states
    # (19.5e9 B) and bf16 gradients (26.0e9 B) together, 45.5e9 B — so stage 1 never needs more than stage 0.
    with pytest.raises(ScenarioError, match=rf"^deepspeed\.zero_optimization\.stage: 0 with .* not modelled yet: "
                                            rf"DeepSpeed's {wrapper}"):
        resolve_plan(build_scenario(stage0(dtype)))


def test_stage0_refusal_is_one_line_exit_2(tmp_path) -> None:
    path = tmp_path / "stage0.yaml"
    path.write_text(yaml.safe_dump(stage0("bf16")))
    done = subprocess.run([sys.executable, "-m", "sim", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: deepspeed.zero_optimization.stage: 0 with bf16 ")


def test_stage0_fp32_still_runs() -> None:
    # No half-precision section: the engine runs the basic optimizer on the fp32 weights, no wrapper.
    result = run_scenario(build_scenario(stage0(None)))
    assert result.built.model_states.optimizer_states_bytes > 0
