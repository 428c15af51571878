"""Hand-derived activation bytes: what a tiny model keeps for backward at the end of its forward.

Tiny qwen2 (transformers 4.39.3, bf16 weights): h=64, a=4 heads of d=16, MHA (4 kv heads), i=128, 2 layers,
V=1000; batch b=2, seq s=16, so N = b·s = 32 tokens. Sizes in bytes.
"""

import numpy as np
import pytest

from sim.ops import Phase
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

N, H, I, B, S, A, D, V = 32, 64, 128, 2, 16, 4, 16, 1000

# One RMSNorm: fp32 copy of x (4Nh, saved by pow and mul) + rsqrt (4N) + bf16 normalised (2Nh, saved by the
# weight mul) + its output (2Nh, saved by the following linears).
NORM = 4 * N * H + 4 * N + 2 * N * H + 2 * N * H
# SwiGLU: gate out (by SiLU), act out and up out (by the mul), product (by down_proj): 4 × 2Ni.
MLP = 4 * 2 * N * I
# Rotary cos[position_ids], sin[position_ids]: (1, s, d) bf16 each (position_ids default to arange(s)[None]),
# saved by q*cos and rotate_half(q)*sin.
ROTARY = 2 * 2 * S * D
# Loss (<=4.45): log_softmax output fp32 over the shifted b·(s-1) rows, nll_loss's target (int64) and
# total_weight (fp32 scalar); the embedding keeps input_ids (int64).
LOSS = 4 * B * (S - 1) * V + 8 * B * (S - 1) + 4
IDS = 8 * N


def activation_bytes_after_forward(raw: dict) -> int:
    run = run_scenario(build_scenario(raw))
    schedule, trace = run.schedule, run.engine.trace
    last_forward_op = max(i for i, op in enumerate(schedule.ops) if op.phase is Phase.FORWARD
                          and schedule.op_step[i] == 0 and schedule.op_micro_batch[i] == 0)
    last_event = int(np.nonzero(trace.op_index <= last_forward_op)[0].max())
    return trace.category_bytes_at(last_event, np.zeros(6, dtype=np.int64))["activations"]


def test_sdpa_flash_layer() -> None:
    # SDPA with no mask runs the flash kernel, which saves post-rotary q and k, v, its output, fp32 logsumexp
    # (b, a, s) and a 16-byte rng state. The output is what o_proj saves too (same storage).
    attention = 2 * N * H * 3 + 2 * N * H + 4 * B * A * S + 16
    layer = NORM + attention + ROTARY + NORM + MLP
    assert layer == 83_728
    assert activation_bytes_after_forward(tiny_raw()) == 2 * layer + IDS + NORM + LOSS == 304_468


def test_eager_layer() -> None:
    # Eager: matmul's reshape copies of q and k (2Nh each), softmax's fp32 output (4·b·a·s²), its bf16 cast
    # (2·b·a·s², saved by the second matmul with the copy of v, 2Nh), the transpose(1,2).contiguous() copy
    # saved by o_proj (2Nh). The (b, 1, s, s) additive mask is not saved (the add keeps nothing) and is
    # released when Qwen2Model.forward returns.
    attention = 2 * N * H * 2 + 4 * B * A * S * S + 2 * B * A * S * S + 2 * N * H + 2 * N * H
    layer = NORM + attention + ROTARY + NORM + MLP
    assert layer == 95_488
    assert activation_bytes_after_forward(tiny_raw(attn_implementation="eager")) == \
        2 * layer + IDS + NORM + LOSS == 327_988


def test_eager_mask_is_kept_by_checkpoints() -> None:
    # With checkpointing the mask is a tensor argument of every checkpointed layer: saved until backward.
    raw = tiny_raw(attn_implementation="eager", gradient_checkpointing=True)
    assert activation_bytes_after_forward(raw) == 2 * (2 * N * H) + 2 * B * S * S + IDS + NORM + LOSS


def test_checkpointing_keeps_only_layer_inputs() -> None:
    # Reentrant checkpointing saves each layer's input hidden state (2Nh bf16) and nothing inside the layers.
    kept = tiny_raw(gradient_checkpointing=True)
    assert activation_bytes_after_forward(kept) == 2 * (2 * N * H) + IDS + NORM + LOSS == 145_204


