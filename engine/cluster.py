"""The server on Ray Serve: one replica per GPU, each with its own model and batched step loop.

    serve run examples/cluster.yaml            # on a Ray cluster (or a local one Ray starts)

Each replica (`ChatReplica`, `ray_actor_options: {num_gpus: 1}`) loads the model, starts its
step loop with `max_sessions` slots and serves the same ASGI app as `python -m engine.serve`
(engine/server/app.py) as the deployment's ingress; Ray's proxy routes each new request to a
replica and a websocket stays on the replica that accepted it for its whole life.

How Ray's routing is used (measured with Ray 2.60; docs/serving.md):
- A websocket holds one of the replica's `max_ongoing_requests` for its whole life, and plain
  HTTP routes share those slots. So `max_ongoing_requests = max_sessions + HTTP_HEADROOM`: a
  replica with every session slot taken still answers `/healthz`, `/metrics` and the page, and a
  session request beyond its slots reaches the app, which refuses it at once with the protocol's
  error and close code 1013 ("server full, try again later"). Ray's own backpressure would queue
  it (`max_queued_requests` >= 1) or answer a bare HTTP 500.
- Ray's default router prefers the proxy's own node and compares two sampled replicas; ours
  (engine/_ray_router.py) sends a request to the replica with the fewest ongoing requests of
  all, so a new conversation lands on a replica with free slots whenever one has them; when
  every replica is full, the one it reaches says "busy".
- Drain: on a redeploy or scale-down Ray stops routing to the replica and waits for its ongoing
  requests up to `graceful_shutdown_timeout_s`. The replica sees the drain start, answers
  `/healthz` 503 "draining", refuses new sessions, lets live ones go on for `drain_seconds`,
  then closes those left with 1001 and a reason, before Ray's deadline (`drain_seconds` +
  `SHUTDOWN_MARGIN_S`) would cut them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import fields

log = logging.getLogger("engine.serve")

HTTP_HEADROOM = 16        # ongoing requests a replica takes beyond its sessions (health, metrics, refusals)
SHUTDOWN_MARGIN_S = 10.0  # Ray's force-kill deadline after our own drain time


def _replica_draining() -> bool | None:
    """Whether Ray has started to shut this replica down (redeploy, scale-down, serve shutdown);
    None where that cannot be read. Ray has no public hook before its drain (the user's `__del__`
    runs after it), so this reads the replica actor's own flag."""
    try:
        from ray._private.worker import global_worker
        actor = global_worker.actors.get(global_worker.actor_id)
        return bool(actor._replica_impl._shutting_down)
    except Exception:  # noqa: BLE001 - another Ray version: no early drain signal
        return None


