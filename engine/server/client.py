"""Realtime test clients for the websocket server: `python -m engine.server.client`.

Each client connects to `/api/chat`, waits for the handshake, then sends a synthetic voice (or a
wav file) as Ogg/Opus in 80 ms messages paced by the wall clock, and records what comes back:
agent audio samples, the longest gap between audio messages, text pieces, errors. With many
clients this is the load generator for the server; run it in its own process (as the server's
real clients are), so its Opus coding and event loop do not share the server's interpreter.

    python -m engine.server.client --url ws://127.0.0.1:8998 --clients 8 --seconds 20 --json out.json
    python -m engine.server.client --url wss://chat.example.org --token "$TOKEN" --cafile server.pem

Exit status: 0 when every client got its handshake, no error and continuous audio (at least one
frame back per frame sent, minus the frames in flight at the end), 1 otherwise (the server not
reachable included), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from urllib.parse import urlencode

import numpy as np

from ..errors import EngineError
from . import protocol as P

SR, FRAME = 24000, 1920
IN_FLIGHT = 8            # frames still on their way back when a client stops sending
LONG_GAP_S = 0.15        # gaps between audio messages longer than this are listed in `long_gaps`
# Result times: `handshake_at`, `closed_at`, `last_audio_at` are time.monotonic() (comparable across
# processes on Linux); `long_gaps` holds (seconds after the handshake, gap seconds).


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A voiced, syllable-modulated test signal (harmonics of a gliding pitch, a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    x = env * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3)) * 0.15
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _codec(codec: str, complexity: int):
    """(writer, reader) of Ogg/Opus streams: ours (libopus) or sphn's (the reference server's)."""
    if codec == "sphn":
        import sphn
        return sphn.OpusStreamWriter(SR), sphn.OpusStreamReader(SR)
    if codec != "libopus":
        raise ValueError(f"codec {codec!r}: use 'libopus' or 'sphn'")
    from ..audio.opus import OggOpusReader, OggOpusWriter
    return OggOpusWriter(SR, complexity=complexity), OggOpusReader(SR)


def ssl_context(url: str, cafile: str | None = None):
    """The TLS context for a wss:// URL (the system's CAs, plus `cafile`, e.g. a self-signed
    certificate); None for ws://."""
    if not url.startswith("wss://"):
        return None
    import ssl
    ctx = ssl.create_default_context()
    if cafile:
        ctx.load_verify_locations(cafile)
    return ctx


async def run_client(url: str, audio: np.ndarray, query: dict | None = None, *, handshake_timeout=60.0,
                     opus_complexity: int = 5, codec: str = "libopus", token: str | None = None,
                     cafile: str | None = None, headers: dict | None = None, result: dict | None = None,
                     arrivals: list | None = None) -> dict:
    """One session: stream `audio` (mono 24 kHz) in real time; returns what happened. Failures
    (no server, no handshake, a refusal, a broken stream back) are in `error`, never raised; the
    websocket's close code (1006: the connection dropped without a close frame) in `close_code`.
    `codec="sphn"` codes with the reference server's package instead of ours. `token` goes in an
    `Authorization: Bearer` header; `cafile` adds a CA (a self-signed certificate) for wss://.
    `result`: a dict to fill (and return) instead of a new one, to watch the session while it runs;
    `arrivals`: a list to which the time.monotonic() of each audio message received is appended."""
    from websockets.exceptions import InvalidStatus, WebSocketException

    res = result if result is not None else {}
    res.update({"handshake_s": None, "frames_sent": 0, "samples": 0, "text": [], "max_gap_s": 0.0,
           "error": None, "close_code": None, "close_reason": None, "closed_at": None, "last_audio_at": None,
           "long_gaps": [], "handshake_at": None, "user_text": []})
    writer, reader = _codec(codec, opus_complexity)
    try:
        await _session(url, audio, query, handshake_timeout, writer, reader, res, token, cafile, headers, arrivals)
    except InvalidStatus as e:
        res["error"] = f"the server refused the websocket: HTTP {e.response.status_code}"
        res["close_code"] = e.response.status_code
    except ConnectionRefusedError as e:
        res["error"] = f"cannot reach {url}: {e}"
    except (WebSocketException, asyncio.TimeoutError, OSError, ValueError) as e:
        res["error"] = res["error"] or f"{type(e).__name__}: {e}"
    return res