@pytest.mark.parametrize("version, loss", [
    ("4.39.3", LOSS),  # fp32 log_softmax over b·(s-1) rows
    ("4.49.0", 4 * N * V + 8 * N + 4),  # labels padded instead: all b·s rows, no shifted copy
])
def test_loss_versions(version: str, loss: int) -> None:
    raw = tiny_raw(gradient_checkpointing=True)
    raw["software"]["transformers"] = version
    # 4.49 computes rotary once per forward, (1, s, d) cos and sin shared by all layers and kept by the
    # checkpoints: 2 × 2·s·d.
    rotary = 0 if version == "4.39.3" else 2 * 2 * S * D
    assert activation_bytes_after_forward(raw) == 2 * (2 * N * H) + IDS + NORM + loss + rotary


QWEN1 = {"model_type": "qwen", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256, "kv_channels": 16,
         "no_bias": True}


@pytest.mark.parametrize("bf16_flag, loss", [
    # No flag, no autocast: Qwen1's remote code has no fp32 upcast; log_softmax over the shifted bf16 logits
    # keeps 2 bytes per value, and nll_loss's total_weight is a bf16 scalar.
    (False, 2 * B * (S - 1) * V + 8 * B * (S - 1) + 2),
    # --bf16 True: CrossEntropyLoss hands log_softmax the logits' bf16 dtype, which autocast keeps, so its saved
    # output stays bf16 (2 bytes per value); nll_loss (autocast's fp32 list) saves its fp32 copy of the log-probs
    # (4 bytes per value), and its total_weight is an fp32 scalar.
    (True, (2 + 4) * B * (S - 1) * V + 8 * B * (S - 1) + 4),
])
def test_qwen1_log_probs_dtype_follows_autocast(bf16_flag: bool, loss: int) -> None:
    # Checkpointing keeps each block's input (2Nh) and the (b, 1, 1, s) bf16 additive mask passed to every
    # checkpoint (2N); Qwen1 autoselects bf16 weights either way.
    raw = tiny_raw(gradient_checkpointing=True, bf16=bf16_flag)
    raw["model"] = dict(QWEN1)
    assert activation_bytes_after_forward(raw) == 2 * (2 * N * H) + 2 * N + IDS + NORM + loss


def test_cublas_workspace_is_allocated_once_per_thread_at_its_first_gemm() -> None:
    # torch's default CUBLAS_WORKSPACE_CONFIG on an A100 (compute capability 8.0): ":4096:2:16:8" =
    # 2 × 4096 KiB + 8 × 16 KiB = 8,519,680 B per (handle, stream), kept for the process. Handles are per thread:
    # the forward's first GEMM (q_proj of layer 0) on the Python thread, the backward's first (lm_head's input
    # gradient) on the autograd engine's thread.
    run = run_scenario(build_scenario(tiny_raw()))
    schedule, trace = run.schedule, run.engine.trace
    firsts = {}
    for thread in ("main", "autograd"):
        ids = [b.buffer_id for b in schedule.buffers if b.name == f"cublas_workspace[{thread} thread]"]
        assert len(ids) == 1 and schedule.buffers[ids[0]].size_bytes == 8_519_680
        events = [i for i in range(len(trace)) if int(trace.buffer_id[i]) == ids[0]]
        assert len(events) == 1 and trace.delta_bytes[events[0]] > 0
        firsts[thread] = schedule.ops[int(trace.op_index[events[0]])].name
    assert firsts == {"main": "model.layers.0.self_attn.q_proj", "autograd": "lm_head.backward.input"}


def test_cublaslt_workspace_of_bias_linears() -> None:
    # Qwen2's q/k/v projections have a bias: F.linear → addmm → cuBLASLt gemm_and_bias, whose 1 MiB workspace
    # (CUBLASLT_WORKSPACE_SIZE 1024 KiB) torch 2.2 allocates for the call and frees after it: 3 per layer × 2
    # layers in the forward, inside the linear's own op.
    run = run_scenario(build_scenario(tiny_raw()))
    schedule, trace = run.schedule, run.engine.trace
    events = [(int(trace.op_index[i]), int(trace.delta_bytes[i])) for i in range(len(trace))
              if schedule.buffers[int(trace.buffer_id[i])].name == "cublaslt_workspace"]
    ops = [schedule.ops[op].name for op, delta in events if delta > 0]
    assert ops == [f"model.layers.{layer}.self_attn.{m}_proj" for layer in range(2) for m in "qkv"]
    assert all(delta == 1 << 20 for _, delta in events[::2]) and [op for op, _ in events[::2]] == \
        [op for op, _ in events[1::2]]
    # torch 2.8 keeps one per (handle, stream); under ZeRO-3 DeepSpeed's linear adds the bias itself (no cuBLASLt)
    raw = tiny_raw()
    raw["software"]["torch"] = "2.8.0"
    kept = run_scenario(build_scenario(raw)).schedule
    assert [b.name for b in kept.buffers if b.name.startswith("cublaslt")] == ["cublaslt_workspace[main thread]"]
    raw = tiny_raw()
    raw["hardware"]["gpus_per_node"] = 2
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    assert not [b for b in run_scenario(build_scenario(raw)).schedule.buffers if b.name.startswith("cublaslt")]


