"""engine.audio.opus: our Ogg/Opus writer and reader against sphn (the reference server's Opus
package, an independent Ogg implementation) in both directions, page layouts sphn never writes,
and the errors bad streams and arguments get."""
import struct

import numpy as np
import pytest

from engine.audio import opus as O
from engine.errors import ConfigError

sphn = pytest.importorskip("sphn", reason="pip install 'personaplex-engine[test]'")

SR, FRAME = 24000, 1920


def _voice(seconds=2.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.5 * t)
    x = (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2) * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3))
    return (0.15 * x + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def _frames(x):
    return [x[i:i + FRAME] for i in range(0, len(x), FRAME)]


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """SNR of `got` against `ref` after the best integer delay (the codec's lookahead)."""
    n = len(ref) - 2500
    d = max(range(0, 2400), key=lambda k: float(np.dot(got[k:k + n], ref[:n])))
    e = got[d:d + n] - ref[:n]
    return 10 * np.log10(float(np.sum(ref[:n] ** 2)) / float(np.sum(e ** 2)))


def _pages(data: bytes) -> list[dict]:
    out, i = [], 0
    while i < len(data):
        assert data[i:i + 4] == b"OggS"
        _, _, flags, gran, serial, seq, crc, nseg = struct.unpack_from("<4sBBqIIIB", data, i)
        lacing = data[i + 27:i + 27 + nseg]
        body = data[i + 27 + nseg:i + 27 + nseg + sum(lacing)]
        out.append(dict(flags=flags, granule=gran, serial=serial, seq=seq, lacing=list(lacing), body=body))
        i += 27 + nseg + sum(lacing)
    return out


def test_ours_to_sphn_and_back():
    x = _voice()
    w = O.OggOpusWriter(SR, complexity=5)
    data = [w.append_pcm(f) for f in _frames(x)]
    # sphn decodes our stream: every sample, and the voice (> 15 dB SNR at ~32 kbit/s)
    r = sphn.OpusStreamReader(SR)
    got = [r.append_bytes(d) for d in data]
    y = np.concatenate([g for g in got if g is not None and len(g)])
    assert y.size == x.size
    assert _snr_db(x, y) > 15
    # our reader gives the same samples from the same bytes
    ours = O.OggOpusReader(SR)
    y2 = np.concatenate([ours.append_bytes(d) for d in data])
    np.testing.assert_allclose(y2, y, atol=1e-6)
    # the stream: OpusHead (BOS) and OpusTags pages first, then one 40 ms packet per page with
    # the granule in 48 kHz samples and consecutive sequence numbers
    pages = _pages(b"".join(data))
    assert pages[0]["flags"] == 2 and pages[0]["body"][:8] == b"OpusHead" and pages[1]["body"][:8] == b"OpusTags"
    head = pages[0]["body"]
    assert head[9] == 1 and struct.unpack_from("<I", head, 12)[0] == SR
    assert struct.unpack_from("<H", head, 10)[0] == w.pre_skip > 0
    assert [p["seq"] for p in pages] == list(range(len(pages)))
    assert len(pages) == 2 + 2 * len(data) and len(data[0]) > len(data[1])      # headers ride the first
    assert [p["granule"] for p in pages[2:6]] == [1920, 3840, 5760, 7680]


def test_sphn_to_ours_in_any_chunking():
    x = _voice(seed=1)
    w = sphn.OpusStreamWriter(SR)
    stream = b"".join(w.append_pcm(f) for f in _frames(x))
    ref = O.OggOpusReader(SR).append_bytes(stream)
    r = sphn.OpusStreamReader(SR)                 # sphn's own reader: the same samples
    np.testing.assert_allclose(ref, np.asarray(r.append_bytes(stream)).reshape(-1), atol=1e-6)
    assert ref.size == x.size and np.abs(ref).max() > 0.05
    rng = np.random.default_rng(0)
    for chunking in ("bytes", "random"):
        r = O.OggOpusReader(SR)
        if chunking == "bytes":
            parts = [stream[i:i + 1] for i in range(len(stream))]
        else:
            cuts = np.sort(rng.choice(np.arange(1, len(stream)), 40, replace=False))
            parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        y = np.concatenate([r.append_bytes(p) for p in parts])
        np.testing.assert_array_equal(y, ref)


def _repage(stream: bytes, per_page: int, split_at: int | None = None) -> bytes:
    """Re-page a stream: `per_page` packets per page; with `split_at`, every page's lacing is cut
    after that many bytes so its last packet continues on the next page (continued flag)."""
    pages = _pages(stream)
    heads, audio = pages[:2], [p["body"] for p in pages[2:]]
    out = [O.ogg_page(p["body"], 0, 7, i, p["flags"]) for i, p in enumerate(heads)]
    seq = 2
    for i in range(0, len(audio), per_page):
        group = audio[i:i + per_page]
        lacing, body = [], b"".join(group)
        for pkt in group:
            lacing += [255] * (len(pkt) // 255) + [len(pkt) % 255]
        if split_at is None:
            chunks = [(lacing, body, 0)]
        else:
            # cut: the first page carries `split_at` bytes in 255-byte laces (a packet left open)
            n = split_at // 255
            left = len(group[0]) - 255 * n          # of the first packet, on the next page
            assert left >= 0
            rest = [255] * (left // 255) + [left % 255]
            for pkt in group[1:]:
                rest += [255] * (len(pkt) // 255) + [len(pkt) % 255]
            chunks = [([255] * n, body[:255 * n], 0), (rest, body[255 * n:], 1)]
        for lac, b, flags in chunks:
            page = bytearray(struct.pack("<4sBBqIIIB", b"OggS", 0, flags, 0, 7, seq, 0, len(lac)) + bytes(lac) + b)
            struct.pack_into("<I", page, 22, O.ogg_crc(page))
            out.append(bytes(page))
            seq += 1
    return b"".join(out)


def test_pages_with_several_packets_and_packets_across_pages():
    x = _voice(seed=2)
    w = O.OggOpusWriter(SR, complexity=5, bitrate=128000)    # packets > 255 bytes: multi-lace
    stream = b"".join(w.append_pcm(f) for f in _frames(x))
    assert max(len(p["body"]) for p in _pages(stream)[2:]) > 255
    ref = O.OggOpusReader(SR).append_bytes(stream)
    grouped = O.OggOpusReader(SR).append_bytes(_repage(stream, per_page=3))
    np.testing.assert_array_equal(grouped, ref)
    spanning = O.OggOpusReader(SR)
    data = _repage(stream, per_page=2, split_at=255)
    assert sum(1 for p in _pages(data) if p["flags"] & 1) == len(_pages(stream)[2:]) // 2   # continued pages
    y = np.concatenate([spanning.append_bytes(data[i:i + 100]) for i in range(0, len(data), 100)])
    np.testing.assert_array_equal(y, ref)
    # and sphn, an independent Ogg reader, agrees on the re-paged stream (lacing); CRCs are checked
    # the other way: our reader verifies every sphn page (test_sphn_to_ours_in_any_chunking)
    r = sphn.OpusStreamReader(SR)
    y3 = r.append_bytes(_repage(stream, per_page=3))
    np.testing.assert_allclose(np.asarray(y3).reshape(-1), ref, atol=1e-6)


def test_bad_streams_are_clear_errors_and_stay_failed():
    good = O.OggOpusWriter(SR).append_pcm(np.zeros(FRAME, np.float32))
    with pytest.raises(O.OpusStreamError, match="not an Ogg page"):
        O.OggOpusReader(SR).append_bytes(b"not an ogg stream" * 4)
    bad = bytearray(good)
    bad[40] ^= 0xFF
    r = O.OggOpusReader(SR)
    with pytest.raises(O.OpusStreamError, match="bad CRC"):
        r.append_bytes(bytes(bad))
    with pytest.raises(O.OpusStreamError, match="already failed"):
        r.append_bytes(good)
    with pytest.raises(O.OpusStreamError, match="OpusHead"):
        O.OggOpusReader(SR).append_bytes(O.ogg_page(b"Vorbis stuff" * 3, 0, 1, 0, flags=2))
    with pytest.raises(O.OpusStreamError, match="beginning-of-stream"):
        O.OggOpusReader(SR).append_bytes(_pages_from(good)[2])
    # a corrupt Opus packet inside a valid page
    pages = _pages_from(good)
    junk = O.ogg_page(bytes([0xFF, 0xFF, 0xFF]), 0, O.OggOpusWriter(SR).serial, 2)
    with pytest.raises(O.OpusStreamError, match="does not decode"):
        O.OggOpusReader(SR).append_bytes(pages[0] + pages[1] + junk)
    assert issubclass(O.OpusStreamError, ValueError)
    # a half page is buffered, not an error
    r = O.OggOpusReader(SR)
    assert r.append_bytes(good[:30]).size == 0 and r.append_bytes(good[30:]).size == FRAME


def _pages_from(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        nseg = data[i + 26]
        size = 27 + nseg + sum(data[i + 27:i + 27 + nseg])
        out.append(data[i:i + size])
        i += size
    return out


def test_writer_arguments():
    with pytest.raises(ConfigError, match="20 ms"):
        O.OggOpusWriter(SR).append_pcm(np.zeros(1000, np.float32))
    with pytest.raises(ConfigError, match="complexity"):
        O.OggOpusWriter(SR, complexity=11)
    with pytest.raises(ConfigError, match="bitrate"):
        O.OggOpusWriter(SR, bitrate=100)
    with pytest.raises(ConfigError, match="sample rate"):
        O.OggOpusReader(44100)
    # 480 (20 ms) and 1440 (60 ms = 40 + 20 ms packets) are whole blocks; float64 input is converted
    w = O.OggOpusWriter(SR)
    pages = _pages(w.append_pcm(np.zeros(480)) + w.append_pcm(np.zeros(1440, np.float32)))
    assert [p["granule"] for p in pages[2:]] == [960, 2880, 3840]
    assert O.opus_version().startswith("libopus")


def test_missing_library_is_a_clear_error(monkeypatch):
    from engine.errors import MissingLibraryError

    monkeypatch.setattr(O, "_lib", None)
    monkeypatch.setattr(O, "_LIB_NAMES", ["libopus-not-here.so.9"])
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(MissingLibraryError, match="apt-get install libopus0"):
        O.OggOpusWriter(SR)


def test_hostile_streams_are_bounded():
    """A 2-byte Opus packet (code 3: six empty 20 ms frames) decodes to 120 ms, so a message of them
    would decode to minutes of audio: a reader with `max_call_seconds` refuses it before decoding.
    Also: a continued page whose packet start was never seen is skipped, not decoded, and an
    OpusHead with an incompatible major version is refused."""
    head = _pages_from(O.OggOpusWriter(SR).append_pcm(np.zeros(FRAME, np.float32)))[:2]
    tiny = b"".join(O.ogg_page(b"\xfb\x06", 0, O.OggOpusWriter(SR).serial, 2 + i) for i in range(20))
    assert O.OggOpusReader(SR).append_bytes(b"".join(head) + tiny).size == 20 * 2880    # 2.4 s, no limit
    limited = O.OggOpusReader(SR, max_call_seconds=1.0)
    with pytest.raises(O.OpusStreamError, match="more than 1 s of audio"):
        limited.append_bytes(b"".join(head) + tiny)
    ok = O.OggOpusReader(SR, max_call_seconds=1.0)                  # the budget is per call
    assert sum(ok.append_bytes(p).size for p in [b"".join(head)] + _pages_from(tiny)) == 20 * 2880

    # an orphan continuation: the first audio page says "continued" but nothing is pending; its
    # first packet's tail (300 bytes of junk, laced 255 + 45) must be dropped, the next packet decoded
    good = O.OggOpusWriter(SR, complexity=5)
    pages = _pages_from(good.append_pcm(_voice(0.08, seed=3)))
    pkt = _pages(pages[2])[0]["body"]
    lacing = bytes([255, 45, len(pkt)])
    orphan = bytearray(struct.pack("<4sBBqIIIB", b"OggS", 0, 1, 0, good.serial, 2, 0, 3) + lacing
                       + bytes(300) + pkt)
    struct.pack_into("<I", orphan, 22, O.ogg_crc(orphan))
    y = O.OggOpusReader(SR).append_bytes(pages[0] + pages[1] + bytes(orphan))
    assert y.size == 960                                             # only the real packet

    bad_head = bytearray(_pages(head[0])[0]["body"])
    bad_head[8] = 0x10
    with pytest.raises(O.OpusStreamError, match="version"):
        O.OggOpusReader(SR).append_bytes(O.ogg_page(bytes(bad_head), 0, 1, 0, flags=2))
