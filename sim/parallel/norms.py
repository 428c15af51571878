"""The gradient norm DeepSpeed's ZeRO optimizers compute at every step, as allocations."""

from sim.scenario import DType
from sim.workload.tape import Tape


def grad_norms(tp: Tape, prefix: str, numels: list[int]) -> None:
    """get_grad_norm_direct at the step (stage3.py and stage_1_and_2.py): each gradient partition is copied to
    fp64 for its norm, one at a time; the one-element norms are kept until stacked and summed."""
    norms = []
    for numel in numels:
        tp.op(f"{prefix}.step.grad_norm", bytes_moved=10 * numel)
        tp.drop(tp.empty(f"{prefix}.step.grad_fp64", numel, DType.FLOAT64))
        norms.append(tp.empty(f"{prefix}.step.grad_norm", 1, DType.FLOAT64))
    tp.op(f"{prefix}.step.total_norm")
    tp.drop(*norms)
