"""RingBuffer (engine/audio/ring.py over csrc/ring.c): semantics, counters, errors, threads."""
from __future__ import annotations

import array
import os
import shutil
import subprocess
import sys
import threading
import time

import engine  # noqa: F401  (loads OpenBLAS before anything imports mlx)
import numpy as np
import pytest

from engine.audio import ring as ring_mod
from engine.audio.ring import RingBuffer
from engine.errors import EngineError, MissingLibraryError, RingBufferError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_MOD = 1 << 24  # float32 holds every integer below 2**24 exactly


def seq(start, n):
    return (np.arange(start, start + n, dtype=np.int64) % SEQ_MOD).astype(np.float32)


# ---------------------------------------------------------------- single thread
def test_write_read_roundtrip_and_levels():
    r = RingBuffer(16)
    assert (r.capacity, r.policy, r.available_read, r.available_write) == (16, "refuse", 0, 16)
    assert r.write(seq(0, 10)) == 10
    assert (r.available_read, r.available_write) == (10, 6)
    np.testing.assert_array_equal(r.read(4), seq(0, 4))
    np.testing.assert_array_equal(r.read(6), seq(4, 6))
    assert r.available_read == 0 and r.overflow_count == 0 and r.underrun_count == 0


def test_wrap_around_every_offset():
    # Write/read 5 samples at a time through a ring of 8, so the copy splits at every offset.
    r = RingBuffer(8)
    start = 0
    for _ in range(40):
        assert r.write(seq(start, 5)) == 5
        np.testing.assert_array_equal(r.peek(5), seq(start, 5))
        np.testing.assert_array_equal(r.read(5), seq(start, 5))
        start += 5
    # a full ring whose contents wrap around
    r.write(seq(0, 3)), r.read(3)
    assert r.write(seq(100, 8)) == 8 and r.available_write == 0
    np.testing.assert_array_equal(r.read(8), seq(100, 8))
    assert r.overflow_count == 0 and r.underrun_count == 0


def test_partial_write_refuse_counts_overflow():
    r = RingBuffer(8)
    assert r.write(seq(0, 6)) == 6
    assert r.write(seq(6, 5)) == 2  # only 2 fit
    assert r.overflow_count == 3
    assert r.write(seq(50, 4)) == 0
    assert r.overflow_count == 7
    np.testing.assert_array_equal(r.read(8), seq(0, 8))  # old contents kept, in order
    assert r.write(seq(0, 20)) == 8 and r.overflow_count == 19


def test_partial_read_counts_underrun():
    r = RingBuffer(8)
    r.write(seq(0, 3))
    out = r.read(5)
    np.testing.assert_array_equal(out, seq(0, 3))
    assert out.dtype == np.float32 and r.underrun_count == 2
    assert r.read(4).size == 0 and r.underrun_count == 6
    buf = np.full(10, -1, np.float32)
    r.write(seq(7, 2))
    assert r.read_into(buf) == 2 and r.underrun_count == 14
    np.testing.assert_array_equal(buf[:2], seq(7, 2))
    assert (buf[2:] == -1).all()  # read_into leaves the rest alone
    r.write(seq(0, 6))
    assert r.read_into(buf, 4) == 4 and r.available_read == 2
    r.reset_counters()
    assert r.underrun_count == 0 and r.overflow_count == 0


def test_drop_oldest_keeps_newest_and_counts():
    r = RingBuffer(8, policy="drop_oldest")
    assert r.write(seq(0, 6)) == 6
    assert r.write(seq(6, 5)) == 5  # drops 0, 1, 2
    assert r.overflow_count == 3 and r.available_read == 8
    np.testing.assert_array_equal(r.read(8), seq(3, 8))
    assert r.write(seq(100, 20)) == 8  # longer than the ring: the newest 8 stay
    assert r.overflow_count == 3 + 12
    np.testing.assert_array_equal(r.read(8), seq(112, 8))
    # a partially read ring across the wrap point
    r.write(seq(0, 5)), r.read(2)
    r.write(seq(5, 7))  # holds 2..11 minus what does not fit: keeps 4..11
    np.testing.assert_array_equal(r.read(8), seq(4, 8))
    assert r.underrun_count == 0


