/* _sim_caching: sim/allocator/caching.py's CachingAllocator, compiled, for one whole run of malloc/free events.
 *
 * Only the configuration the Python model runs without its slow paths: no expandable segments, no garbage
 * collection (no memory fraction), and a fresh allocator. record_stream frees (sim/event_order.py's pending frees)
 * run as sim/drivers.py's PendingReplay calls the model: free(id, pending_on=(stream,)), then release_pending(id)
 * right before the malloc at the free's release point, whose process_events returns the block to its pool (or
 * earlier, where the cudaMalloc-failure path synchronises every stream). The Python model is the specification;
 * this is the same algorithm statement by statement (PyTorch's c10/cuda/CUDACachingAllocator.cpp: round_size, pools
 * per stream, best fit by (size, address), the max_split_size rules, should_split, merging with free neighbours,
 * the cudaMalloc-failure path and the simulator's over-commit after the first OOM).
 * CachingAllocator.replay_compiled drives it and adopts the final state into the Python model;
 * tests/test_compiled_caching.py and tests/test_compiled_pending.py check event by event that both give the same
 * results.
 * When asked, it also writes the model's event log (sim/allocator/event_log.py: PyTorch's trace entries, where
 * CUDACachingAllocator.cpp calls record_trace) into growing columns, each entry with the index of its event.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the constants of sim/allocator/caching.py (kMinBlockSize, kSmallSize, ... in CUDACachingAllocator.cpp) */
#define K_MIN_BLOCK_SIZE 512LL
#define K_SMALL_SIZE 1048576LL
#define K_SMALL_BUFFER 2097152LL
#define K_MIN_LARGE_ALLOC 10485760LL
#define K_LARGE_BUFFER 20971520LL
#define K_ROUND_LARGE 2097152LL
#define VA_BASE 0x7F0000000000LL
#define VA_ALIGN 2097152LL
#define ADDR_LIMIT (1LL << 62) /* as caching.py _ADDR_LIMIT: beyond any user-reachable reserve */
#define ROUNDUP_INTERVALS 16

/* AllocatorAction codes (sim/allocator/event_log.py; TraceEntry::Action in CUDACachingAllocator.h) */
enum { ACTION_ALLOC = 0, ACTION_FREE_REQUESTED = 1, ACTION_FREE_COMPLETED = 2, ACTION_SEGMENT_ALLOC = 3,
       ACTION_SEGMENT_FREE = 4, ACTION_OOM = 7 };

typedef struct {
    int64_t addr, size, req;
    int32_t prev, next, seg, pool; /* -1: none */
    int8_t allocated;
    /* a block freed while a record_stream event is outstanding (the model's _Block.events == 1): the stream it
     * waits on, its buffer, and its neighbours in the list of such blocks in free order (-1: none) */
    int8_t pending, wait;
    int64_t pending_id;
    int32_t pprev, pnext;
} Block;

typedef struct {
    int64_t size, addr;
    int32_t block;
} Key; /* a free block in its pool, ordered by (size, addr) */

typedef struct {
    Key *keys;
    Py_ssize_t n, cap;
} Pool;

typedef struct {
    int64_t addr, size;
    int32_t pool;
    int8_t alive;
} Segment;

/* the event log's columns (AllocatorEventLog's layout): one row per trace entry */
typedef struct {
    int8_t *action, *stream;
    int64_t *address, *size, *event;
    Py_ssize_t n, cap;
    int failed; /* a column could not grow: MemoryError is set, later entries are dropped */
} Log;

typedef struct {
    /* configuration */
    int64_t capacity, max_split, non_split_rounding;
    int max_split_set, rp2;
    int64_t divisions[ROUNDUP_INTERVALS];
    int n_pools;
    /* state */
    Block *blocks;
    int32_t n_blocks, cap_blocks, free_slot; /* free_slot: a list of reusable block slots through .next */
    Segment *segs;
    int32_t n_segs, cap_segs;
    Pool *pools;
    int32_t *live; /* buffer id -> block, -1 */
    Py_ssize_t n_ids;
    /* statistics, as the Python model names them */
    int64_t allocated, reserved, active, requested, inactive_split_bytes, inactive_split, allocation;
    int64_t peak_allocated, peak_reserved, peak_active, num_alloc_retries, num_ooms, num_device_alloc;
    int64_t num_device_free, num_sync_all_streams, oversize_allocations, oversize_segments, next_va;
    int64_t retries_before_first_oom;
    /* pending blocks: the list in free order (head, tail), buffer id -> its latest pending block (the model's
     * _pending, by id), and per stream how many wait on it and when it last became waited on (the model's _events
     * keeps its streams in that order; synchronisation frees stream by stream) */
    int32_t pending_head, pending_tail;
    int32_t *pending_of;
    int64_t *waiting, *waited_since;
    int64_t waits;
    int unlimited, forcing;
    /* the first OOM: event index, caller's size, allocation size, allocated and reserved then */
    int64_t oom_event, oom_requested, oom_alloc_size, oom_allocated, oom_reserved;
    /* the event log, when asked for: the index the current event has in it, and the device's bytes outside
     * what PyTorch reserves (device total minus non-PyTorch memory), for an OOM entry's device_free */
    Log *log;
    int64_t event, device_free_base;
} State;

