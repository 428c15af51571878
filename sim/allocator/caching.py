"""The caching backend: a model of PyTorch's native CUDACachingAllocator (DeviceCachingAllocator).

Follows c10/cuda/CUDACachingAllocator.cpp (2.x): 512 B rounding (optionally roundup_power2_divisions), small (<= 1 MiB)
and large pools per stream, segment sizes 2 MiB / 20 MiB / 2 MiB-rounded, best fit by (size, address) within the
pool of the allocating stream, the max_split_size oversize rules, should_split, coalescing within a segment, the
cudaMalloc-failure path (release_available_cached_blocks when max_split_size is set, then release_cached_blocks =
empty_cache and one retry counted in num_alloc_retries), garbage_collection_threshold (only with a memory fraction),
expandable segments (2 MiB / 20 MiB pages mapped on demand, fully free pages unmapped on release) and record_stream
(frees pending on other streams until those streams pass the free point).

Simulator policy on OOM: the OOM is recorded (num_ooms, `ooms`), then the allocation is made anyway and from then on
allocations still try the cache, cudaMalloc within capacity and the release-and-retry path, and only what that cannot
find is over-committed, so the run shows the whole demand; OutOfMemory is raised after the block has been
allocated and accounted, and the caller frees the buffer later as usual.

Addresses are synthetic and deterministic: cudaMalloc'd segments and expandable-segment reservations are carved, in
call order, from a bump pointer starting at 0x7f0000000000, aligned to 2 MiB.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

import numpy as np

from sim.allocator.alloc_conf import AllocConf
from sim.allocator.base import OutOfMemory
from sim.allocator.event_log import AllocatorAction, AllocatorEventLog
from sim.ops import STREAMS, Stream

try:  # the compiled core (caching_core.c beside this file), built by `pip install .`; without it all runs in Python
    import _sim_caching
except ImportError:
    _sim_caching = None

K_MIN_BLOCK_SIZE = 512  # kMinBlockSize
K_SMALL_SIZE = 1048576  # kSmallSize: requests <= 1 MiB use the small pool
K_SMALL_BUFFER = 2097152  # kSmallBuffer: small-pool segment size; small expandable page
K_MIN_LARGE_ALLOC = 10485760  # kMinLargeAlloc: large requests below 10 MiB get a kLargeBuffer segment
K_LARGE_BUFFER = 20971520  # kLargeBuffer: 20 MiB segment; large expandable page
K_ROUND_LARGE = 2097152  # kRoundLarge: larger segments round up to 2 MiB

_SHIFT = 64  # free-list key = (size << 64) | address: (size, address) order in one Python int
_ADDR_LIMIT = 1 << 62  # synthetic addresses stay below sim.errors.MAX_TENSOR_BYTES, as in caching_core.c
_VA_BASE = 0x7F00_0000_0000
_VA_ALIGN = 2 * 1024 * 1024
_INT64_MAX = (1 << 63) - 1  # the compiled core's sizes are int64: an unset max_split_size (SIZE_MAX) passes as this


def format_size(size: int) -> str:
    """c10 format_size: '<= 1024' bytes, else KiB / MiB / GiB with two decimals (boundaries inclusive)."""
    if size <= 1024:
        return f"{size} bytes"
    if size <= 1048576:
        return f"{size / 1024.0:.2f} KiB"
    if size <= 1073741824:
        return f"{size / 1048576.0:.2f} MiB"
    return f"{size / 1073741824.0:.2f} GiB"


def get_allocation_size(size: int) -> int:
    """Bytes cudaMalloc'd for a rounded request that found no cached block."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """Round `size` up to the next of `divisions` equal steps between its enclosing powers of two."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded_floor = size & ~(step - 1)
    return size if rounded_floor == size else rounded_floor + step


