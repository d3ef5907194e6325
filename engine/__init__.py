"""PersonaPlex realtime engine: full-duplex speech-to-speech on MLX.

Public API (by task):
- load a model:      PersonaPlex.load("tiny" | "nvidia/personaplex-7b-v1" | path, quantize=4|8|None)
- turn by turn:      model.respond(), model.respond_stream(), model.arespond_stream(), model.respond_diagnostic()
                     -> Response, AudioChunk, Diagnostics
- full duplex:       model.respond_realtime(blocks) (no device needed), model.session(...) -> DuplexSession
- audio devices:     list_devices()
- building blocks:   RingBuffer (lock-free C ring), EchoCanceller (Speex AEC), ModelWorker (the MLX thread)
- errors:            EngineError and its subclasses

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

_LAZY = {
    "PersonaPlex": ("api", "PersonaPlex"), "Response": ("api", "Response"),
    "AudioChunk": ("api", "AudioChunk"), "Diagnostics": ("api", "Diagnostics"),
    "DuplexSession": ("session", "DuplexSession"), "SessionStats": ("session", "SessionStats"),
    "ModelWorker": ("worker", "ModelWorker"), "RingBuffer": ("audio.ring", "RingBuffer"),
    "EchoCanceller": ("audio.aec", "EchoCanceller"), "list_devices": ("audio.io", "list_devices"),
}


def __getattr__(name: str):
    # Heavy modules (mlx, cffi extensions, PortAudio) load on first use, not on `import engine`.
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

__all__ = list(_LAZY) + [
    "AudioDeviceError", "AudioFormatError", "ConfigError", "CorruptCheckpoint", "EngineError",
    "GatedModelError", "MissingLibraryError", "ModelNotFound", "NetworkError", "ResourceError",
    "RingBufferError", "UnknownVoice",
]