static int grow(void **items, int32_t *cap, size_t item_size) {
    int32_t new_cap = *cap ? *cap * 2 : 1024;
    void *moved = realloc(*items, (size_t)new_cap * item_size);
    if (!moved) {
        PyErr_NoMemory();
        return -1;
    }
    *items = moved;
    *cap = new_cap;
    return 0;
}

/* record_trace: one entry of the current event; on a failed growth, MemoryError is set once and the entry dropped
 * (the caller checks Log.failed after the run) */
static void log_entry(State *s, int action, int64_t address, int64_t size, int32_t pool) {
    Log *log = s->log;
    if (log->failed)
        return;
    if (log->n == log->cap) {
        Py_ssize_t cap = log->cap ? log->cap * 2 : 4096;
        int8_t *action_col = realloc(log->action, (size_t)cap);
        if (action_col)
            log->action = action_col;
        int8_t *stream_col = realloc(log->stream, (size_t)cap);
        if (stream_col)
            log->stream = stream_col;
        int64_t *address_col = realloc(log->address, (size_t)cap * 8);
        if (address_col)
            log->address = address_col;
        int64_t *size_col = realloc(log->size, (size_t)cap * 8);
        if (size_col)
            log->size = size_col;
        int64_t *event_col = realloc(log->event, (size_t)cap * 8);
        if (event_col)
            log->event = event_col;
        if (!action_col || !stream_col || !address_col || !size_col || !event_col) {
            log->failed = 1;
            PyErr_NoMemory();
            return;
        }
        log->cap = cap;
    }
    Py_ssize_t i = log->n++;
    log->action[i] = (int8_t)action;
    log->stream[i] = (int8_t)(pool / 2); /* pool = stream code * 2 + small */
    log->address[i] = address;
    log->size[i] = size;
    log->event[i] = s->event;
}

static int32_t new_block(State *s, int64_t addr, int64_t size, int32_t pool, int32_t seg) {
    int32_t b = s->free_slot;
    if (b >= 0) {
        s->free_slot = s->blocks[b].next;
    } else {
        if (s->n_blocks == s->cap_blocks && grow((void **)&s->blocks, &s->cap_blocks, sizeof(Block)) < 0)
            return -1;
        b = s->n_blocks++;
    }
    Block *block = &s->blocks[b];
    block->addr = addr;
    block->size = size;
    block->req = 0;
    block->prev = block->next = -1;
    block->seg = seg;
    block->pool = pool;
    block->allocated = 0;
    block->pending = 0;
    block->wait = -1;
    block->pending_id = -1;
    block->pprev = block->pnext = -1;
    return b;
}

static void drop_block(State *s, int32_t b) {
    s->blocks[b].seg = -1;
    s->blocks[b].next = s->free_slot;
    s->free_slot = b;
}

/* first key >= (size, addr): bisect_left on the Python model's (size << 64 | addr) keys */
static Py_ssize_t lower_bound(const Pool *p, int64_t size, int64_t addr) {
    Py_ssize_t lo = 0, hi = p->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        const Key *k = &p->keys[mid];
        if (k->size < size || (k->size == size && k->addr < addr))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int pool_insert(State *s, int32_t b) {
    Block *block = &s->blocks[b];
    Pool *p = &s->pools[block->pool];
    if (p->n == p->cap) {
        Py_ssize_t new_cap = p->cap ? p->cap * 2 : 64;
        Key *moved = realloc(p->keys, (size_t)new_cap * sizeof(Key));
        if (!moved) {
            PyErr_NoMemory();
            return -1;
        }
        p->keys = moved;
        p->cap = new_cap;
    }
    Py_ssize_t i = lower_bound(p, block->size, block->addr);
    memmove(&p->keys[i + 1], &p->keys[i], (size_t)(p->n - i) * sizeof(Key));
    p->keys[i].size = block->size;
    p->keys[i].addr = block->addr;
    p->keys[i].block = b;
    p->n++;
    return 0;
}

static void pool_remove_at(Pool *p, Py_ssize_t i) {
    memmove(&p->keys[i], &p->keys[i + 1], (size_t)(p->n - i - 1) * sizeof(Key));
    p->n--;
}

static void pool_remove(State *s, int32_t b) {
    Block *block = &s->blocks[b];
    Pool *p = &s->pools[block->pool];
    pool_remove_at(p, lower_bound(p, block->size, block->addr));
}

static int64_t roundup_power2_next_division(int64_t size, int64_t divisions) {
    if ((size & (size - 1)) == 0)
        return size;
    int bits = 63 - __builtin_clzll((unsigned long long)size);
    int64_t floor = 1LL << bits;
    int div_bits = divisions ? 64 - __builtin_clzll((unsigned long long)divisions) : 0;
    int64_t step = floor >> (div_bits - 1);
    if (step == 0)
        return floor << 1;
    int64_t rounded_floor = size & ~(step - 1);
    return rounded_floor == size ? size : rounded_floor + step;
}

static int64_t round_size(const State *s, int64_t size) {
    if (size < K_MIN_BLOCK_SIZE)
        return K_MIN_BLOCK_SIZE;
    int index = (63 - __builtin_clzll((unsigned long long)size)) - 20;
    index = index < 0 ? 0 : (index >= ROUNDUP_INTERVALS ? ROUNDUP_INTERVALS - 1 : index);
    int64_t divisions = s->divisions[index];
    if (divisions > 1 && size > K_MIN_BLOCK_SIZE * divisions)
        return roundup_power2_next_division(size, divisions);
    return (size + K_MIN_BLOCK_SIZE - 1) / K_MIN_BLOCK_SIZE * K_MIN_BLOCK_SIZE;
}

static int64_t get_allocation_size(int64_t size) {
    if (size <= K_SMALL_SIZE)
        return K_SMALL_BUFFER;
    if (size < K_MIN_LARGE_ALLOC)
        return K_LARGE_BUFFER;
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) / K_ROUND_LARGE);
}

