"""The server on Ray Serve (engine/cluster.py), on this CPU with the tiny model: a local Ray cluster
of two nodes (Ray's own `ray.cluster_utils.Cluster`, one logical GPU each, everything on
127.0.0.1), two replicas of two sessions each, realtime clients through Ray's proxy."""
from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import pytest

import engine  # noqa: F401  (loads OpenBLAS before mlx)
from engine.server.client import run_client, speechlike

# Before ray is imported: every node on 127.0.0.1, no usage statistics (engine.cluster.loopback_only)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
pytest.importorskip("ray.serve", reason="pip install 'personaplex-engine[cluster]'")

# Realtime judgements (gaps, the 1 s refusal): after the rest of the suite, on idle CPUs
# (tests/conftest.py); an idle cluster of these two replicas takes ~9 % of the 2 cores.
pytestmark = pytest.mark.quiet

FRAME = 1920
Q = {"voice_prompt": "NATF0.pt"}
APP = {"model": "tiny", "num_replicas": 2, "max_sessions": 2, "drain_seconds": 4.0}


def _deploy(args: dict) -> None:
    from ray import serve

    from engine.cluster import build_app
    serve.run(build_app(args), name="personaplex", route_prefix="/")


@pytest.fixture(scope="module")
def cluster():
    from engine.cluster import LocalCluster

    with LocalCluster(nodes=2, gpus_per_node=1) as c:
        _deploy(APP)
        yield c


def _get(port: int, path: str, timeout: float = 10.0):
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - t0


def _replicas() -> list[str]:
    import ray
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::personaplex#ChatReplica"))


def _running_replicas() -> int:
    from ray import serve
    app = serve.status().applications.get("personaplex")
    if app is None or app.status != "RUNNING":
        return 0
    dep = app.deployments["ChatReplica"]
    return dep.replica_states.get("RUNNING", 0)


def _client_process(url: str, specs: list, conn) -> None:
    """Child process: one realtime client per (seconds, seed, start delay) in `specs`; sends
    ("joined", i) on each handshake, then ("done", results). The clients run apart from the test
    process, whose Ray calls block its thread, as real clients run apart from the server."""
    import asyncio

    from engine.server.client import run_client, speechlike

    async def main():
        results = [{} for _ in specs]

        async def one(i, seconds, seed, delay):
            await asyncio.sleep(delay)
            await run_client(url, speechlike(seconds, seed), Q, result=results[i])

        tasks = [asyncio.create_task(one(i, *spec)) for i, spec in enumerate(specs)]
        told = set()
        while not all(t.done() for t in tasks):
            for i, r in enumerate(results):
                if i not in told and (r.get("handshake_at") or r.get("error")):
                    told.add(i)
                    conn.send(("joined", i, r.get("error")))
            await asyncio.sleep(0.02)
        conn.send(("done", results))

    asyncio.run(main())


