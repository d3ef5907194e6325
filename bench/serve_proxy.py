"""What Ray Serve's proxy hop adds, against the standalone server, in one run on this machine.

    PYTHONPATH=. python bench/serve_proxy.py                          # 60 s echo + 2 x 20 s sessions
    PYTHONPATH=. python bench/serve_proxy.py --messages 250 --seconds 10 --json out.json

1. Round trip of an 80 ms message: a client sends an 80 ms Ogg/Opus audio message (the real size,
   from our encoder on a speech-like signal) every 80 ms and times each echo. The same echo app
   (a websocket route that sends every message back) runs (a) standalone in uvicorn, configured
   as `python -m engine.serve` configures it, in its own process, and (b) as a Ray Serve
   deployment behind Ray's proxy (a local one-node Ray on 127.0.0.1). The model's step is not in
   this path, so the difference is the hop itself: p50 / p99 / max of each and the added p50 / p99.
2. The real server: `python -m engine.serve` (tiny model) and engine.cluster's deployment (one
   replica, same settings), each with `--clients` realtime clients for `--seconds`: continuous
   audio, longest gap and the p99 of the gaps between audio messages (80 ms when on time).

The clients run in this process; both servers run in their own processes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def echo_app():
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    async def echo(ws):
        await ws.accept()
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await ws.send_bytes(msg["bytes"] if msg.get("bytes") is not None else msg["text"].encode())

    return Starlette(routes=[WebSocketRoute("/echo", echo)])


def serve_echo(port_file: str) -> None:
    """Child process: the echo app in uvicorn as engine.serve runs its app (app.uvicorn_server)."""
    import engine  # noqa: F401
    from engine.server.app import ServerConfig, uvicorn_server

    async def main():
        uv = uvicorn_server(echo_app(), "127.0.0.1", 0, ServerConfig())
        task = asyncio.create_task(uv.serve())
        while not uv.started:
            await asyncio.sleep(0.01)
        Path(port_file).write_text(str(uv.servers[0].sockets[0].getsockname()[1]))
        await task

    asyncio.run(main())


def _messages(n: int) -> list[bytes]:
    """n audio messages as a client sends them: 80 ms of speech-like signal each, Ogg/Opus."""
    from engine.audio.opus import OggOpusWriter
    from engine.server import protocol as P
    from engine.server.client import speechlike

    audio = speechlike(n * 0.08 + 0.1, 0)
    w = OggOpusWriter(24000, complexity=5)
    return [P.encode(P.AUDIO, w.append_pcm(audio[i * 1920:(i + 1) * 1920])) for i in range(n)]


async def echo_rtts(url: str, msgs: list[bytes]) -> list[float]:
    """Send each message 80 ms apart (clock-paced), return each round trip in ms."""
    from websockets.asyncio.client import connect

    rtts, sent = [], {}
    async with connect(url, max_size=None, ping_interval=None) as ws:
        async def rx():
            for i in range(len(msgs)):
                await ws.recv()
                rtts.append((time.perf_counter() - sent[i]) * 1e3)
        task = asyncio.create_task(rx())
        t0 = time.perf_counter()
        for i, m in enumerate(msgs):
            await asyncio.sleep(max(0.0, t0 + 0.08 * i - time.perf_counter()))
            sent[i] = time.perf_counter()
            await ws.send(m)
        await asyncio.wait_for(task, 30)
    return rtts


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


async def chat_run(url: str, clients: int, seconds: float) -> dict:
    from engine.server.client import continuous, run_client, speechlike

    arrivals: list[list] = [[] for _ in range(clients)]

    async def one(i):
        await asyncio.sleep(0.3 * i)
        return await run_client(url, speechlike(seconds, i), {"voice_prompt": "NATF0.pt"}, arrivals=arrivals[i])

    results = await asyncio.gather(*[one(i) for i in range(clients)])
    allg = [g * 1e3 for a in arrivals for g in np.diff(a)]
    return {"clients": clients, "seconds": seconds, "continuous": sum(continuous(r) for r in results),
            "errors": [r["error"] for r in results if r["error"]],
            "max_gap_ms": round(max(r["max_gap_s"] for r in results) * 1e3),
            "gap_p50_ms": round(float(np.percentile(allg, 50)), 1) if allg else None,
            "gap_p99_ms": round(float(np.percentile(allg, 99)), 1) if allg else None}


def _start_cli_server(clients: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", "0", "--max-sessions", str(clients)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = ""
    while "serving on" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("engine.serve did not start")
    return proc, int(line.split("127.0.0.1:")[1].split("/")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=750, help="echo messages per path (default 750: 60 s)")
    ap.add_argument("--clients", type=int, default=2, help="realtime sessions per server (default 2)")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per session (default 20)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--serve-echo", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_echo:
        return serve_echo(args.serve_echo)

    import engine  # noqa: F401
    from engine.cluster import LocalCluster, build_app, loopback_only
    loopback_only()
    msgs = _messages(args.messages)
    out = {"cores": os.cpu_count(), "load": round(os.getloadavg()[0], 2),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "message_bytes": int(np.mean([len(m) for m in msgs]))}
    print(json.dumps(out), flush=True)

    # 1. echo: standalone uvicorn (child process) vs Ray's proxy, alternating halves
    port_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_proxy_echo_{os.getpid()}"
    child = subprocess.Popen([sys.executable, __file__, "--serve-echo", str(port_file)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        port = int(port_file.read_text())
        with LocalCluster(nodes=1, gpus_per_node=1) as c:
            from ray import serve

            @serve.deployment(ray_actor_options={"num_cpus": 0})
            @serve.ingress(echo_app)
            class Echo:
                pass

            serve.run(Echo.bind(), name="echo", route_prefix="/")
            half = len(msgs) // 2
            rtt = {"standalone": [], "ray": []}
            for part in (msgs[:half], msgs[half:]):          # interleaved: the same machine state
                rtt["standalone"] += asyncio.run(echo_rtts(f"ws://127.0.0.1:{port}/echo", part))
                rtt["ray"] += asyncio.run(echo_rtts(f"ws://127.0.0.1:{c.port}/echo", part))
            serve.delete("echo")
            echo = {k: _stats(v) for k, v in rtt.items()}
            echo["added_p50_ms"] = round(echo["ray"]["p50_ms"] - echo["standalone"]["p50_ms"], 2)
            echo["added_p99_ms"] = round(echo["ray"]["p99_ms"] - echo["standalone"]["p99_ms"], 2)
            out["echo"] = echo
            print(json.dumps({"echo": echo}), flush=True)

            # 2. the real server, both ways
            proc, cport = _start_cli_server(args.clients)
            try:
                out["chat_standalone"] = asyncio.run(chat_run(f"ws://127.0.0.1:{cport}", args.clients, args.seconds))
            finally:
                proc.terminate()
                proc.wait(60)
            print(json.dumps({"chat_standalone": out["chat_standalone"]}), flush=True)
            serve.run(build_app({"model": "tiny", "num_replicas": 1, "max_sessions": args.clients}),
                      name="personaplex", route_prefix="/")
            out["chat_ray"] = asyncio.run(chat_run(c.url, args.clients, args.seconds))
            print(json.dumps({"chat_ray": out["chat_ray"]}), flush=True)
    finally:
        child.terminate()
        child.wait(30)
        port_file.unlink(missing_ok=True)
    e = out["echo"]
    print(f"echo round trip of an 80 ms message ({out['message_bytes']} bytes), {e['standalone']['n']} each: "
          f"standalone p50 {e['standalone']['p50_ms']} p99 {e['standalone']['p99_ms']} ms; "
          f"Ray proxy p50 {e['ray']['p50_ms']} p99 {e['ray']['p99_ms']} ms; "
          f"added p50 {e['added_p50_ms']} p99 {e['added_p99_ms']} ms")
    for k in ("chat_standalone", "chat_ray"):
        r = out[k]
        print(f"{k}: {r['continuous']}/{r['clients']} continuous, gaps p50 {r['gap_p50_ms']} p99 {r['gap_p99_ms']} "
              f"max {r['max_gap_ms']} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