/* _alloc_block: a new segment (cudaMalloc) within capacity unless over-committing; -1 none, -2 error */
static int32_t alloc_block(State *s, int32_t pool, int64_t alloc_size, int is_retry) {
    if (is_retry)
        s->num_alloc_retries++;
    if (!s->forcing && s->reserved + alloc_size > s->capacity)
        return -1;
    int64_t addr = s->next_va;
    int64_t end = addr + alloc_size;
    s->next_va = (end + VA_ALIGN - 1) / VA_ALIGN * VA_ALIGN;
    if (s->next_va >= ADDR_LIMIT) {
        PyErr_SetString(PyExc_AssertionError, "synthetic address space exhausted");
        return -2;
    }
    if (s->n_segs == s->cap_segs && grow((void **)&s->segs, &s->cap_segs, sizeof(Segment)) < 0)
        return -2;
    int32_t seg = s->n_segs++;
    s->segs[seg].addr = addr;
    s->segs[seg].size = alloc_size;
    s->segs[seg].pool = pool;
    s->segs[seg].alive = 1;
    int32_t b = new_block(s, addr, alloc_size, pool, seg);
    if (b < 0)
        return -2;
    s->reserved += alloc_size;
    s->num_device_alloc++;
    if (s->reserved > s->peak_reserved)
        s->peak_reserved = s->reserved;
    if (alloc_size >= s->max_split)
        s->oversize_segments++;
    if (s->log)
        log_entry(s, ACTION_SEGMENT_ALLOC, addr, alloc_size, pool);
    return b;
}

/* _release_block: cudaFree a whole cached segment */
static void release_block(State *s, int32_t b) {
    Block *block = &s->blocks[b];
    if (s->log)
        log_entry(s, ACTION_SEGMENT_FREE, block->addr, block->size, block->pool);
    pool_remove(s, b);
    s->segs[block->seg].alive = 0;
    s->reserved -= block->size;
    s->num_device_free++;
    if (block->size >= s->max_split)
        s->oversize_segments--;
    drop_block(s, b);
}

/* _release_available_cached_blocks (only with max_split_size set) */
static int release_available_cached_blocks(State *s, int32_t pool, int64_t size) {
    if (!s->max_split_set)
        return 0;
    int64_t key_size = size > s->max_split ? size : s->max_split;
    Pool *p = &s->pools[pool];
    Py_ssize_t i = lower_bound(p, key_size, 0);
    if (i == p->n) {
        int64_t released = 0;
        Py_ssize_t j = i - 1;
        while (j >= 0 && released < key_size) {
            int32_t b = p->keys[j].block;
            if (s->blocks[b].size < s->max_split)
                break;
            j--;
            if (s->blocks[b].prev < 0 && s->blocks[b].next < 0) {
                released += s->blocks[b].size;
                release_block(s, b);
            }
        }
        return released >= key_size;
    }
    int32_t b = p->keys[i].block;
    if (s->blocks[b].prev >= 0 || s->blocks[b].next >= 0)
        return 0;
    release_block(s, b);
    return 1;
}

static int free_block(State *s, int32_t b);

/* unlink pending block b from the pending list and from its stream's count (the model's release_pending: a stream
 * left with no pending block is dropped from _events) */
