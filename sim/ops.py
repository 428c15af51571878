"""Value types shared by the schedule, the engine and the trace: categories, phases, streams, buffers, ops."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from typing import NamedTuple

import numpy as np


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


PHASES = tuple(Phase)  # a phase's code is its index here


class Stream(Enum):
    """Simulated CUDA streams, each running its ops in order, and CPU: the host CPU's own work (DeepSpeedCPUAdam, a
    cast into a pinned buffer), run in order by the host process's threads; it allocates no device memory.
    NCCL_WORLD and NCCL_DP are ProcessGroupNCCL's internal streams (one per process group and device, every
    collective of the group in issue order): the default group's (DeepSpeed ZeRO-3's parameter all-gathers, zero.Init's
    dist.get_world_group(); DDP's all-reduces) and the clone of it DeepSpeed's optimizers use
    (groups._clone_world_group: a second communicator; ZeRO-1/2's all-reduces with overlap_comm and the step's
    all-gather). A collective there waits for the ops whose results it reads and the compute op before it, not for
    the rest of its caller's stream's earlier work (a simplification). A synchronous collective the caller's stream
    waits for is laid out on that stream instead (ZeRO-3's reduce-scatter)."""

    COMPUTE = "compute"
    ALLGATHER = "allgather"
    REDUCE = "reduce"
    CPU = "cpu"
    NCCL_WORLD = "nccl_world"
    NCCL_DP = "nccl_dp"


STREAMS = tuple(Stream)  # a stream's code is its index here


class OpKind(Enum):
    """What bounds an op's duration (sim/cost.py): tensor-core GEMMs, fused attention kernels, memory-bound
    kernels (elementwise, reductions, copies: CUDA cores and HBM), the three NCCL collectives, copies between pinned
    host memory and the device over PCIe (each direction its own link), and the host CPU's memory-bound work."""

    GEMM = "gemm"
    ATTENTION = "attention"
    MEMORY = "memory"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_REDUCE = "all_reduce"
    HOST_TO_DEVICE = "host_to_device"
    DEVICE_TO_HOST = "device_to_host"
    HOST_MEMORY = "host_memory"


class Buffer(NamedTuple):
    """One allocation: a tensor's storage as the caching allocator would see it."""

    buffer_id: int
    name: str
    size_bytes: int
    category: Category


class Op:
    """One kernel (or host action) on one stream: allocates `allocs` when it starts, frees `frees` when it ends.
    A plain slotted class: the tape records each op once as it is built and the schedule keeps that object (shared
    by every position that repeats it; Schedule.expand gives each position its own)."""

    __slots__ = ("name", "stream", "phase", "layer", "allocs", "frees", "flops", "bytes_moved", "deps", "wire_bytes",
                 "kind", "host_waits", "alloc_stream")

    def __init__(self, name: str, stream: Stream, phase: Phase, layer: int | None, allocs: Sequence[int] = (),
                 frees: Sequence[int] = (), flops: float = 0.0, bytes_moved: int = 0, deps: tuple[int, ...] = (),
                 wire_bytes: int = 0, kind: OpKind = OpKind.MEMORY, host_waits: tuple[int, ...] = (),
                 alloc_stream: Stream | None = None) -> None:
        self.name = name
        self.stream = stream
        self.phase = phase
        self.layer = layer
        self.allocs = allocs  # buffer ids
        self.frees = frees
        self.flops = flops
        self.bytes_moved = bytes_moved
        self.deps = deps  # relative offsets (negative) of ops, any stream, that must finish first
        self.wire_bytes = wire_bytes  # a collective: bytes each rank sends over the links
        self.kind = kind
        self.host_waits = host_waits  # relative offsets (negative) of ops the host waits to see finish before issuing
        # this one (an event synchronize: DeepSpeed's fetch throttle)
        # the stream whose pool its allocations come from where that is not the one it runs on (None: its own): a
        # collective runs on ProcessGroupNCCL's stream, its caller allocated its buffers on the current stream
        self.alloc_stream = alloc_stream

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.stream.value}, {self.phase.value}, layer={self.layer})"

    def with_buffers(self, allocs: Sequence[int], frees: Sequence[int]) -> "Op":
        """A new plain Op like this one but allocating `allocs` and freeing `frees` (tuples): how
        Schedule.expand gives a repeated op its own object and final buffer ids."""
        return Op(self.name, self.stream, self.phase, self.layer, tuple(allocs), tuple(frees), self.flops,
                  self.bytes_moved, self.deps, self.wire_bytes, self.kind, self.host_waits, self.alloc_stream)


