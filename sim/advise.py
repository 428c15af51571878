"""`sim advise`: for a job that does not fit or fits narrowly, the standard remedies tried one at a time and in
pairs, each re-simulated, those that fit ranked by step time then headroom, each with what it changes in the
allocated peak's breakdown (issue #16). A remedy is a set of `--set` overrides; only those that apply to the
scenario are tried (checkpointing when it is off, a larger ZeRO stage when there is one to take, ...)."""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from sim.scenario import Scenario
from sim.vocab import BITSANDBYTES_OPTIMS, AllocatorBackend, AttnImplementation

LORA = "{r: 16, lora_alpha: 32, target_modules: all-linear}"  # PEFT's usual adapter on every linear layer


@dataclass(frozen=True, slots=True)
class Remedy:
    """One standard change: its name, the overrides that make it, and what it trades."""

    name: str
    overrides: tuple[str, ...]
    cost: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A tried combination of remedies and what the simulation said."""

    remedies: tuple[str, ...]
    fits: bool
    peak_bytes: int
    headroom_bytes: int
    step_time_s: float
    breakdown_change: dict[str, int]  # allocated peak by category, against the scenario as it is
    error: str = ""


def remedies_for(scenario: Scenario) -> list[Remedy]:
    """The standard remedies that apply to the scenario, in the order a user would reach for them."""
    training, hardware, deepspeed = scenario.training, scenario.hardware, scenario.deepspeed
    found = []
    if training.attn_implementation is AttnImplementation.EAGER:
        found.append(Remedy("sdpa attention", ("training.attn_implementation=sdpa",),
                            "none: fused kernels, no s² probabilities kept"))
    if not training.gradient_checkpointing:
        found.append(Remedy("gradient checkpointing", ("training.gradient_checkpointing=true",),
                            "about a third more compute (each layer's forward again)"))
    if training.per_device_train_batch_size > 1:
        half = training.per_device_train_batch_size // 2
        found.append(Remedy("half the micro-batch, twice the accumulation",
                            (f"training.per_device_train_batch_size={half}",
                             f"training.gradient_accumulation_steps={2 * training.gradient_accumulation_steps}"),
                            "smaller GEMMs, a little slower"))
    stage = deepspeed.zero_optimization.stage if deepspeed is not None else None
    if hardware.gpus > 1 and (stage is None or stage < 3):
        found.append(Remedy("ZeRO-3", ("deepspeed.zero_optimization.stage=3",) if deepspeed is not None else
                            ("deepspeed={zero_optimization: {stage: 3}}",),
                            "parameter all-gathers every forward and backward"))
    if stage is not None and stage >= 1:
        found.append(Remedy("optimizer states offloaded to the CPU",
                            ("deepspeed.zero_optimization.offload_optimizer.device=cpu",),
                            "Adam on the host's CPU while the GPU waits, PCIe traffic every step (both in the step "
                            "time shown)"))
    if hardware.gpus_per_node < 8:
        found.append(Remedy("twice the GPUs", (f"hardware.gpus_per_node={2 * hardware.gpus_per_node}",),
                            "twice the GPUs to rent"))
    elif deepspeed is not None:
        found.append(Remedy("twice the nodes", (f"hardware.nodes={2 * hardware.nodes}",),
                            "twice the GPUs to rent, collectives across nodes"))
    host = scenario.hardware.device.cuda_context_bytes == 0 and scenario.allocator.backend is AllocatorBackend.EXACT
    if stage != 3 and not host and not any(item.kind == "save_on_cpu" for item in scenario.strategies):
        found.append(Remedy("activations offloaded to the CPU (save_on_cpu)", ("strategies=[{kind: save_on_cpu}]",),
                            "every saved tensor copied to the host (the host waits for each copy) and back over "
                            "PCIe (in the step time shown)"))
    if deepspeed is None and not host and training.optim not in BITSANDBYTES_OPTIMS:
        found.append(Remedy("8-bit AdamW (bitsandbytes)", ("training.optim=adamw_bnb_8bit",),
                            "Adam's moments quantised to 1 byte per element in blocks (bitsandbytes installed)"))
    if scenario.lora is None:
        found.append(Remedy("LoRA instead of full fine-tuning", (f"lora={LORA}",),
                        "a different training method: adapters only"))
    if scenario.allocator.backend is AllocatorBackend.CACHING and "expandable_segments" not in scenario.allocator.conf:
        found.append(Remedy("expandable segments", ("allocator.conf=expandable_segments:True",),
                            "none (PyTorch >= 2.1)"))
    return found


def combinations(found: list[Remedy]) -> list[tuple[Remedy, ...]]:
    """Each remedy alone, then each pair."""
    return [(remedy,) for remedy in found] + list(itertools.combinations(found, 2))


def advise(base: dict, found: list[Remedy], simulate: Callable[[tuple[str, ...]], dict]) -> list[Outcome]:
    """Every combination simulated (`simulate`: overrides to a result dict, or raises ScenarioError), compared
    with `base` (the scenario's own result): those that fit first, by step time then headroom, then the rest by
    peak."""
    from sim.errors import ScenarioError

    before = base["allocated_peak"]["breakdown"]
    outcomes = []
    for combination in combinations(found):
        names = tuple(remedy.name for remedy in combination)
        try:
            result = simulate(tuple(o for remedy in combination for o in remedy.overrides))
        except ScenarioError as exc:
            outcomes.append(Outcome(names, False, 0, 0, 0.0, {}, str(exc)))
            continue
        after = result["allocated_peak"]["breakdown"]
        outcomes.append(Outcome(names, result["fits"], result["peak"]["total_bytes"], result["headroom_bytes"],
                                result["step_time_s"], {k: after[k] - before[k] for k in before}))
    return sorted(outcomes, key=lambda o: (not o.fits, bool(o.error), o.step_time_s if o.fits else o.peak_bytes,
                                           -o.headroom_bytes))
