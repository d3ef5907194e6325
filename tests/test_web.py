"""Our web page in headless Chromium against the tiny-model server: the fake microphone (a wav
file) streams through WebCodecs Opus in Ogg, the agent's audio is decoded and its text shown.
Driven through the DevTools protocol (aiohttp websocket); a screenshot goes to the artifacts dir
($ARTIFACTS_DIR, default ./artifacts)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import pytest

import engine  # noqa: F401

aiohttp = pytest.importorskip("aiohttp", reason="pip install 'personaplex-engine[test]'")
pytest.importorskip("sphn", reason="pip install 'personaplex-engine[serve]'")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_wav(path: Path, seconds: float = 30.0, sr: int = 48000) -> None:
    t = np.arange(int(seconds * sr)) / sr
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.5 * t)
    x = (0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2) * 0.2 * np.sin(2 * np.pi * np.cumsum(f0) / sr)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())


class _Cdp:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method, **params):
        self.n += 1
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
def test_web_page_streams_in_headless_chromium(tiny_model, tmp_path):
    from engine.server.app import ServerConfig, start

    wav = tmp_path / "mic.wav"
    _write_wav(wav)
    art = Path(os.environ.get("ARTIFACTS_DIR", ROOT / "artifacts"))
    art.mkdir(parents=True, exist_ok=True)
    shot = art / "web_page.png"
    dbg = _free_port()

    async def main():
        runner, server, port = await start(tiny_model, "127.0.0.1", 0, ServerConfig(max_sessions=2))
        profile = tempfile.mkdtemp(prefix="chromium-")
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
            f"--remote-debugging-port={dbg}", f"--user-data-dir={profile}", "--window-size=900,800",
            "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as s:
                targets = None
                for _ in range(150):
                    try:
                        async with s.get(f"http://127.0.0.1:{dbg}/json/list") as r:
                            targets = [t for t in await r.json() if t["type"] == "page"]
                        if targets:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
                assert targets, "Chromium did not open a DevTools page target"
                async with s.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    cdp = _Cdp(ws)
                    await cdp.call("Page.enable")
                    await cdp.call("Page.navigate", url=f"http://127.0.0.1:{port}/?autostart=1&voice=NATF1.pt")
                    stats, deadline = {}, time.monotonic() + 60
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.5)
                        stats = json.loads(await cdp.eval("JSON.stringify(window.ppStats || {})") or "{}")
                        if stats.get("errors"):
                            break
                        if stats.get("decodedFrames", 0) > 100 and stats.get("textPieces", 0) > 5:
                            break
                    transcript = await cdp.eval("document.getElementById('transcript').textContent")
                    status = await cdp.eval("document.getElementById('status').textContent")
                    png = await cdp.call("Page.captureScreenshot", format="png")
                    shot.write_bytes(base64.b64decode(png["data"]))
                    m = server.metrics
                    inbox = [c.inbox for c in server.conns]
                    return stats, transcript, status, m, inbox
        finally:
            proc.terminate()
            await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            await runner.cleanup()

    stats, transcript, status, m, inbox = asyncio.run(main())
    assert not stats.get("errors"), stats
    assert stats["handshake"] and "Live" in status
    assert stats["sentMessages"] > 20                  # the fake microphone streamed Ogg/Opus
    assert stats["decodedFrames"] > 100                # agent audio decoded in the page
    assert stats["textPieces"] > 5 and transcript.strip()
    assert m.sessions_total == 1 and m.closed_error == 0
    assert m.in_underrun_frames < 0.5 * m.steps        # the server really got the page's audio
    assert shot.stat().st_size > 5000