class BufferTable:
    """Buffers by id, stored as columns: a run has hundreds of thousands, and repeated micro-batches share
    their names, sizes and categories (`source[id]` is the row a buffer's facts are in)."""

    def __init__(self, names: list[str], sizes: list[int], categories: list[int], source: list[int],
                 recorded: list[int] | None = None) -> None:
        """`recorded`: per row, the streams (bit STREAMS.index) the tensor was record_stream'ed on (None: none)."""
        self._names, self._sizes, self._categories, self._source = names, sizes, categories, source
        self._recorded = recorded if recorded is not None else [0] * len(names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, buffer_id: int) -> Buffer:
        row = self._source[buffer_id]
        return Buffer(buffer_id, self._names[row], self._sizes[row], CATEGORIES[self._categories[row]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def sizes(self) -> np.ndarray:
        """size_bytes of every buffer id."""
        return np.asarray(self._sizes, dtype=np.int64)[np.asarray(self._source, dtype=np.int64)]

    def category_indices(self) -> np.ndarray:
        """Index into CATEGORIES of every buffer id."""
        return np.asarray(self._categories, dtype=np.int8)[np.asarray(self._source, dtype=np.int64)]

    def recorded_masks(self) -> np.ndarray:
        """Streams (bit STREAMS.index) every buffer id was record_stream'ed on."""
        return np.asarray(self._recorded, dtype=np.int64)[np.asarray(self._source, dtype=np.int64)]


@dataclass(frozen=True, slots=True)
class ReplicaSpan:
    """Ops that repeat earlier ones with the earlier ops' own buffers moved to fresh ids (+shift); a free of a
    buffer outside [low, high) is looked up in `entry` (what the previous repetition left alive)."""

    shift: int
    low: int  # the repeated ops allocate exactly the ids [low, high)
    high: int
    entry: dict  # buffer id freed outside [low, high) -> the id to free instead

    def final_ids(self, allocs: Sequence[int], frees: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The buffer ids a repeated op really allocates and frees, from the ones its shared Op object carries:
        every allocation and every free inside [low, high) moved by `shift`, every other free through `entry`."""
        shift, low, high, entry = self.shift, self.low, self.high, self.entry
        return (tuple(b + shift for b in allocs),
                tuple(b + shift if low <= b < high else entry[b] for b in frees))


@dataclass(slots=True)
class Schedule:
    """Everything one simulated rank does: its buffers, the ones alive before t=0, and its ops in issue order, in
    one of two forms with the same meaning. The engine (timeline, event order, drivers) and the report read either
    through this type; `expand()` turns the compact form into the expanded one.

    Position i is the i-th op issued; `op_step[i]` and `op_micro_batch[i]` say which step and micro-batch issued it.

    Compact form (what Tape.schedule builds where micro-batches repeat: recorded once, then repeated):
    - `op_source[i] = j <= i` where `ops[i] is ops[j]`, the same Op object, and `op_source[j] == j` (the first
      position holding it). Whatever differs between the positions of one shared op (step, micro-batch, times,
      moved ids) lives in per-position columns or `moved_spans`, never on the Op.
    - `moved_spans`: `(first, end, span)` for disjoint, ascending position ranges [first, end) whose shared ops
      repeat earlier ones with fresh buffer ids (a periodic repetition: buffers kept from one micro-batch to the
      next, as ZeRO-1's IPG buffers or ZeRO-3's gathered parameters). The final ids of an op in the range are
      `span.final_ids(op.allocs, op.frees)`: every allocation (all in [span.low, span.high)) and every free in
      that range + span.shift, every other free span.entry[free] (a buffer the previous repetition left alive).
      Outside every moved span an op's ids are final as they stand: a self-contained repetition reuses its ids,
      each freed before the span starts again.
    Expanded form (`is_expanded`): `op_source` is None and `moved_spans` empty: every op's allocs and frees are
    its final ids, and each position is read on its own. `expand()` also gives every position its own Op object,
    so an op can be changed alone.

    In both forms:
    - deps are relative: op i waits for op i + d for each d in `ops[i].deps` (d < 0, any stream). Expanding keeps
      every position, so one encoding serves both; an op shared by several positions waits, from each, for the op
      the same distance back (the tape records a repetition only where that holds). Inserting an op means
      renumbering the deps that cross it.
    - `buffers` has a row for every final id (a moved id has its own row: the name, size and category of the id
      it moves from), and `persistent` lists the ids allocated before the first op and never freed.
    """

    buffers: "BufferTable | list[Buffer]" = field(default_factory=list)
    persistent: list[int] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    op_step: list[int] = field(default_factory=list)
    op_micro_batch: list[int] = field(default_factory=list)
    moved_spans: "list[tuple[int, int, ReplicaSpan]]" = field(default_factory=list)  # [first op, end op): moved ids
    op_source: "list[int] | None" = None  # per op: index of the first op with the same Op object (None: itself)

    _columns: dict = field(default_factory=dict, repr=False, compare=False)  # cache of the columns below

    @property
    def is_expanded(self) -> bool:
        """Whether every op's buffer ids are final as they stand (no op_source, no moved spans; class docstring)."""
        return self.op_source is None and not self.moved_spans

    def expand(self) -> "Schedule":
        """The same schedule in the expanded form: every position its own plain Op carrying its final buffer ids
        (each moved span applied), no op_source, no moved spans; positions, deps, steps, micro-batches, buffers
        and persistent ids unchanged. An expanded schedule is returned as it is."""
        if self.is_expanded:
            return self
        span_at: list[ReplicaSpan | None] = [None] * len(self.ops)
        for first, end, span in self.moved_spans:
            span_at[first:end] = [span] * (end - first)
        ops = [op.with_buffers(op.allocs, op.frees) if span is None else
               op.with_buffers(*span.final_ids(op.allocs, op.frees)) for op, span in zip(self.ops, span_at)]
        return Schedule(self.buffers, list(self.persistent), ops, list(self.op_step), list(self.op_micro_batch))

    def sources(self) -> np.ndarray:
        """`op_source` as an array (each op its own source when None)."""
        if "sources" not in self._columns:
            self._columns["sources"] = np.arange(len(self.ops), dtype=np.int64) if self.op_source is None else \
                np.asarray(self.op_source, dtype=np.int64)
        return self._columns["sources"]

    def distinct_ops(self) -> np.ndarray:
        """Positions of the distinct Op objects: the ops that are their own source."""
        if "distinct" not in self._columns:
            sources = self.sources()
            self._columns["distinct"] = np.flatnonzero(sources == np.arange(len(sources)))
        return self._columns["distinct"]

    def repeated_runs(self) -> list[tuple[int, int, int]]:
        """(first op, its template's first op, count) of every maximal run of positions that repeat consecutive
        earlier ones (op_source); none in the expanded form."""
        sources = self.sources()
        n = len(sources)
        repeated = sources != np.arange(n)
        follows = np.zeros(n, dtype=bool)  # repeats the op after the one the op before it repeats
        follows[1:] = repeated[1:] & repeated[:-1] & (sources[1:] == sources[:-1] + 1)
        firsts = np.flatnonzero(repeated & ~follows)
        breaks = np.append(np.flatnonzero(~follows), n)
        ends = breaks[np.searchsorted(breaks, firsts, side="right")]
        return [(first, int(sources[first]), end - first) for first, end in zip(firsts.tolist(), ends.tolist())]

    def _enum_codes(self, attribute: str, members: tuple) -> np.ndarray:
        """Every op's `attribute` (an enum) as its index in `members`, looked up once per distinct Op object:
        repeated spans share them, and a run has a few times more ops than distinct ones."""
        if attribute not in self._columns:
            code = {id(member): i for i, member in enumerate(members)}  # hashing an Enum is slow
            distinct = self.distinct_ops()
            by_position = np.zeros(len(self.ops), dtype=np.int64)
            ops = map(self.ops.__getitem__, distinct.tolist())
            by_position[distinct] = list(map(code.__getitem__, map(id, map(attrgetter(attribute), ops))))
            self._columns[attribute] = by_position[self.sources()]
        return self._columns[attribute]

    def stream_codes(self) -> np.ndarray:
        """Every op's stream as its index in STREAMS (computed once)."""
        return self._enum_codes("stream", STREAMS)

    def alloc_stream_codes(self) -> np.ndarray:
        """Every op's allocation stream (its alloc_stream, else its own) as its index in STREAMS (computed once)."""
        if "alloc_stream" not in self._columns:
            by_position = self.stream_codes().copy()
            for position in self.distinct_ops().tolist():
                if self.ops[position].alloc_stream is not None:
                    by_position[position] = STREAMS.index(self.ops[position].alloc_stream)
            self._columns["alloc_stream"] = by_position[self.sources()]
        return self._columns["alloc_stream"]

    def phase_codes(self) -> np.ndarray:
        """Every op's phase as its index in PHASES (computed once)."""
        return self._enum_codes("phase", PHASES)

    def window_first_ops(self) -> np.ndarray:
        """The op indices where a new repetition window begins: one per micro-batch and one per optimizer step
        (each run of ops of one step and micro-batch, the optimizer's ops apart). Empty when the schedule records
        no steps: the run is then one window. The engine skips windows that repeat the one before exactly."""
        if not self.op_step:
            return np.zeros(0, dtype=np.int64)
        optimizer = self.phase_codes() == PHASES.index(Phase.OPTIMIZER)
        group = (np.asarray(self.op_step, dtype=np.int64) << 32) \
            + (np.asarray(self.op_micro_batch, dtype=np.int64) << 1) + optimizer
        return np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))

    def buffer_sizes(self) -> np.ndarray:
        """size_bytes by buffer id (int64)."""
        if isinstance(self.buffers, BufferTable):
            return self.buffers.sizes()
        return np.asarray([b.size_bytes for b in self.buffers], dtype=np.int64)

    def buffer_recorded_masks(self) -> np.ndarray:
        """The streams (bit STREAMS.index) each buffer id was record_stream'ed on (int64; 0: none)."""
        if isinstance(self.buffers, BufferTable):
            return self.buffers.recorded_masks()
        return np.zeros(len(self.buffers), dtype=np.int64)

    def buffer_categories(self) -> np.ndarray:
        """Index into CATEGORIES by buffer id (int8)."""
        if isinstance(self.buffers, BufferTable):
            return self.buffers.category_indices()
        index = {c: i for i, c in enumerate(CATEGORIES)}
        return np.asarray([index[b.category] for b in self.buffers], dtype=np.int8)
