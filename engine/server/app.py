"""The server as an ASGI application (Starlette): `/api/chat` (PersonaPlex websocket protocol),
`/healthz`, `/metrics` (Prometheus text format), `/api/voices` and our web page at `/`.

`ChatServer(model, ServerConfig()).make_app()` is a plain ASGI app: run it standalone with uvicorn
(`start()` here, `python -m engine.serve`), mount it in a FastAPI/Starlette app (then enter
`chat.lifespan(app)` from the host app's lifespan, or let the first request start the loop), or use
it as a Ray Serve ingress (engine/cluster.py).

Admission, in this order, before any model work: the Origin of a websocket upgrade (browsers send
it; a page from a foreign site is refused with HTTP 403 before the upgrade: cross-site websocket
hijacking), the auth token (`Authorization: Bearer ...` or, for browsers, which cannot set websocket
headers, `?token=...`; compared in constant time, never logged), draining, the session limit
(close code 1013, try again later), the per-client-address limit, then the query.

Per-session echo cancellation is the client's job here: browsers run it on getUserMedia audio
(`echoCancellation: true`, which our page asks for); the server does no AEC.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import deque
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..audio.opus import OggOpusReader, OggOpusWriter, OpusStreamError, load_opus
from ..errors import ConfigError
from . import protocol as P
from .batch import SlotParams, fused_choice
from .loop import Inbox, Metrics, Slot, StepLoop

log = logging.getLogger("engine.serve")
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
TOKEN_ENV = "PERSONAPLEX_AUTH_TOKEN"

# websocket close codes (RFC 6455 / IANA registry)
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL = 1000, 1001, 1003
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR, CLOSE_TRY_LATER = 1008, 1009, 1011, 1013


@dataclass
class ServerConfig:
    max_sessions: int = 8
    idle_timeout: float = 10.0        # seconds without any audio message -> close
    silence_timeout: float = 300.0    # seconds of audio below `silence_level` RMS -> close
    silence_level: float = 1e-3
    prompt_timeout: float = 120.0     # seconds to wait for the prompt phases
    max_message_bytes: int = 64 * 1024
    max_message_audio: float = 1.0    # seconds of audio one message may decode to (80 ms is normal)
    max_audio_lead: float = 10.0      # seconds a client's audio may run ahead of the wall clock
    inbox_frames: int = 8             # input backlog bound (640 ms)
    outbox_messages: int = 64         # output queue bound per client
    static_dir: Path | None = None
    compiled: bool = True             # mx.compile the batched steps (engine.serve --no-compile: off)
    fused: str = "auto"               # batched CUDA kernels (engine.serve --fused; batch.fused_choice)
    kv_dtype: str = "model"           # the sessions' KV rings: the model's dtype or "fp8" (engine.serve --kv)
    opus_complexity: int = 5          # libopus encoder complexity 0..10 for the agent's audio
    # (voice, text prompt) pairs whose prompt phases run before serving (None = default prompt)
    warm_prompts: tuple = (("NATF0", None),)
    # -- security and shutdown
    auth_token: str | None = None     # None: no token needed
    allowed_origins: tuple = ()       # websocket Origins allowed besides the server's own; "*": any
    max_sessions_per_client: int | None = None   # sessions one client address may hold (None: no limit)
    drain_seconds: float = 30.0       # on shutdown: how long live sessions may go on


class MessageTooBig(P.ProtocolError):
    """A websocket message over `max_message_bytes` (close code 1009)."""


def _close_reason(reason: str) -> str:
    """A close frame's reason holds at most 123 bytes of UTF-8."""
    data = reason.encode()[:120]
    return data.decode(errors="ignore")


