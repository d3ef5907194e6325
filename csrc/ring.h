/* ring.h: single-producer single-consumer lock-free ring buffer of float32 samples.
 *
 * Contract: exactly one thread writes (ring_write) and exactly one thread reads
 * (ring_read, ring_read_or_zero, ring_peek, ring_skip). Any other use is invalid.
 * The query functions (ring_available_*, counters, ring_capacity) may be called from
 * any thread; their answers are snapshots.
 *
 * After creation no call locks, allocates or makes a system call, so both sides may run
 * in a realtime audio callback. Capacity is a power of two (>= RING_MIN_CAPACITY); it is
 * never rounded silently. Every slot is usable (full and empty differ by index distance).
 *
 * Overflow policy, fixed per ring:
 *   RING_REFUSE       a write stores what fits and refuses the rest (default);
 *   RING_DROP_OLDEST  a write discards the oldest unread samples to make room.
 * overflow_count adds up the samples refused or dropped; underrun_count adds up the
 * samples a read asked for but did not get.
 */
#ifndef PERSONAPLEX_RING_H
#define PERSONAPLEX_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ring ring_t;

enum ring_policy { RING_REFUSE = 0, RING_DROP_OLDEST = 1 };

/* Negative return codes of ring_init. */
enum ring_error { RING_EINVAL = -1, RING_EALIGN = -2, RING_ESIZE = -3 };

#define RING_MIN_CAPACITY ((size_t)2)
#define RING_MAX_CAPACITY ((size_t)1 << 30) /* 4 GiB of samples */
#define RING_ALIGNMENT ((size_t)64)         /* alignment ring_init needs for its memory */

/* Bytes of memory a ring of `capacity` samples needs (header + samples), or 0 when the
 * capacity is not a power of two in [RING_MIN_CAPACITY, RING_MAX_CAPACITY]. */
size_t ring_footprint(size_t capacity);

/* Builds a ring inside caller-owned memory (RING_ALIGNMENT-aligned, >= ring_footprint
 * bytes). Returns 0, RING_EINVAL (capacity or policy), RING_EALIGN or RING_ESIZE. */
int ring_init(void *mem, size_t mem_size, size_t capacity, int policy);

/* Allocates and initialises a ring; NULL for a bad capacity/policy or no memory.
 * Release it with ring_destroy (only rings made by ring_create). */
ring_t *ring_create(size_t capacity, int policy);
void ring_destroy(ring_t *ring);

size_t ring_capacity(const ring_t *ring);
int ring_get_policy(const ring_t *ring);

/* Producer. Copies up to n samples from src; returns how many samples of src are now in
 * the ring. RING_REFUSE: min(n, free space). RING_DROP_OLDEST: min(n, capacity), the
 * newest ones; if the reader is inside a read at that very instant the part that does
 * not fit is refused instead (still counted as overflow). */
size_t ring_write(ring_t *ring, const float *src, size_t n);

/* Consumer. Copies up to n samples into dst and returns the count; the missing part
 * (n - returned) is added to underrun_count. */
size_t ring_read(ring_t *ring, float *dst, size_t n);

/* Consumer, for audio callbacks: fills all n samples of dst, with zeros after what was
 * available; returns the samples really read; the zeros count as underrun. */
size_t ring_read_or_zero(ring_t *ring, float *dst, size_t n);

/* Consumer. Copies up to n samples without consuming them. No counters change. */
size_t ring_peek(ring_t *ring, float *dst, size_t n);

/* Consumer. Discards up to n samples; returns how many. No counters change. */
size_t ring_skip(ring_t *ring, size_t n);

size_t ring_available_read(const ring_t *ring);
size_t ring_available_write(const ring_t *ring);

uint64_t ring_overflow_count(const ring_t *ring);
uint64_t ring_underrun_count(const ring_t *ring);
void ring_reset_counters(ring_t *ring);

#ifdef __cplusplus
}
#endif

#endif /* PERSONAPLEX_RING_H */
