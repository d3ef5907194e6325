"""cffi API-mode build of csrc/ring.c as the extension module `engine._ring`.

Used by setup.py (`cffi_modules=["csrc/ring_build.py:ffibuilder"]`), so `pip install .` and
`pip install -e .` compile it. For a quick in-place build during development:
`python csrc/ring_build.py` (writes engine/_ring.*.so next to the sources).
cffi releases the GIL around every call into this module.
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the project root (its working directory).
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


CDEF = """
typedef struct ring ring_t;
enum ring_policy { RING_REFUSE, RING_DROP_OLDEST, ... };
enum ring_error { RING_EINVAL, RING_EALIGN, RING_ESIZE, ... };
#define RING_MIN_CAPACITY ...
#define RING_MAX_CAPACITY ...
#define RING_ALIGNMENT ...

size_t ring_footprint(size_t capacity);
int ring_init(void *mem, size_t mem_size, size_t capacity, int policy);
ring_t *ring_create(size_t capacity, int policy);
void ring_destroy(ring_t *ring);
size_t ring_capacity(const ring_t *ring);
int ring_get_policy(const ring_t *ring);

size_t ring_write(ring_t *ring, const float *src, size_t n);
size_t ring_read(ring_t *ring, float *dst, size_t n);
size_t ring_read_or_zero(ring_t *ring, float *dst, size_t n);
size_t ring_peek(ring_t *ring, float *dst, size_t n);
size_t ring_skip(ring_t *ring, size_t n);

size_t ring_available_read(const ring_t *ring);
size_t ring_available_write(const ring_t *ring);
uint64_t ring_overflow_count(const ring_t *ring);
uint64_t ring_underrun_count(const ring_t *ring);
void ring_reset_counters(ring_t *ring);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "engine._ring",
    '#include "ring.h"',
    sources=[_rel(os.path.join(_HERE, "ring.c"))],
    include_dirs=[_rel(_HERE)],
    depends=[_rel(os.path.join(_HERE, "ring.h"))],
    extra_compile_args=["-O2", "-std=c11"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=_ROOT, verbose=False)
