/* ring.c: SPSC lock-free float32 ring buffer (see ring.h for the contract).
 *
 * Indices. `head` counts samples ever written and `tail` samples ever consumed; both run
 * free as 64-bit counters (2^63 samples is millions of years of 24 kHz audio), and a slot
 * is addressed by index & (capacity - 1). head - tail is the fill level, so a full ring
 * and an empty ring differ without a spare slot. `tail` is stored shifted left by one;
 * its low bit, READING, is set by the reader while it copies in RING_DROP_OLDEST mode.
 *
 * Memory ordering (who publishes what):
 * - The writer copies samples into free slots, then stores head with release. The reader
 *   loads head with acquire before copying, so every sample below head is visible to it.
 * - The reader copies samples out, then stores tail with release. The writer loads tail
 *   with acquire before reusing slots, so the reader's copies happen before the writer's
 *   overwrites (no write-after-read race on a slot).
 * - Each side keeps a plain cached copy of the other side's index on its own cache line
 *   and reloads the shared one only when the cached value says "not enough"; a stale
 *   value only underestimates what is available, so it is always safe.
 * - RING_DROP_OLDEST: the writer may advance tail itself (compare-exchange, acq_rel) to
 *   discard the oldest samples, but only while READING is clear. The reader sets READING
 *   with an atomic fetch_or (acquire) before it copies and clears it with the release
 *   store of the new tail. Because both are read-modify-writes of one word, either the
 *   writer's discard comes first (the reader then starts after the discarded samples;
 *   the release half of the exchange also hands it a head at least as new as the
 *   discarded range) or the reader's claim comes first (the exchange fails and the writer
 *   only uses slots that are free with respect to the reader's start). A writer never
 *   waits: if the reader is inside a copy, the part that does not fit is refused.
 */
#include "ring.h"

#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define CACHE_LINE 64
#define READING ((uint64_t)1)
#define DISCARD_TRIES 8

struct ring {
    /* Writer's line. */
    alignas(CACHE_LINE) _Atomic uint64_t head;
    uint64_t tail_cache; /* writer's last view of tail (unshifted) */
    _Atomic uint64_t overflow;
    /* Reader's line. */
    alignas(CACHE_LINE) _Atomic uint64_t tail; /* (index << 1) | READING */
    uint64_t head_cache; /* reader's last view of head */
    _Atomic uint64_t underrun;
    /* Constant after init. */
    alignas(CACHE_LINE) uint64_t capacity;
    uint64_t mask;
    float *data;
    int policy;
    int owned; /* allocated by ring_create */
};

_Static_assert(sizeof(struct ring) % CACHE_LINE == 0, "ring header fills whole lines");
_Static_assert(offsetof(struct ring, tail) - offsetof(struct ring, head) >= CACHE_LINE,
               "indices on separate cache lines");
_Static_assert(offsetof(struct ring, capacity) - offsetof(struct ring, tail) >= CACHE_LINE,
               "constants apart from the reader's line");