class ChatReplica:
    """One replica: the model, one `ChatServer` (its step loop and ASGI app). Arguments as in
    `build_app`'s args; `server` holds `ServerConfig` fields."""

    async def __init__(self, model: str = "tiny", quantize=None, model_dir: str | None = None,
                   offline: bool | None = None, compile: bool = True, server: dict | None = None,
                   startup_timeout: float = 1200.0):
        from .serve import TOKEN_ENV, use_kernel_cache

        use_kernel_cache()
        from .api import PersonaPlex
        from .server.app import ChatServer, ServerConfig

        server = dict(server or {})
        if server.get("auth_token") is None and os.environ.get(TOKEN_ENV):
            server["auth_token"] = os.environ[TOKEN_ENV]
        if "warm_prompts" in server:
            server["warm_prompts"] = tuple(tuple(w) for w in server["warm_prompts"])
        if "allowed_origins" in server:
            server["allowed_origins"] = tuple(server["allowed_origins"])
        cfg = ServerConfig(**server)
        t0 = time.monotonic()
        self.model = await asyncio.to_thread(PersonaPlex.load, model, quantize=quantize, model_dir=model_dir,
                                             offline=offline, progress=False)
        if compile:
            self.model.worker.call(self.model.lm.compile)
        self.chat = ChatServer(self.model, cfg)
        self.chat.loop.on_progress = lambda stage, d, n, s: log.warning("startup: %s %d/%d (%.0f s)", stage, d, n, s)
        self.chat.ensure_started()
        # Serve only once the loop is ready: Ray routes to a replica as soon as __init__ returns.
        loop = self.chat.loop
        while not loop.ready.is_set():
            if not loop.running and loop.failure is not None:
                raise loop.failure
            if time.monotonic() - t0 > startup_timeout:
                raise TimeoutError(f"the step loop did not start within {startup_timeout:g} s")
            await asyncio.sleep(0.05)
        log.warning("replica ready in %.1f s: %s, %d session slots", time.monotonic() - t0, model, cfg.max_sessions)
        self._watch = asyncio.get_running_loop().create_task(self._watch_drain())

    def __serve_build_asgi_app__(self):
        return self.chat.make_app()

    def check_health(self) -> None:
        """Ray's health check: a step loop that died makes the replica unhealthy (Ray replaces it)."""
        loop = self.chat.loop
        if not loop.running and not self.chat.draining:
            raise RuntimeError(f"the step loop stopped: {loop.failure}")

    async def _watch_drain(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if _replica_draining():
                closed = await self.chat.drain()
                log.warning("replica drained (%d sessions closed at the end of the drain time)", closed)
                return


def replica_options(max_sessions: int, drain_seconds: float) -> dict:
    """Deployment options that follow from the session slots and the drain time."""
    return {"max_ongoing_requests": max_sessions + HTTP_HEADROOM,
            "graceful_shutdown_timeout_s": drain_seconds + SHUTDOWN_MARGIN_S,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0}


def deployment():
    """The Ray Serve deployment class (ray is imported here, not at module import), routed by
    engine._ray_router.LeastSessionsRouter."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    router = RequestRouterConfig(request_router_class="engine._ray_router:LeastSessionsRouter")
    return serve.deployment(name="ChatReplica", ray_actor_options={"num_gpus": 1},
                            request_router_config=router)(serve.ingress()(ChatReplica))


def build_app(args: dict | None = None):
    """Ray Serve application builder (`import_path: engine.cluster:build_app`). args: `model`,
    `quantize`, `model_dir`, `offline`, `compile`, `num_replicas` (default 1; one per GPU),
    `num_gpus` (per replica, default 1), and any `ServerConfig` field (`max_sessions`,
    `drain_seconds`, `max_sessions_per_client`, `allowed_origins`, ...). The auth token comes from
    `PERSONAPLEX_AUTH_TOKEN` in the replicas' environment (runtime_env) rather than the config file."""
    from .server.app import ServerConfig

    args = dict(args or {})
    names = {f.name for f in fields(ServerConfig)}
    server = {k: args.pop(k) for k in list(args) if k in names}
    num_replicas = int(args.pop("num_replicas", 1))
    num_gpus = float(args.pop("num_gpus", 1))
    known = {"model", "quantize", "model_dir", "offline", "compile", "startup_timeout"}
    unknown = set(args) - known
    if unknown:
        from .errors import ConfigError
        raise ConfigError(f"unknown engine.cluster args {sorted(unknown)}: use {sorted(known)}, num_replicas, "
                          f"num_gpus or ServerConfig fields {sorted(names)}")
    cfg = ServerConfig(**{k: v for k, v in server.items() if k in ("max_sessions", "drain_seconds")})
    opts = replica_options(cfg.max_sessions, cfg.drain_seconds)
    return deployment().options(num_replicas=num_replicas, ray_actor_options={"num_gpus": num_gpus},
                                **opts).bind(server=server, **args)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_only() -> None:
    """Keep Ray on 127.0.0.1 and quiet: no usage statistics, and the loopback address as every
    node's own (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray reads when it is imported; set here
    in the environment for the processes it starts, and in this process's copy of the constant
    where ray was imported already)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:
        consts.ENABLE_RAY_CLUSTER = False


class LocalCluster:
    """A Ray cluster on this machine for tests and benchmarks: `nodes` nodes (Ray's own
    `ray.cluster_utils.Cluster`), each with `gpus_per_node` logical GPUs, all of Ray's traffic on
    127.0.0.1 (Ray binds the host's network address otherwise), no dashboard, no usage reporting,
    Serve's proxy on the head node only at 127.0.0.1:`http_port` (0: a free port).

        with LocalCluster(nodes=2) as c:
            serve.run(build_app({...}), route_prefix="/")
            ... c.url ...
    """

    def __init__(self, nodes: int = 2, gpus_per_node: int = 1, cpus_per_node: int = 2, http_port: int = 0,
                 object_store_mb: int = 100):
        self.nodes, self.gpus, self.cpus = nodes, gpus_per_node, cpus_per_node
        self.port = http_port or _free_port()
        self.object_store = object_store_mb * 2**20
        self.cluster = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> "LocalCluster":
        loopback_only()
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        node = {"num_cpus": self.cpus, "num_gpus": self.gpus, "node_ip_address": "127.0.0.1",
                "object_store_memory": self.object_store}
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={**node, "include_dashboard": False, "dashboard_host": "127.0.0.1"})
        try:
            if not self.cluster.address.startswith("127.0.0.1:"):
                raise RuntimeError(f"Ray's head node is at {self.cluster.address}, not on 127.0.0.1")
            for _ in range(self.nodes - 1):
                self.cluster.add_node(**node)
            ray.init(address=self.cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                     include_dashboard=False)
            serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location="HeadOnly")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None
