/* C-level throughput and latency of csrc/ring.c with 1920-sample blocks (80 ms at 24 kHz).
 * usage: ring_bench [seconds_per_case]   Prints "key value" lines (bench/ring.py parses them). */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ring.h"

#define BLOCK 1920
#define CAPACITY 16384

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float src[BLOCK], dst[BLOCK];

typedef struct {
    ring_t *ring;
    long blocks;
} stream_t;

static void *producer(void *arg) {
    stream_t *s = arg;
    for (long i = 0; i < s->blocks; i++) {
        size_t off = 0;
        while (off < BLOCK) {
            size_t k = ring_write(s->ring, src + off, BLOCK - off);
            off += k;
            if (!k) sched_yield();
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 0.5;
    for (int i = 0; i < BLOCK; i++) src[i] = (float)i;
    ring_t *r = ring_create(CAPACITY, RING_REFUSE);
    if (!r) return 1;

    /* 1. push + pop pairs in one thread */
    long iters = 0;
    double t0 = now(), t1;
    do {
        for (int i = 0; i < 1000; i++) {
            ring_write(r, src, BLOCK);
            ring_read(r, dst, BLOCK);
        }
        iters += 1000;
        t1 = now();
    } while (t1 - t0 < secs);
    printf("c_push_pop_samples_per_s %.4g\n", (double)iters * BLOCK / (t1 - t0));

    /* 2. two threads streaming blocks */
    stream_t s = {r, 0};
    s.blocks = (long)(iters > 20000 ? iters / 2 : 10000);
    pthread_t tp;
    long got = 0;
    t0 = now();
    pthread_create(&tp, NULL, producer, &s);
    while (got < s.blocks * BLOCK) {
        size_t k = ring_read(r, dst, BLOCK);
        got += (long)k;
        if (!k) sched_yield();
    }
    pthread_join(tp, NULL);
    t1 = now();
    printf("c_two_thread_samples_per_s %.4g\n", (double)got / (t1 - t0));

    /* 3. per-call latency of the callback-side calls */
    enum { N = 100000 };
    double *lat = malloc(sizeof(double) * N);
    if (!lat) return 1;
    ring_reset_counters(r);
    for (int i = 0; i < N; i++) {
        ring_write(r, src, BLOCK);
        double a = now();
        ring_read_or_zero(r, dst, BLOCK);
        lat[i] = now() - a;
    }
    qsort(lat, N, sizeof(double), cmp_double);
    printf("c_read_or_zero_p50_us %.3f\nc_read_or_zero_p99_us %.3f\n", lat[N / 2] * 1e6,
           lat[N * 99 / 100] * 1e6);
    for (int i = 0; i < N; i++) {
        double a = now();
        ring_write(r, src, BLOCK);
        lat[i] = now() - a;
        ring_read(r, dst, BLOCK);
    }
    qsort(lat, N, sizeof(double), cmp_double);
    printf("c_write_p50_us %.3f\nc_write_p99_us %.3f\n", lat[N / 2] * 1e6, lat[N * 99 / 100] * 1e6);
    free(lat);
    ring_destroy(r);
    return 0;
}
