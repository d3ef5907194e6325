"""Open a native runtime library with cffi's ABI mode (nothing compiled), with an install hint."""
from __future__ import annotations

import ctypes.util

from ..errors import MissingLibraryError


def open_library(ffi, names: list[str], short_name: str, what: str, hint: str):
    """`ffi.dlopen` the first of `names` that loads (then whatever `ctypes.util.find_library(
    short_name)` finds). Raises MissingLibraryError naming `what`, the names tried and `hint`."""
    names = list(names)
    found = ctypes.util.find_library(short_name)
    if found and found not in names:
        names.append(found)
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError:
            continue
    raise MissingLibraryError(f"{what} was not found (tried {', '.join(names)}); {hint}")