def test_read_exact_or_zero_fills_with_zeros():
    r = RingBuffer(16)
    out = np.full(6, np.nan, np.float32)
    r.write(seq(1, 4))
    assert r.read_exact_or_zero(out) == 4
    np.testing.assert_array_equal(out, np.r_[seq(1, 4), 0, 0].astype(np.float32))
    assert r.underrun_count == 2
    # the same buffer again (cached pointer) sees new data
    r.write(seq(20, 10))
    assert r.read_exact_or_zero(out) == 6
    np.testing.assert_array_equal(out, seq(20, 6))
    assert r.read_exact_or_zero(out) == 4 and r.underrun_count == 4
    np.testing.assert_array_equal(out, np.r_[seq(26, 4), 0, 0].astype(np.float32))
    # another buffer, then the first again
    other = np.empty(3, np.float32)
    assert r.read_exact_or_zero(other) == 0 and (other == 0).all()
    r.write(seq(5, 6))
    assert r.read_exact_or_zero(out) == 6
    np.testing.assert_array_equal(out, seq(5, 6))
    # a bytearray, as a PortAudio callback might hand over
    ba = bytearray(16)
    r.write(seq(9, 3))
    assert r.read_exact_or_zero(ba) == 3
    np.testing.assert_array_equal(np.frombuffer(ba, np.float32), np.r_[seq(9, 3), 0])


def test_peek_and_skip_do_not_count():
    r = RingBuffer(8)
    r.write(seq(0, 5))
    np.testing.assert_array_equal(r.peek(3), seq(0, 3))
    np.testing.assert_array_equal(r.peek(10), seq(0, 5))
    assert r.available_read == 5 and r.underrun_count == 0
    assert r.skip(2) == 2
    np.testing.assert_array_equal(r.read(1), seq(2, 1))
    assert r.clear() == 2 and r.available_read == 0 and r.skip(4) == 0
    assert r.underrun_count == 0


def test_bytes_and_multichannel_blocks():
    r = RingBuffer(32)
    assert r.write(seq(0, 4).tobytes()) == 4  # PyAudio hands float32 audio as bytes
    assert r.write(memoryview(seq(4, 2).tobytes())) == 2
    assert r.write(array.array("f", seq(6, 2))) == 2
    stereo = seq(8, 8).reshape(4, 2)  # interleaved frames, C order
    assert r.write(stereo) == 8
    out = np.empty((8, 2), np.float32)
    assert r.read_into(out) == 16
    np.testing.assert_array_equal(out.ravel(), seq(0, 16))
    assert r.write(np.empty(0, np.float32)) == 0 and r.overflow_count == 0


def test_empty_reads():
    r = RingBuffer(4)
    assert r.read(0).size == 0 and r.peek(0).size == 0 and r.underrun_count == 0