static bool capacity_ok(size_t capacity) {
    return capacity >= RING_MIN_CAPACITY && capacity <= RING_MAX_CAPACITY &&
           (capacity & (capacity - 1)) == 0;
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

size_t ring_footprint(size_t capacity) {
    if (!capacity_ok(capacity)) return 0;
    size_t data = capacity * sizeof(float);
    data = (data + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
    return sizeof(struct ring) + data;
}

int ring_init(void *mem, size_t mem_size, size_t capacity, int policy) {
    if (!capacity_ok(capacity) || (policy != RING_REFUSE && policy != RING_DROP_OLDEST))
        return RING_EINVAL;
    if (mem == NULL || (uintptr_t)mem % RING_ALIGNMENT != 0) return RING_EALIGN;
    if (mem_size < ring_footprint(capacity)) return RING_ESIZE;
    struct ring *r = mem;
    memset(r, 0, sizeof *r);
    atomic_init(&r->head, 0);
    atomic_init(&r->tail, 0);
    atomic_init(&r->overflow, 0);
    atomic_init(&r->underrun, 0);
    r->capacity = capacity;
    r->mask = capacity - 1;
    r->data = (float *)((char *)mem + sizeof *r);
    r->policy = policy;
    memset(r->data, 0, capacity * sizeof(float));
    return 0;
}

ring_t *ring_create(size_t capacity, int policy) {
    size_t size = ring_footprint(capacity);
    if (size == 0) return NULL;
    void *mem = aligned_alloc(RING_ALIGNMENT, size);
    if (mem == NULL) return NULL;
    if (ring_init(mem, size, capacity, policy) != 0) {
        free(mem);
        return NULL;
    }
    ((struct ring *)mem)->owned = 1;
    return mem;
}

void ring_destroy(ring_t *ring) {
    if (ring != NULL && ring->owned) free(ring);
}

size_t ring_capacity(const ring_t *ring) { return (size_t)ring->capacity; }

int ring_get_policy(const ring_t *ring) { return ring->policy; }

/* Copies n samples between the ring's slots from index pos and a flat buffer: at most
 * two memcpy, split where the slots wrap around. */
static void copy_in(struct ring *r, uint64_t pos, const float *src, size_t n) {
    size_t off = (size_t)(pos & r->mask);
    size_t first = min_size(n, (size_t)r->capacity - off);
    memcpy(r->data + off, src, first * sizeof(float));
    if (n > first) memcpy(r->data, src + first, (n - first) * sizeof(float));
}

static void copy_out(const struct ring *r, uint64_t pos, float *dst, size_t n) {
    size_t off = (size_t)(pos & r->mask);
    size_t first = min_size(n, (size_t)r->capacity - off);
    memcpy(dst, r->data + off, first * sizeof(float));
    if (n > first) memcpy(dst + first, r->data, (n - first) * sizeof(float));
}

static void count(_Atomic uint64_t *counter, uint64_t n) {
    if (n) atomic_fetch_add_explicit(counter, n, memory_order_relaxed);
}

static size_t write_refuse(struct ring *r, const float *src, size_t n) {
    uint64_t w = atomic_load_explicit(&r->head, memory_order_relaxed); /* own index */
    uint64_t space = r->capacity - (w - r->tail_cache);
    if (space < n) {
        r->tail_cache = atomic_load_explicit(&r->tail, memory_order_acquire) >> 1;
        space = r->capacity - (w - r->tail_cache);
    }
    size_t k = min_size(n, (size_t)space);
    copy_in(r, w, src, k);
    atomic_store_explicit(&r->head, w + k, memory_order_release);
    count(&r->overflow, n - k);
    return k;
}

static size_t write_drop_oldest(struct ring *r, const float *src, size_t n) {
    uint64_t lost = 0;
    if (n > r->capacity) { /* only the newest `capacity` samples can be kept */
        lost = n - r->capacity;
        src += lost;
        n = (size_t)r->capacity;
    }
    uint64_t w = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    for (int i = 0; i < DISCARD_TRIES && !(t & READING); i++) {
        uint64_t space = r->capacity - (w - (t >> 1));
        if (space >= n) break;
        uint64_t target = ((t >> 1) + (n - space)) << 1;
        if (atomic_compare_exchange_weak_explicit(&r->tail, &t, target, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            lost += n - space;
            t = target;
            break;
        }
    }
    /* With READING set, t >> 1 is where the reader's copy starts: slots from head up to
     * t >> 1 + capacity are not being read. */
    r->tail_cache = t >> 1;
    uint64_t space = r->capacity - (w - (t >> 1));
    size_t k = min_size(n, (size_t)space);
    copy_in(r, w, src, k);
    atomic_store_explicit(&r->head, w + k, memory_order_release);
    count(&r->overflow, lost + (n - k));
    return k;
}

size_t ring_write(ring_t *ring, const float *src, size_t n) {
    if (n == 0) return 0;
    return ring->policy == RING_DROP_OLDEST ? write_drop_oldest(ring, src, n)
                                            : write_refuse(ring, src, n);
}

/* Starts a consumer operation: returns the read index and how many samples are readable.
 * In RING_DROP_OLDEST mode this sets READING, which end_read must clear. */
static uint64_t begin_read(struct ring *r, size_t want, size_t *avail) {
    uint64_t t, h;
    if (r->policy == RING_DROP_OLDEST) {
        t = atomic_fetch_or_explicit(&r->tail, READING, memory_order_acquire) >> 1;
        h = atomic_load_explicit(&r->head, memory_order_acquire);
        r->head_cache = h;
    } else {
        t = atomic_load_explicit(&r->tail, memory_order_relaxed) >> 1; /* own index */
        h = r->head_cache;
        uint64_t have = h - t;
        if (have < want || have > r->capacity) {
            h = atomic_load_explicit(&r->head, memory_order_acquire);
            r->head_cache = h;
        }
    }
    uint64_t have = h - t;
    *avail = have > r->capacity ? 0 : (size_t)have; /* cannot happen; be defensive */
    return t;
}

static void end_read(struct ring *r, uint64_t new_tail) {
    atomic_store_explicit(&r->tail, new_tail << 1, memory_order_release);
}

size_t ring_read(ring_t *ring, float *dst, size_t n) {
    size_t avail;
    uint64_t t = begin_read(ring, n, &avail);
    size_t k = min_size(n, avail);
    copy_out(ring, t, dst, k);
    end_read(ring, t + k);
    count(&ring->underrun, n - k);
    return k;
}

size_t ring_read_or_zero(ring_t *ring, float *dst, size_t n) {
    size_t k = ring_read(ring, dst, n);
    if (k < n) memset(dst + k, 0, (n - k) * sizeof(float));
    return k;
}

size_t ring_peek(ring_t *ring, float *dst, size_t n) {
    size_t avail;
    uint64_t t = begin_read(ring, n, &avail);
    size_t k = min_size(n, avail);
    copy_out(ring, t, dst, k);
    if (ring->policy == RING_DROP_OLDEST) end_read(ring, t);
    return k;
}

size_t ring_skip(ring_t *ring, size_t n) {
    size_t avail;
    uint64_t t = begin_read(ring, n, &avail);
    size_t k = min_size(n, avail);
    if (k || ring->policy == RING_DROP_OLDEST) end_read(ring, t + k);
    return k;
}

size_t ring_available_read(const ring_t *ring) {
    /* tail first: head can only be ahead of a tail that was already stored. */
    uint64_t t = atomic_load_explicit(&ring->tail, memory_order_acquire) >> 1;
    uint64_t h = atomic_load_explicit(&ring->head, memory_order_acquire);
    uint64_t have = h - t;
    return have > ring->capacity ? 0 : (size_t)have;
}

size_t ring_available_write(const ring_t *ring) {
    return (size_t)ring->capacity - ring_available_read(ring);
}

uint64_t ring_overflow_count(const ring_t *ring) {
    return atomic_load_explicit(&ring->overflow, memory_order_relaxed);
}

uint64_t ring_underrun_count(const ring_t *ring) {
    return atomic_load_explicit(&ring->underrun, memory_order_relaxed);
}

void ring_reset_counters(ring_t *ring) {
    atomic_store_explicit(&ring->overflow, 0, memory_order_relaxed);
    atomic_store_explicit(&ring->underrun, 0, memory_order_relaxed);
}
