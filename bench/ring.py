"""Ring buffer benchmark: push+pop throughput of 1920-sample float32 blocks and per-call
latency, for engine.audio.ring.RingBuffer and, in the same run, queue.Queue and
collections.deque of numpy blocks; plus the C library alone (csrc/tests/ring_bench.c).

    python bench/ring.py [--seconds 1.0] [--no-write] [--output docs/performance.md]

Writes a "Ring buffer" section between <!-- ring:begin --> and <!-- ring:end --> in
docs/performance.md (the file is created if missing) with the machine, date and command.
Targets (issue 2): >= 1e9 samples/s for the ring, callback-side call < 20 us p99.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import engine  # noqa: E402,F401  (OpenBLAS before mlx; none is used here)
import numpy as np  # noqa: E402

from engine.audio.ring import RingBuffer  # noqa: E402

BLOCK = 1920
BEGIN, END = "<!-- ring:begin -->", "<!-- ring:end -->"


def _pairs_throughput(push, pop, seconds):
    """Samples/s of alternating push/pop calls, measured in batches of 200 pairs."""
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(200):
            push()
            pop()
        n += 200
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * BLOCK / dt


def _latency(push, pop, count):
    """p50/p99 in microseconds of each push and each pop call, timed one by one."""
    clock = time.perf_counter_ns
    tp = np.empty(count, np.int64)
    tq = np.empty(count, np.int64)
    for i in range(count):
        a = clock()
        push()
        b = clock()
        pop()
        c = clock()
        tp[i], tq[i] = b - a, c - b
    p = lambda t: tuple(float(x) / 1e3 for x in np.percentile(t, [50, 99]))  # noqa: E731
    return p(tp), p(tq)


def bench_python(seconds, count):
    block = np.random.default_rng(0).standard_normal(BLOCK).astype(np.float32)
    out = np.empty(BLOCK, np.float32)
    rows = []

    ring = RingBuffer(1 << 14)
    push = lambda: ring.write(block)  # noqa: E731
    pop = lambda: ring.read_exact_or_zero(out)  # noqa: E731
    thr = _pairs_throughput(push, pop, seconds)
    (w50, w99), (r50, r99) = _latency(push, pop, count)
    assert ring.underrun_count == 0 and ring.overflow_count == 0
    np.testing.assert_array_equal(out, block)
    rows.append(("RingBuffer (cffi): write / read_exact_or_zero", thr, w50, w99, r50, r99))

    q = queue.Queue()
    push = lambda: q.put(block)  # noqa: E731
    pop = lambda: q.get()  # noqa: E731
    thr = _pairs_throughput(push, pop, seconds)
    (w50, w99), (r50, r99) = _latency(push, pop, count)
    rows.append(("queue.Queue of numpy blocks: put / get", thr, w50, w99, r50, r99))

    d = collections.deque()
    push = lambda: d.append(block)  # noqa: E731
    pop = lambda: d.popleft()  # noqa: E731
    thr = _pairs_throughput(push, pop, seconds)
    (w50, w99), (r50, r99) = _latency(push, pop, count)
    rows.append(("collections.deque of numpy blocks: append / popleft", thr, w50, w99, r50, r99))
    return rows


def bench_c(seconds):
    """Runs csrc/tests/ring_bench (built with make); returns its numbers or None."""
    try:
        res = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "csrc", "tests"), "build/ring_bench"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode:
            print(f"[bench] C benchmark not built: {res.stderr.strip()}", file=sys.stderr)
            return None
        res = subprocess.run([os.path.join(ROOT, "csrc", "tests", "build", "ring_bench"), str(seconds)],
                             capture_output=True, text=True, timeout=300, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"[bench] C benchmark skipped: {exc}", file=sys.stderr)
        return None
    return {k: float(v) for k, v in (line.split() for line in res.stdout.splitlines() if line.strip())}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                cpu = m.group(1).strip()
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def render(rows, c, seconds, count, command) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        BEGIN,
        "## Ring buffer",
        "",
        f"Machine: {machine()}. Date: {date}. Command: `{command}`.",
        f"Blocks of {BLOCK} float32 samples (80 ms at 24 kHz). Throughput: alternating push and pop "
        f"in one thread for {seconds:g} s. Latency: {count} calls timed one by one (perf_counter_ns, "
        "which adds ~0.1 us). The Queue and deque pass the block by reference (no copy); the ring "
        "copies it in and out.",
        "",
        "| implementation: push / pop | push+pop samples/s | push p50 / p99 (us) | pop p50 / p99 (us) |",
        "|---|---:|---:|---:|",
    ]
    for name, thr, w50, w99, r50, r99 in rows:
        lines.append(f"| {name} | {thr:.3g} | {w50:.2f} / {w99:.2f} | {r50:.2f} / {r99:.2f} |")
    if c:
        lines.append(f"| csrc/ring.c alone (C, one thread): ring_write / ring_read_or_zero | "
                     f"{c['c_push_pop_samples_per_s']:.3g} | {c['c_write_p50_us']:.2f} / {c['c_write_p99_us']:.2f} | "
                     f"{c['c_read_or_zero_p50_us']:.2f} / {c['c_read_or_zero_p99_us']:.2f} |")
        lines.append(f"| csrc/ring.c alone (C, writer and reader threads) | "
                     f"{c['c_two_thread_samples_per_s']:.3g} | | |")
    ring = rows[0]
    lines += [
        "",
        f"Targets (issue 2): ring >= 1e9 samples/s: {ring[1]:.3g} through Python"
        + (f", {c['c_push_pop_samples_per_s']:.3g} in C" if c else "")
        + f"; callback-side call < 20 us p99: read_exact_or_zero {ring[5]:.2f} us, write {ring[3]:.2f} us.",
        END,
    ]
    return "\n".join(lines) + "\n"


def update(path, section) -> None:
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        if text[stop:stop + 1] == "\n":
            stop += 1
        text = text[:start] + section + text[stop:]
    else:
        if not text:
            text = "# Performance\n\nMeasured numbers; each section says its machine, date and command.\n"
        text = text.rstrip("\n") + "\n\n" + section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per throughput case")
    ap.add_argument("--calls", type=int, default=20000, help="calls per latency case")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs", "performance.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.calls < 100:
        ap.error("--seconds must be > 0 and --calls >= 100")
    rows = bench_python(args.seconds, args.calls)
    c = bench_c(args.seconds)
    command = "python bench/ring.py" + ("".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:])))
    section = render(rows, c, args.seconds, args.calls, command)
    print(section)
    if not args.no_write:
        update(args.output, section)
        print(f"[bench] wrote {os.path.relpath(args.output, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