class _Conn:
    """One websocket connection (asyncio side)."""

    def __init__(self, server: "ChatServer", ws, req: P.SessionRequest, client: str = "?"):
        self.server, self.ws, self.req, self.client = server, ws, req, client
        self.aloop = asyncio.get_running_loop()
        # libopus through cffi: each call releases the GIL, so encoding every session's frame on
        # this thread does not hold up the step loop thread (engine/audio/opus.py says why).
        self.reader = OggOpusReader(24000, max_call_seconds=server.config.max_message_audio)
        self.audio_samples = 0            # decoded since the first audio message
        self.first_audio: float | None = None
        self.writer = OggOpusWriter(24000, complexity=server.config.opus_complexity)
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=server.config.outbox_messages)
        self.joined: asyncio.Future = self.aloop.create_future()
        self.kicked = asyncio.Event()     # set by the server to end the session (drain, shutdown)
        self.inbox = Inbox(server.config.inbox_frames, server.metrics)
        self.slot = Slot(req.voice, req.text_prompt, SlotParams(req.sampling, req.seed), self.inbox,
                         self._joined_threadsafe, self._frame_threadsafe)
        now = time.monotonic()
        self.last_audio = self.last_voice = now
        self.out_dropped = 0
        self.closed_reason: str | None = None
        self.kick_code = CLOSE_GOING_AWAY
        # The user's transcript (server --asr, client user_text=1): utterances cut here, on the
        # asyncio thread, recognized in the recognizer's process; the step loop never sees them.
        self.cutter = None
        self.asr_jobs: deque = deque()
        if server.asr is not None and req.user_text:
            from ..audio.vad import UtteranceCutter
            self.cutter = UtteranceCutter()

    # -- called on the worker thread
    def _joined_threadsafe(self, error) -> None:
        self.aloop.call_soon_threadsafe(self._set_joined, error)

    def _set_joined(self, error) -> None:
        if not self.joined.done():
            self.joined.set_result(error)

    def _frame_threadsafe(self, pcm: np.ndarray, text_id: int) -> None:
        self.aloop.call_soon_threadsafe(self._deliver, pcm, text_id)

    # -- asyncio thread
    def kick(self, reason: str, code: int = CLOSE_GOING_AWAY) -> None:
        self.closed_reason, self.kick_code = reason, code
        self.kicked.set()

    def _deliver(self, pcm: np.ndarray, text_id: int) -> None:
        # Drop whole frames before encoding when the client is slow, so the Ogg stream stays valid.
        if self.outbox.qsize() >= self.outbox.maxsize - 1:
            self.out_dropped += 1
            self.server.metrics.out_dropped_frames += 1
            return
        data = self.writer.append_pcm(np.ascontiguousarray(pcm, np.float32))
        if data:
            self.outbox.put_nowait(P.encode(P.AUDIO, data))
        piece = self.server.model.decode_text(text_id) if text_id not in (0, 3) else ""
        if piece:
            self.outbox.put_nowait(P.encode(P.TEXT, piece))

    def on_audio(self, payload: bytes) -> None:
        try:
            pcm = self.reader.append_bytes(payload)
        except OpusStreamError as e:
            raise P.ProtocolError(f"audio message is not a valid Ogg/Opus stream: {e}") from None
        now = time.monotonic()
        self.last_audio = now
        if pcm is not None and len(pcm):
            pcm = np.asarray(pcm, np.float32).reshape(-1)
            # A recording client cannot be ahead of real time by more than its network's jitter;
            # one that is floods the server (the inbox would only drop it): close it.
            if self.first_audio is None:
                self.first_audio = now
            self.audio_samples += pcm.size
            lead = self.audio_samples / 24000 - (now - self.first_audio)
            if lead > self.server.config.max_audio_lead:
                raise P.ProtocolError(f"audio arrives faster than real time ({lead:.1f} s ahead of the "
                                      "clock); send it as it is recorded")
            if float(np.sqrt(np.mean(pcm * pcm))) > self.server.config.silence_level:
                self.last_voice = now
            self.inbox.push(pcm)
            if self.cutter is not None:
                self._asr_submit(self.cutter.feed(pcm))

    def _asr_submit(self, utterances) -> None:
        m = self.server.metrics
        for u in utterances:
            m.asr_utterances += 1
            job = self.server.asr.submit(u.audio, u.sample_rate, index=u.index, start_s=u.start_s, end_s=u.end_s)
            if job is None:
                m.asr_dropped += 1
            else:
                self.asr_jobs.append(job)

    async def asr_loop(self) -> None:
        """Sends each transcript, in utterance order, as a metadata message."""
        m = self.server.metrics
        while True:
            await asyncio.sleep(0.05)
            while self.asr_jobs:
                tr = self.server.asr.result(self.asr_jobs[0], 0.0)
                if tr is None:
                    break
                self.asr_jobs.popleft()
                if tr.error is not None:
                    m.asr_failed += 1
                    continue
                msg = json.dumps({"user_text": tr.text, "start_s": round(tr.start_s, 3), "end_s": round(tr.end_s, 3)})
                try:
                    self.outbox.put_nowait(P.encode(P.METADATA, msg))
                except asyncio.QueueFull:
                    m.asr_dropped += 1

    def close_asr(self) -> None:
        """The session ended: transcripts still due are not wanted any more."""
        for job in self.asr_jobs:
            self.server.asr.discard(job)
        self.asr_jobs.clear()

    async def send_loop(self) -> None:
        while True:
            msg = await self.outbox.get()
            await self.ws.send_bytes(msg)

    async def watchdog(self) -> None:
        cfg = self.server.config
        while True:
            await asyncio.sleep(min(1.0, cfg.idle_timeout / 4))
            now = time.monotonic()
            if now - self.last_audio > cfg.idle_timeout:
                self.closed_reason = f"idle: no audio for {cfg.idle_timeout:g} s"
                return
            if now - self.last_voice > cfg.silence_timeout:
                self.closed_reason = f"silent for {cfg.silence_timeout:g} s"
                return


