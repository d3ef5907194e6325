/* Two-thread stress test of csrc/ring.c, meant to run under ThreadSanitizer.
 *
 * usage: ring_stress [samples] [refuse|drop|all]   (default 100000000 all)
 *
 * The writer streams a running uint32 sequence (stored bit-for-bit in the float slots)
 * in blocks of random size; the reader consumes random-size blocks through every reader
 * call (read, read_or_zero, peek + skip) and checks the sequence:
 * - refuse: the writer retries what was refused; the reader must see 0, 1, 2, ... with
 *   nothing lost, duplicated or reordered, and the counters must match what each side saw.
 * - drop:   the writer never retries (and yields now and then) and the reader is slow now and then; the reader must
 *   see a strictly increasing sequence and received + overflow_count == sent.
 * A third thread polls the any-thread queries. Exit status 0 on success.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ring.h"

#define MAX_BLOCK 4096

#if defined(__GNUC__)
#define NO_TSAN __attribute__((no_sanitize_thread))
#else
#define NO_TSAN
#endif

typedef struct {
    ring_t *ring;
    int policy;
    uint64_t total;
    size_t max_block;   /* blocks are 1..max_block samples (<= MAX_BLOCK) */
    /* results */
    uint64_t refused;   /* writer: samples the ring did not take */
    uint64_t received;  /* reader */
    uint64_t missing;   /* reader: samples asked for but not read */
    uint64_t errors;
    _Atomic int done;   /* writer finished */
    _Atomic int stop;   /* reader finished */
} test_t;

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* The harness's own buffers are private to one thread; only ring.c's accesses (and its
 * memcpy, which TSan intercepts) matter, so these helpers are not instrumented. */
NO_TSAN static void fill(float *buf, uint32_t first, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t v = first + (uint32_t)i;
        memcpy(&buf[i], &v, sizeof v);
    }
}

NO_TSAN static uint32_t value(const float *buf, size_t i) {
    uint32_t v;
    memcpy(&v, &buf[i], sizeof v);
    return v;
}

/* Checks buf[0..n) == expect, expect+1, ...; returns the number of mismatches. */
NO_TSAN static uint64_t check_run(const float *buf, size_t n, uint32_t expect) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += value(buf, i) != expect + (uint32_t)i;
    return bad;
}

/* Checks that buf[0..n) is strictly increasing from *lowest on; updates *lowest. */
NO_TSAN static uint64_t check_increasing(const float *buf, size_t n, uint32_t *lowest) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = value(buf, i);
        bad += v < *lowest;
        *lowest = v + 1;
    }
    return bad;
}

NO_TSAN static uint64_t check_zeros(const float *buf, size_t n) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += value(buf, i) != 0;
    return bad;
}

static void *writer(void *arg) {
    test_t *t = arg;
    static _Thread_local float buf[MAX_BLOCK];
    uint64_t rng = 0x9E3779B97F4A7C15ull, sent = 0;
    while (sent < t->total) {
        size_t n = 1 + xorshift(&rng) % t->max_block;
        if (n > t->total - sent) n = (size_t)(t->total - sent);
        fill(buf, (uint32_t)sent, n);
        if (t->policy == RING_REFUSE) {
            size_t off = 0;
            while (off < n) {
                size_t k = ring_write(t->ring, buf + off, n - off);
                t->refused += (n - off) - k;
                off += k;
                if (off < n) sched_yield();
            }
        } else {
            size_t k = ring_write(t->ring, buf, n);
            t->refused += n - k;
            if (xorshift(&rng) % 4 == 0) sched_yield(); /* let reads and drops interleave */
        }
        sent += n;
    }
    atomic_store(&t->done, 1);
    return NULL;
}