def test_c_ring_in_caller_memory():
    from engine import _ring

    lib, ffi = _ring.lib, _ring.ffi
    fp = lib.ring_footprint(8)
    assert fp >= 8 * 4 and fp % lib.RING_ALIGNMENT == 0
    assert [lib.ring_footprint(c) for c in (0, 1, 6, 2 * lib.RING_MAX_CAPACITY)] == [0, 0, 0, 0]
    mem = ffi.new("char[]", fp + 64)
    aligned = mem + (-int(ffi.cast("uintptr_t", mem)) % 64)
    assert lib.ring_init(aligned + 4, fp, 8, lib.RING_REFUSE) == lib.RING_EALIGN
    assert lib.ring_init(aligned, fp - 1, 8, lib.RING_REFUSE) == lib.RING_ESIZE
    assert lib.ring_init(aligned, fp, 6, lib.RING_REFUSE) == lib.RING_EINVAL
    assert lib.ring_init(aligned, fp, 8, 7) == lib.RING_EINVAL
    assert lib.ring_init(aligned, fp, 8, lib.RING_DROP_OLDEST) == 0
    ring = ffi.cast("ring_t *", aligned)
    assert lib.ring_capacity(ring) == 8 and lib.ring_get_policy(ring) == lib.RING_DROP_OLDEST
    src = seq(0, 10)
    assert lib.ring_write(ring, ffi.from_buffer("float[]", src), 10) == 8
    dst = np.empty(8, np.float32)
    assert lib.ring_read(ring, ffi.from_buffer("float[]", dst), 8) == 8
    np.testing.assert_array_equal(dst, seq(2, 8))
    assert lib.ring_create(6, lib.RING_REFUSE) == ffi.NULL
    assert lib.ring_create(8, 2) == ffi.NULL


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 1000, -8, 1 << 31, 4.0, True, "8", None])
def test_bad_capacity(capacity):
    with pytest.raises(RingBufferError, match="capacity"):
        RingBuffer(capacity)


def test_capacity_message_suggests_power_of_two():
    with pytest.raises(RingBufferError, match="got 1000; the next power of two is 1024"):
        RingBuffer(1000)
    assert RingBuffer(np.int64(4)).capacity == 4 and RingBuffer(2).capacity == 2


def test_bad_policy():
    with pytest.raises(RingBufferError, match="policy.*'oldest'"):
        RingBuffer(8, policy="oldest")


def test_bad_blocks():
    r = RingBuffer(8)
    with pytest.raises(RingBufferError, match="float32, got dtype float64"):
        r.write(np.zeros(4))
    with pytest.raises(RingBufferError, match="float32, got dtype int16"):
        r.write(np.zeros(4, np.int16))
    with pytest.raises(RingBufferError, match="C-contiguous"):
        r.write(np.zeros(8, np.float32)[::2])
    with pytest.raises(RingBufferError, match="C-contiguous"):
        r.write(np.zeros((4, 2), np.float32).T)
    with pytest.raises(RingBufferError, match="not a whole number of float32"):
        r.write(b"\x00" * 6)
    with pytest.raises(RingBufferError, match="got list"):
        r.write([0.0, 1.0])
    with pytest.raises(RingBufferError, match="format 'd'"):
        r.write(array.array("d", [1.0]))
    assert r.available_read == 0 and r.overflow_count == 0  # nothing half-done


