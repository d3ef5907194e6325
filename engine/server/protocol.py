"""The PersonaPlex websocket protocol (the reference server's `/api/chat`; shared spec section 7).

Every websocket message is binary: one kind byte, then the payload.

| kind | name      | payload                                                  |
|------|-----------|----------------------------------------------------------|
| 0x00 | handshake | server -> client, empty; sent once the prompt phases ran  |
| 0x01 | audio     | both ways, Ogg/Opus stream bytes (24 kHz mono)            |
| 0x02 | text      | server -> client, UTF-8 text piece                        |
| 0x03 | control   | client -> server (start/endTurn/pause/restart): ignored   |
| 0x04 | metadata  | JSON; server -> client only on request: see `user_text`  |
| 0x05 | error     | server -> client, UTF-8 reason (sent before a refusal)   |
| 0x06 | ping      | no payload (ignored)                                     |

Query parameters of `/api/chat`: `voice_prompt` (a preset such as `NATF2.pt`), `text_prompt`,
`seed` (-1 = random; the reference client's `text_seed` / `audio_seed` when it is absent),
`text_temperature`, `text_topk`, `audio_temperature`, `audio_topk`, and ours: `user_text=1` asks a
server started with `--asr` for what the user said, as metadata messages
`{"user_text": "...", "start_s": 1.2, "end_s": 3.4}` (one per utterance, times in the session's
audio); text messages stay the agent's text, so clients that do not ask see no change. Unlike the reference server,
sampling parameters and seed are honoured: validated (a non-number is an error) and clamped to
safe ranges (temperatures 0..2, top-k 1..500). Parameters the reference client also sends (`pad_mult`,
`repetition_penalty`, ...) are accepted and ignored.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping

from ..errors import EngineError
from ..models.gen import SamplingParams

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)
KIND_NAMES = {HANDSHAKE: "handshake", AUDIO: "audio", TEXT: "text", CONTROL: "control",
              METADATA: "metadata", ERROR: "error", PING: "ping"}
CLIENT_KINDS = (AUDIO, CONTROL, METADATA, PING)

DEFAULT_VOICE = "NATF0.pt"     # the reference client's default
TEMP_RANGE = (0.0, 2.0)
TOPK_RANGE = (1, 500)
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1


class ProtocolError(EngineError, ValueError):
    """A client sent something the protocol does not allow (the session is closed)."""


def encode(kind: int, payload: bytes | str = b"") -> bytes:
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return bytes([kind]) + bytes(payload)


def decode(message) -> tuple[int, bytes]:
    """A client message -> (kind, payload). Raises ProtocolError for text frames, empty messages
    and kinds a client may not send."""
    if isinstance(message, str):
        raise ProtocolError("expected binary websocket messages, got a text frame")
    if not isinstance(message, (bytes, bytearray, memoryview)) or len(message) == 0:
        raise ProtocolError("empty message: the first byte must be the message kind")
    kind = message[0]
    if kind not in CLIENT_KINDS:
        name = KIND_NAMES.get(kind, "unknown")
        raise ProtocolError(f"message kind 0x{kind:02x} ({name}) is not accepted from a client")
    return kind, bytes(message[1:])


@dataclass(frozen=True)
class SessionRequest:
    """What one connection asked for (already validated)."""

    voice: str
    text_prompt: str | None
    seed: int
    sampling: SamplingParams
    seed_given: bool = False
    user_text: bool = False        # metadata messages with the user's transcript (server --asr)


def _number(q: Mapping[str, str], name: str, default: float, lo: float, hi: float, integer: bool):
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ProtocolError(f"query parameter {name}={raw!r} is not a number") from None
    if not math.isfinite(v):
        raise ProtocolError(f"query parameter {name}={raw!r} must be finite")
    v = min(max(v, lo), hi)
    return int(round(v)) if integer else float(v)


def parse_query(q: Mapping[str, str], voices: list[str] | None = None) -> SessionRequest:
    """Validate `/api/chat` query parameters (clamping numbers into range)."""
    voice = (q.get("voice_prompt") or DEFAULT_VOICE).strip()
    name = voice[:-3] if voice.lower().endswith(".pt") else voice
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ProtocolError(f"voice_prompt={voice!r} must be a voice name such as NATF2.pt")
    if voices is not None:
        match = [v for v in voices if v.lower() == name.lower()]
        if not match:
            raise ProtocolError(f"unknown voice_prompt {voice!r}; available: {', '.join(voices)}")
        name = match[0]
    text = q.get("text_prompt")
    if text is not None:
        if len(text) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"text_prompt has {len(text)} characters, the limit is {MAX_PROMPT_CHARS}")
        text = text if text.strip() else None
    # `seed`, else the reference client's `text_seed` / `audio_seed` (one seed drives every site).
    raw_seed = next((q.get(k) for k in ("seed", "text_seed", "audio_seed") if q.get(k) not in (None, "")), None)
    seed_given = False
    if raw_seed in (None, "", "-1"):
        seed = secrets.randbits(62)
    else:
        try:
            seed = int(raw_seed)
        except ValueError:
            raise ProtocolError(f"query parameter seed={raw_seed!r} is not an integer") from None
        if seed < 0:
            seed = secrets.randbits(62)
        else:
            seed, seed_given = min(seed, MAX_SEED), True
    d = SamplingParams()
    sampling = SamplingParams(
        temp_text=_number(q, "text_temperature", d.temp_text, *TEMP_RANGE, False),
        top_k_text=_number(q, "text_topk", d.top_k_text, *TOPK_RANGE, True),
        temp_audio=_number(q, "audio_temperature", d.temp_audio, *TEMP_RANGE, False),
        top_k_audio=_number(q, "audio_topk", d.top_k_audio, *TOPK_RANGE, True),
    )
    user_text = (q.get("user_text") or "").strip().lower() in ("1", "true", "yes", "on")
    return SessionRequest(name, text, seed, sampling, seed_given, user_text)
