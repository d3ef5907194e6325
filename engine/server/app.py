"""aiohttp application: `/api/chat` (PersonaPlex websocket protocol), `/healthz`, `/metrics`
(Prometheus text format) and our web page at `/`.

Per-session echo cancellation is the client's job here: browsers run it on getUserMedia audio
(`echoCancellation: true`, which our page asks for); the server does no AEC.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import WSMsgType, web

from ..audio.opus import OggOpusReader, OggOpusWriter, OpusStreamError, load_opus
from ..errors import ConfigError
from . import protocol as P
from .batch import SlotParams, fused_choice
from .loop import FRAME, Inbox, Metrics, Slot, StepLoop

log = logging.getLogger("engine.serve")
WEB_DIR = Path(__file__).resolve().parents[1] / "web"


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
    opus_complexity: int = 5          # libopus encoder complexity 0..10 for the agent's audio
    # (voice, text prompt) pairs whose prompt phases run before serving (None = default prompt)
    warm_prompts: tuple = (("NATF0", None),)


class _Conn:
    """One websocket connection (asyncio side)."""

    def __init__(self, server: "ChatServer", ws: web.WebSocketResponse, req: P.SessionRequest):
        self.server, self.ws, self.req = server, ws, req
        self.aloop = asyncio.get_running_loop()
        # libopus through cffi: each call releases the GIL, so encoding every session's frame on
        # this thread does not hold up the step loop thread (engine/audio/opus.py says why).
        self.reader = OggOpusReader(24000, max_call_seconds=server.config.max_message_audio)
        self.audio_samples = 0            # decoded since the first audio message
        self.first_audio: float | None = None
        self.writer = OggOpusWriter(24000, complexity=server.config.opus_complexity)
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=server.config.outbox_messages)
        self.joined: asyncio.Future = self.aloop.create_future()
        self.inbox = Inbox(server.config.inbox_frames, server.metrics)
        self.slot = Slot(req.voice, req.text_prompt, SlotParams(req.sampling, req.seed), self.inbox,
                         self._joined_threadsafe, self._frame_threadsafe)
        now = time.monotonic()
        self.last_audio = self.last_voice = now
        self.out_dropped = 0
        self.closed_reason: str | None = None
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
        load_opus()                                   # a clear error now, not at the first connection
        self.metrics = Metrics()
        self.loop = StepLoop(model, self.metrics, compiled=self.config.compiled,
                             capacity=self.config.max_sessions, warm=self.config.warm_prompts)
        self.loop.fused, self.loop.fused_parts = fused_choice(self.config.fused)
        self.conns: set[_Conn] = set()
        self._pending = 0
        self.voices = model.list_voices()
        self.asr = getattr(model, "asr", None)       # engine.asr.Recognizer (engine.serve --asr)
        self.static_dir = Path(self.config.static_dir) if self.config.static_dir else WEB_DIR

    # -- app
    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/api/voices", self.voices_page)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", self.static_dir, show_index=False)
        if self.config.static_dir:
            # Another client build (e.g. the reference's dist/): its assets live at the root.
            app.router.add_static("/", self.static_dir, show_index=False)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self.loop.start()

    async def _on_shutdown(self, app) -> None:
        for c in list(self.conns):
            await c.ws.close(code=1001, message=b"server shutting down")
        await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)

    async def index(self, request) -> web.StreamResponse:
        return web.FileResponse(self.static_dir / "index.html")

    async def healthz(self, request) -> web.Response:
        ok = self.loop.running
        body = {"status": "ok" if ok else "loop stopped", "sessions": len(self.conns),
                "max_sessions": self.config.max_sessions, "steps": self.metrics.steps}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_page(self, request) -> web.Response:
        self.metrics.sessions_active = len(self.conns)
        return web.Response(text=self.metrics.prometheus(self.config.max_sessions),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def voices_page(self, request) -> web.Response:
        from ..persona import PROMPTS, DEFAULT_PROMPT
        return web.json_response({"voices": [v + ".pt" for v in self.voices],
                                  "prompts": PROMPTS, "default_prompt": DEFAULT_PROMPT})

    # -- websocket
    async def _refuse(self, ws, reason: str, code: int) -> web.WebSocketResponse:
        self.metrics.refused += 1
        log.info("refused a connection: %s", reason)
        try:
            await ws.send_bytes(P.encode(P.ERROR, reason))
        finally:
            await ws.close(code=code, message=reason[:120].encode())
        return ws

    async def chat(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.config.max_message_bytes, heartbeat=None)
        await ws.prepare(request)
        if len(self.conns) >= self.config.max_sessions:
            return await self._refuse(ws, f"server full: {len(self.conns)}/{self.config.max_sessions} "
                                          "sessions in use, try again later", 1013)
        try:
            req = P.parse_query(request.query, self.voices)
        except P.ProtocolError as e:
            return await self._refuse(ws, str(e), 1008)
        conn = _Conn(self, ws, req)
        self.conns.add(conn)
        self.metrics.sessions_total += 1
        self.metrics.sessions_active = len(self.conns)
        tasks: list[asyncio.Task] = []
        try:
            self.loop.join(conn.slot)
            try:
                err = await asyncio.wait_for(asyncio.shield(conn.joined), self.config.prompt_timeout)
            except asyncio.TimeoutError:
                err = TimeoutError(f"prompt phases took over {self.config.prompt_timeout:g} s")
            if err is not None:
                self.metrics.closed_error += 1
                await ws.send_bytes(P.encode(P.ERROR, f"cannot start the session: {err}"))
                await ws.close(code=1011, message=b"session start failed")
                return ws
            await ws.send_bytes(P.encode(P.HANDSHAKE))
            conn.last_audio = conn.last_voice = time.monotonic()
            sender = asyncio.create_task(conn.send_loop())
            watchdog = asyncio.create_task(conn.watchdog())
            receiver = asyncio.create_task(self._recv(conn))
            tasks = [sender, watchdog, receiver]
            if conn.cutter is not None:
                tasks.append(asyncio.create_task(conn.asr_loop()))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if watchdog in done:
                self.metrics.closed_idle += 1
                await self._close(conn, conn.closed_reason or "timeout", 1000)
            elif receiver in done and receiver.exception() is not None:
                exc = receiver.exception()
                self.metrics.closed_error += 1
                await self._close(conn, str(exc), 1003 if isinstance(exc, P.ProtocolError) else 1011)
        finally:
            self.loop.leave(conn.slot)
            self.conns.discard(conn)
            if conn.cutter is not None:
                conn.close_asr()
            self.metrics.sessions_active = len(self.conns)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not ws.closed:
                await ws.close()
        return ws

    async def _close(self, conn: _Conn, reason: str, code: int) -> None:
        log.info("closing session %d: %s", conn.slot.id, reason)
        if not conn.ws.closed:
            try:
                await asyncio.wait_for(conn.ws.send_bytes(P.encode(P.ERROR, reason)), 1.0)
            except Exception:  # noqa: BLE001 - the client may be gone already
                pass
            await conn.ws.close(code=code, message=reason[:120].encode())

    async def _recv(self, conn: _Conn) -> None:
        async for msg in conn.ws:
            if msg.type == WSMsgType.BINARY:
                kind, payload = P.decode(msg.data)
                if kind == P.AUDIO:
                    conn.on_audio(payload)
            elif msg.type == WSMsgType.TEXT:
                P.decode(msg.data)                   # raises: text frames are not allowed
            elif msg.type == WSMsgType.ERROR:
                raise P.ProtocolError(f"websocket error: {conn.ws.exception()}")


async def start(model, host: str = "127.0.0.1", port: int = 8998,
                config: ServerConfig | None = None) -> tuple[web.AppRunner, ChatServer, int]:
    """Start the server inside a running asyncio loop; returns (runner, server, bound port)."""
    server = ChatServer(model, config)
    runner = web.AppRunner(server.make_app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, server, port


def describe(server: ChatServer) -> str:
    return json.dumps({"max_sessions": server.config.max_sessions, "voices": len(server.voices)})
