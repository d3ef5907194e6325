"""Persona conditioning inputs: voice prompts, system prompts, and text-token display.

- `VOICES`: the 18 released voice presets (NATF0-3, NATM0-3 natural; VARF0-4, VARM0-4 variety).
- `load_voice(name_or_path, files, mimi=None) -> VoicePrompt`: a preset name or a `.pt` path is
  read with the torch-free reader (engine._torchpt; embeddings (N,1,1,D) + token ring (1,17,4));
  the converted MLX layout's presets (and any `.safetensors` voice path) hold the same two arrays
  as safetensors (`embeddings` fp16, `cache` as float32);
  a `.wav` path is a custom voice: downmixed/resampled to 24 kHz, loudness-normalised to -24 LUFS
  (pyloudnorm, ITU-R BS.1770), cut into 1920-sample frames (last one zero-padded) and Mimi-encoded
  frame by frame into agent codes -> `VoicePrompt.from_codes`.
- `PROMPTS`: built-in system prompts (the demo's "assistant + focused" default among them).
- `encode_system_prompt(text, sp)`: the reference's wrapping "<system> " + text + " <system>" then
  SentencePiece ids (plain ids, no BOS/EOS). An empty prompt is allowed (the reference crashes).
- `decode_text_token(id, sp)`: display text of one sampled text token ("" for EPAD 0 / PAD 3).

Prompt phases (voice, silence, text, silence) run in `engine.models.gen.LmGen.run_prompts`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import AudioFormatError, ConfigError, CorruptCheckpoint, UnknownVoice
from .filenames import VOICE_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from .hub import ModelFiles

try:  # the generator's dataclass is the contract; fall back only while it is being written
    from .models.gen import VoicePrompt
except ImportError:  # pragma: no cover
    from dataclasses import dataclass

    @dataclass
    class VoicePrompt:  # type: ignore[no-redef]
        embeddings: np.ndarray | None = None
        cache: np.ndarray | None = None
        codes: np.ndarray | None = None

        @classmethod
        def from_codes(cls, codes):
            return cls(codes=np.asarray(codes, np.int64))

__all__ = [
    "VOICES", "DEFAULT_VOICE", "PROMPTS", "DEFAULT_PROMPT", "TARGET_LUFS", "VoicePrompt",
    "load_voice", "voice_from_audio", "normalize_loudness", "wrap_system_prompt",
    "encode_system_prompt", "decode_text_token", "load_tokenizer", "resolve_prompt",
    "TEXT_EPAD", "TEXT_BOS", "TEXT_EOS", "TEXT_PAD",
]

VOICES: tuple[str, ...] = VOICE_NAMES
DEFAULT_VOICE = "NATM0"

# Text token ids with a meaning of their own (offline.py: EPAD, BOS, EOS, PAD); 0 and 3 are silent.
TEXT_EPAD, TEXT_BOS, TEXT_EOS, TEXT_PAD = 0, 1, 2, 3
_SILENT_TEXT = (TEXT_EPAD, TEXT_PAD)

TARGET_LUFS = -24.0
_SYSTEM_TAG = "<system>"

PROMPTS: dict[str, str] = {
    # the Swift demo's default
    "assistant+focused": ("Answer questions clearly and concisely. Listen carefully to what the user says, "
                          "then respond directly. Stay on topic. Be concise."),
    # the reference offline.py default / README "assistant" family
    "assistant": ("You are a wise and friendly teacher. Answer questions or provide advice in a clear "
                  "and engaging way."),
    "casual": "You enjoy having a good conversation.",
    "customer-service": ("You work for Morning Crumb, which is a bakery, and your name is Ada. "
                         "Information: the bakery opens at 7 am and closes at 6 pm, every day but Sunday."),
    "none": "",
}
DEFAULT_PROMPT = "assistant+focused"


def resolve_prompt(prompt: str | None) -> str:
    """A preset name from PROMPTS becomes its text; any other string is used as the prompt itself;
    None means the default preset."""
    if prompt is None:
        return PROMPTS[DEFAULT_PROMPT]
    if not isinstance(prompt, str):
        raise ConfigError(f"system_prompt must be a string, got {type(prompt).__name__}")
    return PROMPTS.get(prompt, prompt)


# ----------------------------------------------------------------------------------------------
# Text


def load_tokenizer(path: str | os.PathLike):
    """Open a SentencePiece model (`tokenizer_spm_32k_3.model`)."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        from .errors import ModelNotFound
        raise ModelNotFound(f"SentencePiece model {path} does not exist")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"{path} is not a SentencePiece model ({exc}); download it again") from None
    return sp


