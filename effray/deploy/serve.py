"""``effray serve``: an online endpoint on Ray Serve.

One deployment of :class:`~effray.deploy.replica.ClassifierServer` replicas (the HTTP
routes, request checks and dynamic batching live there); this module starts it on the
cluster, waits until it answers, serves until interrupted and shuts Serve down again.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import threading
import time
import urllib.request
from typing import Any

from effray.config import require
from effray.console import say
from effray.deploy.config import ServeConfig
from effray.deploy.model import load_deployable
from effray.deploy.replica import ClassifierServer
from effray.errors import EffrayError

APP_NAME = "effray"
DEPLOYMENT_NAME = "effray-classifier"
READY_TIMEOUT_S = 60.0
MIN_ONGOING_REQUESTS = 64  # requests a replica holds at once (each one decoded image)


# ------------------------------------------------------------------ starting and stopping


def resolve_gpus(gpus_per_replica: float, cluster: dict[str, float]) -> float:
    """``-1``: one GPU per replica when the cluster has GPUs, else none."""
    if gpus_per_replica >= 0:
        return gpus_per_replica
    return 1.0 if cluster.get("GPU", 0) > 0 else 0.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(host: str, port: int) -> str:
    """Where this machine reaches the endpoint (a wildcard bind is reached on loopback)."""
    reach = (
        "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    )
    return f"http://{reach}:{port}"


def build_app(cfg: ServeConfig, cluster: dict[str, float]) -> Any:
    """The Serve application: ``cfg.replicas`` replicas of :class:`ClassifierServer`."""
    from ray import serve

    gpus = resolve_gpus(cfg.gpus_per_replica, cluster)
    require(
        gpus == 0 or cluster.get("GPU", 0) >= gpus,
        f"--gpus-per-replica {gpus:g} but the cluster has {cluster.get('GPU', 0):g} GPUs; pass --gpus-per-replica 0 "
        "to serve on CPUs",
    )
    deployment = serve.deployment(
        ClassifierServer,
        name=DEPLOYMENT_NAME,
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus},
        # a replica must accept a whole batch's requests at once, or batches never fill; and as
        # many with batching off, so that requests wait in its queue, not in the router's backoff
        max_ongoing_requests=max(2 * cfg.max_batch_size, MIN_ONGOING_REQUESTS),
        max_constructor_retry_count=2,
    )
    return deployment.bind(cfg)


def bind_warning(host: str, port: int) -> str | None:
    """The line said when the endpoint is reachable from other machines, else None."""
    if is_loopback(host):
        return None
    return (
        f"effray: warning: serving on {host}:{port}, reachable from other machines; the endpoint has no "
        "authentication of its own, so put it behind the cluster's ingress (auth, TLS)"
    )


def start(cfg: ServeConfig) -> str:
    """Start Serve on ``cfg.host:cfg.port`` and the app on it; return its URL once
    ``/healthz`` answers. Doesn't block: :func:`stop` ends it. Refuses (one line) when
    Serve already runs on the cluster: its HTTP options are fixed once started, so this
    app would answer on another port than the one asked for; a failed start shuts Serve
    down again."""
    import ray
    from ray import serve

    load_deployable(
        cfg.model, device="cpu", kind=cfg.kind, trust_code=cfg.trust_code
    )  # a bad model fails here, not in a replica's retries
    app = build_app(cfg, ray.cluster_resources())
    running = serve.status()
    require(
        not running.applications and not running.proxies,
        f"Ray Serve is already running on this cluster (applications: {', '.join(running.applications) or 'none'}); "
        "stop it first (`serve shutdown -y`): its HTTP host and port can't change while it runs",
    )
    warning = bind_warning(cfg.host, cfg.port)
    if warning:
        say(warning)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = url_of(cfg.host, cfg.port)
        wait_ready(url)
    except BaseException:
        stop()
        raise
    return url


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """``GET /healthz`` until it answers 200; its JSON."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
                return json.loads(resp.read())
        except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 404 while routes settle
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise EffrayError(
        f"{url}/healthz did not answer within {timeout_s:.0f} s ({last}); is --port {url.rsplit(':', 1)[1]} "
        "free and reachable, or is Serve already running on this cluster with other HTTP options?"
    )


def stop() -> None:
    """Shut Serve down on this cluster: the app, its replicas and the HTTP proxies."""
    from ray import serve

    serve.shutdown()


def serve_forever(cfg: ServeConfig) -> dict[str, Any]:
    """Start, print the URL, serve until interrupted (Ctrl-C; `ray job stop`'s SIGTERM, or
    SIGINT with RAY_JOB_STOP_SIGNAL=SIGINT), then shut Serve down: its controller is a
    detached actor and would outlive this process otherwise. Returns what ran, for how long,
    and the requests a single replica answered."""
    started = time.monotonic()
    url = start(cfg)
    say(
        f'[effray] serving {cfg.model} at {url}: POST {url}/predict (an image, or JSON {{"images": [base64, ...]}}), '
        f"GET {url}/healthz; Ctrl-C stops"
    )
    previous = _sigterm_interrupts()
    stats: dict[str, Any] = {}
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("[effray] interrupted: shutting Serve down")
        stats = _replica_stats(url) if cfg.replicas == 1 else {}
    finally:
        stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {
        "url": url,
        "model": cfg.model,
        "replicas": cfg.replicas,
        "max_batch_size": cfg.max_batch_size,
        "served_s": round(time.monotonic() - started, 1),
        **({"replica_stats": stats} if stats else {}),
    }


def _sigterm_interrupts() -> Any:
    """Make SIGTERM raise KeyboardInterrupt (in the main thread only, where Python delivers
    signals); returns the handler it replaced, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _replica_stats(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=2) as resp:
            return json.loads(resp.read())
    except Exception:  # noqa: BLE001 - a summary nicety: never in the way of shutting down
        return {}


def serve(cfg: ServeConfig) -> dict[str, Any]:
    """``effray serve``: see :func:`serve_forever`."""
    return serve_forever(cfg)