def round_size(size: int, conf: AllocConf) -> int:
    """DeviceCachingAllocator::round_size."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = conf.divisions_for(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(size, divisions)
    return (size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE * K_MIN_BLOCK_SIZE


class _Pool:
    """Free blocks of one (stream, small|large) pool: sorted keys (size << 64 | addr) plus key -> block."""

    __slots__ = ("keys", "map", "small", "stream", "sidx", "unmapped")

    def __init__(self, stream: Hashable, sidx: int, small: bool) -> None:
        self.keys: list[int] = []
        self.map: dict[int, _Block] = {}
        self.small = small
        self.stream = stream
        self.sidx = sidx
        self.unmapped: dict[int, _Block] = {}  # expandable segments: unmapped ranges by address


class _Segment:
    """A cudaMalloc'd segment, or an expandable segment's reserved virtual range."""

    __slots__ = ("addr", "size", "pool", "expandable", "page")

    def __init__(self, addr: int, size: int, pool: _Pool, expandable: bool, page: int) -> None:
        self.addr = addr
        self.size = size
        self.pool = pool
        self.expandable = expandable
        self.page = page


class _Block:
    __slots__ = ("addr", "size", "req", "pool", "seg", "prev", "next", "allocated", "events", "mapped", "gc_base")

    def __init__(self, addr: int, size: int, pool: _Pool, seg: _Segment) -> None:
        self.addr = addr
        self.size = size
        self.req = 0
        self.pool = pool
        self.seg = seg
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.events = 0  # outstanding record_stream events (state active_pending_free while > 0)
        self.mapped = True
        self.gc_base = 0


@dataclass(frozen=True, slots=True)
class OomRecord:
    requested_bytes: int  # the caller's size
    alloc_size: int  # what "Tried to allocate" prints (get_allocation_size of the rounded size)
    allocated_bytes: int
    reserved_bytes: int
    message: str


def _block_key(b: _Block) -> int:
    return (b.size << _SHIFT) | b.addr


class CachingAllocator:
    """PyTorch's CUDA caching allocator for one device, driven by the simulator's malloc/free calls."""

    # slots: malloc and free read and write a dozen of these per call, and slot access is the fastest CPython has
    # (an instance dict of this many attributes is not key-shared: every access would be a dict lookup)
    __slots__ = ("conf", "capacity_bytes", "torch_version", "device_index", "device_total_bytes", "non_pytorch_bytes",
                 "memory_fraction", "allowed_memory_maximum", "allocated_bytes", "reserved_bytes", "active_bytes",
                 "requested_bytes", "inactive_split_bytes", "inactive_split", "allocation", "peak_allocated_bytes",
                 "peak_reserved_bytes", "peak_active_bytes", "num_alloc_retries", "num_ooms", "num_device_alloc",
                 "num_device_free", "num_sync_all_streams", "oversize_allocations", "oversize_segments", "ooms",
                 "retries_before_first_oom", "unlimited", "_forcing", "_max_split", "_non_split_rounding",
                 "_expandable", "_rp2", "_gc_active", "_slow_search", "_gc_calls", "_live", "_pools", "_streams",
                 "_segments", "_expandable_segments", "_events", "_ready", "_pending", "_next_va", "_last_stream",
                 "_last_pools", "_oom", "event_log")

    def __init__(
        self,
        capacity_bytes: int,
        conf: AllocConf | None = None,
        torch_version: tuple[int, ...] = (2, 2, 2),
        device_index: int = 0,
        memory_fraction: float | None = None,
        *,
        device_total_bytes: int | None = None,
        event_log: AllocatorEventLog | None = None,
    ) -> None:
        """`capacity_bytes`: what PyTorch's cudaMalloc can get (device total minus CUDA context, NCCL, ...).
        `device_total_bytes` (default: capacity_bytes) is only used for the OOM message ("total capacity") and the
        memory fraction; the difference to capacity_bytes counts as non-PyTorch memory of this process.
        `event_log`: where to record PyTorch's trace entries (alloc, free_requested, ..., segment_free) as they
        happen, each with the index of the call (malloc, free, empty_cache) that made it; no window is then
        repeated (that skips calls), and the compiled core writes the same entries."""
        self.conf = conf if conf is not None else AllocConf()
        self.capacity_bytes = capacity_bytes
        self.torch_version = tuple(torch_version)
        self.device_index = device_index
        self.device_total_bytes = capacity_bytes if device_total_bytes is None else device_total_bytes
        self.non_pytorch_bytes = max(self.device_total_bytes - capacity_bytes, 0)
        if memory_fraction is not None and not 0.0 <= memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in [0, 1] (got {memory_fraction})")
        self.memory_fraction = memory_fraction
        self.allowed_memory_maximum: int | None = (
            None if memory_fraction is None else int(memory_fraction * self.device_total_bytes)
        )

        # public stats (PyTorch names without the ".all.current" suffix)
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.active_bytes = 0
        self.requested_bytes = 0
        self.inactive_split_bytes = 0
        self.inactive_split = 0
        self.allocation = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.peak_active_bytes = 0
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self.num_device_alloc = 0
        self.num_device_free = 0
        self.num_sync_all_streams = 0
        self.oversize_allocations = 0
        self.oversize_segments = 0
        self.ooms: list[OomRecord] = []
        self.retries_before_first_oom: int | None = None  # num_alloc_retries when the first OOM was recorded
        self.unlimited = False  # set by the first OOM: from then on a failed allocation over-commits
        self._forcing = False  # inside such an over-committing allocation

        self._max_split = self.conf.max_split_size
        self._non_split_rounding = self.conf.max_non_split_rounding_bytes
        self._expandable = self.conf.expandable_segments
        self._rp2 = any(d > 1 for d in self.conf.roundup_power2_divisions)
        self._gc_active = self.allowed_memory_maximum is not None and self.conf.garbage_collection_threshold > 0
        self._slow_search = self._expandable or self._gc_active
        self._gc_calls = [0, 0]  # get_free_block calls on the [large, small] pools (gc ages)

        self._live: dict[int, _Block] = {}
        self._pools: dict[Hashable, tuple[_Pool, _Pool]] = {}
        self._streams: list[Hashable] = []  # in stream-index order
        self._segments: dict[int, _Segment] = {}  # non-expandable segments by address
        self._expandable_segments: list[_Segment] = []
        self._events: dict[Hashable, list[_Block]] = {}  # record_stream events not yet known complete
        self._ready: list[_Block] = []  # events completed (stream passed), processed at the next malloc
        self._pending: dict[int, _Block] = {}  # freed buffer -> its block while record_stream events are pending
        self._next_va = _VA_BASE
        self._last_stream: Hashable = None
        self._last_pools: tuple[_Pool, _Pool] | None = None
        self._oom: OutOfMemory | None = None
        self.event_log = event_log
        for s in Stream:
            self._register_stream(s)

    # ------------------------------------------------------------------ repetition (sim/drivers.py)

    _COUNTERS = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free", "num_sync_all_streams",
                 "_next_va")

    def can_repeat(self) -> bool:
        """Whether `state_signature` captures everything later mallocs and frees depend on (not with expandable
        segments or garbage collection, whose page maps and ages it leaves out, nor with record_stream events
        completed but not yet processed, nor with an event log, which skipped calls would leave incomplete).
        Blocks pending on record_stream events are in the signature, named by their freed buffer's key."""
        return not (self._slow_search or self._ready or self.event_log is not None
                    or len(self._pending) != sum(map(len, self._events.values())))

    def live_buffer_ids(self) -> list[int]:
        """The buffers holding a block now."""
        return list(self._live)

    def pending_buffer_ids(self) -> list[int]:
        """The freed buffers whose blocks wait for record_stream events (release_pending)."""
        return list(self._pending)

    def state_signature(self, owner_keys: dict[int, int]) -> tuple:
        """The state up to synthetic addresses and buffer names: every block in address order with its size,
        requested size, whether it starts a segment, its pool, its owner's key (None: free) and, for a block
        pending on record_stream events (each on one stream), its freed buffer's key. Decisions depend
        on addresses only through their order (best fit ties, and new segments always lie above the old ones),
        so two states with equal signatures answer the same calls the same way."""
        owner = {id(block): owner_keys[buffer_id] for buffer_id, block in self._live.items()}
        pending = {id(block): owner_keys[buffer_id] for buffer_id, block in self._pending.items()}
        blocks = [*self._live.values(), *self._pending.values()]
        for pool in self._all_pools():
            blocks.extend(pool.map.values())
        blocks.sort(key=lambda b: b.addr)
        return self.unlimited, tuple((b.size, b.req if b.allocated or id(b) in pending else 0, b.addr == b.seg.addr,
                                      b.pool.sidx, b.pool.small, owner.get(id(b)), pending.get(id(b)))
                                     for b in blocks)

    def rename_live(self, renames: dict[int, int]) -> None:
        """Give live blocks new buffer ids (old -> new), as if the buffers they hold had been allocated instead."""
        live = self._live
        moved = [(renames[b], live.pop(b)) for b in list(live) if b in renames]
        live.update(moved)

    def rename_pending(self, renames: dict[int, int]) -> None:
        """Give pending blocks new freed-buffer ids (old -> new), as if those buffers had been freed instead."""
        self._pending = {renames.get(b, b): block for b, block in self._pending.items()}

    def counters(self) -> tuple:
        """A reading of the running counts a repeated window adds to (retries, cudaMalloc/cudaFree calls, synthetic
        addresses used, OOMs)."""
        return tuple(getattr(self, name) for name in self._COUNTERS) + (len(self.ooms),)

    def add_counters(self, before: tuple, after: tuple, times: int = 1) -> None:
        """Count again, `times` times, what happened between two `counters()` readings (a repeated window of
        calls). Only the first OOM is recorded (then the model over-commits), so a repeated window adds no record
        but the first one's own."""
        for name, old, new in zip(self._COUNTERS, before, after):
            setattr(self, name, getattr(self, name) + (new - old) * times)
        self.ooms.extend(self.ooms[before[-1]:after[-1]] * times)

    # ----------------------------------------------------------- whole runs at once (the compiled core: caching_core.c)

    def can_replay_vectorised(self) -> bool:
        """Never: where a block lands depends on the cache's state, not on the sizes alone."""
        return False

    def replay_vectorised(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray
                          ) -> tuple[np.ndarray, tuple[int, OutOfMemory] | None]:
        """Refused: the caching allocator's bytes depend on block placement (can_replay_vectorised is False)."""
        raise NotImplementedError("the caching allocator cannot be replayed as a sum of sizes; use replay_compiled "
                                  "or malloc/free")

    def can_replay_compiled(self) -> bool:
        """Whether `replay_compiled` applies: the core is built, nothing has happened yet (no record_stream events
        outstanding either), and the configuration needs none of the paths the core leaves out (expandable
        segments, garbage collection)."""
        return (_sim_caching is not None and not self._slow_search and self.num_device_alloc == 0
                and self.num_sync_all_streams == 0
                and not self._live and not self._events and not self._ready and tuple(self._streams) == STREAMS)

    def replay_compiled(self, signed_ids: np.ndarray, sizes_bytes: np.ndarray, stream_codes: np.ndarray,
                        release_at: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, tuple[int, OutOfMemory] | None, int | None]:
        """Every event of a run (signed id >= 0: malloc of that buffer on STREAMS[code], ~id: its free) through
        the compiled core, which runs this class's algorithm for the configurations `can_replay_compiled`
        accepts. `release_at` (AllocatorEvents.release_at; default: no free pending): a free with a release point
        is free(id, pending_on=(STREAMS[code],)), and release_pending(id) comes right before the malloc at that
        point, as sim/drivers.py's StepwiseDriver calls them. Returns the allocated and reserved bytes after each
        event, the first OOM (its event index and the error malloc would raise; None: none), and the largest free
        block at the first event with the most reserved (None without events, as the stepwise driver gives); the
        allocator then holds the state the events leave (pending blocks included), and its event log the entries
        they make, as if malloc and free had been called for each."""
        n = len(signed_ids)
        allocated, reserved = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        release_at = np.full(n, -1, dtype=np.int64) if release_at is None else release_at
        log = self.event_log
        state, oom, largest, entries = _sim_caching.replay(
            np.ascontiguousarray(signed_ids, dtype=np.int64), np.ascontiguousarray(sizes_bytes, dtype=np.int64),
            np.ascontiguousarray(stream_codes, dtype=np.int64), np.ascontiguousarray(release_at, dtype=np.int64),
            allocated, reserved, len(STREAMS),
            self.capacity_bytes, min(self._max_split, _INT64_MAX), self.conf.max_split_size_bytes is not None,
            self._non_split_rounding, list(self.conf.roundup_power2_divisions), log is not None,
            0 if log is None else log.events, self.device_total_bytes - self.non_pytorch_bytes)
        self._adopt(*state)
        if log is not None:
            log.extend(*entries, n)
        largest = largest if n else None
        if oom is None:
            return allocated, reserved, None, largest
        at, requested, alloc_size, allocated_then, reserved_then = oom
        message = self.oom_message(alloc_size, allocated_bytes=allocated_then, reserved_bytes=reserved_then)
        self.ooms.append(OomRecord(requested, alloc_size, allocated_then, reserved_then, message))
        return allocated, reserved, (at, OutOfMemory(requested, message)), largest

    def _adopt(self, segments: list[tuple], blocks: list[tuple], stats: dict[str, int],
               pending: list[tuple[int, int, int]]) -> None:
        """Take over the compiled core's final state: segments (address, size, pool code = stream code * 2 +
        small), blocks (address, size, requested, segment row, buffer id or -1 when free or pending), statistics,
        and the pending blocks (block row, stream code waited on, buffer id or -1 where a later pending free of
        the same id replaced it in _pending) in the order _events holds them."""
        pools = [pool for stream in STREAMS for pool in self._pools[stream]]
        made = [_Segment(addr, size, pools[code], False, 0) for addr, size, code in segments]
        self._segments = {seg.addr: seg for seg in made}
        runs: list[list[tuple[_Block, int]]] = [[] for _ in made]
        by_row: list[_Block] = []
        for addr, size, req, row, owner in blocks:
            block = _Block(addr, size, made[row].pool, made[row])
            block.req = req
            runs[row].append((block, owner))
            by_row.append(block)
        for block_row, code, buffer_id in pending:  # a pending block holds one record_stream event
            block = by_row[block_row]
            block.events = 1
            self._events.setdefault(STREAMS[code], []).append(block)
            if buffer_id >= 0:
                self._pending[buffer_id] = block
        for run in runs:
            run.sort(key=lambda item: item[0].addr)
            for (block, _), (after, _) in zip(run, run[1:]):
                block.next, after.prev = after, block
            for block, owner in run:
                if owner >= 0:
                    block.allocated = True
                    self._live[owner] = block
                elif not block.events:
                    self._pool_insert(block.pool, block)
        retries = stats.pop("retries_before_first_oom")
        self.retries_before_first_oom = None if retries < 0 else retries
        self.unlimited = bool(stats.pop("unlimited"))
        for name, value in stats.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ public API

    def malloc(self, buffer_id: int, size_bytes: int, stream: Hashable) -> None:
        """Allocate `size_bytes` for `buffer_id` on `stream`; raises OutOfMemory (after allocating) on OOM."""
        if buffer_id in self._live:
            raise AssertionError(f"buffer {buffer_id} allocated twice")
        if self._ready:
            self._process_events()
        if size_bytes <= K_MIN_BLOCK_SIZE:
            size = K_MIN_BLOCK_SIZE
        elif self._rp2:
            size = round_size(size_bytes, self.conf)
        else:
            size = (size_bytes + 511) & -512
        if stream is self._last_stream:  # identity first: hashing an Enum stream is slow
            pools = self._last_pools
        else:
            pools = self._pools.get(stream)
            if pools is None:
                pools = self._register_stream(stream)
            self._last_stream, self._last_pools = stream, pools
        small = size <= K_SMALL_SIZE
        pool = pools[1] if small else pools[0]
        max_split = self._max_split

        # get_free_block
        block: _Block | None = None
        if self._slow_search:
            block = self._get_free_block(pool, size)
        else:
            keys = pool.keys
            i = bisect_left(keys, size << _SHIFT)
            if i < len(keys):
                k = keys[i]
                bsize = k >> _SHIFT
                if not (
                    (size < max_split and bsize >= max_split)
                    or (size >= max_split and bsize >= size + self._non_split_rounding)
                ):
                    del keys[i]
                    block = pool.map.pop(k)
        if block is None:
            block = self._alloc_new(pool, size, size_bytes)

        # alloc_found_block
        bsize = block.size
        rem = bsize - size
        if small or self._expandable:
            split = rem >= K_MIN_BLOCK_SIZE
        else:
            split = size < max_split and rem > K_SMALL_SIZE
        already_split = block.prev is not None or block.next is not None
        if split:
            front = _Block(block.addr, size, pool, block.seg)
            prev = block.prev
            front.prev = prev
            if prev is not None:
                prev.next = front
            front.next = block
            block.prev = front
            block.addr += size
            block.size = rem
            k = (rem << _SHIFT) | block.addr
            insort(pool.keys, k)
            pool.map[k] = block
            if self._gc_active:
                block.gc_base = self._gc_calls[small]
            if not self._expandable:
                if already_split:
                    self.inactive_split_bytes -= size
                else:
                    self.inactive_split_bytes += rem
                    self.inactive_split += 1
            block = front
            bsize = size
        elif already_split and not self._expandable:
            self.inactive_split_bytes -= bsize
            self.inactive_split -= 1

        block.allocated = True
        block.req = size_bytes
        self._live[buffer_id] = block
        self.allocation += 1
        allocated = self.allocated_bytes + bsize
        self.allocated_bytes = allocated
        if allocated > self.peak_allocated_bytes:
            self.peak_allocated_bytes = allocated
        active = self.active_bytes + bsize
        self.active_bytes = active
        if active > self.peak_active_bytes:
            self.peak_active_bytes = active
        self.requested_bytes += size_bytes
        if bsize >= max_split:
            self.oversize_allocations += 1
        if self.event_log is not None:  # alloc_found_block; the call ends here
            self.event_log.record(AllocatorAction.ALLOC, block.addr, size_bytes, pool.sidx)
            self.event_log.end_event()
        if self._oom is not None:
            exc, self._oom = self._oom, None
            raise exc

    def free(self, buffer_id: int, pending_on: Iterable[Hashable] = ()) -> None:
        """Free `buffer_id`. `pending_on`: streams the tensor was record_stream'ed on; the block stays
        active_pending_free (not reusable) until each of those streams passes this point (`stream_passed`).
        The allocation stream itself is ignored, as recordStream ignores it."""
        block = self._live.pop(buffer_id)
        block.allocated = False
        if self.event_log is not None:
            self.event_log.record(AllocatorAction.FREE_REQUESTED, block.addr, block.req, block.pool.sidx)
        bsize = block.size
        self.allocated_bytes -= bsize
        self.allocation -= 1
        if bsize >= self._max_split:
            self.oversize_allocations -= 1
        if pending_on:
            own = block.pool.stream
            for s in pending_on:
                if s != own:
                    block.events += 1
                    self._events.setdefault(s, []).append(block)
        if block.events:
            self._pending[buffer_id] = block
        else:
            self._free_block(block)
        if self.event_log is not None:
            self.event_log.end_event()

    def release_pending(self, buffer_id: int) -> None:
        """Every stream the freed `buffer_id` was record_stream'ed on has passed its free (its events complete):
        the block returns to the cache at the next malloc (process_events), as in PyTorch. Nothing if it already
        has (an OOM retry synchronises every pending event)."""
        block = self._pending.pop(buffer_id, None)
        if block is None:
            return
        for waiting in self._events.values():
            while block in waiting:
                waiting.remove(block)
                self._ready.append(block)
        for stream in [s for s, waiting in self._events.items() if not waiting]:
            del self._events[stream]

    def stream_passed(self, stream: Hashable) -> None:
        """Every event recorded on `stream` so far has completed; the blocks become free at the next malloc
        (process_events) or release, as in PyTorch."""
        waiting = self._events.pop(stream, None)
        if waiting:
            self._ready.extend(waiting)
            for buffer_id in [b for b, block in self._pending.items() if block in waiting]:
                del self._pending[buffer_id]

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): wait for all pending events, return every fully free segment / page."""
        self._release_cached_blocks()
        if self.event_log is not None:
            self.event_log.end_event()

    @property
    def num_segments(self) -> int:
        """Segments as PyTorch counts them (`segment.all.current`); an expandable segment counts once."""
        return len(self._segments) + len(self._expandable_segments)

    @property
    def cached_bytes(self) -> int:
        """Reserved but not allocated (includes blocks pending on record_stream events)."""
        return self.reserved_bytes - self.allocated_bytes

    def largest_free_block_bytes(self) -> int:
        """Largest cached free block over all pools (cache_info's `largest`)."""
        best = 0
        for pools in self._pools.values():
            for pool in pools:
                if pool.keys:
                    best = max(best, pool.keys[-1] >> _SHIFT)
        return best

    def block_of(self, buffer_id: int) -> tuple[int, int]:
        """(address, block size) of a live buffer."""
        b = self._live[buffer_id]
        return b.addr, b.size

    def memory_stats(self) -> dict[str, int | float]:
        """A subset of torch.cuda.memory_stats() (aggregate pool)."""
        return {
            "allocated_bytes.all.current": self.allocated_bytes,
            "allocated_bytes.all.peak": self.peak_allocated_bytes,
            "reserved_bytes.all.current": self.reserved_bytes,
            "reserved_bytes.all.peak": self.peak_reserved_bytes,
            "active_bytes.all.current": self.active_bytes,
            "active_bytes.all.peak": self.peak_active_bytes,
            "requested_bytes.all.current": self.requested_bytes,
            "inactive_split_bytes.all.current": self.inactive_split_bytes,
            "inactive_split.all.current": self.inactive_split,
            "allocation.all.current": self.allocation,
            "segment.all.current": self.num_segments,
            "num_alloc_retries": self.num_alloc_retries,
            "num_ooms": self.num_ooms,
            "num_device_alloc": self.num_device_alloc,
            "num_device_free": self.num_device_free,
            "num_sync_all_streams": self.num_sync_all_streams,
            "oversize_allocations.current": self.oversize_allocations,
            "oversize_segments.current": self.oversize_segments,
            "max_split_size": self._max_split if self.conf.max_split_size_bytes is not None else -1,
        }

    def segments(self, frames_of_buffer: Callable[[int], list[dict]] | None = None) -> list[dict[str, Any]]:
        """Segments in the memory-snapshot schema (torch.cuda.memory._snapshot()['segments']), by address.
        An expandable segment is reported as one segment per contiguous mapped range. `frames_of_buffer`: the
        frames of an allocated block, from the buffer it holds (default: none recorded)."""
        owner = {id(block): buffer_id for buffer_id, block in self._live.items()}
        by_seg: dict[int, list[_Block]] = {}
        for b in self._all_blocks():
            by_seg.setdefault(id(b.seg), []).append(b)
        segs = {id(s): s for s in self._segments.values()}
        segs.update({id(s): s for s in self._expandable_segments})
        out: list[dict[str, Any]] = []
        for sid, blocks in by_seg.items():
            seg = segs[sid]
            blocks.sort(key=lambda b: b.addr)
            runs: list[list[_Block]] = [[]]
            for b in blocks:
                if b.mapped:
                    runs[-1].append(b)
                elif runs[-1]:
                    runs.append([])
            for run in runs:
                if run:
                    out.append(self._segment_info(seg, run, owner, frames_of_buffer))
        out.sort(key=lambda s: s["address"])
        return out

    def snapshot(self, frames_of_buffer: Callable[[int], list[dict]] | None = None,
                 frames_of_event: Callable[[int], list[dict]] | None = None) -> dict[str, Any]:
        """A memory snapshot dict; this device's `device_traces` list holds the event log's entries (empty
        without one). `frames_of_buffer` names allocated blocks, `frames_of_event` the entries of each allocator
        event (default: no frames)."""
        traces: list[list[dict]] = [[] for _ in range(self.device_index + 1)]
        if self.event_log is not None:
            traces[self.device_index] = self.event_log.device_trace(frames_of_event)
        return {
            "segments": self.segments(frames_of_buffer),
            "device_traces": traces,
            "allocator_settings": self.conf.allocator_settings(),
        }

    def oom_message(self, alloc_size: int, torch_version: tuple[int, ...] | None = None, *,
                    allocated_bytes: int | None = None, reserved_bytes: int | None = None) -> str:
        """The OutOfMemoryError text PyTorch would print now (or with the allocated and reserved bytes given) for
        a request whose segment size is `alloc_size`."""
        version = tuple(torch_version if torch_version is not None else self.torch_version)[:2]
        fs = format_size
        total = self.device_total_bytes
        allocated = self.allocated_bytes if allocated_bytes is None else allocated_bytes
        reserved = self.reserved_bytes if reserved_bytes is None else reserved_bytes
        device_free = max(total - self.non_pytorch_bytes - reserved, 0)
        allowed_info = (
            f"{fs(self.allowed_memory_maximum)} allowed; " if self.allowed_memory_maximum is not None else ""
        )
        if version <= (2, 0):
            return (
                f"CUDA out of memory. Tried to allocate {fs(alloc_size)} (GPU {self.device_index}; "
                f"{fs(total)} total capacity; {fs(allocated)} already allocated; {fs(device_free)} free; "
                f"{allowed_info}{fs(reserved)} reserved in total by PyTorch) If reserved memory is >> allocated "
                "memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory "
                "Management and PYTORCH_CUDA_ALLOC_CONF"
            )
        in_use = fs(reserved + self.non_pytorch_bytes)
        proc_info = f"Including non-PyTorch memory, this process has {in_use} memory in use. "
        head = (
            f"CUDA out of memory. Tried to allocate {fs(alloc_size)}. GPU {self.device_index} has a total "
            f"{'capacty' if version == (2, 1) else 'capacity'} of {fs(total)} of which {fs(device_free)} is free. "
            f"{proc_info}{allowed_info}Of the allocated memory {fs(allocated)} is allocated by PyTorch, and "
            f"{fs(reserved - allocated)} is reserved by PyTorch but unallocated."
        )
        if version == (2, 1):
            return (
                head + " If reserved but unallocated memory is large try setting max_split_size_mb to avoid "
                "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
            )
        return (
            head + " If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
            "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
        )

    def check_invariants(self) -> None:
        """Assert the allocator's structural invariants (for tests; walks every block)."""
        blocks = list(self._all_blocks())
        ids = {id(b) for b in blocks}
        assert len(ids) == len(blocks), "a block is in two places"
        by_seg: dict[int, list[_Block]] = {}
        for b in blocks:
            by_seg.setdefault(id(b.seg), []).append(b)
        segs = list(self._segments.values()) + self._expandable_segments
        assert {id(s) for s in segs} == set(by_seg), "segments and blocks disagree"
        allocated = mapped_total = active = requested = inactive_split = 0
        spans: list[tuple[int, int]] = []
        for seg in segs:
            seg_blocks = sorted(by_seg[id(seg)], key=lambda b: b.addr)
            assert sum(b.size for b in seg_blocks) == seg.size, "block sizes do not sum to the segment size"
            cursor = seg.addr
            for i, b in enumerate(seg_blocks):
                assert b.addr == cursor, "blocks are not contiguous"
                assert b.pool is seg.pool, "block crossed pools or streams"
                assert b.prev is (seg_blocks[i - 1] if i else None), "prev link broken"
                assert b.next is (seg_blocks[i + 1] if i + 1 < len(seg_blocks) else None), "next link broken"
                assert b.size > 0 and b.addr % K_MIN_BLOCK_SIZE == 0 and b.size % K_MIN_BLOCK_SIZE == 0
                cursor += b.size
                if not b.mapped:
                    assert seg.expandable and not b.allocated and not b.events
                    off = b.addr - seg.addr
                    assert off % seg.page == 0 and b.size % seg.page == 0, "unmapped range not page aligned"
                    continue
                mapped_total += b.size
                if b.allocated:
                    allocated += b.size
                if b.allocated or b.events:
                    active += b.size
                    requested += b.req
                elif not seg.expandable and (b.prev is not None or b.next is not None):
                    inactive_split += b.size
                if not b.allocated and not b.events and i:
                    prev = seg_blocks[i - 1]
                    assert prev.allocated or prev.events or not prev.mapped, "two free neighbours not merged"
            spans.append((seg.addr, seg.addr + seg.size))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "segments overlap"
        for pool in self._all_pools():
            assert pool.keys == sorted(pool.map), "free list out of order"
            for k, b in pool.map.items():
                assert k == _block_key(b) and b.pool is pool and b.mapped and not b.allocated and not b.events
            for a, b in pool.unmapped.items():
                assert a == b.addr and not b.mapped and b.pool is pool
        assert allocated == self.allocated_bytes, (allocated, self.allocated_bytes)
        assert mapped_total == self.reserved_bytes, (mapped_total, self.reserved_bytes)
        assert active == self.active_bytes, (active, self.active_bytes)
        assert requested == self.requested_bytes, (requested, self.requested_bytes)
        if not self._expandable:
            assert inactive_split == self.inactive_split_bytes, (inactive_split, self.inactive_split_bytes)
        assert self.unlimited or self.reserved_bytes <= self.capacity_bytes
        assert self.unlimited == (self.num_ooms > 0)

    # ------------------------------------------------------------------ internals

    def _register_stream(self, stream: Hashable) -> tuple[_Pool, _Pool]:
        sidx = len(self._streams)
        self._streams.append(stream)
        pools = (_Pool(stream, sidx, False), _Pool(stream, sidx, True))  # (large, small)
        self._pools[stream] = pools
        return pools

    def _all_pools(self) -> list[_Pool]:
        """All pools in PyTorch's iteration order: large_blocks (by stream) then small_blocks (by stream)."""
        ordered = [self._pools[s] for s in self._streams]
        return [p[0] for p in ordered] + [p[1] for p in ordered]

    def _all_blocks(self) -> Iterable[_Block]:
        yield from self._live.values()
        for pool in self._all_pools():
            yield from pool.map.values()
            yield from pool.unmapped.values()
        seen: set[int] = set()
        for lst in (*self._events.values(), self._ready):
            for b in lst:
                if id(b) not in seen:
                    seen.add(id(b))
                    yield b

    def _segment_info(self, seg: _Segment, run: list[_Block], owner: dict[int, int],
                      frames_of_buffer: Callable[[int], list[dict]] | None) -> dict[str, Any]:
        blocks = []
        allocated = active = requested = 0
        for b in run:
            if b.allocated:
                state = "active_allocated"
            elif b.events:
                state = "active_pending_free"
            else:
                state = "inactive"
            is_active = state != "inactive"
            blocks.append(
                {
                    "address": b.addr,
                    "size": b.size,
                    "requested_size": b.req if is_active else 0,
                    "state": state,
                    "frames": frames_of_buffer(owner[id(b)]) if frames_of_buffer and b.allocated else [],
                }
            )
            if b.allocated:
                allocated += b.size
            if is_active:
                active += b.size
                requested += b.req
        return {
            "device": self.device_index,
            "address": run[0].addr,
            "total_size": sum(b.size for b in run),
            "allocated_size": allocated,
            "active_size": active,
            "requested_size": requested,
            "stream": seg.pool.sidx,
            "segment_type": "small" if seg.pool.small else "large",
            "segment_pool_id": (0, 0),
            "is_expandable": seg.expandable,
            "frames": [],
            "blocks": blocks,
        }

    def _pool_insert(self, pool: _Pool, b: _Block) -> None:
        k = (b.size << _SHIFT) | b.addr
        insort(pool.keys, k)
        pool.map[k] = b
        if self._gc_active:
            b.gc_base = self._gc_calls[pool.small]

    def _pool_remove(self, pool: _Pool, b: _Block) -> None:
        k = (b.size << _SHIFT) | b.addr
        keys = pool.keys
        del keys[bisect_left(keys, k)]
        del pool.map[k]

    def _new_va(self, size: int) -> int:
        addr = self._next_va
        end = addr + size
        self._next_va = (end + _VA_ALIGN - 1) // _VA_ALIGN * _VA_ALIGN
        if self._next_va >= _ADDR_LIMIT:
            raise AssertionError("synthetic address space exhausted")
        return addr

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        if self._gc_active:
            self._gc_calls[pool.small] += 1
        keys = pool.keys
        i = bisect_left(keys, size << _SHIFT)
        n = len(keys)
        if i == n:
            return None
        if self._expandable:
            # rank a block by its size plus the unmapped range right after it (expandable_size)
            def expandable_size(b: _Block) -> int:
                nxt = b.next
                return b.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

            cur = pool.map[keys[i]]
            while i + 1 < n:
                nb = pool.map[keys[i + 1]]
                if expandable_size(nb) < expandable_size(cur):
                    i += 1
                    cur = nb
                else:
                    break
        k = keys[i]
        bsize = k >> _SHIFT
        max_split = self._max_split
        if size < max_split and bsize >= max_split:
            return None
        if size >= max_split and bsize >= size + self._non_split_rounding:
            return None
        del keys[i]
        return pool.map.pop(k)

    def _alloc_new(self, pool: _Pool, size: int, orig_size: int) -> _Block:
        """The malloc path after the cache missed: gc, cudaMalloc, the two release-and-retry steps, OOM."""
        if self._gc_active:
            self._garbage_collect_cached_blocks()
        alloc_size = get_allocation_size(size)
        block = self._alloc_block(pool, size, alloc_size, False)
        if block is None and self._release_available_cached_blocks(pool, size):
            block = self._alloc_block(pool, size, alloc_size, False)
        if block is None and self._release_cached_blocks():
            block = self._alloc_block(pool, size, alloc_size, True)
        if block is None:
            if not self.unlimited:  # the first failure is the OOM the run reports
                message = self.oom_message(alloc_size)
                self.num_ooms += 1
                self.retries_before_first_oom = self.num_alloc_retries
                self.ooms.append(OomRecord(orig_size, alloc_size, self.allocated_bytes, self.reserved_bytes, message))
                self._oom = OutOfMemory(orig_size, message)
                if self.event_log is not None:  # malloc records the device's free bytes (cudaMemGetInfo) and size
                    device_free = max(self.device_total_bytes - self.non_pytorch_bytes - self.reserved_bytes, 0)
                    self.event_log.record(AllocatorAction.OOM, device_free, size, pool.sidx)
                self.unlimited = True
            # Over-commit only what the real path could not find: every allocation still goes through the cache,
            # cudaMalloc within capacity and the release-and-retry, so reserved stays what PyTorch would hold,
            # plus just the shortfall (the run then shows the whole demand).
            self._forcing = True
            block = self._alloc_block(pool, size, alloc_size, False)
            self._forcing = False
            assert block is not None
        return block

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, is_retry: bool) -> _Block | None:
        if is_retry:
            self.num_alloc_retries += 1
        limited = not self._forcing
        allowed = self.allowed_memory_maximum
        if limited and allowed is not None and self.reserved_bytes + alloc_size > allowed:
            return None
        if self._expandable:
            return self._try_allocate_expandable_block(pool, size)
        if limited and self.reserved_bytes + alloc_size > self.capacity_bytes:
            return None
        addr = self._new_va(alloc_size)
        seg = _Segment(addr, alloc_size, pool, False, 0)
        self._segments[addr] = seg
        block = _Block(addr, alloc_size, pool, seg)
        self._add_reserved(alloc_size)
        if alloc_size >= self._max_split:
            self.oversize_segments += 1
        if self.event_log is not None:
            self.event_log.record(AllocatorAction.SEGMENT_ALLOC, addr, alloc_size, pool.sidx)
        return block

    def _add_reserved(self, n: int) -> None:
        self.reserved_bytes += n
        self.num_device_alloc += 1
        if self.reserved_bytes > self.peak_reserved_bytes:
            self.peak_reserved_bytes = self.reserved_bytes

    def _release_block(self, b: _Block) -> None:
        """cudaFree a whole (unsplit, non-expandable) cached segment."""
        if self.event_log is not None:
            self.event_log.record(AllocatorAction.SEGMENT_FREE, b.addr, b.size, b.pool.sidx)
        self._pool_remove(b.pool, b)
        del self._segments[b.seg.addr]
        self.reserved_bytes -= b.size
        self.num_device_free += 1
        if b.size >= self._max_split:
            self.oversize_segments -= 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """With max_split_size set: free one cached oversize block big enough, or several largest ones."""
        if self.conf.max_split_size_bytes is None or self._expandable:
            return False
        key_size = max(size, self._max_split)
        keys = pool.keys
        i = bisect_left(keys, key_size << _SHIFT)
        if i == len(keys):
            released = 0
            j = i - 1
            while j >= 0 and released < key_size:
                b = pool.map[keys[j]]
                if b.size < self._max_split:
                    break
                j -= 1
                if b.prev is None and b.next is None:
                    released += b.size
                    self._release_block(b)
            return released >= key_size
        b = pool.map[keys[i]]
        if b.prev is not None or b.next is not None:
            return False
        self._release_block(b)
        return True

    def _release_cached_blocks(self) -> bool:
        """empty_cache: synchronize all pending events, then cudaFree every unsplit cached block of every stream
        (expandable: unmap every free page and drop fully unmapped segments), in PyTorch's order (release_blocks
        walks large_blocks, then small_blocks, each ordered by (stream, size, address)), which the log shows."""
        self._synchronize_and_free_events()
        for pool in self._all_pools():
            cached = [pool.map[k] for k in pool.keys]
            if self._expandable:
                for b in cached:
                    self._unmap_block(b)
                    if b.prev is None and b.next is None:
                        del pool.unmapped[b.addr]
                        self._expandable_segments.remove(b.seg)
            else:
                for b in cached:
                    if b.prev is None and b.next is None:
                        self._release_block(b)
        return True

    def _process_events(self) -> None:
        ready, self._ready = self._ready, []
        for b in ready:
            b.events -= 1
            if b.events == 0:
                self._free_block(b)

    def _synchronize_and_free_events(self) -> None:
        self.num_sync_all_streams += 1
        self._process_events()
        self._pending.clear()
        events, self._events = self._events, {}
        for lst in events.values():
            for b in lst:
                b.events -= 1
                if b.events == 0:
                    self._free_block(b)

    def _free_block(self, block: _Block) -> None:
        """Return a block to its pool, merging with free neighbours of the same segment."""
        orig_size = block.size
        pool = block.pool
        if self.event_log is not None:
            self.event_log.record(AllocatorAction.FREE_COMPLETED, block.addr, block.req, pool.sidx)
        net_blocks = 0
        net_size = 0
        prev = block.prev
        if prev is not None and not prev.allocated and not prev.events and prev.mapped:
            k = (prev.size << _SHIFT) | prev.addr
            keys = pool.keys
            del keys[bisect_left(keys, k)]
            del pool.map[k]
            block.addr = prev.addr
            block.size += prev.size
            pp = prev.prev
            block.prev = pp
            if pp is not None:
                pp.next = block
            net_blocks -= 1
            net_size -= prev.size
        nxt = block.next
        if nxt is not None and not nxt.allocated and not nxt.events and nxt.mapped:
            k = (nxt.size << _SHIFT) | nxt.addr
            keys = pool.keys
            del keys[bisect_left(keys, k)]
            del pool.map[k]
            block.size += nxt.size
            nn = nxt.next
            block.next = nn
            if nn is not None:
                nn.prev = block
            net_blocks -= 1
            net_size -= nxt.size
        k = (block.size << _SHIFT) | block.addr
        insort(pool.keys, k)
        pool.map[k] = block
        if self._gc_active:
            block.gc_base = self._gc_calls[pool.small]
        if not self._expandable:
            if block.prev is not None or block.next is not None:
                net_blocks += 1
                net_size += block.size
            self.inactive_split += net_blocks
            self.inactive_split_bytes += net_size
        self.active_bytes -= orig_size
        self.requested_bytes -= block.req
        block.req = 0

    def _garbage_collect_cached_blocks(self) -> None:
        """Free aged unsplit large-pool blocks until reserved <= threshold * allowed (no synchronisation)."""
        assert self.allowed_memory_maximum is not None
        gc_threshold = int(self.conf.garbage_collection_threshold * self.allowed_memory_maximum)
        if self.reserved_bytes <= gc_threshold:
            return
        target = self.reserved_bytes - gc_threshold
        calls = self._gc_calls[False]
        large_pools = [self._pools[s][0] for s in self._streams]

        def freeable() -> list[_Block]:
            return [
                b
                for p in large_pools
                for b in (p.map[k] for k in p.keys)
                if b.prev is None and b.next is None and not b.seg.expandable
            ]

        blocks = freeable()
        if not blocks:
            return
        total_age = sum(calls - b.gc_base for b in blocks)
        count = len(blocks)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            threshold = total_age / count
            freed = False
            for b in freeable():
                age = calls - b.gc_base
                if age >= threshold:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b)

    # ---------------------------------------------------------------- expandable segments

    def _try_merge(self, dst: _Block, src: _Block | None) -> int:
        if src is None or src.allocated or src.events or src.mapped != dst.mapped:
            return 0
        pool = src.pool
        if src.mapped:
            self._pool_remove(pool, src)
        else:
            del pool.unmapped[src.addr]
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        def allocatable(b: _Block | None) -> bool:
            return b is not None and not b.allocated and not b.events

        for addr in sorted(pool.unmapped):
            c = pool.unmapped[addr]
            if allocatable(c.prev):
                c = c.prev  # type: ignore[assignment]
            room = 0
            b: _Block | None = c
            while room < size and allocatable(b):
                room += b.size  # type: ignore[union-attr]
                b = b.next  # type: ignore[union-attr]
            if room >= size:
                return c
        page = K_SMALL_BUFFER if pool.small else K_LARGE_BUFFER
        total = self.device_total_bytes
        va_size = max(total + total // 8, size)
        va_size = (va_size + page - 1) // page * page
        base = self._new_va(va_size)
        seg = _Segment(base, va_size, pool, True, page)
        self._expandable_segments.append(seg)
        c = _Block(base, va_size, pool, seg)
        c.mapped = False
        pool.unmapped[base] = c
        return c

    def _map_block(self, to_map: _Block, size: int) -> bool:
        seg = to_map.seg
        page = seg.page
        mapped = (size + page - 1) // page * page
        if not self._forcing and self.reserved_bytes + mapped > self.capacity_bytes:
            return False
        pool = to_map.pool
        if self.event_log is not None:  # the mapped range, before the block merges with its free neighbours
            self.event_log.record(AllocatorAction.SEGMENT_MAP, to_map.addr, mapped, pool.sidx)
        del pool.unmapped[to_map.addr]
        to_map.mapped = True
        if mapped < to_map.size:
            rest = _Block(to_map.addr + mapped, to_map.size - mapped, pool, seg)
            rest.mapped = False
            rest.prev = to_map
            rest.next = to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            pool.unmapped[rest.addr] = rest
            to_map.size = mapped
        self._try_merge(to_map, to_map.prev)
        self._try_merge(to_map, to_map.next)
        self._pool_insert(pool, to_map)
        self._add_reserved(mapped)
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        c = self._find_expandable_block(pool, size)
        if not c.mapped and not self._map_block(c, min(c.size, size)):
            return None
        while c.size < size:
            nc = c.next
            assert nc is not None and not nc.mapped
            if not self._map_block(nc, min(size - c.size, nc.size)):
                return None
            c = nc
        self._pool_remove(pool, c)
        return c

    def _unmap_block(self, block: _Block) -> None:
        """Unmap every page lying completely inside free mapped `block`."""
        seg = block.seg
        page = seg.page
        off = block.addr - seg.addr
        begin = (off + page - 1) // page
        end = (off + block.size) // page
        if begin >= end:
            return
        pool = block.pool
        self._pool_remove(pool, block)
        start = seg.addr + begin * page
        length = (end - begin) * page
        before = start - block.addr
        after = block.size - before - length
        if before > 0:
            bf = _Block(block.addr, before, pool, seg)
            bf.prev = block.prev
            if bf.prev is not None:
                bf.prev.next = bf
            bf.next = block
            block.prev = bf
            self._pool_insert(pool, bf)
        if after > 0:
            af = _Block(start + length, after, pool, seg)
            af.next = block.next
            if af.next is not None:
                af.next.prev = af
            af.prev = block
            block.next = af
            self._pool_insert(pool, af)
        block.addr = start
        block.size = length
        block.mapped = False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.unmapped[block.addr] = block
        self.reserved_bytes -= length
        self.num_device_free += 1
        if self.event_log is not None:
            self.event_log.record(AllocatorAction.SEGMENT_UNMAP, start, length, pool.sidx)
