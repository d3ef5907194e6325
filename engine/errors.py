"""Error classes. Every user-fixable problem raises a subclass of EngineError whose message
says what was wrong (with the value) and what to do about it."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """An argument or setting has an invalid value."""


class ModelNotFound(EngineError):
    """The model repository, directory or a file in it does not exist."""


class GatedModelError(EngineError):
    """The repository is gated: no token, or the license was not accepted."""


class NetworkError(EngineError):
    """The model hub could not be reached."""


class CorruptCheckpoint(EngineError):
    """A checkpoint file is truncated, has a bad header, or missing / mis-shaped keys."""


class ResourceError(EngineError):
    """Too little disk space or memory for the requested model."""


class AudioFormatError(EngineError, ValueError):
    """Audio input has an unusable shape, dtype, rate, or values (NaN/inf)."""


class AudioDeviceError(EngineError):
    """A PortAudio device could not be found or opened."""

    def __init__(self, message: str, *, device=None, host_api=None, sample_rate=None,
                 blocksize=None, pa_error=None):
        details = []
        if device is not None:
            details.append(f"device={device!r}")
        if host_api is not None:
            details.append(f"host API={host_api}")
        if sample_rate is not None:
            details.append(f"rate={sample_rate}")
        if blocksize is not None:
            details.append(f"blocksize={blocksize}")
        if pa_error:
            details.append(f"PortAudio: {pa_error}")
        super().__init__(message + (f" ({', '.join(details)})" if details else ""))
        self.device, self.host_api, self.sample_rate = device, host_api, sample_rate
        self.blocksize, self.pa_error = blocksize, pa_error


class MissingLibraryError(EngineError):
    """A native library (libspeexdsp, PortAudio) is not installed."""


class UnknownVoice(EngineError, KeyError):
    """The requested voice preset does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RingBufferError(EngineError, ValueError):
    """Invalid use of the ring buffer (bad capacity, dtype, layout, or size)."""
