"""PortAudio (PyAudio) devices and callback streams that move samples between devices and rings.

- `list_devices() -> list[DeviceInfo]`, `format_devices()` (the `--list-devices` table, or
  `NO_DEVICES_HINT`: how to get a device), `find_device(spec, kind)`.
- `open_duplex(capture_ring, playback_ring, input_device=None, output_device=None, blocksize=480)`
  -> `AudioStreams` (also `open_input` / `open_output`): `start()`, `stop()`, `close()`, context
  manager (enter starts, exit closes), `latencies`, `counters`.

Realtime rules for the callbacks: each does exactly one ring call per direction (capture ->
`capture_ring.write(in_data)`, playback -> `playback_ring.read_exact_or_zero(out)`, which plays
silence and counts the underrun), plus integer bookkeeping. No allocation on the steady path, no
locks, no logging, no MLX. PortAudio status flags are ORed into `counters["status_flags"]` and
counted per flag.

Devices that cannot run at 24 kHz are opened at their own rate: the callbacks then talk to
device-rate rings, and the service thread (outside the callback) resamples between those and the
caller's 24 kHz rings.

A stream can die under a running conversation: the host API's callback thread gives up on an error
(seen with PortAudio's ALSA host API over PulseAudio: `PaAlsaStream_WaitForFrames` fails and the
stream goes inactive). The service thread notices a started stream that is no longer active,
closes it and opens it again on the same device and rings, and counts it
(`counters["stream_restarts"]`, failed attempts in `restart_failures`, the last reason in
`last_error`). Tries back off (0.05 s doubling to 2 s) while the device refuses or a reopened
stream dies again within a second. The audio of the gap is not captured (the mic) or is played
late (the playback ring keeps its samples); while a reopen runs (~50 ms) the resampling pump
waits, which the device-rate rings (16 blocks) absorb. A device that disappeared (unplugged) is
retried but comes back only if PortAudio still lists it: its device list is read once, when the
streams are made. `close()` (or leaving the context manager) ends the service thread.
"""
from __future__ import annotations

import contextlib as _contextlib
import os as _os
import threading as _threading
import time as _time
from dataclasses import dataclass as _dataclass

import numpy as _np

from ..errors import AudioDeviceError, ConfigError, MissingLibraryError
from .resample import StreamingResampler as _StreamingResampler

__all__ = ["DeviceInfo", "AudioStreams", "list_devices", "format_devices", "NO_DEVICES_HINT", "find_device",
           "open_duplex", "open_input", "open_output"]

SAMPLE_RATE = 24000

# PortAudio callback status flags (portaudio.h).
_FLAG_NAMES = {1: "input_underflow", 2: "input_overflow", 4: "output_underflow", 8: "output_overflow",
               16: "priming_output"}


def _import_pyaudio():
    try:
        import pyaudio
    except ImportError as e:
        raise MissingLibraryError(
            "PyAudio is not installed: `pip install pyaudio` (it builds against PortAudio: "
            "`apt-get install portaudio19-dev` / `brew install portaudio`), or use files instead of "
            f"devices (--in-wav/--out-wav); import failed with: {e}") from e
    return pyaudio


@_contextlib.contextmanager
def _quiet_stderr():
    """PortAudio's ALSA/JACK probing prints dozens of harmless lines on fd 2 at init; hide them."""
    try:
        saved = _os.dup(2)
    except OSError:
        yield
        return
    try:
        devnull = _os.open(_os.devnull, _os.O_WRONLY)
        _os.dup2(devnull, 2)
        _os.close(devnull)
        yield
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)


def _new_pyaudio():
    pyaudio = _import_pyaudio()
    with _quiet_stderr():
        return pyaudio.PyAudio()


@_dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_sample_rate: float
    is_default_input: bool = False
    is_default_output: bool = False


def _devices(pa) -> list[DeviceInfo]:
    def default(fn):
        try:
            return int(fn()["index"])
        except (OSError, IOError):
            return -1
    din, dout = default(pa.get_default_input_device_info), default(pa.get_default_output_device_info)
    out = []
    for i in range(pa.get_device_count()):
        d = pa.get_device_info_by_index(i)
        api = pa.get_host_api_info_by_index(d["hostApi"])["name"]
        out.append(DeviceInfo(i, str(d["name"]), str(api), int(d["maxInputChannels"]),
                              int(d["maxOutputChannels"]), float(d["defaultSampleRate"]), i == din, i == dout))
    return out


