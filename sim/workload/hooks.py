"""The declared seams where something outside the modelling code intercepts a training step (DDP and ZeRO in
sim/parallel/ today, the what-if strategies of #16 next). Every interception goes through one of these:

- module enter/exit: `ModuleHooks` on `RunContext.module_hooks` (ZeRO-3 gathers a module's parameters before its
  forward and releases them after, and the reverse in backward);
- a parameter's gradient: `Tape.grad_hook` takes it over instead of accumulating it (ZeRO-2/3),
  `Tape.post_grad_hook` runs after AccumulateGrad (DDP's reducer, ZeRO-1 with overlap_comm);
- micro-batch boundaries and the optimizer step: `sim.parallel.placement.Placement`.
"""

from typing import Protocol

from sim.workload.tape import Param, Tensor


class ModuleHooks(Protocol):
    """A module's forward pre- and post-hooks, as torch's register_forward_pre_hook / register_forward_hook."""

    def pre_forward(self, module: str, params: list[Param], x: Tensor | None) -> Tensor | None:
        """Before `module` runs on `x`: returns a replacement input (that carries a backward hook), or None."""

    def post_forward(self, module: str, out: Tensor) -> Tensor | None:
        """After `module` produced `out`: returns a replacement output (that carries a backward hook), or None."""
