"""PersonaPlex realtime engine: full-duplex speech-to-speech on MLX.

Public API (by task):
- errors: EngineError and its subclasses (engine.errors)
- ring buffer: engine.audio.ring.RingBuffer

Importing `engine` first makes MLX's Linux CPU backend use OpenBLAS (see engine/_blas.py).
"""
from __future__ import annotations

from . import _blas as _blas

_blas.preload()

from .errors import (  # noqa: E402
    AudioDeviceError,
    AudioFormatError,
    ConfigError,
    CorruptCheckpoint,
    EngineError,
    GatedModelError,
    MissingLibraryError,
    ModelNotFound,
    NetworkError,
    ResourceError,
    RingBufferError,
    UnknownVoice,
)

__version__ = "0.1.0"

__all__ = [
    "AudioDeviceError", "AudioFormatError", "ConfigError", "CorruptCheckpoint", "EngineError",
    "GatedModelError", "MissingLibraryError", "ModelNotFound", "NetworkError", "ResourceError",
    "RingBufferError", "UnknownVoice",
]
