"""accelerate's mixed precision under the HF Trainer's flag: the plan's decision, autocast's fp32 loss and
convert_outputs_to_fp32's copy of the logits, hand-derived on a tiny model.

Tiny qwen2 / mistral (tests/conftest.py): V=1000 vocabulary, batch b=2, seq s=16; sizes in bytes.
"""

import pytest

from sim.ops import Phase
from sim.plan import AmpPlan
from sim.resolve import resolve_plan
from sim.scenario import build_scenario
from sim.schedule import build_schedule
from sim.vocab import DType
from tests.conftest import tiny_raw

B, S, V = 2, 16, 1000
CONVERT = "accelerate.convert_to_fp32.logits"
QWEN1 = {"model_type": "qwen", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": V, "max_position_embeddings": 256, "kv_channels": 16,
         "no_bias": True}


def _ops(raw: dict) -> tuple[list, object]:
    """The ops of the first micro-batch's forward and backward, and the schedule's buffers (expanded form)."""
    schedule = build_schedule(resolve_plan(build_scenario(raw)), repeat=False).schedule
    ops = [op for i, op in enumerate(schedule.ops) if schedule.op_step[i] == 0 and schedule.op_micro_batch[i] == 0]
    return ops, schedule.buffers


@pytest.mark.parametrize("mutate, expected", [
    ({}, AmpPlan(DType.BFLOAT16, outputs_to_fp32=True)),  # bf16 weights: accelerate autocasts all the same
    ({"training.bf16": False}, None),  # no flag: no mixed precision
    ({"training.bf16": False, "training.fp16": True}, AmpPlan(DType.FLOAT16, outputs_to_fp32=True)),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, None),  # native_amp is off under DeepSpeed
    ({"host": True}, None),  # the calibration's plain host: no Trainer, same-dtype weights: no autocast
    ({"host": True, "model.torch_dtype": "float32"}, AmpPlan(DType.BFLOAT16, outputs_to_fp32=False)),
])
def test_plan_decides_amp_once(mutate: dict, expected: AmpPlan | None) -> None:
    raw = tiny_raw()
    for key, value in mutate.items():
        if key == "host":
            raw["hardware"] = {"device": {"name": "cpu-host", "capacity_bytes": 1 << 40, "cuda_context_bytes": 0,
                                          "peak_flops": {"fp32": 1.0e12, "bf16": 1.0e12}, "hbm_bytes_per_s": 1.0e11}}
        elif "." in key:
            section, name = key.split(".")
            raw[section][name] = value
        else:
            raw[key] = value
    assert resolve_plan(build_scenario(raw)).amp == expected


@pytest.mark.parametrize("model_type, version, copied", [
    # <= 4.45 (mistral <= 4.47) the model upcasts the logits itself: the output's logits are fp32 already and
    # convert_to_fp32 copies nothing.
    ("qwen2", "4.45.2", False),
    ("mistral", "4.47.1", False),
    # ForCausalLMLoss (4.46, mistral 4.48) upcasts inside the loss and returns the bf16 logits: copied.
    ("qwen2", "4.46.0", True),
    ("mistral", "4.48.0", True),
])
def test_convert_outputs_copies_half_logits_until_compute_loss_returns(model_type: str, version: str,
                                                                       copied: bool) -> None:
    raw = tiny_raw(gradient_checkpointing=True)  # use_cache off: no past_key_values in the output
    raw["model"]["model_type"] = model_type
    raw["software"]["transformers"] = version
    ops, buffers = _ops(raw)
    converts = [i for i, op in enumerate(ops) if op.name == CONVERT]
    if not copied:
        assert converts == []
        return
    [at] = converts
    [copy] = ops[at].allocs
    # tensor.float() of the (b, s, V) bf16 logits: 4 bytes × 2 × 16 × 1000 = 128,000.
    assert buffers[copy].size_bytes == 4 * B * S * V == 128_000
    # Alive from the start of the copy: with the (b, s-1, V) fp32 log_probs saved for backward and the bf16
    # logits (2 × 2 × 16 × 1000 = 64,000 bytes), which the original output holds until the wrapper returns.
    # Trainer.compute_loss then returns with no kernel in between, dropping the new output: both go at the end
    # of the copy's own op, in forward.
    assert sorted(buffers[f].size_bytes for f in ops[at].frees) == [2 * B * S * V, 4 * B * S * V]
    assert ops[at].phase is Phase.FORWARD
    first_backward = next(i for i, op in enumerate(ops) if op.phase is Phase.BACKWARD)
    assert at < first_backward


def test_no_flag_no_copy() -> None:
    raw = tiny_raw(bf16=False)
    raw["software"]["transformers"] = "4.46.0"
    assert [op for op in _ops(raw)[0] if op.name == CONVERT] == []


