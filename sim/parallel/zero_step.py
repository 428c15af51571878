"""What DeepSpeed's ZeRO optimizers do at every step, as allocations: the gradient norm and the inner optimizer's
step on an fp32 partition."""

from sim.vocab import DType
from sim.workload.tape import Tape, Tensor

# DeepSpeedCPUAdam's step streams 28 B of host memory per element: it loads the fp32 grad, exp_avg, exp_avg_sq and
# param and stores param, exp_avg and exp_avg_sq (deepspeedai/DeepSpeed csrc/includes/cpu_adam.h, Step_AVX)
CPU_ADAM_BYTES_PER_ELEMENT = 7 * 4


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


def inner_adam_step(tp: Tape, name: str, numel: int, lazy_states: list[Tensor], temporaries: int,
                    temporary_name: str) -> None:
    """The inner optimizer's step on an fp32 partition of `numel` elements: Adam, ~12 FLOPs per element, reads fp32
    param, grad, m, v and writes param, m, v (28 B per element); torch's Adam makes exp_avg and exp_avg_sq at its
    first step (`lazy_states`: those not made yet); `temporaries` fp32 tensors of the partition's size (foreach)."""
    tp.op(name, flops=12.0 * numel, bytes_moved=28 * numel)
    tp.allocate_existing(*lazy_states)
    tp.drop(*[tp.empty(temporary_name, numel, DType.FLOAT32) for _ in range(temporaries)])