class ChatServer:
    def __init__(self, model, config: ServerConfig | None = None):
        self.model = model
        self.config = config or ServerConfig()
        c = self.config.opus_complexity
        if not (isinstance(c, int) and 0 <= c <= 10):
            raise ConfigError(f"opus_complexity must be an integer 0..10, got {c!r}")
        limit = self.config.max_sessions_per_client
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"max_sessions_per_client must be an integer >= 1 or None, got {limit!r}")
        if self.config.auth_token is not None and not self.config.auth_token.strip():
            raise ConfigError("auth_token is empty: give a token (e.g. `openssl rand -hex 24`) or None for none")
        if self.config.drain_seconds < 0:
            raise ConfigError(f"drain_seconds must be >= 0, got {self.config.drain_seconds!r}")
        load_opus()                                   # a clear error now, not at the first connection
        self.metrics = Metrics()
        self.loop = StepLoop(model, self.metrics, compiled=self.config.compiled,
                             capacity=self.config.max_sessions, warm=self.config.warm_prompts)
        self.loop.fused, self.loop.fused_parts = fused_choice(self.config.fused)
        model.lm.kv_storage(self.config.kv_dtype)     # a bad choice fails here, with the choices
        self.loop.kv_dtype = self.config.kv_dtype
        self.conns: set[_Conn] = set()
        self.per_client: Counter = Counter()
        self.draining = False
        self._started = False
        self.voices = model.list_voices()
        self.asr = getattr(model, "asr", None)       # engine.asr.Recognizer (engine.serve --asr)
        self.static_dir = Path(self.config.static_dir) if self.config.static_dir else WEB_DIR
        self._token = self.config.auth_token.encode() if self.config.auth_token else None

    # -- app
    def make_app(self):
        """The ASGI application (Starlette). Its lifespan starts the step loop and, at shutdown,
        closes the sessions still open and stops the loop."""
        from starlette.applications import Starlette
        from starlette.routing import Mount, Route, WebSocketRoute
        from starlette.staticfiles import StaticFiles

        routes = [
            WebSocketRoute("/api/chat", self.chat),
            Route("/healthz", self.healthz),
            Route("/metrics", self.metrics_page),
            Route("/api/voices", self.voices_page),
            Route("/", self.index),
            Mount("/static", StaticFiles(directory=self.static_dir), name="static"),
        ]
        if self.config.static_dir:
            # Another client build (e.g. the reference's dist/): its assets live at the root.
            routes.append(Mount("/", StaticFiles(directory=self.static_dir), name="root"))
        return Starlette(routes=routes, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app=None):
        self.ensure_started()
        try:
            yield
        finally:
            await self.shutdown()

    def ensure_started(self) -> None:
        """Start the step loop (once). A mounted app whose host does not run our lifespan starts it
        at its first request."""
        if not self._started:
            self._started = True
            self.loop.start()

    async def shutdown(self, reason: str = "server shutting down") -> None:
        """Close every session (close code 1001 with `reason`), then stop the step loop."""
        self.draining = True
        await self._kick_all(reason)
        if self._started:
            self._started = False
            await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)

    async def drain(self, seconds: float | None = None) -> int:
        """Stop admitting sessions (`/healthz` answers 503 "draining"), let the live ones go on
        for up to `seconds` (default `config.drain_seconds`), then close those left with a reason.
        Returns how many had to be closed."""
        seconds = self.config.drain_seconds if seconds is None else seconds
        self.draining = True
        log.warning("draining: %d live sessions, up to %g s", len(self.conns), seconds)
        deadline = time.monotonic() + seconds
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.conns)
        if left:
            await self._kick_all(f"server shutting down: the {seconds:g} s drain time is over")
        return left

    async def _kick_all(self, reason: str, wait: float = 5.0) -> None:
        for c in list(self.conns):
            c.kick(reason)
        deadline = time.monotonic() + wait
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def index(self, request):
        from starlette.responses import FileResponse
        return FileResponse(self.static_dir / "index.html")

    async def healthz(self, request):
        running = self.loop.running
        status = ("draining" if self.draining else "loop stopped" if not running else
                  "ok" if self.loop.ready.is_set() else "starting")
        body = {"status": status, "sessions": len(self.conns),
                "max_sessions": self.config.max_sessions, "steps": self.metrics.steps}
        if not running and self.loop.failure is not None:
            body["error"] = str(self.loop.failure)
        return _json(body, 200 if status == "ok" else 503)

    async def metrics_page(self, request):
        from starlette.responses import PlainTextResponse
        if not self._authorized(request):
            return self._unauthorized(request)
        self.metrics.sessions_active = len(self.conns)
        return PlainTextResponse(self.metrics.prometheus(self.config.max_sessions),
                                 headers={"X-Prometheus-Format": "0.0.4"})

    async def voices_page(self, request):
        from ..persona import DEFAULT_PROMPT, PROMPTS
        if not self._authorized(request):
            return self._unauthorized(request)
        return _json({"voices": [v + ".pt" for v in self.voices],
                      "prompts": PROMPTS, "default_prompt": DEFAULT_PROMPT})

    # -- admission
    def _authorized(self, conn) -> bool:
        """The token from `Authorization: Bearer ...` or the `token` query parameter, compared in
        constant time. True when no token is configured."""
        if self._token is None:
            return True
        auth = conn.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else conn.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self._token)

    def _unauthorized(self, request):
        self.metrics.refused_auth += 1
        log.warning("refused %s %s from %s: missing or wrong auth token", request.method,
                    request.url.path, _client(request))
        return _json({"error": "missing or wrong auth token: send `Authorization: Bearer <token>` "
                               "or add ?token=<token> to the URL"}, 401)

    def _origin_ok(self, origin: str | None, host: str | None) -> bool:
        """No Origin (not a browser): allowed (the token guards those). A browser's Origin must be
        the server's own (same host:port as the Host header) or in `allowed_origins`."""
        if origin is None:
            return True
        allowed = self.config.allowed_origins
        if "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
            return True
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()

    async def _refuse(self, ws, reason: str, code: int) -> None:
        self.metrics.refused += 1
        log.info("refused a connection from %s: %s", _client(ws), reason)
        await ws.accept()
        try:
            await ws.send_bytes(P.encode(P.ERROR, reason))
        finally:
            with contextlib.suppress(Exception):      # the client may be gone already
                await ws.close(code=code, reason=_close_reason(reason))

    # -- websocket
    async def chat(self, ws) -> None:
        self.ensure_started()
        client = _client(ws)
        origin = ws.headers.get("origin")
        if not self._origin_ok(origin, ws.headers.get("host")):
            self.metrics.refused += 1
            self.metrics.refused_origin += 1
            log.warning("refused a websocket from %s: Origin %r is not allowed (engine.serve --allow-origin)",
                        client, origin)
            await ws.close(code=CLOSE_POLICY)          # before the upgrade: HTTP 403
            return
        if not self._authorized(ws):
            self.metrics.refused_auth += 1
            log.warning("refused a websocket from %s: missing or wrong auth token", client)
            return await self._refuse(ws, "missing or wrong auth token: add ?token=<token> to the URL "
                                          "or send `Authorization: Bearer <token>`", CLOSE_POLICY)
        cfg = self.config
        if self.draining:
            return await self._refuse(ws, "server draining (shutting down), try again later", CLOSE_TRY_LATER)
        if len(self.conns) >= cfg.max_sessions:
            self.metrics.refused_busy += 1
            return await self._refuse(ws, f"server full: {len(self.conns)}/{cfg.max_sessions} "
                                          "sessions in use, try again later", CLOSE_TRY_LATER)
        limit = cfg.max_sessions_per_client
        if limit is not None and self.per_client[client] >= limit:
            self.metrics.refused_client_limit += 1
            return await self._refuse(ws, f"too many sessions from your address: {self.per_client[client]}/"
                                          f"{limit} in use", CLOSE_POLICY)
        try:
            req = P.parse_query(ws.query_params, self.voices)
        except P.ProtocolError as e:
            return await self._refuse(ws, str(e), CLOSE_POLICY)
        await ws.accept()
        await self._serve_session(_Conn(self, ws, req, client))

    async def _serve_session(self, conn: _Conn) -> None:
        ws = conn.ws
        self.conns.add(conn)
        self.per_client[conn.client] += 1
        self.metrics.sessions_total += 1
        self.metrics.sessions_active = len(self.conns)
        tasks: list[asyncio.Task] = []
        try:
            self.loop.join(conn.slot)
            kicked = asyncio.ensure_future(conn.kicked.wait())
            tasks = [kicked]
            done, _ = await asyncio.wait([asyncio.shield(conn.joined), kicked],
                                         timeout=self.config.prompt_timeout, return_when=asyncio.FIRST_COMPLETED)
            if kicked in done:
                await self._close(conn, conn.closed_reason or "server shutting down", conn.kick_code)
                return
            err = conn.joined.result() if conn.joined.done() else TimeoutError(
                f"prompt phases took over {self.config.prompt_timeout:g} s")
            if err is not None:
                self.metrics.closed_error += 1
                await self._close(conn, f"cannot start the session: {err}", CLOSE_ERROR)
                return
            await ws.send_bytes(P.encode(P.HANDSHAKE))
            conn.last_audio = conn.last_voice = time.monotonic()
            sender = asyncio.create_task(conn.send_loop())
            watchdog = asyncio.create_task(conn.watchdog())
            receiver = asyncio.create_task(self._recv(conn))
            tasks += [sender, watchdog, receiver]
            if conn.cutter is not None:
                tasks.append(asyncio.create_task(conn.asr_loop()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if kicked in done:
                await self._close(conn, conn.closed_reason or "server shutting down", conn.kick_code)
            elif watchdog in done:
                self.metrics.closed_idle += 1
                await self._close(conn, conn.closed_reason or "timeout", CLOSE_NORMAL)
            elif receiver in done and receiver.exception() is not None:
                exc = receiver.exception()
                self.metrics.closed_error += 1
                code = (CLOSE_TOO_BIG if isinstance(exc, MessageTooBig) else
                        CLOSE_PROTOCOL if isinstance(exc, P.ProtocolError) else CLOSE_ERROR)
                await self._close(conn, str(exc), code)
        finally:
            self.loop.leave(conn.slot)
            self.conns.discard(conn)
            if conn.cutter is not None:
                conn.close_asr()
            self.per_client[conn.client] -= 1
            if self.per_client[conn.client] <= 0:
                del self.per_client[conn.client]
            self.metrics.sessions_active = len(self.conns)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):        # closed already, or the client is gone
                await ws.close()

    async def _close(self, conn: _Conn, reason: str, code: int) -> None:
        log.info("closing session %d: %s", conn.slot.id, reason)
        with contextlib.suppress(Exception):            # the client may be gone already
            await asyncio.wait_for(conn.ws.send_bytes(P.encode(P.ERROR, reason)), 1.0)
        with contextlib.suppress(Exception):
            await conn.ws.close(code=code, reason=_close_reason(reason))

    async def _recv(self, conn: _Conn) -> None:
        limit = self.config.max_message_bytes
        while True:
            msg = await conn.ws.receive()
            if msg["type"] == "websocket.disconnect":
                if msg.get("code") == CLOSE_TOO_BIG:     # the server's protocol layer refused it (uvicorn)
                    raise MessageTooBig(f"a message over {limit} bytes")
                return
            data = msg.get("bytes")
            if data is None:
                P.decode(msg.get("text") or "")      # raises: text frames are not allowed
            if len(data) > limit:
                raise MessageTooBig(f"message of {len(data)} bytes; the limit is {limit}")
            kind, payload = P.decode(data)
            if kind == P.AUDIO:
                conn.on_audio(payload)


def _json(body, status: int = 200):
    """A JSON response as json.dumps writes it (", " and ": " separators, as the aiohttp server did)."""
    import json

    from starlette.responses import Response
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _client(conn) -> str:
    """The peer's address (behind a proxy that forwards it, e.g. Ray Serve's or uvicorn with
    --forwarded-allow-ips, the original client's)."""
    c = getattr(conn, "client", None)
    return c.host if c is not None and c.host else "?"


class Standalone:
    """A running uvicorn server of a ChatServer's app (what `start()` returns as its runner)."""

    def __init__(self, uv, task: asyncio.Task, chat: ChatServer):
        self.uv, self.task, self.chat = uv, task, chat

    async def drain(self, seconds: float | None = None) -> int:
        return await self.chat.drain(seconds)

    async def cleanup(self) -> None:
        """Stop serving: close the sessions still open (1001), stop the loop and the listener."""
        self.uv.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self.task


def uvicorn_server(app, host: str, port: int, config: ServerConfig, ssl_certfile=None, ssl_keyfile=None,
                   on_signal=None, forwarded_allow_ips: str | None = None):
    """A uvicorn.Server for `app`: websockets without pings (the audio flows both ways every 80 ms),
    messages over `max_message_bytes` closed by the protocol layer (1009), no access log (a
    browser's URL carries its token). `on_signal(sig)` replaces uvicorn's own SIGINT/SIGTERM
    handling (None: no signal handlers). `forwarded_allow_ips`: proxies whose X-Forwarded-For names
    the client (None: uvicorn's default, $FORWARDED_ALLOW_IPS or 127.0.0.1)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if on_signal is None:
                yield
                return
            import signal
            import threading
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, lambda sig, frame: on_signal(sig)) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    cfg = uvicorn.Config(app, host=host, port=port, lifespan="on", ws="websockets-sansio",
                         ws_max_size=config.max_message_bytes, ws_ping_interval=None,
                         ws_ping_timeout=None, access_log=False, log_level="warning",
                         ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                         timeout_graceful_shutdown=5, forwarded_allow_ips=forwarded_allow_ips)
    return _Server(cfg)


async def start(model, host: str = "127.0.0.1", port: int = 8998, config: ServerConfig | None = None,
                *, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                startup_timeout: float = 600.0) -> tuple[Standalone, ChatServer, int]:
    """Serve the app with uvicorn inside the running asyncio loop; returns (runner, server, bound
    port) once the step loop is ready. `await runner.cleanup()` stops it; `await runner.drain()`
    drains first."""
    server = ChatServer(model, config)
    uv = uvicorn_server(server.make_app(), host, port, server.config, ssl_certfile, ssl_keyfile)
    task = asyncio.create_task(uv.serve())
    t0 = time.monotonic()
    while not uv.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise ConfigError(f"the server did not start on {host}:{port}: "
                              f"{exc or 'see the log above (address in use? bad TLS files?)'}")
        if time.monotonic() - t0 > startup_timeout:
            uv.should_exit = True
            raise ConfigError(f"the server did not start on {host}:{port} within {startup_timeout:g} s")
        await asyncio.sleep(0.02)
    runner = Standalone(uv, task, server)
    while not server.loop.ready.is_set():            # warm-up, graph traces, rehearsal
        if not server.loop.running and server.loop.failure is not None:
            await runner.cleanup()
            raise server.loop.failure
        if time.monotonic() - t0 > startup_timeout:
            await runner.cleanup()
            raise ConfigError(f"the step loop did not start within {startup_timeout:g} s")
        await asyncio.sleep(0.05)
    bound = uv.servers[0].sockets[0].getsockname()[1]
    return runner, server, bound
