"""The ASGI server's admission and shutdown on the tiny model: auth token, Origin allowlist,
per-client-address limit, TLS, graceful drain (SIGTERM on `python -m engine.serve`), mounting
in a host app."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine  # noqa: F401  (loads OpenBLAS before mlx)
from engine.server.client import run_client, speechlike

pytest.importorskip("starlette", reason="pip install 'personaplex-engine[serve]'")
pytest.importorskip("uvicorn", reason="pip install 'personaplex-engine[serve]'")
pytest.importorskip("websockets", reason="pip install 'personaplex-engine[serve]'")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CERT, KEY = FIXTURES / "tls_cert.pem", FIXTURES / "tls_key.pem"
FRAME = 1920
TOKEN = "s3cret-t0ken-for-tests"


def _run(model, coro_fn, **cfg):
    from engine.server.app import ServerConfig, start

    tls = cfg.pop("tls", False)

    async def main():
        kw = {"ssl_certfile": str(CERT), "ssl_keyfile": str(KEY)} if tls else {}
        runner, server, port = await start(model, "127.0.0.1", 0, ServerConfig(**cfg), **kw)
        try:
            return await coro_fn(port, server)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def _http(url, headers=None, cafile=None):
    """(status, body) of a GET, in a thread (urllib: no extra client dependency)."""
    import ssl
    import urllib.error
    import urllib.request

    def get():
        ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(get)


def _ok(r, seconds):
    frames = int(seconds * 24000) // FRAME
    return (r["error"] is None and r["handshake_s"] is not None and r["frames_sent"] == frames
            and r["samples"] >= (frames - 8) * FRAME)


def test_auth_token_origin_and_per_client_limit(tiny_model, caplog):
    """No token, a wrong token: refused with the protocol's error and close code 1008 before any
    model work (no session joins), logged without the token. The right token (Bearer header, or
    the query parameter browsers use) is served. A page from a foreign Origin is refused at the
    upgrade (HTTP 403); the server's own origin and allow-listed ones are served. A third
    concurrent session from one address over a limit of 2 is refused (one that a trusted proxy
    says comes from another address is not); `/metrics` needs the token, `/healthz` does not."""
    caplog.set_level(logging.INFO, logger="engine.serve")
    q = {"voice_prompt": "NATF0.pt"}

    async def scenario(port, server):
        url = f"ws://127.0.0.1:{port}"
        audio = speechlike(1.0, 0)
        out = {}
        out["none"] = await run_client(url, audio, q)
        out["wrong"] = await run_client(url, audio, q, token=TOKEN + "x")
        out["short"] = await run_client(url, audio, q, token=TOKEN[:-1])
        out["joined_after_refusals"] = server.metrics.sessions_total
        out["header"] = await run_client(url, audio, q, token=TOKEN)
        out["query"] = await run_client(url, audio, {**q, "token": TOKEN})
        out["foreign"] = await run_client(url, audio, q, token=TOKEN, headers={"Origin": "https://evil.example"})
        out["own"] = await run_client(url, audio, q, token=TOKEN, headers={"Origin": f"http://127.0.0.1:{port}"})
        out["listed"] = await run_client(url, audio, q, token=TOKEN, headers={"Origin": "https://app.example.org"})
        # per-address limit 2: two long sessions, then a third from the same address
        long = [asyncio.create_task(run_client(url, speechlike(4.0, i), q, token=TOKEN)) for i in range(2)]
        t0 = time.monotonic()
        while len(server.conns) < 2 and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        out["third"] = await run_client(url, audio, q, token=TOKEN)
        # from a trusted proxy (uvicorn's default: 127.0.0.1), X-Forwarded-For names the client
        out["forwarded"] = await run_client(url, audio, q, token=TOKEN, headers={"X-Forwarded-For": "198.51.100.7"})
        out["long"] = await asyncio.gather(*long)
        base = f"http://127.0.0.1:{port}"
        out["metrics_none"] = await _http(base + "/metrics")
        out["metrics_ok"] = await _http(base + "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        out["voices_query"] = await _http(base + f"/api/voices?token={TOKEN}")
        out["health"] = await _http(base + "/healthz")
        out["page"] = await _http(base + "/")
        return out, server.metrics

    out, m = _run(tiny_model, scenario, max_sessions=3, auth_token=TOKEN,
                  allowed_origins=("https://app.example.org",), max_sessions_per_client=2)
    for k in ("none", "wrong", "short"):
        r = out[k]
        assert r["handshake_s"] is None and r["close_code"] == 1008, (k, r)
        assert "missing or wrong auth token" in r["error"], (k, r)
    assert out["joined_after_refusals"] == 0                # refused before any model work
    for k in ("header", "query", "own", "listed"):
        assert _ok(out[k], 1.0), (k, out[k])
    assert out["foreign"]["handshake_s"] is None and out["foreign"]["close_code"] == 403
    assert "HTTP 403" in out["foreign"]["error"]
    third = out["third"]
    assert third["close_code"] == 1008 and "too many sessions from your address: 2/2" in third["error"], third
    assert all(_ok(r, 4.0) for r in out["long"]), out["long"]
    assert _ok(out["forwarded"], 1.0), out["forwarded"]
    assert out["metrics_none"][0] == 401 and "auth token" in out["metrics_none"][1]
    assert out["metrics_ok"][0] == 200 and "personaplex_refused_auth_total 4" in out["metrics_ok"][1]
    assert out["voices_query"][0] == 200 and "NATF0.pt" in out["voices_query"][1]
    assert out["health"][0] == 200 and json.loads(out["health"][1])["status"] == "ok"
    assert out["page"][0] == 200 and "static/app.js" in out["page"][1]
    assert (m.refused_auth, m.refused_origin, m.refused_client_limit) == (4, 1, 1)
    assert m.refused == 3 + 1 + 1 and m.sessions_total == 7
    logged = caplog.text
    assert "missing or wrong auth token" in logged and "Origin 'https://evil.example'" in logged
    assert TOKEN[:-1] not in logged                        # no token (nor a prefix of it) in the log


def test_config_errors_are_clear(tiny_model):
    from engine.errors import ConfigError
    from engine.server.app import ChatServer, ServerConfig

    with pytest.raises(ConfigError, match="auth_token is empty"):
        ChatServer(tiny_model, ServerConfig(auth_token="  "))
    with pytest.raises(ConfigError, match="max_sessions_per_client"):
        ChatServer(tiny_model, ServerConfig(max_sessions_per_client=0))
    from engine.serve import main
    assert main(["--ssl-certfile", str(CERT)]) == 2
    assert main(["--ssl-certfile", str(CERT), "--ssl-keyfile", str(FIXTURES / "nope.pem")]) == 2
    assert main(["--max-sessions-per-client", "0"]) == 2


def test_tls_wss_with_a_test_certificate(tiny_model):
    """Over TLS: a client trusting the test certificate streams over wss:// with continuous audio;
    one that does not trust it fails the TLS handshake; https:// /healthz answers."""

    async def scenario(port, server):
        url = f"wss://127.0.0.1:{port}"
        good = await run_client(url, speechlike(1.5, 1), {"voice_prompt": "NATF0.pt"}, cafile=str(CERT))
        untrusted = await run_client(url, speechlike(0.5, 1), {"voice_prompt": "NATF0.pt"})
        plain = await run_client(f"ws://127.0.0.1:{port}", speechlike(0.5, 1), {"voice_prompt": "NATF0.pt"})
        health = await _http(f"https://127.0.0.1:{port}/healthz", cafile=CERT)
        return good, untrusted, plain, health

    good, untrusted, plain, health = _run(tiny_model, scenario, max_sessions=2, tls=True)
    assert _ok(good, 1.5), good
    assert untrusted["handshake_s"] is None and "CERTIFICATE_VERIFY_FAILED" in untrusted["error"], untrusted
    assert plain["handshake_s"] is None and plain["error"]
    assert health[0] == 200 and '"status": "ok"' in health[1]