def list_devices() -> list[DeviceInfo]:
    """All PortAudio devices (a fresh PortAudio scan)."""
    pa = _new_pyaudio()
    try:
        return _devices(pa)
    finally:
        pa.terminate()


# How to get an audio device, for `--list-devices` (one item a line) and for device errors (one line).
_GET_A_DEVICE = (
    "start your sound server (PulseAudio / PipeWire) or plug in a sound card",
    "on a headless Linux machine, start a virtual device (a PulseAudio null sink) from the repository: "
    "eval \"$(bash scripts/pulse.sh start)\"",
    "or run without devices, on files: --in-wav IN.wav --out-wav OUT.wav")
NO_DEVICES_HINT = ("no audio devices found: PortAudio sees no sound card and no sound server. To get one:\n"
                   + "\n".join("  - " + item.replace(": eval", ":\n      eval") for item in _GET_A_DEVICE))


def format_devices(devices: list[DeviceInfo] | None = None) -> str:
    """`--list-devices`: an aligned table (index, name, host API, in/out channels, default rate, which
    device is the default input/output), or NO_DEVICES_HINT when there is none."""
    devices = list_devices() if devices is None else devices
    if not devices:
        return NO_DEVICES_HINT
    head = ("index", "name", "host API", "in", "out", "rate (Hz)", "default")
    rows = [(str(d.index), d.name, d.host_api, str(d.max_input_channels), str(d.max_output_channels),
             f"{d.default_sample_rate:.0f}",
             " + ".join(k for k, on in (("input", d.is_default_input), ("output", d.is_default_output)) if on))
            for d in devices]
    right = {0, 3, 4, 5}                   # numbers: right-aligned
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def line(r):
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))]
        return "  ".join(cells).rstrip()
    return "\n".join([line(head), *map(line, rows),
                      "(--input-device / --output-device take an index or a unique part of a name)"])


def _pick(devices: list[DeviceInfo], spec, kind: str) -> DeviceInfo:
    chan = (lambda d: d.max_input_channels) if kind == "input" else (lambda d: d.max_output_channels)
    usable = [d for d in devices if chan(d) > 0]
    if not usable:
        raise AudioDeviceError(f"no audio {kind} device found. To get one: " + "; ".join(_GET_A_DEVICE),
                               device=spec)
    avail = ", ".join(f"{d.index}: {d.name!r}" for d in usable)
    if spec is None:
        for d in usable:
            if (d.is_default_input if kind == "input" else d.is_default_output):
                return d
        raise AudioDeviceError(f"no default {kind} device (available {kind} devices: {avail})", device=None)
    if isinstance(spec, (int, _np.integer)) or (isinstance(spec, str) and spec.strip().isdigit()):
        idx = int(spec)
        for d in devices:
            if d.index == idx:
                if chan(d) <= 0:
                    raise AudioDeviceError(f"device {idx} ({d.name!r}) has no {kind} channels "
                                           f"(available {kind} devices: {avail})", device=idx, host_api=d.host_api)
                return d
        raise AudioDeviceError(f"unknown {kind} device index {idx} (available {kind} devices: {avail}; "
                               "see --list-devices)", device=idx)
    if not isinstance(spec, str):
        raise ConfigError(f"{kind} device must be an index, a name or None, got {spec!r}")
    exact = [d for d in usable if d.name == spec]
    if exact:
        return exact[0]
    sub = [d for d in usable if spec.lower() in d.name.lower()]
    if len(sub) == 1:
        return sub[0]
    if len(sub) > 1:
        raise AudioDeviceError(f"{kind} device name {spec!r} is ambiguous: matches "
                               + ", ".join(f"{d.index}: {d.name!r}" for d in sub), device=spec)
    raise AudioDeviceError(f"unknown {kind} device {spec!r} (available {kind} devices: {avail}; "
                           "see --list-devices)", device=spec)