def test_qwen3_qk_norms_save_an_rmsnorm_per_head() -> None:
    # Qwen3 (4.51.3) against Qwen2 at the same version: q_norm and k_norm are RMSNorms over each head's d = 16 on
    # the (b, s, heads, d) projections; each saves the fp32 copy (4·N·a·d = 4Nh), the per-head rsqrt (4·N·a) and the
    # bf16 normalised tensor (2Nh, by the weight mul). Its output goes to the rotary embedding, which saves cos/sin
    # only, as for Qwen2's un-normed q and k. MHA here, so k is as large as q. Two norms per layer, two layers.
    qk_norms = 2 * (4 * N * H + 4 * N * A + 2 * N * H)
    assert qk_norms == 25_600
    raws = {}
    for model_type in ("qwen2", "qwen3"):
        raws[model_type] = tiny_raw()
        raws[model_type]["model"]["model_type"] = model_type
        raws[model_type]["software"]["transformers"] = "4.51.3"
    assert activation_bytes_after_forward(raws["qwen3"]) - activation_bytes_after_forward(raws["qwen2"]) == \
        2 * qk_norms


def _at_5_24(model_type: str, attn: str = "sdpa", **model) -> dict:
    raw = tiny_raw(attn_implementation=attn)
    raw["model"].update(model_type=model_type, **model)
    raw["software"]["transformers"] = "5.24.0"
    return raw


def test_gemma_rmsnorm_saves_its_fp32_normalised_tensor() -> None:
    # GemmaRMSNorm computes (x·rsqrt) * (1 + w.float()) in fp32 and casts at the end: it saves the fp32 x (4Nh) and
    # rsqrt (4N) as Llama's does, then the fp32 normalised tensor (4Nh) and 1 + w (4h), where Llama's saves the
    # normalised tensor cast back to bf16 (2Nh). Per norm: 2Nh + 4h more; 2 layers × 2 norms + the final norm.
    # The scaled embedding saves only the 0-dim scale; GELU saves its input as SiLU does.
    per_norm = 2 * N * H + 4 * H
    assert per_norm == 4352
    assert activation_bytes_after_forward(_at_5_24("gemma")) - activation_bytes_after_forward(_at_5_24("llama")) == \
        5 * per_norm


def test_gemma2_final_soft_capping_saves_the_tanh_of_the_logits() -> None:
    # logits / 30, tanh, * 30 in the logits' dtype (bf16): TanhBackward0 keeps its result, 2·N·V bytes.
    capped = activation_bytes_after_forward(_at_5_24("gemma2", "eager"))
    uncapped = activation_bytes_after_forward(_at_5_24("gemma2", "eager", final_logit_softcapping=None))
    assert capped - uncapped == 2 * N * V == 64_000


def test_phi3_v_slice_keeps_the_whole_qkv_output() -> None:
    # Phi-3 against Llama (5.24, SDPA flash): the flash kernel saves v, which in Phi-3 is a slice view of the fused
    # qkv_proj output, so the whole (b, s, (a + 2k)·d) output stays (Llama's v_proj output is k·d wide): 2·N·(a + k)·d
    # more bf16 bytes per layer. The MLP saves 4·2Ni either way (Phi-3: the gate_up output whole, held by the gate
    # and up views, the activation and the product). Two layers, a = k = 4, d = 16.
    per_layer = 2 * N * (A + A) * D
    assert per_layer == 8192
    assert activation_bytes_after_forward(_at_5_24("phi3")) - activation_bytes_after_forward(_at_5_24("llama")) == \
        2 * per_layer