static void unlink_pending(State *s, int32_t b) {
    Block *block = &s->blocks[b];
    if (block->pprev >= 0)
        s->blocks[block->pprev].pnext = block->pnext;
    else
        s->pending_head = block->pnext;
    if (block->pnext >= 0)
        s->blocks[block->pnext].pprev = block->pprev;
    else
        s->pending_tail = block->pprev;
    block->pprev = block->pnext = -1;
    block->pending = 0;
    s->waiting[block->wait]--;
    s->pending_of[block->pending_id] = -1; /* b is the id's latest pending block, or a synchronisation frees both */
}

/* _synchronize_and_free_events: every pending block back to its pool, the streams in the order the model's
 * _events holds them (when each last became waited on), each stream's blocks in free order */
static int synchronize_and_free_events(State *s) {
    s->num_sync_all_streams++;
    for (;;) {
        int stream = -1;
        for (int k = 0; k < s->n_pools / 2; k++)
            if (s->waiting[k] > 0 && (stream < 0 || s->waited_since[k] < s->waited_since[stream]))
                stream = k;
        if (stream < 0)
            return 0;
        for (int32_t b = s->pending_head; b >= 0;) {
            int32_t next = s->blocks[b].pnext;
            if (s->blocks[b].wait == stream) {
                unlink_pending(s, b);
                if (free_block(s, b) < 0)
                    return -1;
            }
            b = next;
        }
    }
}

/* _release_cached_blocks: empty_cache (synchronises all streams, freeing the pending blocks); the large pools of
 * every stream first, then the small ones, each in (size, address) order, as PyTorch's release_blocks */
static int release_cached_blocks(State *s) {
    if (synchronize_and_free_events(s) < 0)
        return -1;
    for (int k = 0; k < s->n_pools; k++) {
        int pool = k < s->n_pools / 2 ? 2 * k : 2 * (k - s->n_pools / 2) + 1;
        Pool *p = &s->pools[pool];
        Py_ssize_t i = 0;
        while (i < p->n) {
            int32_t b = p->keys[i].block;
            if (s->blocks[b].prev < 0 && s->blocks[b].next < 0)
                release_block(s, b); /* removes keys[i]: the next key moves to i */
            else
                i++;
        }
    }
    return 0;
}

/* _alloc_new: the path after the cache missed; -2 on error */
static int32_t alloc_new(State *s, int32_t pool, int64_t size, int64_t orig_size, int64_t event) {
    int64_t alloc_size = get_allocation_size(size);
    int32_t b = alloc_block(s, pool, alloc_size, 0);
    if (b == -1 && release_available_cached_blocks(s, pool, size))
        b = alloc_block(s, pool, alloc_size, 0);
    if (b == -1) {
        if (release_cached_blocks(s) < 0)
            return -2;
        b = alloc_block(s, pool, alloc_size, 1);
    }
    if (b == -1) {
        if (!s->unlimited) {
            s->num_ooms++;
            s->retries_before_first_oom = s->num_alloc_retries;
            s->oom_event = event;
            s->oom_requested = orig_size;
            s->oom_alloc_size = alloc_size;
            s->oom_allocated = s->allocated;
            s->oom_reserved = s->reserved;
            s->unlimited = 1;
            if (s->log) { /* malloc's record_trace(OOM): the device's free bytes (cudaMemGetInfo) and the size */
                int64_t device_free = s->device_free_base - s->reserved;
                log_entry(s, ACTION_OOM, device_free > 0 ? device_free : 0, size, pool);
            }
        }
        s->forcing = 1;
        b = alloc_block(s, pool, alloc_size, 0);
        s->forcing = 0;
    }
    return b;
}

