"""Ogg/Opus streams with libopus (cffi ABI mode: nothing is compiled), for the websocket server.

`OggOpusWriter.append_pcm(pcm) -> bytes` and `OggOpusReader.append_bytes(data) -> pcm` speak the
stream the PersonaPlex web client sends and expects: mono Opus in Ogg pages (RFC 7845), one
packet per page, the two header pages (OpusHead, OpusTags) in front of the first audio.

Why not the `sphn` package: its coder holds the GIL while it encodes (1.4 ms per 80 ms frame at
its fixed complexity), and the server encodes one frame per session every 80 ms on the asyncio
thread, while the step loop thread needs the GIL to queue its work: 16 sessions took 23 ms of
every 80 ms from the loop. cffi releases the GIL around each libopus call, and the complexity
is ours to set.

Only the runtime library is needed: `libopus0` on Debian/Ubuntu, `opus` on Homebrew.
Each object is one stream's state; not thread-safe (one session's coroutine uses it).
"""
from __future__ import annotations

import struct as _struct
import sys as _sys

import numpy as _np
from cffi import FFI as _FFI

from ..errors import ConfigError
from ._dlopen import open_library

__all__ = ["OggOpusWriter", "OggOpusReader", "OpusStreamError", "load_opus", "opus_version"]

_CDEF = """
typedef struct OpusEncoder OpusEncoder;
typedef struct OpusDecoder OpusDecoder;
OpusEncoder *opus_encoder_create(int32_t Fs, int channels, int application, int *error);
void opus_encoder_destroy(OpusEncoder *st);
int32_t opus_encode_float(OpusEncoder *st, const float *pcm, int frame_size, unsigned char *data,
                          int32_t max_data_bytes);
int opus_encoder_ctl(OpusEncoder *st, int request, ...);
OpusDecoder *opus_decoder_create(int32_t Fs, int channels, int *error);
void opus_decoder_destroy(OpusDecoder *st);
int opus_decode_float(OpusDecoder *st, const unsigned char *data, int32_t len, float *pcm,
                      int frame_size, int decode_fec);
int opus_packet_get_nb_samples(const unsigned char *packet, int32_t len, int32_t Fs);
const char *opus_strerror(int error);
const char *opus_get_version_string(void);
"""

# From opus_defines.h (stable ABI since libopus 1.0).
_APPLICATION_AUDIO = 2049
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_GET_LOOKAHEAD = 4027
_RATES = (8000, 12000, 16000, 24000, 48000)

if _sys.platform == "darwin":
    _LIB_NAMES = ["libopus.0.dylib", "libopus.dylib", "/opt/homebrew/lib/libopus.dylib",
                  "/usr/local/lib/libopus.dylib"]
else:
    _LIB_NAMES = ["libopus.so.0", "libopus.so"]

_ffi = _FFI()
_ffi.cdef(_CDEF)
_lib = None

_INSTALL_HINT = "install it with `apt-get install libopus0` (Debian/Ubuntu) or `brew install opus` (macOS)"


class OpusStreamError(ValueError):
    """Bytes that are not a valid mono/stereo Ogg/Opus stream (bad page, CRC, header or packet)."""


def load_opus():
    """Open libopus once (cached) and return the cffi library object.

    Raises:
        MissingLibraryError: the library is not installed (the message says how to install it).
    """
    global _lib
    if _lib is None:
        _lib = open_library(_ffi, _LIB_NAMES, "opus", "libopus (the server's Ogg/Opus audio)", _INSTALL_HINT)
    return _lib


def opus_version() -> str:
    return _ffi.string(load_opus().opus_get_version_string()).decode()


def _check_rate(sample_rate: int) -> int:
    if int(sample_rate) not in _RATES:
        raise ConfigError(f"Opus sample rate {sample_rate} is not supported; use one of {_RATES}")
    return int(sample_rate)