static void *reader(void *arg) {
    test_t *t = arg;
    static _Thread_local float buf[MAX_BLOCK];
    uint64_t rng = 0xD1B54A32D192ED03ull;
    uint32_t expect = 0; /* next value (refuse) or lowest acceptable value (drop) */
    for (;;) {
        int finished = atomic_load(&t->done);
        size_t n = 1 + xorshift(&rng) % t->max_block;
        size_t k;
        int mode = (int)(xorshift(&rng) % 3);
        if (mode == 2) { /* peek, check, then consume */
            k = ring_peek(t->ring, buf, n);
            if (t->policy == RING_REFUSE) {
                t->errors += ring_skip(t->ring, k) != k;
            } else { /* the writer may drop between peek and read: consume with a read */
                uint32_t lowest = expect;
                t->errors += check_increasing(buf, k, &lowest);
                mode = 0;
            }
        }
        if (mode == 0) {
            k = ring_read(t->ring, buf, n);
            t->missing += n - k;
        } else if (mode == 1) {
            k = ring_read_or_zero(t->ring, buf, n);
            t->missing += n - k;
            t->errors += check_zeros(buf + k, n - k);
        }
        if (t->policy == RING_REFUSE) {
            t->errors += check_run(buf, k, expect);
            expect += (uint32_t)k;
        } else {
            t->errors += check_increasing(buf, k, &expect);
        }
        t->received += k;
        if (k == 0) {
            if (finished && ring_available_read(t->ring) == 0) break;
            sched_yield();
        } else if (t->policy == RING_DROP_OLDEST && xorshift(&rng) % 4 == 0) {
            sched_yield(); /* be slow now and then so the writer has to drop */
        }
    }
    atomic_store(&t->stop, 1);
    return NULL;
}

static void *observer(void *arg) {
    test_t *t = arg;
    uint64_t bad = 0, last_over = 0, last_under = 0;
    size_t cap = ring_capacity(t->ring);
    while (!atomic_load(&t->stop)) {
        size_t r = ring_available_read(t->ring), w = ring_available_write(t->ring);
        bad += r > cap || w > cap;
        uint64_t o = ring_overflow_count(t->ring), u = ring_underrun_count(t->ring);
        bad += o < last_over || u < last_under; /* counters never go backwards */
        last_over = o;
        last_under = u;
        sched_yield();
    }
    t->errors += bad;
    return NULL;
}

static int run(int policy, uint64_t total, size_t capacity, size_t max_block) {
    test_t t;
    memset(&t, 0, sizeof t);
    t.ring = ring_create(capacity, policy);
    t.policy = policy;
    t.total = total;
    t.max_block = max_block;
    if (!t.ring) {
        fprintf(stderr, "ring_create failed\n");
        return 1;
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t tw, tr, to;
    pthread_create(&to, NULL, observer, &t);
    pthread_create(&tr, NULL, reader, &t);
    pthread_create(&tw, NULL, writer, &t);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    pthread_join(to, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);

    uint64_t over = ring_overflow_count(t.ring), under = ring_underrun_count(t.ring);
    int ok = t.errors == 0 && under == t.missing;
    if (policy == RING_REFUSE) /* every refusal was retried */
        ok = ok && over == t.refused && t.received == total;
    else /* overflow = refused part of writes + oldest samples dropped */
        ok = ok && over >= t.refused && t.received + over == total && t.received > 0;
    const char *name = policy == RING_REFUSE ? "refuse" : "drop_oldest";
    printf("ring_stress %-11s capacity %-6zu sent %llu received %llu overflow %llu (refused %llu) "
           "underrun %llu errors %llu  %.2f s  %s\n",
           name, capacity, (unsigned long long)total, (unsigned long long)t.received,
           (unsigned long long)over, (unsigned long long)t.refused, (unsigned long long)under, (unsigned long long)t.errors,
           secs, ok ? "OK" : "FAILED");
    ring_destroy(t.ring);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    uint64_t total = argc > 1 ? strtoull(argv[1], NULL, 10) : 100000000ull;
    const char *which = argc > 2 ? argv[2] : "all";
    if (total == 0 || total > UINT32_MAX) {
        fprintf(stderr, "samples must be in 1..%u\n", UINT32_MAX);
        return 2;
    }
    int fail = 0;
    if (!strcmp(which, "refuse") || !strcmp(which, "all")) fail |= run(RING_REFUSE, total, 8192, MAX_BLOCK);
    if (!strcmp(which, "drop") || !strcmp(which, "all"))
        fail |= run(RING_DROP_OLDEST, total / 4 > 0 ? total / 4 : total, 512, 640);
    return fail;
}