static int do_malloc(State *s, int64_t buffer_id, int64_t size_bytes, int64_t stream, int64_t event) {
    if (s->live[buffer_id] >= 0) {
        PyErr_Format(PyExc_AssertionError, "buffer %lld allocated twice", (long long)buffer_id);
        return -1;
    }
    int64_t size = size_bytes <= K_MIN_BLOCK_SIZE ? K_MIN_BLOCK_SIZE
                   : s->rp2                       ? round_size(s, size_bytes)
                                                  : (size_bytes + 511) & -512LL;
    int small = size <= K_SMALL_SIZE;
    int32_t pool = (int32_t)(stream * 2 + small); /* the Python model's (large, small) pair per stream */
    int64_t max_split = s->max_split;

    int32_t b = -1;
    Pool *p = &s->pools[pool];
    Py_ssize_t i = lower_bound(p, size, 0);
    if (i < p->n) {
        int64_t bsize = p->keys[i].size;
        if (!((size < max_split && bsize >= max_split) ||
              (size >= max_split && bsize >= size + s->non_split_rounding))) {
            b = p->keys[i].block;
            pool_remove_at(p, i);
        }
    }
    if (b < 0) {
        b = alloc_new(s, pool, size, size_bytes, event);
        if (b < 0)
            return -1;
    }

    int64_t bsize = s->blocks[b].size;
    int64_t rem = bsize - size;
    int split = small ? rem >= K_MIN_BLOCK_SIZE : (size < max_split && rem > K_SMALL_SIZE);
    int already_split = s->blocks[b].prev >= 0 || s->blocks[b].next >= 0;
    if (split) {
        int32_t front = new_block(s, s->blocks[b].addr, size, pool, s->blocks[b].seg);
        if (front < 0)
            return -1;
        Block *block = &s->blocks[b], *fb = &s->blocks[front];
        fb->prev = block->prev;
        if (block->prev >= 0)
            s->blocks[block->prev].next = front;
        fb->next = b;
        block->prev = front;
        block->addr += size;
        block->size = rem;
        if (pool_insert(s, b) < 0)
            return -1;
        if (already_split) {
            s->inactive_split_bytes -= size;
        } else {
            s->inactive_split_bytes += rem;
            s->inactive_split++;
        }
        b = front;
        bsize = size;
    } else if (already_split) {
        s->inactive_split_bytes -= bsize;
        s->inactive_split--;
    }
    Block *block = &s->blocks[b];
    block->allocated = 1;
    block->req = size_bytes;
    s->live[buffer_id] = b;
    s->allocation++;
    s->allocated += bsize;
    if (s->allocated > s->peak_allocated)
        s->peak_allocated = s->allocated;
    s->active += bsize;
    if (s->active > s->peak_active)
        s->peak_active = s->active;
    s->requested += size_bytes;
    if (bsize >= max_split)
        s->oversize_allocations++;
    if (s->log) /* alloc_found_block */
        log_entry(s, ACTION_ALLOC, block->addr, size_bytes, pool);
    return 0;
}

/* merge the free neighbour n (right before or after b in their segment) into b; returns its size */
static int64_t absorb(State *s, int32_t b, int32_t n) {
    Block *block = &s->blocks[b], *nb = &s->blocks[n];
    int64_t size = nb->size;
    pool_remove(s, n);
    if (block->prev == n) {
        block->addr = nb->addr;
        block->prev = nb->prev;
        if (nb->prev >= 0)
            s->blocks[nb->prev].next = b;
    } else {
        block->next = nb->next;
        if (nb->next >= 0)
            s->blocks[nb->next].prev = b;
    }
    block->size += size;
    drop_block(s, n);
    return size;
}

/* _free_block: back to its pool, merged with free neighbours */
static int free_block(State *s, int32_t b) {
    Block *block = &s->blocks[b];
    if (s->log)
        log_entry(s, ACTION_FREE_COMPLETED, block->addr, block->req, block->pool);
    int64_t orig_size = block->size;
    int64_t net_blocks = 0, net_size = 0;
    int32_t neighbours[2] = {block->prev, block->next};
    for (int i = 0; i < 2; i++) {
        int32_t n = neighbours[i];
        if (n >= 0 && !s->blocks[n].allocated && !s->blocks[n].pending) {
            net_blocks--;
            net_size -= absorb(s, b, n);
        }
    }
    if (pool_insert(s, b) < 0)
        return -1;
    block = &s->blocks[b];
    if (block->prev >= 0 || block->next >= 0) {
        net_blocks++;
        net_size += block->size;
    }
    s->inactive_split += net_blocks;
    s->inactive_split_bytes += net_size;
    s->active -= orig_size;
    s->requested -= block->req;
    block->req = 0;
    return 0;
}

/* free: a block freed on another stream than its own with a release point (record_stream) stays pending, out of
 * its pool, until that point or a synchronisation; any other goes back to its pool now */
static int do_free(State *s, int64_t buffer_id, int64_t stream, int pending) {
    int32_t b = s->live[buffer_id];
    if (b < 0) {
        PyObject *key = PyLong_FromLongLong(buffer_id);
        if (key) {
            PyErr_SetObject(PyExc_KeyError, key);
            Py_DECREF(key);
        }
        return -1;
    }
    s->live[buffer_id] = -1;
    Block *block = &s->blocks[b];
    block->allocated = 0;
    if (s->log)
        log_entry(s, ACTION_FREE_REQUESTED, block->addr, block->req, block->pool);
    int64_t bsize = block->size;
    s->allocated -= bsize;
    s->allocation--;
    if (bsize >= s->max_split)
        s->oversize_allocations--;
    if (!pending || stream == block->pool / 2) /* the model's free ignores the allocation stream itself */
        return free_block(s, b);
    block->pending = 1;
    block->wait = (int8_t)stream;
    block->pending_id = buffer_id;
    block->pprev = s->pending_tail;
    if (s->pending_tail >= 0)
        s->blocks[s->pending_tail].pnext = b;
    else
        s->pending_head = b;
    s->pending_tail = b;
    if (s->waiting[stream]++ == 0)
        s->waited_since[stream] = s->waits++;
    s->pending_of[buffer_id] = b; /* an earlier pending block of this id stays pending until a synchronisation */
    return 0;
}

