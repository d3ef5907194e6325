"""`python -m engine.serve`: the PersonaPlex websocket server with one batched step loop.

    python -m engine.serve --port 8998 --max-sessions 8                  # the tiny model (default)
    python -m engine.serve --model nvidia/personaplex-7b-v1 --quantize 4 --max-sessions 16 \
        --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem --auth-token "$TOKEN"

Endpoints: `/api/chat` (the reference web client's protocol), `/` (our page), `/healthz`,
`/metrics` (Prometheus text). Echo cancellation is left to the client (browsers do it). An ASGI
app (Starlette) served by uvicorn; SIGTERM (or Ctrl-C) drains: no new sessions, `/healthz` 503
"draining", live sessions go on for up to --drain-seconds, then are closed with a reason.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from .cli import add_asr_arg
from .errors import EngineError

TOKEN_ENV = "PERSONAPLEX_AUTH_TOKEN"


def kernel_cache_dir() -> Path:
    """Where MLX keeps the CUDA kernels it compiles: the user's cache directory unless
    MLX_PTX_CACHE_DIR says otherwise (MLX's own default, /tmp/mlx, is lost at reboot; a cold
    16-session start on a GPU compiles for ~220 s, ~10 s with the cache)."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return Path(os.environ["MLX_PTX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "personaplex" / "mlx-kernels"


def use_kernel_cache() -> Path:
    """Point MLX's kernel cache at kernel_cache_dir() (before any kernel is compiled)."""
    path = kernel_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.environ["MLX_PTX_CACHE_DIR"] = str(path)
    except OSError as e:
        print(f"warning: cannot create the kernel cache {path} ({e}); MLX uses its default", file=sys.stderr)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 faces the network)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 = any free port)")
    p.add_argument("--model", default="tiny",
                   help='"tiny" (default: the embedded tiny model, random weights, babbles), a Hugging Face '
                        'repo id such as nvidia/personaplex-7b-v1, or a local model directory')
    p.add_argument("--model-dir", default=None, help="local directory with the model files (used instead of --model)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--quantize", default=None, help="4, 8 or none (default: none)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--idle-timeout", type=float, default=10.0,
                   help="close a session after this many seconds without audio (default 10)")
    p.add_argument("--silence-timeout", type=float, default=300.0,
                   help="close a session after this many seconds of silent audio (default 300)")
    p.add_argument("--static", default=None, help="serve this directory at / instead of our page")
    p.add_argument("--warm", action="append", default=None, metavar="VOICE[:PROMPT]",
                   help="run this voice (+ prompt preset or text) prompt phases before serving, so the "
                        "first session using it does not delay the others; repeatable (default NATF0)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="mx.compile the batched steps (one graph per batch size, traced and rehearsed "
                        "before serving; fewer kernel launches on a GPU, ~25%% less CPU time on the tiny "
                        "model). Default on; --no-compile runs them op by op")
    p.add_argument("--kv", default="model", choices=("model", "fp8"), dest="kv_dtype",
                   help="how the sessions' KV rings are stored: model = the model's dtype (default, bf16); "
                        "fp8 = e4m3 bytes, half the memory and half the attention's reads, with some damage "
                        "to the attention (docs/performance.md says what was measured)")
    p.add_argument("--fused", default="auto",
                   choices=("auto", "off", "depformer", "attention", "all"),
                   help="batched CUDA kernels: auto (default) = where MLX runs on CUDA, the depformer of all "
                        "sessions as one kernel on ticks of up to 16 sessions and MLX's graphs above (faster "
                        "there), and the attention over each session's KV ring as kernels that read its "
                        "stored slots only; the MLX path elsewhere; off = MLX only; depformer / "
                        "attention / all = those kernels at every session count (CUDA only)")
    p.add_argument("--opus-complexity", type=int, default=5, choices=range(11), metavar="0..10",
                   help="libopus encoder complexity for the agent's audio (default 5: a quarter of the "
                        "CPU of 10 at about the same bitrate)")
    sec = p.add_argument_group("security")
    sec.add_argument("--auth-token", default=None,
                     help=f"require this token (default: ${TOKEN_ENV}; none when unset): clients send "
                          "`Authorization: Bearer TOKEN`, browsers open /?token=TOKEN. /healthz and the "
                          "page's files stay open")
    sec.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="also accept websockets from pages of this origin, e.g. https://app.example.org "
                          "(repeatable; '*' = any). Default: only the server's own pages")
    sec.add_argument("--max-sessions-per-client", type=int, default=None, metavar="N",
                     help="sessions one client address may hold at once (default: no limit)")
    sec.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM): serve https:// and wss://")
    sec.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM) of --ssl-certfile")
    sec.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                     help="take the client address (per-client limit, logs) from X-Forwarded-For when the "
                          "connection comes from these proxy addresses (comma list; default: uvicorn's, "
                          "$FORWARDED_ALLOW_IPS or 127.0.0.1, a reverse proxy on this machine)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C: how long live sessions may go on before they are closed "
                        "(default 30; a second signal stops at once)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every session event")
    add_asr_arg(p, shows="send what each user says to the clients that ask for it (query user_text=1) "
                         "as metadata messages {\"user_text\": ...}; text messages stay the agent's")
    return p


