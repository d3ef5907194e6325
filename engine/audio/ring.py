"""RingBuffer: a single-producer single-consumer lock-free ring of float32 samples.

A thin wrapper over csrc/ring.c (the cffi extension `engine._ring`). Samples move between
numpy arrays (or bytes-like buffers of native float32) and the ring with the ring's own
memcpy only; cffi releases the GIL during every C call.

Threads: one thread calls `write`; one thread calls the reader methods (`read`, `read_into`,
`read_exact_or_zero`, `peek`, `skip`). `available_read`, `available_write`, the counters and
`reset_counters` may be called from any thread.

Realtime use: `write(block)` in a capture callback and `read_exact_or_zero(out)` in a
playback callback are each a single call into C that never blocks, allocates or locks.
`read_exact_or_zero` remembers the last `out` it was given, so a callback that reuses one
preallocated buffer pays for the buffer checks once.
"""
from __future__ import annotations

import numpy as _np

from ..errors import MissingLibraryError as _MissingLibraryError
from ..errors import RingBufferError as _RingBufferError

__all__ = ["RingBuffer", "POLICIES"]

#: Overflow policies: "refuse" keeps what is in the ring and refuses new samples that do not
#: fit; "drop_oldest" discards the oldest unread samples to make room for new ones.
POLICIES = ("refuse", "drop_oldest")

_F32 = _np.dtype(_np.float32)
_lib = None
_ffi = None


def _load():
    global _lib, _ffi
    if _lib is None:
        try:
            from .. import _ring
        except ImportError as exc:
            raise _MissingLibraryError(
                "The ring buffer's C extension engine._ring is not built "
                f"({exc}). Run `pip install -e .` in the repository (or `bash scripts/setup.sh`); "
                "for a quick in-place build: `python csrc/ring_build.py`.") from exc
        _lib, _ffi = _ring.lib, _ring.ffi
    return _lib, _ffi


def _policy_code(policy, lib) -> int:
    if policy == "refuse":
        return lib.RING_REFUSE
    if policy == "drop_oldest":
        return lib.RING_DROP_OLDEST
    raise _RingBufferError(f"policy must be one of {POLICIES}, got {policy!r}")


