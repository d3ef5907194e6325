"""Read and write torch `.pt` checkpoints (zip + pickle) without importing torch.

The released PersonaPlex voices (`voices/NATF2.pt`, ...) are `torch.save` dicts of tensors. Unpickling
them with plain `pickle` would run whatever the file names; here a restricted unpickler accepts only
the globals a tensor checkpoint needs (`torch._utils._rebuild_tensor_v2`, the typed storage classes,
`collections.OrderedDict`) and rebuilds each tensor as a numpy array from its raw storage bytes.
Anything else raises `CorruptCheckpoint`.

Format (torch >= 1.6, "zipfile serialization"): an uncompressed zip whose entries share one prefix
directory: `<prefix>/data.pkl` (pickle protocol 2), `<prefix>/data/<key>` (raw little-endian storage
bytes, 64-byte aligned), `<prefix>/byteorder`, `<prefix>/version`. In the pickle, a tensor is
`_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` where `storage` is a
persistent id `("storage", <torch.XStorage>, key, location, numel)`.

`save()` writes the same format (used for the tiny model's voices and the tests); torch.load reads it.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import CorruptCheckpoint

__all__ = ["load", "save", "BFloat16", "bf16_to_float32", "float32_to_bf16"]

# torch legacy typed-storage class name -> numpy dtype of one element (bf16 kept as raw uint16 bits).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_DTYPE_STORAGES = {
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("<i2"): "ShortStorage",
    np.dtype("i1"): "CharStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
}
_ALIGN = 64
_MAX_DIMS = 16


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN (as torch does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


class BFloat16:
    """Marks an array to be written as a bfloat16 tensor by `save` (values rounded from float32)."""

    def __init__(self, values: np.ndarray):
        self.bits = float32_to_bf16(np.asarray(values, dtype=np.float32))
        self.shape = self.bits.shape


class _Storage:
    __slots__ = ("array", "bf16")

    def __init__(self, array: np.ndarray, bf16: bool):
        self.array, self.bf16 = array, bf16


class _StorageType:
    """Stand-in for a `torch.XStorage` class named in a persistent id."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _corrupt(path, why: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"{path}: not a readable torch tensor checkpoint ({why}). Re-download the file, or delete it "
        "so it is fetched again.")


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path, bf16: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._path, self._bf16 = archive, prefix, path, bf16
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise _corrupt(self._path, f"it references {module}.{name}, which a tensor checkpoint never "
                                   "needs; refusing to load it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise _corrupt(self._path, f"unexpected persistent id {pid!r}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise _corrupt(self._path, f"storage record {name!r} is missing") from None
        need = numel * stype.dtype.itemsize
        if info.file_size != need:
            raise _corrupt(self._path, f"storage {key} holds {info.file_size} bytes, expected {need}")
        raw = self._zip.read(info)
        arr = np.frombuffer(raw, dtype=stype.dtype, count=numel)
        storage = _Storage(arr, stype.name == "BFloat16Storage")
        self._storages[key] = storage
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise _corrupt(self._path, "a tensor is not backed by a storage record")
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and len(size) <= _MAX_DIMS
                and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
            raise _corrupt(self._path, f"bad tensor geometry offset={offset!r} size={size!r} stride={stride!r}")
        n = storage.array.shape[0]
        count = int(np.prod(size, dtype=np.int64)) if size else 1
        if count:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= n:
                raise _corrupt(self._path, f"tensor of size {size} at offset {offset} reads past its "
                                           f"storage of {n} elements")
        base = storage.array
        item = base.itemsize
        if count:
            view = np.lib.stride_tricks.as_strided(
                base[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False)
        else:
            view = np.zeros(size, dtype=base.dtype)
        out = np.array(view, copy=True)
        if storage.bf16 and self._bf16 == "float32":
            out = bf16_to_float32(out)
        return out

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None, *rest):
        return data


def _find_prefix(archive: zipfile.ZipFile, path) -> str:
    names = [n for n in archive.namelist() if n.endswith("data.pkl")]
    names = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(names) != 1:
        raise _corrupt(path, "expected exactly one data.pkl record")
    return names[0][: -len("data.pkl")]


def load(path: str | os.PathLike | io.BytesIO, *, bf16: str = "float32"):
    """Load a torch `.pt` zip checkpoint as plain Python containers of numpy arrays.

    Args:
        path: file path (or a binary file object).
        bf16: "float32" (default) converts bfloat16 tensors to float32 exactly; "bits" keeps them as
            uint16 bit patterns.

    Returns:
        The unpickled object (dicts, lists, tuples, numbers, strings, numpy arrays).

    Raises:
        CorruptCheckpoint: not a zip checkpoint, truncated, or it references anything beyond tensors.
    """
    if bf16 not in ("float32", "bits"):
        raise ValueError(f"bf16 must be 'float32' or 'bits', got {bf16!r}")
    label = getattr(path, "name", path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _corrupt(label, f"not a zip archive: {exc}; legacy (pre-1.6) torch files are not "
                              "supported") from None
    with archive:
        prefix = _find_prefix(archive, label)
        bo = prefix + "byteorder"
        if bo in archive.namelist() and archive.read(bo).strip() not in (b"little",):
            raise _corrupt(label, "big-endian checkpoints are not supported")
        try:
            data = archive.read(prefix + "data.pkl")
            return _TensorUnpickler(data, archive, prefix, label, bf16).load()
        except CorruptCheckpoint:
            raise
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
                KeyError, IndexError, AttributeError, OSError, struct.error) as exc:
            raise _corrupt(label, f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Writer: a tiny protocol-2 pickle emitter for the same restricted vocabulary.


class _PickleWriter:
    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[tuple[str, bytes]] = []

    def w(self, b: bytes):
        self.out.write(b)

    def global_(self, module: str, name: str):
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def obj(self, x):
        if x is None:
            self.w(b"N")
        elif x is True or x is False:
            self.w(b"\x88" if x else b"\x89")
        elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            self.int_(int(x))
        elif isinstance(x, (float, np.floating)):
            self.w(b"G" + struct.pack(">d", float(x)))
        elif isinstance(x, str):
            b = x.encode("utf-8")
            self.w(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(x, tuple):
            self.w(b"(")
            for v in x:
                self.obj(v)
            self.w(b"t")
        elif isinstance(x, list):
            self.w(b"](")
            for v in x:
                self.obj(v)
            self.w(b"e")
        elif isinstance(x, dict):
            self.w(b"}(")
            for k, v in x.items():
                self.obj(k)
                self.obj(v)
            self.w(b"u")
        elif isinstance(x, (np.ndarray, BFloat16)):
            self.tensor(x)
        else:
            raise TypeError(f"cannot write {type(x).__name__} to a .pt file (arrays, numbers, strings, "
                            "None, lists, tuples and dicts only)")

    def int_(self, v: int):
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif -(2 ** 31) <= v < 2 ** 31:
            self.w(b"J" + struct.pack("<i", v))
        else:
            n = (v.bit_length() + 8) // 8
            self.w(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

    def tensor(self, x):
        if isinstance(x, BFloat16):
            data, storage = np.ascontiguousarray(x.bits), "BFloat16Storage"
        else:
            arr = np.ascontiguousarray(x)
            dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            if dt not in _DTYPE_STORAGES:
                raise TypeError(f"dtype {arr.dtype} has no torch storage type")
            data, storage = arr.astype(dt, copy=False), _DTYPE_STORAGES[dt]
        key = str(len(self.storages))
        self.storages.append((key, data.tobytes()))
        shape = tuple(int(s) for s in data.shape)
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= max(s, 1)
        stride = tuple(reversed(stride))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")  # args
        self.w(b"(")  # persistent id
        self.obj("storage")
        self.global_("torch", storage)
        self.obj(key)
        self.obj("cpu")
        self.int_(int(data.size))
        self.w(b"tQ")
        self.int_(0)
        self.obj(shape)
        self.obj(stride)
        self.w(b"\x89")  # requires_grad False
        self.global_("collections", "OrderedDict")
        self.w(b")R")
        self.w(b"tR")

    def dumps(self, obj) -> bytes:
        self.w(b"\x80\x02")
        self.obj(obj)
        self.w(b".")
        return self.out.getvalue()


def _aligned_info(archive_fp, name: str) -> zipfile.ZipInfo:
    """ZipInfo whose data starts on a 64-byte boundary (padding in an extra field, as torch does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = archive_fp.tell() + 30 + len(name.encode())
    pad = (-(start + 4)) % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def save(obj, path: str | os.PathLike, *, prefix: str | None = None) -> None:
    """Write `obj` (dicts/lists/tuples of numpy arrays, `BFloat16(...)`, numbers, strings) as a torch
    zip checkpoint that `torch.load` (also with `weights_only=True`) and `load` read.

    Deterministic: same object, same bytes. Written to a temp file, then renamed into place.
    """
    path = Path(path)
    prefix = prefix or path.stem or "archive"
    writer = _PickleWriter()
    pkl = writer.dumps(obj)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fp:
            with zipfile.ZipFile(fp, "w", compression=zipfile.ZIP_STORED) as archive:
                records = [(f"{prefix}/data.pkl", pkl), (f"{prefix}/byteorder", b"little")]
                records += [(f"{prefix}/data/{k}", b) for k, b in writer.storages]
                records += [(f"{prefix}/version", b"3\n")]
                for name, payload in records:
                    archive.writestr(_aligned_info(fp, name), payload)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