def _check_args(args) -> str | None:
    if args.max_sessions < 1:
        return f"--max-sessions={args.max_sessions} must be >= 1"
    if args.idle_timeout <= 0 or args.silence_timeout <= 0:
        return "--idle-timeout and --silence-timeout must be > 0"
    if args.max_sessions_per_client is not None and args.max_sessions_per_client < 1:
        return f"--max-sessions-per-client={args.max_sessions_per_client} must be >= 1"
    if args.drain_seconds < 0:
        return f"--drain-seconds={args.drain_seconds} must be >= 0"
    if args.auth_token is not None and not args.auth_token.strip():
        return f"the auth token is empty; set a real one (e.g. `openssl rand -hex 24`) or unset ${TOKEN_ENV}"
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        return "TLS needs both --ssl-certfile and --ssl-keyfile"
    if args.ssl_certfile:
        import ssl
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        except (OSError, ssl.SSLError) as e:
            return (f"cannot use --ssl-certfile {args.ssl_certfile} / --ssl-keyfile {args.ssl_keyfile}: {e} "
                    "(both PEM files, the key matching the certificate)")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.auth_token is None:
        args.auth_token = os.environ.get(TOKEN_ENV)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    err = _check_args(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cache = use_kernel_cache()
    try:
        from .api import PersonaPlex
        from .audio.opus import load_opus
        from .server.app import ServerConfig
        load_opus()                      # before the (long) model load: a missing libopus fails fast
        if args.fused not in ("auto", "off"):
            from .models.fused import cuda_backend
            if not cuda_backend():
                print(f"error: --fused {args.fused} needs MLX's CUDA backend with the GPU as default device; "
                      "use --fused auto (the MLX path here) or off", file=sys.stderr)
                return 2
        model = PersonaPlex.load(args.model, quantize=args.quantize, model_dir=args.model_dir,
                                 offline=args.offline or None, asr=args.asr)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e}; install the server extra: pip install 'personaplex-engine[serve]'",
              file=sys.stderr)
        return 1
    cfg = ServerConfig(max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                       silence_timeout=args.silence_timeout, static_dir=args.static,
                       compiled=args.compile, opus_complexity=args.opus_complexity, fused=args.fused,
                       kv_dtype=args.kv_dtype,
                       auth_token=args.auth_token, allowed_origins=tuple(args.allow_origin),
                       max_sessions_per_client=args.max_sessions_per_client, drain_seconds=args.drain_seconds)
    if args.warm:
        cfg.warm_prompts = tuple((w.split(":", 1)[0].removesuffix(".pt"), w.split(":", 1)[1] if ":" in w else None)
                                 for w in args.warm)
    if args.compile:
        model.worker.call(model.lm.compile)
    try:
        return asyncio.run(_serve(model, args, cfg, cache))
    except KeyboardInterrupt:
        return 130
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        model.close()


async def _serve(model, args, cfg, cache: Path) -> int:
    from .server.app import ChatServer, uvicorn_server

    server = ChatServer(model, cfg)
    aloop = asyncio.get_running_loop()
    state = {"signals": 0, "drain": None}

    def progress(stage, done, total, seconds):
        print(f"[startup] {stage}: {done}/{total} batch sizes ({seconds:.0f} s; kernel cache {cache})",
              file=sys.stderr, flush=True)

    server.loop.on_progress = progress

    def on_signal(sig):                      # signal handler: only hands over to the event loop
        state["signals"] += 1
        aloop.call_soon_threadsafe(_on_signal, sig)

    def _on_signal(sig):
        if state["signals"] > 1:
            print("stopping now", file=sys.stderr, flush=True)
            uv.should_exit = uv.force_exit = True
            return
        print(f"{signal.Signals(sig).name}: draining, up to {cfg.drain_seconds:g} s for "
              f"{len(server.conns)} live sessions (again to stop at once)", file=sys.stderr, flush=True)
        state["drain"] = asyncio.ensure_future(_drain())

    async def _drain():
        closed = await server.drain()
        if closed:
            print(f"closed {closed} sessions at the end of the drain", file=sys.stderr, flush=True)
        uv.should_exit = True

    uv = uvicorn_server(server.make_app(), args.host, args.port, cfg, args.ssl_certfile, args.ssl_keyfile,
                        on_signal=on_signal, forwarded_allow_ips=args.forwarded_allow_ips)
    task = asyncio.create_task(uv.serve())
    while not (server.loop.ready.is_set() and uv.started):
        if task.done():
            return 1 if task.exception() else 0
        if server._started and not server.loop.running and server.loop.failure is not None:
            print(f"error: the step loop did not start: {server.loop.failure}", file=sys.stderr)
            uv.should_exit = True
            await task
            return 1
        await asyncio.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if args.ssl_certfile else "http"
    print(f"serving on {scheme}://{args.host}:{port}/ (max {cfg.max_sessions} sessions"
          f"{', token required' if cfg.auth_token else ''})", flush=True)
    await task
    return 0


if __name__ == "__main__":
    sys.exit(main())
