"""ZeRO-1's reported model states: the gradients at the optimizer step are this rank's partition, so the reported
states never exceed the peak allocated (issue #19, item 9c)."""

import pytest

from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw


def zero1(overlap_comm: bool, offload: bool = False) -> dict:
    """One qwen2 layer of hidden 2048 (intermediate 2048, vocab 64, untied) under ZeRO-1 on 8 GPUs, 4 tokens, one
    step: the model states dominate the peak."""
    raw = tiny_raw(per_device_train_batch_size=1, seq_len=4)
    raw["model"].update(hidden_size=2048, intermediate_size=2048, num_hidden_layers=1, vocab_size=64,
                        tie_word_embeddings=False)
    raw["hardware"] = {"device": "a100-sxm4-80gb", "gpus_per_node": 8}
    zero = {"stage": 1, "overlap_comm": overlap_comm, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    raw["deepspeed"] = {"zero_optimization": zero, "bf16": {"enabled": True}}
    return raw


@pytest.mark.parametrize("overlap_comm", [False, True])
def test_zero1_gradients_at_the_step_are_the_partition(overlap_comm: bool) -> None:
    # Parameters: embed_tokens and lm_head 2 × 64·2048 = 262,144; final norm 2,048; the layer: q,k,v 3·2048² +
    # biases 3·2048 = 12,589,056, o_proj 2048² = 4,194,304, gate/up/down 3·2048² = 12,582,912, 2 norms 4,096
    # → 29,634,560. The flat bf16 group padded to 8 ranks × 2 is already a multiple of 16: partition 3,704,320.
    # At the step stage_1_and_2.py has freed the full gradients and holds averaged_gradients, the bf16 partition:
    # 2 × 3,704,320 = 7,408,640 B (before: the full bf16 gradients, 59,269,120 B, without overlap_comm, and 0 B
    # with it). Parameters 2 × 29,634,560 = 59,269,120 B; fp32 master + Adam 12 × 3,704,320 = 44,451,840 B.
    result = summarize(run_scenario(build_scenario(zero1(overlap_comm))))
    states = result["model_states_bytes"]
    assert states == {"parameters": 59_269_120, "gradients": 7_408_640, "optimizer_states": 44_451_840}
    # 111,129,600 B reported against a simulated peak of about 160 MB; before, 162,990,080 B without overlap_comm,
    # above the peak, since the full gradients are freed before the first step makes Adam's moments
    assert result["max_memory"]["allocated_bytes"] >= sum(states.values())


def test_zero1_offload_keeps_no_gradients_on_the_gpu() -> None:
    # offload_optimizer: the partition's gradients go to the host (copy_grads_in_partition), none stay on the GPU
    states = summarize(run_scenario(build_scenario(zero1(False, offload=True))))["model_states_bytes"]
    assert states["gradients"] == 0