# ----------------------------------------------------------------------------------------------
# Ogg pages (RFC 3533): CRC-32 with polynomial 0x04c11db7, no reflection, init 0, no final xor.
# ----------------------------------------------------------------------------------------------
def _crc_table() -> list:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()
_HEADER = _struct.Struct("<4sBBqIIIB")           # capture, version, flags, granule, serial, seq, crc, nseg
_FLAG_CONTINUED, _FLAG_BOS, _FLAG_EOS = 1, 2, 4


def ogg_crc(data: bytes) -> int:
    crc, table = 0, _CRC
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ b) & 0xFF]
    return crc


def ogg_page(packet: bytes, granule: int, serial: int, seq: int, flags: int = 0) -> bytes:
    """One page holding one whole packet (up to 255 * 255 - 1 bytes)."""
    n = len(packet)
    if n >= 255 * 255:
        raise ValueError(f"packet of {n} bytes does not fit one Ogg page")
    lacing = bytes([255] * (n // 255) + [n % 255])
    head = _HEADER.pack(b"OggS", 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    page = bytearray(head + packet)
    _struct.pack_into("<I", page, 22, ogg_crc(page))
    return bytes(page)


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------
class OggOpusWriter:
    """Mono float32 PCM -> Ogg/Opus bytes, one Opus packet per page.

    `append_pcm(pcm)` takes a whole number of 20 ms blocks (480 samples at 24 kHz; the server
    passes 80 ms frames) and returns the pages for it: 40 ms packets (one 20 ms packet for an odd
    block), the stream's two header pages in front of the first call's audio.

    Args:
        sample_rate: 8000, 12000, 16000, 24000 or 48000.
        complexity: libopus's speed/quality knob, 0..10 (10 is libopus's default, ~1.4 ms per
            80 ms of 24 kHz speech on one core; 5 is about half; see docs/benchmarks.md).
        bitrate: bits per second, or None for libopus's choice.
        serial: the Ogg stream serial number.
    """

    def __init__(self, sample_rate: int = 24000, complexity: int = 10, bitrate: int | None = None,
                 serial: int = 0x5050):
        lib = load_opus()
        self.sample_rate = _check_rate(sample_rate)
        if not (isinstance(complexity, int) and 0 <= complexity <= 10):
            raise ConfigError(f"Opus complexity must be an integer 0..10, got {complexity!r}")
        if bitrate is not None and not (isinstance(bitrate, int) and 6000 <= bitrate <= 510000):
            raise ConfigError(f"Opus bitrate must be 6000..510000 bit/s or None, got {bitrate!r}")
        err = _ffi.new("int *")
        enc = lib.opus_encoder_create(self.sample_rate, 1, _APPLICATION_AUDIO, err)
        if enc == _ffi.NULL or err[0] != 0:
            raise ConfigError(f"opus_encoder_create failed: {_ffi.string(lib.opus_strerror(err[0])).decode()}")
        self._enc = _ffi.gc(enc, lib.opus_encoder_destroy)
        self._lib = lib
        self._ctl(_SET_COMPLEXITY, complexity)
        if bitrate is not None:
            self._ctl(_SET_BITRATE, bitrate)
        look = _ffi.new("int32_t *")
        if lib.opus_encoder_ctl(self._enc, _GET_LOOKAHEAD, look) != 0:
            look[0] = 0                                        # pre-skip is advisory
        self.complexity, self.bitrate = complexity, bitrate
        self.block = self.sample_rate // 50                    # 20 ms
        self.pre_skip = int(look[0]) * 48000 // self.sample_rate
        self.serial, self._seq, self._granule = serial, 0, 0
        self._headers_sent = False
        self._buf = _ffi.new("unsigned char[]", 4000)

    def _ctl(self, request: int, value: int) -> None:
        rc = self._lib.opus_encoder_ctl(self._enc, request, _ffi.cast("int32_t", value))
        if rc != 0:
            raise ConfigError(f"opus_encoder_ctl({request}, {value}) failed: "
                              f"{_ffi.string(self._lib.opus_strerror(rc)).decode()}")

    def _page(self, packet: bytes, flags: int = 0) -> bytes:
        page = ogg_page(packet, self._granule, self.serial, self._seq, flags)
        self._seq += 1
        return page

    def headers(self) -> bytes:
        """The OpusHead and OpusTags pages (RFC 7845); `append_pcm` sends them first by itself."""
        head = b"OpusHead" + _struct.pack("<BBHIhB", 1, 1, self.pre_skip, self.sample_rate, 0, 0)
        vendor = b"personaplex-engine"
        tags = b"OpusTags" + _struct.pack("<I", len(vendor)) + vendor + _struct.pack("<I", 0)
        return self._page(head, _FLAG_BOS) + self._page(tags)

    def append_pcm(self, pcm) -> bytes:
        x = _np.ascontiguousarray(pcm, dtype=_np.float32).reshape(-1) if not (
            isinstance(pcm, _np.ndarray) and pcm.dtype == _np.float32 and pcm.ndim == 1
            and pcm.flags.c_contiguous) else pcm
        n = x.size
        if n == 0 or n % self.block:
            raise ConfigError(f"append_pcm needs a whole number of {self.block}-sample (20 ms) blocks "
                              f"of mono audio, got {n} samples")
        out = []
        if not self._headers_sent:
            out.append(self.headers())
            self._headers_sent = True
        ptr = _ffi.cast("float *", _ffi.from_buffer(x))
        i = 0
        while i < n:
            size = 2 * self.block if n - i >= 2 * self.block else self.block
            k = self._lib.opus_encode_float(self._enc, ptr + i, size, self._buf, len(self._buf))
            if k < 0:
                raise ConfigError(f"opus_encode_float failed: {_ffi.string(self._lib.opus_strerror(k)).decode()}")
            i += size
            self._granule += size * 48000 // self.sample_rate
            out.append(self._page(_ffi.buffer(self._buf, k)[:]))
        return b"".join(out)


# ----------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------
class OggOpusReader:
    """Ogg/Opus bytes, in chunks of any size -> mono float32 PCM at `sample_rate`.

    `append_bytes(data)` returns every sample decodable so far (an empty array while a page is
    incomplete). Pages may hold several packets, and packets may span pages. The first packet
    must be OpusHead, the second OpusTags. Stereo streams are downmixed by libopus. Pre-skip is
    not trimmed: a live stream keeps its timing. Bad data raises `OpusStreamError` (a ValueError)
    naming what is wrong; after that the reader is unusable.

    `max_call_seconds`: the most audio one `append_bytes` call may decode (None: no limit). A
    2-byte Opus packet decodes to 120 ms, so a 64 KiB message of them would be ~30 minutes of
    audio (seconds of CPU, hundreds of MB): a server reading client bytes sets a limit.
    """

    MAX_PACKET = 1 << 16

    def __init__(self, sample_rate: int = 24000, max_call_seconds: float | None = None):
        lib = load_opus()
        self.sample_rate = _check_rate(sample_rate)
        err = _ffi.new("int *")
        dec = lib.opus_decoder_create(self.sample_rate, 1, err)
        if dec == _ffi.NULL or err[0] != 0:
            raise ConfigError(f"opus_decoder_create failed: {_ffi.string(lib.opus_strerror(err[0])).decode()}")
        self._dec = _ffi.gc(dec, lib.opus_decoder_destroy)
        self._lib = lib
        self._data = bytearray()
        self._packet = bytearray()          # a packet continued on the next page
        self._orphan = False                # skipping the tail of a packet whose start was never seen
        self._packets = 0                   # packets seen (0: OpusHead, 1: OpusTags)
        self._serial = None
        self._failed: str | None = None
        self._max = self.sample_rate * 120 // 1000          # the longest Opus packet: 120 ms
        self._pcm = _np.zeros(self._max, _np.float32)
        self._pcm_ptr = _ffi.cast("float *", _ffi.from_buffer(self._pcm))
        self.channels = None
        self.pages = 0
        self._budget_max = None if max_call_seconds is None else int(max_call_seconds * self.sample_rate)
        self._budget = 0

    def _fail(self, why: str):
        self._failed = why
        raise OpusStreamError(why)

    def append_bytes(self, data) -> _np.ndarray:
        if self._failed:
            raise OpusStreamError(f"the stream already failed: {self._failed}")
        self._data += bytes(data)
        self._budget = self._budget_max
        out = []
        buf = self._data
        pos = 0
        while len(buf) - pos >= 27:
            if buf[pos:pos + 4] != b"OggS":
                self._fail(f"not an Ogg page at byte {pos} of the buffered data (got {bytes(buf[pos:pos + 4])!r})")
            _, version, flags, _granule, serial, _seq, crc, nseg = _HEADER.unpack_from(buf, pos)
            if version != 0:
                self._fail(f"Ogg page version {version} (only 0 exists)")
            if len(buf) - pos < 27 + nseg:
                break
            lacing = buf[pos + 27: pos + 27 + nseg]
            size = 27 + nseg + sum(lacing)
            if len(buf) - pos < size:
                break
            page = bytearray(buf[pos: pos + size])
            page[22:26] = b"\0\0\0\0"
            if ogg_crc(page) != crc:
                self._fail(f"Ogg page {self.pages} has a bad CRC (corrupted or not Ogg)")
            if self._serial is None:
                if not flags & _FLAG_BOS:
                    self._fail("the stream does not start with a beginning-of-stream page")
                self._serial = serial
            elif serial != self._serial:
                self._fail(f"a second logical stream (serial {serial}); one Opus stream per connection")
            self.pages += 1
            body = memoryview(page)[27 + nseg:]
            if not flags & _FLAG_CONTINUED:
                self._packet.clear()        # a lost continuation: drop the partial packet
                self._orphan = False
            elif not self._packet:
                self._orphan = True         # continues a packet we never saw: drop up to its end
            at = 0
            for lace in lacing:
                if self._orphan:
                    at += lace
                    self._orphan = lace == 255
                    continue
                self._packet += body[at: at + lace]
                at += lace
                if len(self._packet) > self.MAX_PACKET:
                    self._fail(f"an Ogg packet longer than {self.MAX_PACKET} bytes")
                if lace < 255:
                    pcm = self._on_packet(bytes(self._packet))
                    if pcm is not None:
                        out.append(pcm)
                    self._packet.clear()
            pos += size
        del buf[:pos]
        if not out:
            return _np.zeros(0, _np.float32)
        return out[0] if len(out) == 1 else _np.concatenate(out)

    def _on_packet(self, pkt: bytes):
        k = self._packets
        self._packets += 1
        if k == 0:
            if len(pkt) < 19 or pkt[:8] != b"OpusHead":
                self._fail("the first packet is not an OpusHead header (is this Ogg/Opus?)")
            if pkt[8] >> 4:
                self._fail(f"OpusHead version {pkt[8]}: an incompatible Ogg Opus mapping (RFC 7845 knows 0-15)")
            self.channels = pkt[9]
            if self.channels not in (1, 2) or pkt[18] != 0:
                self._fail(f"unsupported Opus channel layout ({self.channels} channels, mapping {pkt[18]}); "
                           "send mono or stereo")
            return None
        if k == 1:
            if pkt[:8] != b"OpusTags":
                self._fail("the second packet is not an OpusTags header")
            return None
        if not pkt:
            return None                      # an empty packet: nothing to decode
        if self._budget is not None:
            nb = self._lib.opus_packet_get_nb_samples(pkt, len(pkt), self.sample_rate)
            if nb < 0:
                self._fail(f"Opus packet {k - 2} is malformed: {_ffi.string(self._lib.opus_strerror(nb)).decode()}")
            self._budget -= nb
            if self._budget < 0:
                self._fail(f"one message holds more than {self._budget_max / self.sample_rate:g} s of audio; "
                           "send it as it is recorded (80 ms per message)")
        n = self._lib.opus_decode_float(self._dec, pkt, len(pkt), self._pcm_ptr, self._max, 0)
        if n < 0:
            self._fail(f"Opus packet {k - 2} does not decode: {_ffi.string(self._lib.opus_strerror(n)).decode()}")
        return self._pcm[:n].copy()