async def _session(url, audio, query, handshake_timeout, writer, reader, res, token, cafile, headers,
                   arrivals) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    q = urlencode(query or {"voice_prompt": P.DEFAULT_VOICE})
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    t0 = time.monotonic()
    async with connect(f"{url.rstrip('/')}/api/chat?{q}", max_size=None, ping_interval=None,
                       additional_headers=hdrs, ssl=ssl_context(url, cafile), open_timeout=handshake_timeout,
                       close_timeout=5) as ws:

        def closed():
            res["close_code"], res["close_reason"] = ws.close_code, ws.close_reason
            res["closed_at"] = res["closed_at"] or time.monotonic()

        try:
            first = await asyncio.wait_for(ws.recv(), handshake_timeout)
        except ConnectionClosed:
            closed()
            res["error"] = f"no handshake (websocket closed: {res['close_code']} {res['close_reason']})"
            return
        if not isinstance(first, bytes) or first[:1] != bytes([P.HANDSHAKE]):
            res["error"] = (first[1:].decode(errors="replace") if isinstance(first, bytes)
                            else "no handshake (a text message)")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 5)
            closed()
            return
        res["handshake_s"] = time.monotonic() - t0
        res["handshake_at"] = time.monotonic()

        async def receive():
            last = None
            try:
                async for msg in ws:
                    if not isinstance(msg, bytes):
                        break
                    kind, payload = msg[0], msg[1:]
                    if kind == P.AUDIO:
                        now = time.monotonic()
                        if last is not None:
                            res["max_gap_s"] = max(res["max_gap_s"], now - last)
                            if now - last > LONG_GAP_S:          # (seconds since the handshake, gap)
                                res["long_gaps"].append((round(last - t0 - res["handshake_s"], 3),
                                                         round(now - last, 3)))
                        last = res["last_audio_at"] = now
                        if arrivals is not None:
                            arrivals.append(now)
                        pcm = reader.append_bytes(payload)
                        res["samples"] += 0 if pcm is None else np.asarray(pcm).size
                    elif kind == P.TEXT:
                        res["text"].append(payload.decode(errors="replace"))
                    elif kind == P.METADATA:        # user_text=1 with a server started with --asr
                        meta = json.loads(payload.decode(errors="replace") or "{}")
                        if isinstance(meta, dict) and "user_text" in meta:
                            res["user_text"].append(meta)
                    elif kind == P.ERROR:
                        res["error"] = payload.decode(errors="replace")
            except ConnectionClosed:
                pass
            closed()

        rx = asyncio.create_task(receive())
        start = time.monotonic()
        n = len(audio) // FRAME
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * FRAME / SR - time.monotonic()))
            if rx.done():
                break
            try:
                await ws.send(P.encode(P.AUDIO, writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME])))
            except ConnectionClosed as e:
                res["error"] = res["error"] or f"connection lost: {e}"
                break
            res["frames_sent"] = i + 1
        if not rx.done():
            await asyncio.sleep(IN_FLIGHT * FRAME / SR)
        await ws.close()
        try:
            await asyncio.wait_for(rx, 10)
        except asyncio.TimeoutError:
            rx.cancel()
        if res["close_code"] == 1006 and res["error"] is None:
            res["error"] = "connection lost (1006: closed without a close frame)"


def continuous(r: dict) -> bool:
    return (r["error"] is None and r["handshake_s"] is not None
            and r["samples"] >= (r["frames_sent"] - IN_FLIGHT) * FRAME)


async def run_clients(url: str, clients: int, seconds: float, query: dict | None = None,
                      stagger_s: float = 0.0, wav: str | None = None, **kw) -> list[dict]:
    """`clients` sessions at once (started `stagger_s` apart); `kw` goes to run_client (token, cafile)."""
    if wav:
        from ..audio.wav import load_audio
        base, _ = load_audio(wav)
        reps = int(np.ceil(seconds * SR / max(len(base), 1)))
        audios = [np.tile(base, reps)[:int(seconds * SR)] for _ in range(clients)]
    else:
        audios = [speechlike(seconds, i) for i in range(clients)]

    async def one(i):
        await asyncio.sleep(i * stagger_s)
        return await run_client(url, audios[i], query, **kw)

    return list(await asyncio.gather(*[one(i) for i in range(clients)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.server.client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8998",
                    help="the server: ws://, wss:// (TLS), http:// or https:// (default ws://127.0.0.1:8998)")
    ap.add_argument("--token", default=os.environ.get("PERSONAPLEX_AUTH_TOKEN"),
                    help="the server's auth token (default: $PERSONAPLEX_AUTH_TOKEN), sent as a Bearer header")
    ap.add_argument("--cafile", default=None,
                    help="trust this CA / self-signed certificate for wss:// (PEM)")
    ap.add_argument("--clients", type=int, default=1, help="concurrent sessions (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio each client sends (default 10)")
    ap.add_argument("--voice", default=P.DEFAULT_VOICE, help=f"voice_prompt (default {P.DEFAULT_VOICE})")
    ap.add_argument("--text-prompt", default=None, help="text_prompt")
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds between client starts (default 0)")
    ap.add_argument("--wav", default=None, help="send this file (looped) instead of the synthetic voice")
    ap.add_argument("--json", default=None, help="write the per-client results here")
    ap.add_argument("--nice", type=int, default=0,
                    help="lower this process's CPU priority by N (0-19) so that clients run on the "
                         "server's own machine take only the CPU it leaves idle (default 0)")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        print("error: --clients must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    if not 0 <= args.nice <= 19:
        print(f"error: --nice {args.nice}: use 0 (unchanged) to 19 (lowest priority)", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    query = {"voice_prompt": args.voice}
    if args.text_prompt is not None:
        query["text_prompt"] = args.text_prompt
    url = args.url.replace("http://", "ws://").replace("https://", "wss://")
    try:
        results = asyncio.run(run_clients(url, args.clients, args.seconds, query, args.stagger, args.wav,
                                          token=args.token, cafile=args.cafile))
    except EngineError as e:                 # e.g. an unreadable --wav
        print(f"error: {e}", file=sys.stderr)
        return 2
    unreachable = [r["error"] for r in results if (r["error"] or "").startswith("cannot reach")]
    if len(unreachable) == len(results):
        print(f"error: {unreachable[0]}", file=sys.stderr)
        return 1
    ok = sum(continuous(r) for r in results)
    for i, r in enumerate(results):
        print(f"client {i}: handshake {r['handshake_s'] if r['handshake_s'] is None else round(r['handshake_s'], 2)} s, "
              f"sent {r['frames_sent']} frames, got {r['samples'] / FRAME:.1f} frames, longest gap "
              f"{r['max_gap_s'] * 1e3:.0f} ms, {len(r['text'])} text pieces"
              + (f", error: {r['error']}" if r["error"] else ""))
    print(f"{ok}/{len(results)} clients got continuous audio")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
