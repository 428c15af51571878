"""torch.utils.checkpoint on the tape, reentrant and not, on a hand-countable function of one 400-byte tensor.

fn(x) = scale2(silu2(scale(silu(x)))): silu saves its input, x * scalar saves nothing, so the forward packs two
tensors (x by silu, the scale output by silu2). Every tensor is 100 fp32 values: 400 B.
"""

from types import SimpleNamespace

import pytest

from sim.errors import ScenarioError
from sim.ops import Phase
from sim.vocab import DType
from sim.workload import primitives as P
from sim.workload.checkpoint import checkpoint, checkpoint_without_reentrant
from sim.workload.tape import Tape, Tensor
from tests.conftest import tiny_raw

NUMEL, BYTES = 100, 400


def _fn(tp: Tape):
    def fn(x: Tensor) -> Tensor:
        a = P.silu(tp, "silu", x)
        b = P.mul_scalar(tp, "scale", a)
        tp.drop(a)
        c = P.silu(tp, "silu2", b)
        tp.drop(b)
        d = P.mul_scalar(tp, "scale2", c)
        tp.drop(c)
        return d
    return fn


def _run(reentrant: bool) -> tuple[Tape, list[int]]:
    """Forward under checkpoint, then backward from the output; the live non-parameter bytes after each op."""
    tp = Tape()
    tp.op("init")
    x = tp.parameter("x", NUMEL, DType.FLOAT32, True).tensor
    ctx = SimpleNamespace(tape=tp, clear_cast_cache=lambda: None)
    if reentrant:
        out = checkpoint(ctx, _fn(tp), x, [])
    else:
        out = checkpoint_without_reentrant(ctx, _fn(tp), x, [], [])
    tp.op("loss.backward")
    grad = tp.empty("grad", NUMEL, DType.FLOAT32)
    tp.backward(out, grad)
    tp.drop(out)
    live, after = 0, []
    for op in tp._ops:
        live += sum(tp._buffer_source[i].size_bytes for i in op.allocs)
        after.append(live)
        live -= sum(tp._buffer_source[i].size_bytes for i in op.frees)
    return tp, after


def _recompute_ops(tp: Tape) -> list[str]:
    return [op.name for op in tp._ops if op.phase is Phase.RECOMPUTE]


def test_non_reentrant_stops_the_recompute_at_the_last_packed_tensor() -> None:
    # The second pack (silu2 saving its input b) reaches the forward's count of 2: _StopRecomputationError before
    # silu2's kernel (inputs are saved before it runs), so silu2 is an empty op and scale2 never runs again.
    # Reentrant re-runs the whole function.
    tp = _run(False)[0]
    assert _recompute_ops(tp) == ["silu", "scale", "silu2"]
    silu2 = [op for op in tp._ops if op.phase is Phase.RECOMPUTE][-1]
    assert (silu2.flops, silu2.bytes_moved, silu2.allocs, silu2.frees) == (0.0, 0, [], [])
    assert _recompute_ops(_run(True)[0]) == ["silu", "scale", "silu2", "scale2"]


@pytest.mark.parametrize("reentrant, peak", [
    # Non-reentrant: d (the forward's output, the caller's until after backward) + scale2.backward's output g2
    # (the incoming grad goes after it). The re-run's scale op: g2 + d + a' + b' = 4 · 400 (a' goes after it);
    # silu2 stops before its kernel (no c'); silu2's backward: d + g2 + b' + its output = 1,600.
    (False, 4 * BYTES),
    # Reentrant: the re-run goes on through scale2 and keeps its output d' for the inner backward, which runs
    # after the whole re-run with the outer grad still held: at silu2.backward grad + d + b' + d' + g2 + g1 =
    # 6 · 400.
    (True, 6 * BYTES),
])
def test_recompute_peak_hand_derived(reentrant: bool, peak: int) -> None:
    assert max(_run(reentrant)[1]) == peak


def test_non_reentrant_frees_everything_but_the_grad() -> None:
    # Every buffer made is freed by the end of backward except x.grad (silu.backward's output): the recomputed
    # tensors as their nodes finish.
    tp, _ = _run(False)
    left = {i for op in tp._ops for i in op.allocs} - {i for op in tp._ops for i in op.frees}
    assert [tp._buffer_source[i].name for i in left] == ["silu.backward.out"]


NON_REENTRANT = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def _resolve(raw: dict):
    from sim.resolve import resolve_plan
    from sim.scenario import build_scenario

    return resolve_plan(build_scenario(raw))


def test_non_reentrant_on_old_torch_is_refused() -> None:
    raw = tiny_raw(**NON_REENTRANT)
    raw["software"]["torch"] = "2.0.1"
    with pytest.raises(ScenarioError, match=r"^training\.gradient_checkpointing_kwargs\.use_reentrant: false "
                                            r"\(non-reentrant checkpointing; unset, it is transformers >= 5\.0's default\) on torch "
                                            r"2\.0\.1 \(< 2\.1\)"):
        _resolve(raw)


def test_non_reentrant_under_zero3_is_refused() -> None:
    raw = tiny_raw(**NON_REENTRANT)
    raw["hardware"]["gpus_per_node"] = 2
    raw["software"]["deepspeed"] = "0.14.0"
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ScenarioError, match=r"under deepspeed ZeRO stage 3 is not modelled yet; `--set training\.gradient_checkpointing_kwargs\.use_reentrant=true` simulates the reentrant path$"):
        _resolve(raw)


def test_non_reentrant_changes_the_run_and_qwen1_ignores_it() -> None:
    # HF families pass the kwarg on: the backward differs from the reentrant run's. Qwen1's own checkpoint call
    # is reentrant whatever the kwarg says: the same run.
    from sim.simulate import run_scenario
    from sim.scenario import build_scenario
    from tests.test_saved_tensors import QWEN1

    def peak_bytes(raw: dict) -> int:
        return run_scenario(build_scenario(raw)).engine.trace.allocated_bytes.max()

    reentrant = tiny_raw(gradient_checkpointing=True)
    assert _resolve(tiny_raw(**NON_REENTRANT)).training.use_reentrant is False
    assert peak_bytes(tiny_raw(**NON_REENTRANT)) != peak_bytes(reentrant) or \
        _recompute_op_count(tiny_raw(**NON_REENTRANT)) != _recompute_op_count(reentrant)
    qwen1, qwen1_nr = tiny_raw(gradient_checkpointing=True), tiny_raw(**NON_REENTRANT)
    qwen1["model"] = dict(QWEN1)
    qwen1_nr["model"] = dict(QWEN1)
    assert _recompute_op_count(qwen1_nr) == _recompute_op_count(qwen1)


def _recompute_op_count(raw: dict) -> int:
    from sim.simulate import run_scenario
    from sim.scenario import build_scenario

    return sum(op.phase is Phase.RECOMPUTE for op in run_scenario(build_scenario(raw)).schedule.ops)
