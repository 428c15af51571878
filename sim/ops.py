"""Value types shared by the schedule, the engine and the trace: categories, phases, streams, buffers, ops."""

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class Category(Enum):
    """What a buffer is, as reported in `breakdown_at_peak` (design.md §4)."""

    PARAMETERS = "parameters"
    GRADIENTS = "gradients"
    OPTIMIZER_STATES = "optimizer_states"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    COMMUNICATION = "communication"


CATEGORIES = tuple(Category)


class Phase(Enum):
    """Where in a step an op runs. RECOMPUTE is a checkpointed layer's forward re-run inside backward."""

    FORWARD = "forward"
    BACKWARD = "backward"
    RECOMPUTE = "recompute"
    OPTIMIZER = "optimizer"


class Stream(Enum):
    """Simulated CUDA streams; each runs its ops in order."""

    COMPUTE = "compute"
    ALLGATHER = "allgather"
    REDUCE = "reduce"


class Buffer(NamedTuple):
    """One allocation: a tensor's storage as the caching allocator would see it."""

    buffer_id: int
    name: str
    size_bytes: int
    category: Category


class Op(NamedTuple):
    """One kernel (or host action) on one stream: allocates `allocs` when it starts, frees `frees` when it ends."""

    name: str
    stream: Stream
    phase: Phase
    layer: int | None
    allocs: tuple[int, ...] = ()
    frees: tuple[int, ...] = ()
    flops: float = 0.0
    bytes_moved: int = 0
    deps: tuple[int, ...] = ()  # relative offsets (negative) of ops, any stream, that must finish first
    wire_bytes: int = 0  # a collective: bytes each rank sends over the links


@dataclass(slots=True)
class Schedule:
    """Everything one simulated rank does: its buffers, the ones alive before t=0, and its ops in issue order.

    Repeated micro-batches share their Op objects (and buffer ids: each buffer is freed before the span repeats),
    so an op's step and micro-batch live beside it in `op_step` and `op_micro_batch`.
    """

    buffers: list[Buffer] = field(default_factory=list)
    persistent: list[int] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    op_step: list[int] = field(default_factory=list)
    op_micro_batch: list[int] = field(default_factory=list)