def wrap_system_prompt(text: str) -> str:
    """The reference's wrapping: strip; keep a text that already starts and ends with <system>,
    else "<system> " + text + " <system>". An empty text gives "<system>  <system>"."""
    if not isinstance(text, str):
        raise ConfigError(f"system prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) >= 2 * len(_SYSTEM_TAG) and text.startswith(_SYSTEM_TAG) and text.endswith(_SYSTEM_TAG):
        return text
    return f"{_SYSTEM_TAG} {text} {_SYSTEM_TAG}"


def encode_system_prompt(text: str, sp) -> list[int]:
    """SentencePiece ids of the wrapped system prompt (plain ids, no BOS/EOS)."""
    ids = sp.encode(wrap_system_prompt(text))
    return [int(i) for i in ids]


def decode_text_token(token: int, sp) -> str:
    """Display text of one text token: "" for EPAD (0) and PAD (3), else the piece with "▁" as a space."""
    token = int(token)
    if token in _SILENT_TEXT:
        return ""
    if not 0 <= token < sp.get_piece_size():
        return ""
    if sp.is_byte(token) or sp.is_control(token) or sp.is_unknown(token):
        return ""
    return sp.id_to_piece(token).replace("\u2581", " ")


# ----------------------------------------------------------------------------------------------
# Voices


def _voice_error(name: str, files: "ModelFiles | None") -> UnknownVoice:
    where = f" in {files.voices_dir}" if files is not None and files.voices_dir is not None else ""
    return UnknownVoice(
        f"unknown voice {name!r}{where}. Valid voices: {', '.join(VOICES)}; or give the path of a "
        ".pt / .safetensors voice prompt or of a .wav file (a custom voice, a few seconds of clean speech).")


def _preset_missing(preset: str, files: "ModelFiles | None") -> UnknownVoice:
    if files is None or files.voices_dir is None:
        return UnknownVoice(f"voice {preset} is a preset, but this model has no voices directory "
                            f"({getattr(files, 'root', None)}): re-download the model's voices")
    path = files.voices_dir / (preset + files.voice_suffix)
    fix = ("re-download voices/ from the model's repository" if files.layout == "mlx"
           else "re-extract or re-download voices.tgz")
    return UnknownVoice(f"voice {preset} is a preset, but {path} is missing: {fix}")


def load_voice(name_or_path: str | os.PathLike, files: "ModelFiles | None" = None, mimi=None) -> VoicePrompt:
    """Load a voice prompt.

    Args:
        name_or_path: a preset name (see VOICES, case-insensitive, ".pt" suffix allowed), a `.pt`
            voice file, or a `.wav` file for a custom voice.
        files: the model's files (for the presets' directory).
        mimi: an `engine.models.mimi.Mimi`, needed for a `.wav` voice. Call this on the thread that
            owns MLX (the model worker) when a wav voice is encoded.

    Raises:
        UnknownVoice: not a preset and not an existing file.
        CorruptCheckpoint: the .pt file is not a valid voice prompt.
        AudioFormatError: the wav file cannot be used.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"voice must be a preset name or a path, got {type(name_or_path).__name__}")
    s = os.fspath(name_or_path)
    key = next((s[: -len(x)] for x in (".pt", ".safetensors") if s.lower().endswith(x)), s)
    preset = key.upper() if key.upper() in VOICES else None
    if preset is not None and os.sep not in s:
        path = files.voice_path(preset) if files is not None else None
        if path is None:
            raise _preset_missing(preset, files)
        return _voice_from_file(path)
    path = Path(s).expanduser()
    if not path.is_file():
        raise _voice_error(s, files)
    if path.suffix.lower() in (".pt", ".safetensors"):
        return _voice_from_file(path)
    if path.suffix.lower() in (".wav", ".wave"):
        if mimi is None:
            raise ConfigError(f"custom voice {path} is audio: load_voice needs the model's Mimi codec "
                              "(mimi=...) to encode it")
        return voice_from_audio(path, mimi)
    raise UnknownVoice(f"voice file {path} must be a .pt or .safetensors voice prompt or a .wav recording")


def _read_safetensors_voice(path: Path) -> dict:
    """The arrays of a converted voice file. `cache` is stored as float32 and must hold whole token
    ids; it comes back as int64."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CorruptCheckpoint(f"{path} is not a readable safetensors voice file ({exc}); download it again") from None
    cache = data.get("cache")
    if isinstance(cache, np.ndarray) and np.issubdtype(cache.dtype, np.floating):
        if not (np.all(np.isfinite(cache)) and np.array_equal(cache, np.round(cache))):
            raise CorruptCheckpoint(f"{path}: cache must hold whole token ids, found fractional values")
        data["cache"] = cache.astype(np.int64)
    return data


def _voice_from_file(path: Path) -> VoicePrompt:
    """A released `.pt` voice prompt or its converted `.safetensors` form."""
    if path.suffix.lower() == ".safetensors":
        data = _read_safetensors_voice(path)
    else:
        from . import _torchpt
        data = _torchpt.load(path)
    if not isinstance(data, dict) or "embeddings" not in data or "cache" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CorruptCheckpoint(f"{path}: a voice prompt holds 'embeddings' and 'cache', found {keys}")
    emb, cache = data["embeddings"], data["cache"]
    if not (isinstance(emb, np.ndarray) and emb.ndim in (2, 4) and emb.shape[0] >= 1
            and (emb.ndim == 2 or emb.shape[1:3] == (1, 1))):
        raise CorruptCheckpoint(f"{path}: embeddings must be [N, 1, 1, D], got "
                                f"{getattr(emb, 'shape', type(emb).__name__)}")
    if not (isinstance(cache, np.ndarray) and np.issubdtype(cache.dtype, np.integer)
            and cache.shape in ((1, 17, 4), (17, 4))):
        raise CorruptCheckpoint(f"{path}: cache must be an integer [1, 17, 4] token ring, got "
                                f"{getattr(cache, 'dtype', '?')} {getattr(cache, 'shape', '?')}")
    try:
        return VoicePrompt(embeddings=emb.astype(np.float32), cache=cache.astype(np.int64))
    except ConfigError as exc:
        raise CorruptCheckpoint(f"{path}: {exc}") from None


def normalize_loudness(x: np.ndarray, sample_rate: int, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale mono audio to `target_lufs` integrated loudness (ITU-R BS.1770 via pyloudnorm).

    Clips shorter than the 400 ms measurement block, or silent ones, are returned unchanged.
    """
    try:
        import pyloudnorm
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("custom wav voices need pyloudnorm: pip install pyloudnorm") from None
    x = np.asarray(x, dtype=np.float64)
    if x.size < int(0.4 * sample_rate) or not np.any(x):
        return x.astype(np.float32)
    meter = pyloudnorm.Meter(sample_rate)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns when the result clips
        loudness = meter.integrated_loudness(x)
        if not np.isfinite(loudness):
            return x.astype(np.float32)
        y = pyloudnorm.normalize.loudness(x, loudness, target_lufs)
    return np.asarray(y, dtype=np.float32)


def voice_from_audio(audio, mimi, sample_rate: int | None = None) -> VoicePrompt:
    """A custom voice from a wav path or an audio array: 24 kHz mono, -24 LUFS, Mimi-encoded
    frame by frame (streaming, batch 1) into agent codes (num_codebooks, frames)."""
    import mlx.core as mx

    from .audio.wav import load_audio

    x, _info = load_audio(audio, sample_rate)
    frame = int(mimi.frame_size)
    if x.size < 2 * frame:
        raise AudioFormatError(f"custom voice audio is {x.size / mimi.sample_rate:.2f} s; at least "
                               f"{2 * frame / mimi.sample_rate:.2f} s of speech is needed (a few seconds is best)")
    x = normalize_loudness(x, int(mimi.sample_rate))
    n = -(-x.size // frame)
    padded = np.zeros(n * frame, dtype=np.float32)
    padded[: x.size] = x
    state = mimi.make_state(1)
    codes = []
    for i in range(n):
        c = mimi.encode_step(mx.array(padded[None, None, i * frame:(i + 1) * frame]), state)
        codes.append(np.array(c)[0, :, 0])
    return VoicePrompt.from_codes(np.stack(codes, axis=1).astype(np.int64))