/* release_pending then process_events at the start of a malloc: the latest pending block of each buffer released
 * here, in the order they were freed (none where a synchronisation freed it already) */
static int release_pending(State *s, const int64_t *ids, Py_ssize_t count) {
    for (Py_ssize_t k = 0; k < count; k++) {
        int32_t b = s->pending_of[ids[k]];
        if (b < 0)
            continue;
        unlink_pending(s, b);
        if (free_block(s, b) < 0)
            return -1;
    }
    return 0;
}

static int64_t largest_free_block(const State *s) {
    int64_t best = 0;
    for (int pool = 0; pool < s->n_pools; pool++) {
        const Pool *p = &s->pools[pool];
        if (p->n && p->keys[p->n - 1].size > best)
            best = p->keys[p->n - 1].size;
    }
    return best;
}

/* the log's columns back to the heap */
static void free_log(Log *log) {
    free(log->action);
    free(log->stream);
    free(log->address);
    free(log->size);
    free(log->event);
}

/* a column as bytes (b"" before its first entry, where it is not allocated yet: y# would give None) */
static const char *column(const void *items) { return items ? (const char *)items : ""; }

/* the log's columns as bytes, in AllocatorEventLog.extend's order: action, address, size, stream, event index */
static PyObject *export_log(const Log *log) {
    return Py_BuildValue("(y#y#y#y#y#)", column(log->action), log->n, column(log->address), log->n * 8,
                         column(log->size), log->n * 8, column(log->stream), log->n, column(log->event), log->n * 8);
}

static void free_state(State *s) {
    free(s->blocks);
    free(s->segs);
    if (s->pools)
        for (int i = 0; i < s->n_pools; i++)
            free(s->pools[i].keys);
    free(s->pools);
    free(s->live);
    free(s->pending_of);
    free(s->waiting);
    free(s->waited_since);
}