class Clients:
    """Realtime clients in a child process: `Clients(url, [(seconds, seed, delay), ...])`;
    `wait_joined(n)`, then `results()`."""

    def __init__(self, url: str, specs: list):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_process, args=(url, specs, child), daemon=True)
        self.proc.start()
        self.joined: dict = {}
        self._results = None

    def _poll(self, timeout: float) -> None:
        if self.conn.poll(timeout):
            msg = self.conn.recv()
            if msg[0] == "joined":
                self.joined[msg[1]] = msg[2]
            else:
                self._results = msg[1]

    def wait_joined(self, n: int, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        while len(self.joined) < n and self._results is None:
            assert time.monotonic() - t0 < timeout, f"{len(self.joined)}/{n} clients joined in {timeout} s"
            self._poll(0.05)
        errors = [e for e in self.joined.values() if e]
        assert not errors, errors

    def results(self, timeout: float = 120.0) -> list[dict]:
        t0 = time.monotonic()
        while self._results is None:
            assert time.monotonic() - t0 < timeout and self.proc.is_alive() or self.conn.poll(), "clients hung"
            self._poll(0.1)
        self.proc.join(10)
        return self._results


def _continuous(r: dict, until: float | None = None) -> bool:
    frames = r["frames_sent"]
    return r["handshake_s"] is not None and r["samples"] >= (frames - 8) * FRAME


def test_two_replicas_four_sessions_fifth_busy_health_answers(cluster):
    """4 realtime clients through Ray's proxy all get continuous audio (2 per replica: each
    replica holds 2); a 5th gets the protocol's "busy" error with close code 1013 in under 1 s;
    `/healthz` answers while every session slot is taken."""
    assert _running_replicas() == 2
    clients = Clients(cluster.url, [(8.0, i, 0.3 * i) for i in range(4)])
    clients.wait_joined(4)
    t0 = time.monotonic()
    fifth = asyncio.run(run_client(cluster.url, speechlike(1.0, 9), Q))
    t_fifth = time.monotonic() - t0
    health = [_get(cluster.port, "/healthz") for _ in range(4)]
    results = clients.results()
    for r in results:
        assert r["error"] is None and r["frames_sent"] == 100 and _continuous(r), r
        assert r["max_gap_s"] < 0.5, r["long_gaps"]
    assert fifth["handshake_s"] is None and fifth["close_code"] == 1013, fifth
    assert "server full: 2/2 sessions in use" in fifth["error"] and t_fifth < 1.0, (fifth, t_fifth)
    for status, body, dt in health:
        assert status == 200 and json.loads(body)["sessions"] == 2 and dt < 1.0, (status, body, dt)


def test_killed_replica_drops_only_its_sessions_and_reconnects_land(cluster):
    """Killing one replica's actor drops exactly its 2 sessions (abnormal close, 1006, within 2 s);
    the other 2 go on with continuous audio to their end, without a gap over 160 ms while the kill
    is handled (from 0.5 s before it to 0.8 s after). Once Ray has restarted the replica, both
    dropped clients reconnect and are served (they land on the restarted replica: the other one
    is full). Here both "GPU nodes" share this machine's 2 cores: from ~1 s after the kill the
    replacement's process start (Ray's worker, imports, model, graph traces) takes the survivors'
    CPU and stretched their gaps to 0.2-0.5 s in runs on a loaded machine, so over the whole
    session their gaps are held to 1 s; on real nodes the replacement starts on its own node."""
    import ray

    assert _running_replicas() == 2
    names = _replicas()
    assert len(names) == 2
    clients = Clients(cluster.url, [(30.0, i, 0.3 * i) for i in range(4)])
    clients.wait_joined(4)
    time.sleep(2.0)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    # Ray replaces the replica (a new actor, running once its step loop is ready) and tells the
    # proxy; the replica is back for clients when the proxy routes a request to it (the only
    # replica without sessions). Then the two dropped clients come back.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        now = _replicas()
        if (len(now) == 2 and len(set(now) - set(names)) == 1 and _running_replicas() == 2
                and json.loads(_get(cluster.port, "/healthz")[1])["sessions"] == 0):
            break
        time.sleep(0.2)
    t_back = time.monotonic() - t_kill

    async def reconnect():
        async def one(i):
            await asyncio.sleep(0.3 * i)
            return await run_client(cluster.url, speechlike(3.0, 10 + i), Q)
        return await asyncio.gather(*[one(i) for i in range(2)])

    again = asyncio.run(reconnect())
    results = clients.results()
    dropped = [r for r in results if r["close_code"] == 1006]
    assert len(dropped) == 2, [(r["close_code"], r["error"]) for r in results]
    for r in dropped:
        assert r["closed_at"] - t_kill < 2.0, r
    for r in results:
        if r["close_code"] == 1006:
            continue
        assert r["error"] is None and r["frames_sent"] == 375 and _continuous(r), r
        kill_at = t_kill - r["handshake_at"]                 # on the long_gaps clock
        near = [g for t, g in r["long_gaps"] if -0.5 < t - kill_at < 0.8]
        assert max(near, default=0) < 0.16, (kill_at, r["long_gaps"])
        assert r["max_gap_s"] < 1.0, (kill_at, r["long_gaps"])
    assert t_back < 120, "the replica was not replaced"
    for r in again:
        assert r["error"] is None and r["handshake_s"] is not None and _continuous(r), r


def test_redeploy_drains(cluster):
    """A redeploy (here: a new server setting) replaces the replicas; Ray stops routing to a
    replica being replaced, which lets its live session go on for its drain time (4 s) and then
    closes it with 1001 and a reason, never an abnormal close. New sessions are served by the new
    replicas, and the redeploy ends with 2 running replicas."""
    assert _running_replicas() == 2
    old = _replicas()
    clients = Clients(cluster.url, [(40.0, i, 0.3 * i) for i in range(2)])
    clients.wait_joined(2)
    time.sleep(1.0)
    t_redeploy = time.monotonic()
    _deploy({**APP, "opus_complexity": 4})
    after = asyncio.run(run_client(cluster.url, speechlike(2.0, 20), Q))
    results = clients.results()
    assert _running_replicas() == 2 and not set(_replicas()) & set(old)
    for r in results:
        assert r["close_code"] == 1001 and "drain time is over" in r["close_reason"], r
        # audio went on until the drain time was over
        assert r["closed_at"] - t_redeploy > 4.0 - 0.5 and r["last_audio_at"] > r["closed_at"] - 0.5, r
        assert r["handshake_s"] is not None and r["max_gap_s"] < 0.5, r["long_gaps"]
    assert after["error"] is None and after["handshake_s"] is not None and _continuous(after), after


def test_serve_run_with_the_example_config(cluster, tmp_path):
    """`serve run examples/cluster.yaml` (Ray's CLI, the shipped config unchanged) against this
    cluster: its application replaces the test's and serves a session; /healthz shows the config's
    8 session slots. Runs last: it leaves the config's application deployed."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_cli), "run", "--address", cluster.cluster.address, str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0, body = time.monotonic(), {}
        while time.monotonic() - t0 < 180 and proc.poll() is None:
            try:
                status, text, _ = _get(cluster.port, "/healthz", timeout=5)
                body = json.loads(text) if status == 200 else {}
            except OSError:
                body = {}
            if body.get("max_sessions") == 8:
                break
            time.sleep(0.5)
        assert body.get("max_sessions") == 8, proc.stdout.read() if proc.poll() is not None else body
        r = asyncio.run(run_client(cluster.url, speechlike(2.0, 30), Q))
        assert r["error"] is None and r["handshake_s"] is not None and _continuous(r), r
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
