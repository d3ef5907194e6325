"""`python -m engine.serve`: the PersonaPlex websocket server with one batched step loop.

    python -m engine.serve --host 127.0.0.1 --port 8998 --model nvidia/personaplex-7b-v1 \
        --quantize 4 --max-sessions 16

Endpoints: `/api/chat` (the reference web client's protocol), `/` (our page), `/healthz`,
`/metrics` (Prometheus text). Echo cancellation is left to the client (browsers do it).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .cli import add_asr_arg
from .errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 = any free port)")
    p.add_argument("--model", default="nvidia/personaplex-7b-v1",
                   help='"tiny", a Hugging Face repo id or a local model directory')
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
    p.add_argument("--fused", default="auto", choices=("auto", "off", "depformer", "temporal", "all"),
                   help="batched CUDA kernels: auto (default) = the depformer of all sessions as one kernel "
                        "where MLX runs on CUDA, the MLX path elsewhere; off = MLX only; depformer / "
                        "temporal / all = those kernels (CUDA only; the temporal one is slower at 16 "
                        "sessions, see docs/performance_serve.md)")
    p.add_argument("--opus-complexity", type=int, default=5, choices=range(11), metavar="0..10",
                   help="libopus encoder complexity for the agent's audio (default 5: a quarter of the "
                        "CPU of 10 at about the same bitrate)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every session event")
    add_asr_arg(p, shows="send what each user says to the clients that ask for it (query user_text=1) "
                         "as metadata messages {\"user_text\": ...}; text messages stay the agent's")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.max_sessions < 1:
        print(f"error: --max-sessions={args.max_sessions} must be >= 1", file=sys.stderr)
        return 2
    if args.idle_timeout <= 0 or args.silence_timeout <= 0:
        print("error: --idle-timeout and --silence-timeout must be > 0", file=sys.stderr)
        return 2
    try:
        from .api import PersonaPlex
        from .audio.opus import load_opus
        from .server.app import ServerConfig, start
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
                       compiled=args.compile, opus_complexity=args.opus_complexity, fused=args.fused)
    if args.warm:
        cfg.warm_prompts = tuple((w.split(":", 1)[0].removesuffix(".pt"), w.split(":", 1)[1] if ":" in w else None)
                                 for w in args.warm)
    if args.compile:
        model.worker.call(model.lm.compile)

    async def run() -> None:
        runner, server, port = await start(model, args.host, args.port, cfg)
        print(f"serving on http://{args.host}:{port}/ (max {cfg.max_sessions} sessions)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