def find_device(spec, kind: str = "input") -> DeviceInfo:
    """Resolve a device by index, exact name, unique name substring, or None (the default).

    Raises:
        AudioDeviceError: no such device, no channels in that direction, or an ambiguous name.
    """
    if kind not in ("input", "output"):
        raise ConfigError(f"kind must be 'input' or 'output', got {kind!r}")
    return _pick(list_devices(), spec, kind)


def _pow2_at_least(n: int) -> int:
    return 1 << max(1, int(n - 1).bit_length())


class AudioStreams:
    """Open PortAudio stream(s) bound to rings. Made by `open_duplex` / `open_input` / `open_output`."""

    def __init__(self, capture_ring, playback_ring, input_device, output_device, blocksize: int,
                 sample_rate: int, device_rate: int | None):
        from .ring import RingBuffer  # late: the C ring is built separately

        if int(blocksize) != blocksize or not 16 <= blocksize <= 16384:
            raise ConfigError(f"blocksize must be an integer in [16, 16384] frames, got {blocksize!r}")
        self._pyaudio = _import_pyaudio()
        self.blocksize, self.sample_rate = int(blocksize), int(sample_rate)
        self.capture_ring, self.playback_ring = capture_ring, playback_ring
        self._pa = _new_pyaudio()
        self._streams = []           # [(want_in, want_out, stream)]
        self._service = None
        self._stop_service = _threading.Event()
        self._control = _threading.Lock()   # start / stop / close against the service thread's reopen
        self._running = False
        self._closed = False
        self.restart_backoff = 0.05  # seconds between tries to reopen a dead stream (doubles to 2 s)
        try:
            devices = _devices(self._pa)
            self.input_device = _pick(devices, input_device, "input") if capture_ring is not None else None
            self.output_device = _pick(devices, output_device, "output") if playback_ring is not None else None
            self.device_rate = self._choose_rate(device_rate)
            self.resampling = self.device_rate != self.sample_rate
            self.device_blocksize = (self.blocksize if not self.resampling
                                     else max(16, round(self.blocksize * self.device_rate / self.sample_rate)))
            if self.resampling:
                cap = _pow2_at_least(16 * self.device_blocksize)
                self._dev_capture = RingBuffer(cap) if capture_ring is not None else None
                self._dev_playback = RingBuffer(cap) if playback_ring is not None else None
                self._rs_in = _StreamingResampler(self.device_rate, self.sample_rate)
                self._rs_out = _StreamingResampler(self.sample_rate, self.device_rate)
            else:
                self._dev_capture, self._dev_playback = capture_ring, playback_ring
            self._reset_counters()
            self._open()
        except BaseException:
            self._pa.terminate()
            raise

    # -- setup ---------------------------------------------------------------------------------
    def _err(self, msg, dev, rate, pa_error=None):
        return AudioDeviceError(msg, device=None if dev is None else f"{dev.index}: {dev.name}",
                                host_api=None if dev is None else dev.host_api, sample_rate=rate,
                                blocksize=self.blocksize, pa_error=pa_error)

    def _supported(self, rate: int) -> str | None:
        """None if every used device can do `rate` (mono float32), else PortAudio's complaint."""
        pa = self._pyaudio
        try:
            kw = {}
            if self.input_device is not None:
                kw.update(input_device=self.input_device.index, input_channels=1, input_format=pa.paFloat32)
            if self.output_device is not None:
                kw.update(output_device=self.output_device.index, output_channels=1, output_format=pa.paFloat32)
            self._pa.is_format_supported(rate, **kw)
            return None
        except ValueError as e:
            return str(e.args[0] if e.args else e)

    def _choose_rate(self, device_rate) -> int:
        dev = self.input_device or self.output_device
        if device_rate is not None:
            if int(device_rate) != device_rate or device_rate <= 0:
                raise ConfigError(f"device_rate must be a positive integer in Hz, got {device_rate!r}")
            why = self._supported(int(device_rate))
            if why:
                raise self._err("the audio device does not support this sample rate", dev, device_rate, why)
            return int(device_rate)
        why = self._supported(self.sample_rate)
        if why is None:
            return self.sample_rate
        native = int((self.input_device or self.output_device).default_sample_rate)
        if self.input_device and self.output_device and \
                self.input_device.default_sample_rate != self.output_device.default_sample_rate:
            native = int(self.input_device.default_sample_rate)
        why2 = self._supported(native)
        if why2:
            raise self._err(f"the audio device supports neither {self.sample_rate} Hz nor its default {native} Hz",
                            dev, self.sample_rate, f"{why}; {why2}")
        return native

    def _reset_counters(self) -> None:
        self._restarts = 0
        self._restart_failures = 0
        self._failure = None       # why the last reopen failed, until one succeeds
        self.last_error = None
        self._callbacks = 0
        self._frames_in = 0
        self._frames_out = 0
        self._status_flags = 0
        self._flag_counts = dict.fromkeys(_FLAG_NAMES.values(), 0)

    def _note_status(self, status: int) -> None:  # rare path only
        self._status_flags |= status
        for bit, name in _FLAG_NAMES.items():
            if status & bit:
                self._flag_counts[name] += 1

    def _make_callback(self, want_in: bool, want_out: bool):
        pa = self._pyaudio
        cont = pa.paContinue
        bs = self.device_blocksize
        out = _np.zeros(bs, _np.float32)
        cap, play = self._dev_capture, self._dev_playback
        # Bound methods fetched once; the closures below only call them.
        cap_write = cap.write if want_in else None
        play_fill = play.read_exact_or_zero if want_out else None
        note = self._note_status
        st = self

        if want_in and want_out:
            def callback(in_data, frame_count, time_info, status):
                if status:
                    note(status)
                st._callbacks += 1
                st._frames_in += frame_count
                st._frames_out += frame_count
                cap_write(in_data)
                if frame_count == bs:
                    play_fill(out)
                    return out, cont
                tmp = _np.zeros(frame_count, _np.float32)  # PortAudio gave an odd size: rare, allowed to allocate
                play.read_into(tmp)
                return tmp, cont
        elif want_in:
            def callback(in_data, frame_count, time_info, status):
                if status:
                    note(status)
                st._callbacks += 1
                st._frames_in += frame_count
                cap_write(in_data)
                return None, cont
        else:
            def callback(in_data, frame_count, time_info, status):
                if status:
                    note(status)
                st._callbacks += 1
                st._frames_out += frame_count
                if frame_count == bs:
                    play_fill(out)
                    return out, cont
                tmp = _np.zeros(frame_count, _np.float32)
                play.read_into(tmp)
                return tmp, cont
        return callback

    def _open(self) -> None:
        ind, outd = self.input_device, self.output_device
        # One duplex stream when both directions share a host API: one clock, a fixed in/out offset.
        if ind is not None and outd is not None and ind.host_api == outd.host_api:
            plan = [(True, True)]
        else:
            plan = [p for p in ((ind is not None, False), (False, outd is not None)) if any(p)]
        for want_in, want_out in plan:
            try:
                s = self._open_one(want_in, want_out)
            except AudioDeviceError:
                for *_, s in self._streams:
                    s.close()
                self._streams = []
                raise
            self._streams.append((want_in, want_out, s))

    def _open_one(self, want_in: bool, want_out: bool, quiet: bool = True):
        """One PortAudio stream (not started) for these directions, on this object's devices, rate,
        blocksize and rings. quiet: hide what PortAudio prints on fd 2 meanwhile (setup only: it
        silences the whole process, so a reopen under a running conversation leaves it on)."""
        pa = self._pyaudio
        ind, outd = self.input_device, self.output_device
        # PyAudio keeps the callback alive; nothing else is called on it.
        cb = self._make_callback(want_in, want_out)
        try:
            with _quiet_stderr() if quiet else _contextlib.nullcontext():
                return self._pa.open(format=pa.paFloat32, channels=1, rate=self.device_rate,
                                     input=want_in, output=want_out,
                                     input_device_index=ind.index if want_in else None,
                                     output_device_index=outd.index if want_out else None,
                                     frames_per_buffer=self.device_blocksize, stream_callback=cb,
                                     start=False)
        except (OSError, ValueError) as e:
            raise self._err("could not open the audio stream", ind if want_in else outd, self.device_rate,
                            str(e)) from e

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        with self._control:
            if self._closed:
                raise AudioDeviceError("the audio streams are closed")
            if self._running:
                return
            started = []
            try:
                for i, (want_in, want_out, s) in enumerate(self._streams):
                    if isinstance(s, _DeadStream):   # its reopen failed while running: once more now
                        s = self._open_one(want_in, want_out)
                        self._streams[i] = (want_in, want_out, s)
                    s.start_stream()
                    started.append(s)
            except BaseException:
                for s in started:
                    with _contextlib.suppress(OSError):
                        s.stop_stream()
                raise
            self._running = True
            self._stop_service = _threading.Event()
            self._service = _threading.Thread(target=self._service_loop, args=(self._stop_service,),
                                              name="audio-service", daemon=True)
            self._service.start()

    def stop(self) -> None:
        with self._control:
            if not self._running:
                return
            self._running = False
            self._stop_service.set()
            service, self._service = self._service, None
            for *_, s in self._streams:
                # A stream that died is stopped too (PortAudio would refuse to start it again).
                with _contextlib.suppress(OSError):
                    s.stop_stream()
        service.join()

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        with self._control:
            for *_, s in self._streams:
                s.close()
            self._streams = []
            self._pa.terminate()
            self._closed = True

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def active(self) -> bool:
        return self._running and any(s.is_active() for *_, s in self._streams)

    # -- the service thread: resampling pump, dead-stream watchdog ------------------------------
    def reopen_dead_streams(self) -> None:
        """Close and reopen (started) every stream that should run but is no longer active.
        Called by the service thread; on failure the reason is kept in `last_error`, counted in
        `restart_failures`, and the next call tries again."""
        with self._control:
            if not self._running:
                return
            for i, (want_in, want_out, s) in enumerate(self._streams):
                with _contextlib.suppress(OSError):
                    if s.is_active():
                        continue
                with _contextlib.suppress(Exception):     # a stream the host API already tore down
                    s.close()
                try:
                    s = self._open_one(want_in, want_out, quiet=False)
                    try:
                        s.start_stream()
                    except OSError:
                        s.close()
                        raise
                except Exception as e:   # noqa: BLE001 - whatever it is, the pump must go on; count and retry
                    self._restart_failures += 1
                    self._failure = self.last_error = f"reopening a stream that stopped on its own failed: {e!r}"
                    # Keep a placeholder that reads as dead so the next pass retries.
                    self._streams[i] = (want_in, want_out, _DeadStream())
                    continue
                self._streams[i] = (want_in, want_out, s)
                self._restarts += 1
                self.last_error = ("a stream stopped on its own (host API error) and was reopened"
                                   + (f" (before that: {self._failure})" if self._failure else ""))
                self._failure = None

    def pump(self) -> None:
        """Move and resample whatever is pending between the device-rate and 24 kHz rings."""
        if not self.resampling:
            return
        if self._dev_capture is not None:
            k = self._dev_capture.available_read
            if k:
                self.capture_ring.write(self._rs_in.process(self._dev_capture.read(k)))
        if self._dev_playback is not None:
            # Keep about three device blocks queued; read only what the 24 kHz ring holds.
            need = 3 * self.device_blocksize - self._dev_playback.available_read
            if need > 0:
                take = min(self.playback_ring.available_read,
                           -(-need * self.sample_rate // self.device_rate))
                if take:
                    self._dev_playback.write(self._rs_out.process(self.playback_ring.read(take)))

    def _service_loop(self, stop: _threading.Event) -> None:
        period = max(0.002, self.device_blocksize / self.device_rate / 4) if self.resampling else 0.02
        check_every = max(1, round(0.02 / period))     # look for dead streams about every 20 ms
        wait, n, last = 0.0, 0, -1e9
        while not stop.is_set():
            self.pump()
            n += 1
            if n % check_every == 0 and _time.monotonic() >= wait:
                before = (self._restarts, self._restart_failures)
                self.reopen_dead_streams()
                if (self._restarts, self._restart_failures) != before:
                    now = _time.monotonic()
                    if now - last > 10.0:                 # a new episode starts from the shortest pause
                        self.restart_backoff = 0.05
                    # Back off while the device refuses, or a reopened stream dies again at once.
                    if self._restart_failures > before[1] or now - last < 1.0:
                        self.restart_backoff = min(2.0, self.restart_backoff * 2)
                        wait = now + self.restart_backoff
                    last = now
            stop.wait(period)

    # -- reporting -----------------------------------------------------------------------------
    @property
    def latencies(self) -> dict:
        """Seconds: PortAudio's input / output latency, plus the resampler's delay when resampling."""
        extra = 0.0
        if self.resampling:
            extra = self._rs_in.half_width / self.device_rate + self._rs_out.half_width / self.sample_rate
        lat = {"input": 0.0, "output": 0.0}
        for *_, s in self._streams:
            with _contextlib.suppress(Exception):
                lat["input"] = max(lat["input"], s.get_input_latency())
            with _contextlib.suppress(Exception):
                lat["output"] = max(lat["output"], s.get_output_latency())
        lat["resampler"] = extra
        lat["block"] = self.blocksize / self.sample_rate
        return lat

    @property
    def counters(self) -> dict:
        """callbacks, device frames in/out, per-flag PortAudio status counts, ORed status_flags,
        stream_restarts / restart_failures (dead streams reopened / failed tries), and the rings'
        capture overflow / playback underrun in samples (device-rate rings when resampling)."""
        c = {"callbacks": self._callbacks, "frames_in": self._frames_in, "frames_out": self._frames_out,
             "status_flags": self._status_flags, **self._flag_counts,
             "stream_restarts": self._restarts, "restart_failures": self._restart_failures}
        c["capture_overflow_samples"] = self._dev_capture.overflow_count if self._dev_capture is not None else 0
        c["playback_underrun_samples"] = (self._dev_playback.underrun_count
                                          if self._dev_playback is not None else 0)
        return c

    def __repr__(self) -> str:
        devs = ", ".join(f"{k}={d.index}:{d.name!r}" for k, d in (("in", self.input_device),
                                                                    ("out", self.output_device)) if d)
        return (f"AudioStreams({devs}, {self.sample_rate} Hz, device {self.device_rate} Hz, "
                f"blocksize={self.blocksize}, running={self._running})")


class _DeadStream:
    """Stands in for a stream that could not be reopened: inactive, so the watchdog tries again
    (and `start()` after `stop()` opens it anew)."""

    def is_active(self) -> bool:
        return False

    def stop_stream(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_duplex(capture_ring, playback_ring, input_device=None, output_device=None, blocksize: int = 480,
                *, sample_rate: int = SAMPLE_RATE, device_rate: int | None = None) -> AudioStreams:
    """Open capture -> `capture_ring` and `playback_ring` -> speaker, mono float32 at `sample_rate`.

    Args:
        capture_ring / playback_ring: engine.audio.ring.RingBuffer (float32 samples at sample_rate).
        input_device / output_device: index, name (exact or unique substring) or None for the default.
        blocksize: frames per callback at sample_rate (480 = 20 ms; keep >= 20 ms, see design notes).
        device_rate: force the device rate (default: sample_rate if supported, else the device's own).

    Returns:
        AudioStreams, not started (`start()`, or use it as a context manager).

    Raises:
        AudioDeviceError: unknown device, unsupported rate, or PortAudio refused to open the stream.
        MissingLibraryError: PyAudio / PortAudio missing.
    """
    return AudioStreams(capture_ring, playback_ring, input_device, output_device, blocksize, sample_rate,
                        device_rate)


def open_input(capture_ring, device=None, blocksize: int = 480, **kw) -> AudioStreams:
    """Capture only (see open_duplex)."""
    return AudioStreams(capture_ring, None, device, None, blocksize, kw.pop("sample_rate", SAMPLE_RATE),
                        kw.pop("device_rate", None))


def open_output(playback_ring, device=None, blocksize: int = 480, **kw) -> AudioStreams:
    """Playback only (see open_duplex)."""
    return AudioStreams(None, playback_ring, None, device, blocksize, kw.pop("sample_rate", SAMPLE_RATE),
                        kw.pop("device_rate", None))