class RingBuffer:
    """SPSC float32 ring buffer.

    Args:
        capacity: number of samples, a power of two >= 2 (never rounded).
        policy: "refuse" (default) or "drop_oldest"; what a write does when the ring is full.

    Raises:
        RingBufferError: bad capacity or policy.
        MissingLibraryError: the C extension is not built (run `pip install -e .`).
    """

    __slots__ = ("_lib", "_ffi", "_ring", "_capacity", "_policy",
                 "_out_obj", "_out_ptr", "_out_n", "__weakref__")

    def __init__(self, capacity: int, policy: str = "refuse"):
        lib, ffi = _load()
        if isinstance(capacity, bool) or not isinstance(capacity, (int, _np.integer)):
            raise _RingBufferError(f"capacity must be an int (samples), got {capacity!r}")
        capacity = int(capacity)
        lo, hi = int(lib.RING_MIN_CAPACITY), int(lib.RING_MAX_CAPACITY)
        if capacity < lo or capacity > hi or capacity & (capacity - 1):
            hint = ""
            if lo <= capacity <= hi:
                hint = f"; the next power of two is {1 << (capacity - 1).bit_length()}"
            raise _RingBufferError(
                f"capacity must be a power of two between {lo} and {hi} samples, "
                f"got {capacity}{hint}")
        code = _policy_code(policy, lib)
        ptr = lib.ring_create(capacity, code)
        if ptr == ffi.NULL:
            raise MemoryError(f"could not allocate a ring of {capacity} samples")
        self._lib, self._ffi = lib, ffi
        self._ring = ffi.gc(ptr, lib.ring_destroy, size=int(lib.ring_footprint(capacity)))
        self._capacity, self._policy = capacity, policy
        self._out_obj = None
        self._out_ptr = ffi.NULL
        self._out_n = 0

    # ----- buffers -----
    def _src(self, block):
        """(cdata float*, samples) for a block to write, without copying."""
        if isinstance(block, _np.ndarray):
            if block.dtype != _F32:
                raise _RingBufferError(
                    f"block must be float32, got dtype {block.dtype} (use .astype(np.float32))")
            if not block.flags.c_contiguous:
                raise _RingBufferError(
                    f"block must be C-contiguous, got strides {block.strides} for shape "
                    f"{block.shape} (use np.ascontiguousarray)")
            return self._ffi.from_buffer("float[]", block), block.size
        return self._bytes_like(block, writable=False, what="block")

    def _dst(self, out, n, what="out"):
        """(cdata float*, samples) for an output array, checked to hold n samples."""
        if isinstance(out, _np.ndarray):
            if out.dtype != _F32:
                raise _RingBufferError(f"{what} must be float32, got dtype {out.dtype}")
            if not out.flags.c_contiguous:
                raise _RingBufferError(
                    f"{what} must be C-contiguous, got strides {out.strides} for shape {out.shape}")
            if not out.flags.writeable:
                raise _RingBufferError(f"{what} is read-only")
            size = out.size
            ptr = self._ffi.from_buffer("float[]", out, require_writable=True)
        else:
            ptr, size = self._bytes_like(out, writable=True, what=what)
        if n is None:
            n = size
        else:
            n = self._count(n)
            if n > size:
                raise _RingBufferError(f"{what} holds {size} samples, too small to read {n}")
        return ptr, n

    def _bytes_like(self, obj, writable, what):
        try:
            view = memoryview(obj)
        except TypeError:
            raise _RingBufferError(
                f"{what} must be a float32 numpy array or a bytes-like buffer of float32, "
                f"got {type(obj).__name__}") from None
        with view:
            if view.format not in ("B", "b", "c", "f") or (view.format == "f" and view.itemsize != 4):
                raise _RingBufferError(
                    f"{what} buffer must hold float32 (format 'f') or raw bytes, got format {view.format!r}")
            if not view.c_contiguous:
                raise _RingBufferError(f"{what} buffer must be C-contiguous")
            if writable and view.readonly:
                raise _RingBufferError(f"{what} buffer is read-only")
            if view.nbytes % 4:
                raise _RingBufferError(
                    f"{what} buffer has {view.nbytes} bytes, not a whole number of float32 samples")
            nbytes = view.nbytes
        ptr = self._ffi.from_buffer("float[]", obj, require_writable=writable)
        return ptr, nbytes // 4

    @staticmethod
    def _count(n) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, _np.integer)) or n < 0:
            raise _RingBufferError(f"sample count must be a non-negative int, got {n!r}")
        return int(n)

    # ----- writer -----
    def write(self, block) -> int:
        """Copies a float32 block (numpy array of any shape, C-contiguous, or a bytes-like
        buffer of native float32) into the ring. Returns the samples of `block` now stored:
        with "refuse" what fit (the rest is counted in overflow_count), with "drop_oldest"
        all of them (at most `capacity`, the newest), the dropped oldest samples counted."""
        ptr, n = self._src(block)
        return self._lib.ring_write(self._ring, ptr, n)

    # ----- reader -----
    def read(self, n: int) -> _np.ndarray:
        """Returns up to n samples (float32, 1-D); what is missing counts as underrun."""
        out = _np.empty(self._count(n), _F32)
        k = self._lib.ring_read(self._ring, self._ffi.from_buffer("float[]", out), out.size)
        return out if k == out.size else out[:k]

    def read_into(self, out, n: int | None = None) -> int:
        """Reads up to n samples (default: out's size) into the start of `out` (float32,
        C-contiguous, writable); returns the count. The missing part counts as underrun."""
        ptr, n = self._dst(out, n)
        return self._lib.ring_read(self._ring, ptr, n)

    def read_exact_or_zero(self, out) -> int:
        """Fills all of `out`: the available samples, then zeros (counted as underrun).
        Returns the samples really read. Meant for the playback callback: one C call."""
        if out is not self._out_obj:
            ptr, n = self._dst(out, None)
            self._out_obj, self._out_ptr, self._out_n = out, ptr, n
        return self._lib.ring_read_or_zero(self._ring, self._out_ptr, self._out_n)

    def peek(self, n: int) -> _np.ndarray:
        """Returns a copy of up to n of the oldest samples without consuming them."""
        out = _np.empty(self._count(n), _F32)
        k = self._lib.ring_peek(self._ring, self._ffi.from_buffer("float[]", out), out.size)
        return out if k == out.size else out[:k]

    def skip(self, n: int) -> int:
        """Discards up to n of the oldest samples; returns how many."""
        return self._lib.ring_skip(self._ring, self._count(n))

    def clear(self) -> int:
        """Reader side: discards everything available now; returns how many samples."""
        return self._lib.ring_skip(self._ring, self._capacity)

    # ----- any thread -----
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def available_read(self) -> int:
        return self._lib.ring_available_read(self._ring)

    @property
    def available_write(self) -> int:
        return self._lib.ring_available_write(self._ring)

    @property
    def overflow_count(self) -> int:
        """Samples refused ("refuse") or dropped ("drop_oldest") since the last reset."""
        return self._lib.ring_overflow_count(self._ring)

    @property
    def underrun_count(self) -> int:
        """Samples the reader asked for but did not get since the last reset."""
        return self._lib.ring_underrun_count(self._ring)

    def reset_counters(self) -> None:
        self._lib.ring_reset_counters(self._ring)

    def __repr__(self) -> str:
        return (f"RingBuffer(capacity={self._capacity}, policy={self._policy!r}, "
                f"available={self.available_read}, overflow={self.overflow_count}, "
                f"underrun={self.underrun_count})")