@pytest.mark.parametrize("weights, flag", [("bf16", "bf16"), ("fp16", "fp16")])
def test_autocast_runs_qwen1_cross_entropy_log_softmax_in_half_and_nll_loss_in_fp32(weights: str, flag: str) -> None:
    # CrossEntropyLoss passes the logits' dtype to log_softmax, which CUDA autocast keeps: its output is half,
    # b·(s-1)·V × 2 = 2 × 15 × 1000 × 2 = 60,000 bytes, and no fp32 copy of the logits is made before it; nll_loss
    # (autocast's fp32 list) then copies the log-probs to fp32: 2 × 15 × 1000 × 4 = 120,000 bytes
    raw = tiny_raw(gradient_checkpointing=True, bf16=flag == "bf16", fp16=flag == "fp16")
    raw["model"] = dict(QWEN1, **{weights: True})
    ops, buffers = _ops(raw)
    forward = [op for op in ops if op.phase is Phase.FORWARD]
    assert [op for op in forward if op.name == "loss.log_softmax.to"] == []
    [log_softmax] = [op for op in forward if op.name == "loss.log_softmax"]
    assert [buffers[a].size_bytes for a in log_softmax.allocs] == [2 * B * (S - 1) * V] == [60_000]
    [upcast] = [op for op in forward if op.name == "loss.nll_loss.autocast_to_fp32"]
    assert [buffers[a].size_bytes for a in upcast.allocs] == [4 * B * (S - 1) * V] == [120_000]


def test_qwen1_cross_entropy_backward_returns_to_bf16_after_nll_loss() -> None:
    # NllLossBackward: zeros_like(its fp32 input) = 2 × 15 × 1000 × 4 = 120,000 bytes; autocast's ToCopyBackward
    # brings the grad back to bf16 (60,000); LogSoftmaxBackward's grad input is bf16 too (60,000); the slice of
    # logits[..., :-1, :] scatters it into a zeroed (2, 16, 1000) bf16 grad: 64,000 bytes
    raw = tiny_raw(gradient_checkpointing=True, bf16=True)
    raw["model"] = dict(QWEN1, bf16=True)
    ops, buffers = _ops(raw)
    backward = {op.name: [buffers[a].size_bytes for a in op.allocs] for op in ops
                if op.phase is Phase.BACKWARD and op.name.startswith("loss.")}
    assert backward["loss.nll_loss.backward"] == [4 * B * (S - 1) * V] == [120_000]
    assert backward["loss.nll_loss.autocast_to_fp32.backward"] == [2 * B * (S - 1) * V] == [60_000]
    assert backward["loss.log_softmax.backward"] == [2 * B * (S - 1) * V] == [60_000]
    [first_slice] = [op for op in ops if op.phase is Phase.BACKWARD and op.name == "slice.backward"][:1]
    assert [buffers[a].size_bytes for a in first_slice.allocs] == [2 * B * S * V] == [64_000]


def test_autocast_leaves_qwen1_log_softmax_alone_without_the_flag() -> None:
    # Qwen1 on bf16 weights with no flag: the log_softmax output stays bf16, 2 × 15 × 1000 × 2 = 60,000 bytes.
    raw = tiny_raw(gradient_checkpointing=True, bf16=False)
    raw["model"] = dict(QWEN1)
    ops, buffers = _ops(raw)
    [log_softmax] = [op for op in ops if op.name == "loss.log_softmax" and op.phase is Phase.FORWARD]
    assert [buffers[a].size_bytes for a in log_softmax.allocs] == [2 * B * (S - 1) * V]


KV = [f"past_key_values.{layer}.{part}" for layer in range(2) for part in ("key", "value")]


@pytest.mark.parametrize("version, copied", [
    ("4.39.3", KV),  # fp32 logits (the model upcasts), the cache returned as a legacy tuple: its 4 tensors copied
    ("4.46.0", ["logits"] + KV),  # bf16 logits and the legacy tuple
    ("4.48.0", ["logits"]),  # the output holds the DynamicCache itself, which convert_to_fp32 leaves alone
])
def test_convert_outputs_copies_a_legacy_past_key_values_tuple(version: str, copied: list[str]) -> None:
    # No checkpointing: use_cache, so the training forward fills a DynamicCache with each layer's post-RoPE key and
    # value, (b, kv_heads, s, d) = 2 × 4 × 16 × 16 = 2,048 bf16 values each: an fp32 copy is 8,192 bytes; the
    # logits' copy is 4 × 2 × 16 × 1000 = 128,000 bytes.
    raw = tiny_raw()
    raw["software"]["transformers"] = version
    ops, buffers = _ops(raw)
    prefix = "accelerate.convert_to_fp32."
    converts = [(op.name.removeprefix(prefix), [buffers[a].size_bytes for a in op.allocs])
                for op in ops if op.name.startswith(prefix)]
    sizes = {"logits": [4 * B * S * V]} | {name: [4 * B * 4 * S * 16] for name in KV}
    assert converts == [(name, sizes[name]) for name in copied]
