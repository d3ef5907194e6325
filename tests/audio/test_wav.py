"""wav read/write, load_audio conversions and validation, resampler quality."""
from __future__ import annotations

import struct
import wave

import numpy as np
import pytest

import engine  # noqa: F401
from engine.audio.resample import StreamingResampler, resample
from engine.audio.wav import load_audio, read_wav, write_wav
from engine.errors import AudioFormatError


def tone(freq, rate, seconds=1.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def snr_vs_tone(y, freq, rate, margin=400):
    ref = 0.5 * np.sin(2 * np.pi * freq * np.arange(y.size) / rate)
    e = y[margin:-margin] - ref[margin:-margin]
    return 10 * np.log10(np.mean(ref[margin:-margin] ** 2) / np.mean(e ** 2))


@pytest.mark.parametrize("fmt,tol", [("int16", 1 / 32768), ("int24", 1 / 2 ** 23), ("int32", 1 / 2 ** 31),
                                     ("float32", 0.0)])
def test_roundtrip_formats(tmp_path, fmt, tol):
    x = tone(440, 24000, 0.25)
    p = tmp_path / f"{fmt}.wav"
    write_wav(p, x, 24000, fmt)
    y, rate, desc = read_wav(p)
    assert rate == 24000 and y.shape == (x.size, 1) and fmt.replace("int", "int") in desc
    assert np.max(np.abs(y[:, 0] - x)) <= tol + 1e-7
    z, info = load_audio(p)
    assert z.dtype == np.float32 and z.ndim == 1 and "resampled" not in info


def test_stereo_44k_downmixed_and_resampled(tmp_path):
    x = np.stack([tone(1000, 44100), tone(1000, 44100)], axis=1)
    p = tmp_path / "st.wav"
    write_wav(p, x, 44100)
    y, info = load_audio(p)
    assert "downmixed 2 channels" in info and "resampled 44100 -> 24000" in info
    assert y.size == 24000
    assert snr_vs_tone(y, 1000, 24000) > 60


def test_wave_extensible_pcm(tmp_path):
    # WAVE_FORMAT_EXTENSIBLE with a PCM sub-format (the stdlib reader refuses it on Python 3.11).
    x = (tone(300, 16000, 0.1) * 32767).astype("<i2")
    data = x.tobytes()
    guid = struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 32000, 2, 16, 22, 16, 4) + guid
    p = tmp_path / "ext.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                  + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    y, info = load_audio(p)
    assert "16000 Hz" in info and y.size == 2400


def test_arrays():
    y, info = load_audio(np.zeros((2, 4800), np.int16) + 16384, sample_rate=48000)
    assert "transposed" in info and "downmixed" in info and y.size == 2400
    assert abs(float(np.median(y)) - 0.5) < 1e-3
    y, info = load_audio(np.full(100, 2.0))
    assert "clipping" in info and y.dtype == np.float32


def write_8bit(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128] * 800))


@pytest.mark.parametrize("case", ["8bit", "empty_file", "empty_array", "nan", "inf",
                                  "not_wav", "missing", "int8_array", "bad_shape", "rate_mismatch"])
def test_bad_inputs(tmp_path, case):
    p = tmp_path / "x.wav"
    kw = {}
    if case == "8bit":
        write_8bit(p)
        src, word = p, "8-bit"
    elif case == "empty_file":
        write_wav(p, np.zeros(0, np.float32))
        src, word = p, "no audio"
    elif case == "empty_array":
        src, word = np.zeros(0, np.float32), "no audio"
    elif case == "nan":
        a = np.zeros(2400, np.float32)
        a[1200] = np.nan
        src, word = a, "0.050 s"
    elif case == "inf":
        a = np.zeros((10, 1), np.float32)
        a[3] = np.inf
        write_wav_float = tmp_path / "f.wav"
        data = a.astype("<f4").tobytes()
        fmt = struct.pack("<HHIIHH", 3, 1, 24000, 96000, 4, 32)
        write_wav_float.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
                                    + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)
        src, word = write_wav_float, "NaN/inf"
    elif case == "not_wav":
        p.write_bytes(b"ID3\x03" + b"\x00" * 100)
        src, word = p, "not a RIFF/WAVE"
    elif case == "missing":
        src, word = tmp_path / "nope.wav", "not found"
    elif case == "int8_array":
        src, word = np.zeros(10, np.int8), "8-bit"
    elif case == "bad_shape":
        src, word = np.zeros((2, 3, 4), np.float32), "shape"
    else:
        write_wav(p, np.zeros(100, np.float32), 16000)
        src, kw, word = p, {"sample_rate": 24000}, "16000 Hz"
    with pytest.raises(AudioFormatError) as e:
        load_audio(src, **kw)
    assert word in str(e.value)


@pytest.mark.parametrize("rin,rout", [(48000, 24000), (44100, 24000), (16000, 24000), (24000, 16000),
                                      (22050, 24000), (8000, 24000)])
def test_resample_quality_and_streaming(rin, rout):
    x = tone(1000, rin)
    y = resample(x, rin, rout)
    assert y.size == -(-x.size * rout // rin)
    assert snr_vs_tone(y, 1000, rout) > 80
    if rout < rin:  # a tone above the new Nyquist is removed, not aliased
        ya = resample(tone(rout / 2 + 1500, rin), rin, rout)
        assert 10 * np.log10(np.mean(ya[400:-400] ** 2) / 0.125) < -70
    r = StreamingResampler(rin, rout)
    rng = np.random.default_rng(0)
    parts, i = [], 0
    while i < x.size:
        k = int(rng.integers(1, 3000))
        parts.append(r.process(x[i:i + k]))
        i += k
    parts.append(r.flush())
    np.testing.assert_array_equal(np.concatenate(parts), y)


def test_resample_bad_args():
    with pytest.raises(AudioFormatError):
        resample(np.zeros((2, 10)), 48000, 24000)
    with pytest.raises(engine.ConfigError):
        StreamingResampler(0, 24000)