def test_bad_outputs():
    r = RingBuffer(8)
    r.write(seq(0, 4))
    with pytest.raises(RingBufferError, match="holds 3 samples, too small to read 4"):
        r.read_into(np.empty(3, np.float32), 4)
    with pytest.raises(RingBufferError, match="float32, got dtype float64"):
        r.read_into(np.empty(4))
    with pytest.raises(RingBufferError, match="C-contiguous"):
        r.read_into(np.empty(8, np.float32)[::2])
    ro = np.empty(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(RingBufferError, match="read-only"):
        r.read_into(ro)
    with pytest.raises(RingBufferError, match="read-only"):
        r.read_exact_or_zero(bytes(16))
    with pytest.raises(RingBufferError, match="float32, got dtype int32"):
        r.read_exact_or_zero(np.empty(4, np.int32))
    for bad in (-1, 2.0, True, None):
        with pytest.raises(RingBufferError, match="non-negative int"):
            r.read(bad)
    with pytest.raises(RingBufferError, match="non-negative int"):
        r.skip(-3)
    assert r.available_read == 4 and r.underrun_count == 0


def test_missing_extension_raises_clear_error(monkeypatch):
    monkeypatch.setattr(ring_mod, "_lib", None)
    monkeypatch.setitem(sys.modules, "engine._ring", None)  # makes the import fail
    monkeypatch.delattr(engine, "_ring", raising=False)
    with pytest.raises(MissingLibraryError, match=r"pip install -e \.") as info:
        RingBuffer(8)
    assert isinstance(info.value, EngineError)


# ---------------------------------------------------------------- threads
def _stream(r, total, rng_seed, retry):
    """Writer thread + reader in this thread, random block sizes; returns what was read."""
    errors = []
    sent = [0]

    def writer():
        rng = np.random.default_rng(rng_seed)
        pos = 0
        try:
            while pos < total:
                n = min(int(rng.integers(1, 3000)), total - pos)
                block = seq(pos, n)
                if retry:
                    off = 0
                    while off < n:
                        off += r.write(block[off:])
                else:
                    r.write(block)
                pos += n
        except Exception as exc:  # surfaced by the main thread
            errors.append(exc)
        sent[0] = pos

    t = threading.Thread(target=writer)
    rng = np.random.default_rng(rng_seed + 1)
    buf = np.empty(4096, np.float32)
    chunks = []
    t.start()
    while True:
        alive = t.is_alive()
        n = int(rng.integers(1, 4096))
        k = r.read_into(buf, n) if rng.integers(2) else r.read_exact_or_zero(buf[:n])
        if k:
            chunks.append(buf[:k].copy())
        elif not alive and r.available_read == 0:
            break
    t.join()
    assert not errors, errors
    return np.concatenate(chunks) if chunks else np.empty(0, np.float32), sent[0]


def test_two_threads_refuse_streams_1e7_samples_in_order():
    total = 10_000_000
    r = RingBuffer(1 << 14)
    got, sent = _stream(r, total, rng_seed=1, retry=True)
    assert sent == total and got.size == total
    # nothing lost, duplicated or reordered
    np.testing.assert_array_equal(got, seq(0, total))


def test_two_threads_drop_oldest_never_reorders():
    total = 2_000_000
    r = RingBuffer(1 << 11, policy="drop_oldest")
    got, sent = _stream(r, total, rng_seed=7, retry=False)
    assert sent == total
    assert got.size + r.overflow_count == total  # every sample either read or counted
    assert got.size >= r.capacity and r.overflow_count > 0
    values = got.astype(np.int64)  # below 2**24: exact
    assert (np.diff(values) > 0).all()  # strictly increasing: no duplicate, no reordering
    assert values[-1] == total - 1  # the newest sample always survives


def test_c_calls_release_the_gil():
    # A Python thread must run while a long copy is inside C (cffi drops the GIL). With a long
    # switch interval, the ticker (which sleeps between ticks, so the main thread gets the GIL
    # back at once) can run inside a call only if the call released the GIL. Checked with
    # ctypes: a GIL-holding libc usleep gives 0 ticks here, a GIL-releasing one ~20 per 5 ms.
    n = 1 << 22  # 16 MB per copy
    r = RingBuffer(n)
    block = np.ones(n, np.float32)
    out = np.empty(n, np.float32)
    ticks, windows, stop = [], [], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    t = threading.Thread(target=ticker)
    t.start()
    try:
        for _ in range(10):
            a = time.perf_counter()
            r.write(block)
            b = time.perf_counter()
            r.read_into(out)
            windows += [(a, b), (b, time.perf_counter())]
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    ticks = np.asarray(ticks)
    inside = sum(int(((ticks > a) & (ticks < b)).sum()) for a, b in windows)
    assert inside > 0, "no Python bytecode ran during any C copy: the GIL was held"
    assert r.available_read == 0 and out[0] == 1


# ---------------------------------------------------------------- C stress test
def _make(target, samples):
    if shutil.which(os.environ.get("CC", "cc")) is None or shutil.which("make") is None:
        pytest.skip("needs make and a C compiler")
    return subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "csrc", "tests"), target,
                           f"SAMPLES={samples}"], capture_output=True, text=True, timeout=600)


def test_c_stress_small():
    res = _make("test", 2_000_000)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" OK") == 2


@pytest.mark.slow
def test_c_stress_tsan_1e8():
    res = _make("tsan", 100_000_000)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ThreadSanitizer" not in res.stderr and res.stdout.count(" OK") == 2