static int get_int64_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t n, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != 8 || view->len != n * 8 || !view->format || strchr("qlQL", view->format[0]) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd contiguous int64 values", name, n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The final state: ((addr, size, pool) per live segment), ((addr, size, req, segment row, buffer id or -1) per
 * block: a live block has its buffer, a free or pending one -1), the statistics by name, and the pending blocks
 * ((block row, stream code waited on, buffer id or -1 where a later pending free of the id took its place) in the
 * order the model's _events holds them: by stream as synchronisation frees them, each in free order). */
static PyObject *export_state(State *s) {
    int32_t *row = malloc((size_t)(s->n_segs ? s->n_segs : 1) * sizeof(int32_t));
    int32_t *owner = malloc((size_t)(s->n_blocks ? s->n_blocks : 1) * sizeof(int32_t));
    int32_t *block_row = malloc((size_t)(s->n_blocks ? s->n_blocks : 1) * sizeof(int32_t));
    PyObject *segments = PyList_New(0), *blocks = PyList_New(0), *pending = NULL, *result = NULL;
    if (!row || !owner || !block_row || !segments || !blocks) {
        PyErr_NoMemory();
        goto done;
    }
    for (int32_t i = 0, r = 0; i < s->n_segs; i++) {
        row[i] = -1;
        if (!s->segs[i].alive)
            continue;
        row[i] = r++;
        PyObject *item = Py_BuildValue("(LLi)", (long long)s->segs[i].addr, (long long)s->segs[i].size,
                                       s->segs[i].pool);
        if (!item || PyList_Append(segments, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    for (int32_t b = 0; b < s->n_blocks; b++)
        owner[b] = -1;
    for (Py_ssize_t id = 0; id < s->n_ids; id++)
        if (s->live[id] >= 0)
            owner[s->live[id]] = (int32_t)id;
    for (int32_t b = 0, r = 0; b < s->n_blocks; b++) {
        const Block *block = &s->blocks[b];
        if (block->seg < 0)
            continue;
        block_row[b] = r++;
        PyObject *item = Py_BuildValue("(LLLii)", (long long)block->addr, (long long)block->size,
                                       (long long)block->req, row[block->seg], owner[b]);
        if (!item || PyList_Append(blocks, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    pending = PyList_New(0);
    if (!pending)
        goto done;
    for (int64_t after = -1;;) { /* the waited-on streams in the order they became so */
        int stream = -1;
        for (int k = 0; k < s->n_pools / 2; k++)
            if (s->waiting[k] > 0 && s->waited_since[k] > after &&
                (stream < 0 || s->waited_since[k] < s->waited_since[stream]))
                stream = k;
        if (stream < 0)
            break;
        after = s->waited_since[stream];
        for (int32_t b = s->pending_head; b >= 0; b = s->blocks[b].pnext) {
            const Block *block = &s->blocks[b];
            if (block->wait != stream)
                continue;
            long long id = s->pending_of[block->pending_id] == b ? (long long)block->pending_id : -1LL;
            PyObject *item = Py_BuildValue("(iiL)", block_row[b], (int)block->wait, id);
            if (!item || PyList_Append(pending, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
        }
    }
    result = Py_BuildValue(
        "(OO{sLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsLsi}O)", segments, blocks,
        "allocated_bytes", (long long)s->allocated, "reserved_bytes", (long long)s->reserved,
        "active_bytes", (long long)s->active, "requested_bytes", (long long)s->requested,
        "inactive_split_bytes", (long long)s->inactive_split_bytes, "inactive_split", (long long)s->inactive_split,
        "allocation", (long long)s->allocation, "peak_allocated_bytes", (long long)s->peak_allocated,
        "peak_reserved_bytes", (long long)s->peak_reserved, "peak_active_bytes", (long long)s->peak_active,
        "num_alloc_retries", (long long)s->num_alloc_retries, "num_ooms", (long long)s->num_ooms,
        "num_device_alloc", (long long)s->num_device_alloc, "num_device_free", (long long)s->num_device_free,
        "num_sync_all_streams", (long long)s->num_sync_all_streams,
        "oversize_allocations", (long long)s->oversize_allocations,
        "oversize_segments", (long long)s->oversize_segments, "_next_va", (long long)s->next_va,
        "retries_before_first_oom", (long long)s->retries_before_first_oom, "unlimited", s->unlimited, pending);
done:
    free(row);
    free(owner);
    free(block_row);
    Py_XDECREF(segments);
    Py_XDECREF(blocks);
    Py_XDECREF(pending);
    return result;
}

static const char replay_doc[] =
    "replay(signed_ids, sizes, stream_codes, release_at, allocated_out, reserved_out, n_streams, capacity, "
    "max_split, max_split_set, non_split_rounding, divisions, log, first_event, device_free_base)\n"
    "Run every event on a fresh allocator (signed id >= 0: malloc of that buffer, ~id: its free) and write the "
    "allocated and reserved bytes after each. release_at (sim/event_order.py's AllocatorEvents.release_at): for a "
    "free on another stream than its buffer's allocation, the malloc at whose start its block returns to the cache "
    "(at or past the end: never), else -1. Returns (state, first OOM (event, requested, alloc size, allocated, "
    "reserved) or None, largest free block at the first event with the most reserved, event log or None). With "
    "`log`, the event log: the columns (action, address, size, stream, event index) as bytes (int8, int64, int64, "
    "int8, int64), event i of this run numbered first_event + i.";

static PyObject *replay(PyObject *self, PyObject *args) {
    PyObject *signed_obj, *sizes_obj, *streams_obj, *release_obj, *allocated_obj, *reserved_obj, *divisions_obj;
    long long capacity, max_split, non_split_rounding, first_event, device_free_base;
    int n_streams, max_split_set, want_log;
    if (!PyArg_ParseTuple(args, "OOOOOOiLLpLOpLL", &signed_obj, &sizes_obj, &streams_obj, &release_obj,
                          &allocated_obj, &reserved_obj, &n_streams, &capacity, &max_split, &max_split_set,
                          &non_split_rounding, &divisions_obj, &want_log, &first_event, &device_free_base))
        return NULL;
    PyObject *divisions = PySequence_Fast(divisions_obj, "divisions must be a sequence");
    if (!divisions)
        return NULL;
    if (PySequence_Fast_GET_SIZE(divisions) != ROUNDUP_INTERVALS || n_streams < 1) {
        Py_DECREF(divisions);
        PyErr_SetString(PyExc_ValueError, "expected 16 roundup divisions and at least one stream");
        return NULL;
    }
    State s;
    memset(&s, 0, sizeof(s));
    Log log;
    memset(&log, 0, sizeof(log));
    s.log = want_log ? &log : NULL;
    s.device_free_base = device_free_base;
    s.capacity = capacity;
    s.max_split = max_split;
    s.max_split_set = max_split_set;
    s.non_split_rounding = non_split_rounding;
    for (int i = 0; i < ROUNDUP_INTERVALS; i++) {
        s.divisions[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(divisions, i));
        if (s.divisions[i] > 1)
            s.rp2 = 1;
    }
    Py_DECREF(divisions);
    if (PyErr_Occurred())
        return NULL;
    s.free_slot = -1;
    s.next_va = VA_BASE;
    s.retries_before_first_oom = -1;
    s.oom_event = -1;
    s.n_pools = 2 * n_streams;

    s.pending_head = s.pending_tail = -1;

    Py_buffer views[6];
    int got = 0;
    PyObject *result = NULL;
    /* the pending frees' buffer ids grouped by release point, each group in free order */
    Py_ssize_t *first_release = NULL;
    int64_t *released_ids = NULL;
    Py_ssize_t n = PyObject_Length(signed_obj);
    if (n < 0)
        return NULL;
    PyObject *objects[6] = {signed_obj, sizes_obj, streams_obj, release_obj, allocated_obj, reserved_obj};
    const char *names[6] = {"signed_ids", "sizes", "stream_codes", "release_at", "allocated_out", "reserved_out"};
    for (; got < 6; got++)
        if (get_int64_buffer(objects[got], &views[got], n, got >= 4, names[got]) < 0)
            goto done;
    const int64_t *signed_ids = views[0].buf, *sizes = views[1].buf, *streams = views[2].buf;
    const int64_t *release_at = views[3].buf;
    int64_t *allocated_out = views[4].buf, *reserved_out = views[5].buf;

    int64_t max_id = -1;
    first_release = calloc((size_t)n + 2, sizeof(Py_ssize_t));
    if (!first_release) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t id = signed_ids[i] >= 0 ? signed_ids[i] : ~signed_ids[i];
        if (id > max_id)
            max_id = id;
        int pending = release_at[i] >= 0;
        if ((signed_ids[i] >= 0 || pending) && (streams[i] < 0 || streams[i] >= n_streams)) {
            PyErr_Format(PyExc_ValueError, "event %zd: stream code %lld out of range", i, (long long)streams[i]);
            goto done;
        }
        if (release_at[i] != -1 && (signed_ids[i] >= 0 || release_at[i] <= i)) {
            PyErr_Format(PyExc_ValueError, "event %zd: release point %lld is not a later event of a free", i,
                         (long long)release_at[i]);
            goto done;
        }
        if (pending) /* a release point at or past the end (a run's head keeps its events' points) is never */
            first_release[(release_at[i] < n ? release_at[i] : n) + 1]++;
    }
    for (Py_ssize_t i = 0; i <= n; i++) /* first_release[m]: where release point m's ids begin */
        first_release[i + 1] += first_release[i];
    released_ids = malloc((size_t)(first_release[n + 1] ? first_release[n + 1] : 1) * sizeof(int64_t));
    if (!released_ids) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) /* in free order; first_release[m] moves to the end of group m */
        if (release_at[i] >= 0)
            released_ids[first_release[release_at[i] < n ? release_at[i] : n]++] = ~signed_ids[i];
    for (Py_ssize_t i = n; i > 0; i--) /* back to each group's start */
        first_release[i] = first_release[i - 1];
    first_release[0] = 0;

    s.n_ids = (Py_ssize_t)(max_id + 1);
    s.live = malloc((size_t)(s.n_ids ? s.n_ids : 1) * sizeof(int32_t));
    s.pending_of = malloc((size_t)(s.n_ids ? s.n_ids : 1) * sizeof(int32_t));
    s.pools = calloc((size_t)s.n_pools, sizeof(Pool));
    s.waiting = calloc((size_t)n_streams, sizeof(int64_t));
    s.waited_since = malloc((size_t)n_streams * sizeof(int64_t));
    if (!s.live || !s.pending_of || !s.pools || !s.waiting || !s.waited_since) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t id = 0; id < s.n_ids; id++)
        s.live[id] = s.pending_of[id] = -1;
    for (int k = 0; k < n_streams; k++)
        s.waited_since[k] = -1;

    int64_t most_reserved = -1, largest_at_peak = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t id = signed_ids[i];
        s.event = first_event + i;
        if (id >= 0) {
            if (release_pending(&s, released_ids + first_release[i], first_release[i + 1] - first_release[i]) < 0 ||
                do_malloc(&s, id, sizes[i], streams[i], i) < 0)
                goto done;
        } else if (do_free(&s, ~id, streams[i], release_at[i] >= 0) < 0) {
            goto done;
        }
        allocated_out[i] = s.allocated;
        reserved_out[i] = s.reserved;
        if (s.reserved > most_reserved) {
            most_reserved = s.reserved;
            largest_at_peak = largest_free_block(&s);
        }
    }
    if (log.failed)
        goto done;
    PyObject *entries = Py_None;
    Py_INCREF(entries);
    if (s.log) {
        Py_DECREF(entries);
        entries = export_log(&log);
        if (!entries)
            goto done;
    }
    PyObject *state = export_state(&s);
    if (!state) {
        Py_DECREF(entries);
        goto done;
    }
    if (s.oom_event >= 0)
        result = Py_BuildValue("(N(LLLLL)LN)", state, (long long)s.oom_event, (long long)s.oom_requested,
                               (long long)s.oom_alloc_size, (long long)s.oom_allocated, (long long)s.oom_reserved,
                               (long long)largest_at_peak, entries);
    else
        result = Py_BuildValue("(NOLN)", state, Py_None, (long long)largest_at_peak, entries);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    free_state(&s);
    free_log(&log);
    free(first_release);
    free(released_ids);
    return result;
}

static PyMethodDef methods[] = {
    {"replay", replay, METH_VARARGS, replay_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sim_caching",
    "sim/allocator/caching.py's CachingAllocator compiled, for whole runs (CachingAllocator.replay_compiled).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__sim_caching(void) { return PyModule_Create(&module); }
