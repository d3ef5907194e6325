"""Wav files and audio arrays in, 24 kHz mono float32 out (and wav files back out).

- `read_wav(path) -> (samples float32 (frames, channels), sample_rate, description)`: PCM int16 /
  int24 / int32 through the stdlib `wave` module, IEEE float32/64 (and WAVE_FORMAT_EXTENSIBLE)
  through a small RIFF reader, since `wave` rejects those.
- `write_wav(path, audio, sample_rate=24000, sample_format="int16" | "int24" | "int32" | "float32")`.
- `load_audio(path_or_array, sample_rate=None) -> (float32 mono at 24 kHz, info)`: validates,
  downmixes, converts integer samples and resamples (engine.audio.resample); `info` says what was
  done. Bad input raises AudioFormatError naming the problem and a fix.
"""
from __future__ import annotations

import os as _os
import struct as _struct
import wave as _wave

import numpy as _np

from ..errors import AudioFormatError
from .resample import resample as _resample

__all__ = ["read_wav", "write_wav", "load_audio", "TARGET_RATE"]

TARGET_RATE = 24000

_FMT_PCM, _FMT_FLOAT, _FMT_EXTENSIBLE = 1, 3, 0xFFFE


def _pcm_to_float(raw: bytes, width: int, channels: int, where: str) -> _np.ndarray:
    if width == 1:
        raise AudioFormatError(f"{where}: 8-bit PCM is not supported (too little resolution for the model); "
                               "convert it, e.g. `sox in.wav -b 16 out.wav`")
    if width == 2:
        x = _np.frombuffer(raw, "<i2").astype(_np.float32) / 32768.0
    elif width == 3:
        b = _np.frombuffer(raw, _np.uint8)
        b = b[: b.size - b.size % 3].reshape(-1, 3).astype(_np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = _np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(_np.float32) / float(1 << 23)
    elif width == 4:
        x = (_np.frombuffer(raw, "<i4").astype(_np.float64) / 2147483648.0).astype(_np.float32)
    else:
        raise AudioFormatError(f"{where}: {8 * width}-bit PCM is not supported (use 16, 24 or 32 bit)")
    return x[: x.size - x.size % channels].reshape(-1, channels)


def _read_riff(path: str):
    """(format tag, channels, rate, bits, data bytes) from a RIFF/WAVE file, any format tag."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            raise AudioFormatError(f"{path}: not a RIFF/WAVE file; convert it, e.g. "
                                   "`ffmpeg -i input -ar 24000 -ac 1 out.wav`")
        fmt = data = None
        while True:
            ch = f.read(8)
            if len(ch) < 8:
                break
            cid, size = ch[:4], _struct.unpack("<I", ch[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(size)
            elif cid == b"data":
                data = f.read(size)
            else:
                f.seek(size, 1)
            if size % 2:
                f.seek(1, 1)
        if fmt is None or len(fmt) < 16 or data is None:
            raise AudioFormatError(f"{path}: wav file without a valid 'fmt ' or 'data' chunk (truncated?)")
        tag, channels, rate, _, _, bits = _struct.unpack("<HHIIHH", fmt[:16])
        if tag == _FMT_EXTENSIBLE and len(fmt) >= 26:
            tag = _struct.unpack("<H", fmt[24:26])[0]  # first two bytes of the sub-format GUID
        return tag, channels, rate, bits, data


def read_wav(path) -> tuple[_np.ndarray, int, str]:
    """Read a wav file.

    Returns:
        (float32 array (frames, channels) in [-1, 1], sample rate, short description of the format).

    Raises:
        AudioFormatError: missing file, not a wav, 8-bit or other unsupported encodings.
    """
    path = _os.fspath(path)
    if not _os.path.isfile(path):
        raise AudioFormatError(f"audio file not found: {path!r}")
    try:
        with _wave.open(path, "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
        x = _pcm_to_float(raw, width, channels, path)
        return x, rate, f"{rate} Hz, {channels} ch, int{8 * width}"
    except (_wave.Error, EOFError):
        pass  # float or WAVE_FORMAT_EXTENSIBLE: read the chunks ourselves
    tag, channels, rate, bits, data = _read_riff(path)
    if channels < 1 or rate < 1:
        raise AudioFormatError(f"{path}: invalid header (channels={channels}, rate={rate})")
    if tag == _FMT_FLOAT and bits in (32, 64):
        x = _np.frombuffer(data[: len(data) - len(data) % (bits // 8)], "<f4" if bits == 32 else "<f8")
        x = x.astype(_np.float32)
        return x[: x.size - x.size % channels].reshape(-1, channels), rate, f"{rate} Hz, {channels} ch, float{bits}"
    if tag == _FMT_PCM:
        return _pcm_to_float(data, bits // 8, channels, path), rate, f"{rate} Hz, {channels} ch, int{bits}"
    raise AudioFormatError(f"{path}: wav encoding {tag:#x} ({bits} bit) is not supported; use PCM 16/24/32-bit "
                           "or float32, e.g. `sox in.wav -e signed -b 16 out.wav`")


def write_wav(path, audio, sample_rate: int = TARGET_RATE, sample_format: str = "int16") -> None:
    """Write float audio ((frames,) or (frames, channels), values in [-1, 1]; clipped) to a wav file.

    Raises:
        AudioFormatError: bad shape, non-finite samples or unknown sample_format.
    """
    a = _np.asarray(audio, dtype=_np.float32)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] < 1:
        raise AudioFormatError(f"write_wav expects (frames,) or (frames, channels), got shape {a.shape}")
    if not _np.isfinite(a).all():
        raise AudioFormatError("write_wav: audio contains NaN or inf")
    channels = a.shape[1]
    if sample_format == "float32":
        data = a.astype("<f4").tobytes()
        fmt = _struct.pack("<HHIIHH", _FMT_FLOAT, channels, int(sample_rate), int(sample_rate) * 4 * channels,
                           4 * channels, 32)
        with open(_os.fspath(path), "wb") as f:
            f.write(b"RIFF" + _struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
            f.write(b"fmt " + _struct.pack("<I", len(fmt)) + fmt)
            f.write(b"data" + _struct.pack("<I", len(data)) + data)
        return
    widths = {"int16": 2, "int24": 3, "int32": 4}
    if sample_format not in widths:
        raise AudioFormatError(f"sample_format must be one of int16, int24, int32, float32; got {sample_format!r}")
    width = widths[sample_format]
    scale = float(1 << (8 * width - 1))
    v = _np.clip(_np.rint(a.astype(_np.float64) * scale), -scale, scale - 1).astype("<i4")
    if width == 2:
        data = v.astype("<i2").tobytes()
    elif width == 4:
        data = v.tobytes()
    else:
        data = v.view(_np.uint8).reshape(-1, 4)[:, :3].tobytes()
    # The file is opened first: a Wave_write whose open failed raises again from its __del__.
    with open(_os.fspath(path), "wb") as f, _wave.open(f, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(int(sample_rate))
        w.writeframes(data)


def _array_to_float(a: _np.ndarray) -> tuple[_np.ndarray, str]:
    if a.dtype == _np.uint8 or a.dtype == _np.int8:
        raise AudioFormatError("8-bit audio is not supported (too little resolution); use int16 or float")
    if a.dtype == _np.int16:
        return a.astype(_np.float32) / 32768.0, "int16"
    if a.dtype == _np.int32:
        return (a.astype(_np.float64) / 2147483648.0).astype(_np.float32), "int32"
    if _np.issubdtype(a.dtype, _np.floating):
        return a.astype(_np.float32, copy=False), str(a.dtype)
    raise AudioFormatError(f"audio array dtype {a.dtype} is not supported (use float32, float64, int16 or int32)")


def load_audio(path_or_array, sample_rate: int | None = None, *,
               target_rate: int = TARGET_RATE) -> tuple[_np.ndarray, str]:
    """Load a wav file or an array as mono float32 at `target_rate` (24 kHz).

    Args:
        path_or_array: a wav path, or an array: (frames,) mono or (frames, channels); a
            (channels, frames) array with at most 8 rows is accepted too (torch layout).
        sample_rate: the rate of an array input (default: already `target_rate`). For a file the
            header's rate is used; passing a different one is an error.

    Returns:
        (float32 1-D array at target_rate, info string describing the source and every conversion).

    Raises:
        AudioFormatError: empty, NaN/inf, 8-bit, bad shape/dtype.
    """
    notes = []
    if isinstance(path_or_array, (str, bytes, _os.PathLike)):
        x, rate, desc = read_wav(path_or_array)
        name = _os.path.basename(_os.fspath(path_or_array))
        if sample_rate is not None and int(sample_rate) != rate:
            raise AudioFormatError(f"{name}: header says {rate} Hz but sample_rate={sample_rate} was given; "
                                   "leave sample_rate out for files")
        src = f"{name}: {desc}"
    else:
        a = _np.asarray(path_or_array)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 1:
            a = a[:, None]
        elif a.ndim == 2 and a.shape[0] <= 8 and a.shape[0] < a.shape[1]:
            a = a.T
            notes.append("transposed (channels, frames) to (frames, channels)")
        elif a.ndim != 2:
            raise AudioFormatError(f"audio array must be (frames,) or (frames, channels), got shape {a.shape}")
        x, dt = _array_to_float(a)
        rate = int(sample_rate) if sample_rate is not None else target_rate
        if rate <= 0:
            raise AudioFormatError(f"sample_rate must be positive, got {sample_rate!r}")
        src = f"array: {rate} Hz, {x.shape[1]} ch, {dt}"
    frames, channels = x.shape
    if frames == 0 or channels == 0:
        raise AudioFormatError(f"{src}: contains no audio samples")
    bad = ~_np.isfinite(x)
    if bad.any():
        first = int(_np.argmax(bad.any(axis=1)))
        raise AudioFormatError(f"{src}: {int(bad.sum())} NaN/inf samples (first at {first / rate:.3f} s)")
    if channels > 1:
        x = x.mean(axis=1)
        notes.append(f"downmixed {channels} channels to mono")
    else:
        x = x[:, 0]
    if rate != target_rate:
        x = _resample(x, rate, target_rate)
        notes.append(f"resampled {rate} -> {target_rate} Hz")
    peak = float(_np.max(_np.abs(x)))
    if peak > 1.0:
        notes.append(f"peak {peak:.2f} > 1.0 (clipping)")
    x = _np.ascontiguousarray(x, dtype=_np.float32)
    info = f"{src}, {frames / rate:.2f} s" + ("; " + "; ".join(notes) if notes else "")
    return x, info