def test_mounted_in_a_host_app(tiny_model):
    """The app mounted under a prefix of a host Starlette app (as in a user's FastAPI app), the host
    running the server's lifespan: the page (with relative URLs), the voices and a session."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route
    from starlette.responses import PlainTextResponse

    from engine.server.app import ChatServer, ServerConfig

    chat = ChatServer(tiny_model, ServerConfig(max_sessions=2))
    host = Starlette(routes=[Route("/", lambda r: PlainTextResponse("host app")),
                             Mount("/personaplex", chat.make_app())], lifespan=chat.lifespan)

    async def main():
        uv = uvicorn.Server(uvicorn.Config(host, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        task = asyncio.create_task(uv.serve())
        try:
            while not (uv.started and chat.loop.ready.is_set()):
                assert not task.done()
                await asyncio.sleep(0.05)
            port = uv.servers[0].sockets[0].getsockname()[1]
            base = f"http://127.0.0.1:{port}"
            pages = [await _http(base + p) for p in ("/", "/personaplex/", "/personaplex/static/app.js",
                                                     "/personaplex/api/voices", "/personaplex/healthz")]
            r = await run_client(f"ws://127.0.0.1:{port}/personaplex", speechlike(1.0, 2), {"voice_prompt": "NATF1.pt"})
            return pages, r
        finally:
            uv.should_exit = True
            await task

    pages, r = asyncio.run(main())
    assert [p[0] for p in pages] == [200] * 5
    assert pages[0][1] == "host app" and 'src="static/app.js"' in pages[1][1]
    assert 'apiUrl("api/voices")' in pages[2][1] and "NATF1.pt" in pages[3][1]
    assert _ok(r, 1.0), r
    assert not chat.loop.running                         # the host's lifespan stopped the loop


def _start_cli(*extra, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", "0", "--max-sessions", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line, t0 = "", time.monotonic()
    while "serving on" not in line and time.monotonic() - t0 < 180:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    if "serving on" not in line:
        proc.kill()
        raise AssertionError(f"engine.serve did not start: {line} {proc.stderr.read()}")
    return proc, int(line.split("127.0.0.1:")[1].split("/")[0])


@pytest.mark.quiet      # the live session's audio gaps are timed (< 0.5 s): run on idle CPUs
@pytest.mark.parametrize("ends", ["cut", "finish"], ids=["drain-time-over", "sessions-finish"])
def test_sigterm_drains(tmp_path, ends):
    """`python -m engine.serve` on SIGTERM: stops admitting (a new client gets the protocol's error
    and 1013), `/healthz` answers 503 "draining", the live session goes on; at the end of
    --drain-seconds a session still open is closed with 1001 and a reason, and the process exits
    0. A session that ends within the drain time ends normally and the server exits right after.
    The token comes from the environment."""
    drain = 3.0 if ends == "cut" else 20.0
    seconds = 12.0 if ends == "cut" else 4.0
    proc, port = _start_cli("--drain-seconds", str(drain), env={"PERSONAPLEX_AUTH_TOKEN": TOKEN})

    async def scenario():
        url = f"ws://127.0.0.1:{port}"
        live = asyncio.create_task(run_client(url, speechlike(seconds, 3), {"voice_prompt": "NATF0.pt"}, token=TOKEN))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            st, body = await _http(f"http://127.0.0.1:{port}/healthz")
            if json.loads(body)["sessions"] == 1:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        await asyncio.sleep(0.5)
        health = await _http(f"http://127.0.0.1:{port}/healthz")
        t1 = time.monotonic()
        late = await run_client(url, speechlike(0.5, 4), {"voice_prompt": "NATF0.pt"}, token=TOKEN)
        t_late = time.monotonic() - t1
        r = await live
        exited = await asyncio.to_thread(proc.wait, 60)
        return health, late, t_late, r, t_sig, exited

    try:
        health, late, t_late, r, t_sig, rc = asyncio.run(scenario())
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read()
    assert health[0] == 503 and json.loads(health[1])["status"] == "draining", health
    assert late["handshake_s"] is None and late["close_code"] == 1013 and "draining" in late["error"], late
    assert t_late < 1.0
    assert rc == 0, err
    assert "SIGTERM: draining" in err
    # startup progress while the step graphs are traced and rehearsed (2 batch sizes)
    assert "[startup] compiling the step graphs: 2/2 batch sizes" in err
    assert "[startup] rehearsing live steps: 2/2 batch sizes" in err
    if ends == "cut":
        # closed by the server at the end of the drain time, with its reason; audio until then
        assert r["close_code"] == 1001 and "drain time is over" in r["close_reason"], r
        assert "drain time is over" in r["error"]
        assert drain - 0.5 < r["closed_at"] - t_sig < drain + 3.0, r["closed_at"] - t_sig
        assert r["last_audio_at"] - t_sig > drain - 0.5 and r["max_gap_s"] < 0.5
    else:
        assert _ok(r, seconds), r
        assert r["close_code"] == 1000


def test_cli_defaults_and_kernel_cache(monkeypatch, tmp_path, capsys):
    """`python -m engine.serve` serves the tiny model by default and says so in --help; MLX's kernel
    cache goes to the user's cache directory unless MLX_PTX_CACHE_DIR names one."""
    from engine.serve import build_parser, kernel_cache_dir, use_kernel_cache

    p = build_parser()
    assert p.get_default("model") == "tiny" and p.get_default("host") == "127.0.0.1"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert '"tiny" (default' in help_text and "--auth-token" in help_text and "--drain-seconds" in help_text
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_cache_dir() == tmp_path / "personaplex" / "mlx-kernels"
    assert use_kernel_cache() == tmp_path / "personaplex" / "mlx-kernels"
    assert (tmp_path / "personaplex" / "mlx-kernels").is_dir()
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "personaplex" / "mlx-kernels")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mine"))
    assert kernel_cache_dir() == tmp_path / "mine"
