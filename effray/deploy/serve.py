"""``effray serve``: an online endpoint on Ray Serve.

One deployment, its replicas each holding one :class:`~effray.deploy.model.Deployable`
(loaded once, in ``__init__``), behind a plain Starlette ingress:

- ``POST /predict``: one image's bytes (PNG/JPEG of the model's size), or JSON
  ``{"images": ["<base64>", ...]}``; answers class, label, per-class probabilities, top-5
  and the model's provenance (a list of those for a batch).
- ``GET /healthz``: the model's name, kind and classes (answered once the replica loaded).
- ``GET /stats``: this replica's requests and the sizes of the model calls it made.

Every image, single or from a JSON batch, goes through one ``@serve.batch`` queue, so
concurrent requests share model calls (dynamic batching). A bad request gets a 4xx with a
one-line JSON reason, checked before any pixel is decoded where possible (the size from
the PNG/JPEG header, the body's length from Content-Length and while reading), and the
replica keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.config import option, require
from effray.console import say
from effray.deploy.model import load_deployable
from effray.errors import EffrayError

APP_NAME = "effray"
DEPLOYMENT_NAME = "effray-classifier"
TOP = 5  # classes in each answer's "top5"
READY_TIMEOUT_S = 60.0
MIN_ONGOING_REQUESTS = 64  # requests a replica holds at once (each one decoded image)


@dataclass(frozen=True)
class ServeConfig:
    """Which model to serve, where, on what."""

    model: str = option("", "checkpoint, compressed artifact or `effray export` output")
    kind: str = option(
        "", "which file of an export directory: torch, onnx, onnx-int8, torch-int8 ('' = the first present)"
    )
    host: str = option(
        "127.0.0.1",
        "address to bind; anything but loopback is reachable by others and has no authentication of its own",
    )
    port: int = option(8000, "HTTP port")
    replicas: int = option(1, "model replicas")
    gpus_per_replica: float = option(-1.0, "GPUs per replica (-1 = 1 when the cluster has GPUs, else 0)")
    cpus_per_replica: float = option(1.0, "CPUs per replica")
    max_batch_size: int = option(32, "requests batched into one model call (@serve.batch)")
    batch_wait_timeout_s: float = option(0.01, "longest a request waits for its batch to fill")
    max_request_bytes: int = option(4 << 20, "largest request body accepted (413 beyond)")
    max_images_per_request: int = option(64, "most images in one JSON batch request (400 beyond)")

    def validate(self) -> None:
        require(bool(self.model), "--model PATH is required (a checkpoint, artifact or `effray export` output)")
        require(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        require(self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        require(self.max_batch_size >= 1, f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        require(self.batch_wait_timeout_s >= 0, f"--batch-wait-timeout-s must be >= 0, got {self.batch_wait_timeout_s}")
        require(self.max_request_bytes > 0, f"--max-request-bytes must be positive, got {self.max_request_bytes}")
        require(
            self.max_images_per_request >= 1,
            f"--max-images-per-request must be >= 1, got {self.max_images_per_request}",
        )
        require(
            self.gpus_per_replica == -1 or self.gpus_per_replica >= 0,
            f"--gpus-per-replica must be >= 0 (or -1 = auto), got {self.gpus_per_replica}",
        )
        require(self.cpus_per_replica > 0, f"--cpus-per-replica must be positive, got {self.cpus_per_replica}")


class BadRequest(Exception):
    """A client's mistake: answered with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_request_image(data: bytes, image_shape: list[int]) -> np.ndarray:
    """PNG/JPEG bytes -> HWC uint8 of the model's size. The size is checked from the
    header before decoding, so a small file that would decode to a huge image costs nothing."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = image_shape
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (w, h):
                raise BadRequest(400, f"image is {im.size[0]}x{im.size[1]} (WxH), the model takes {w}x{h}")
            im.load()
            arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise BadRequest(400, "body is not an image (PNG/JPEG expected)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise BadRequest(
            400, f"corrupt image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def answer(logits: np.ndarray, classes: list[str], model: dict[str, Any]) -> dict[str, Any]:
    """One image's JSON answer from its logits."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-logits, kind="stable")[:TOP]
    best = int(order[0])
    return {
        "class_name": classes[best],
        "label": best,
        "probability": float(p[best]),
        "probabilities": {c: float(v) for c, v in zip(classes, p)},
        "top5": [{"label": int(i), "class_name": classes[int(i)], "probability": float(p[i])} for i in order],
        "model": model,
    }


class ClassifierServer:
    """A Serve replica: the model, the request checks, and the batching queue."""

    def __init__(self, cfg: ServeConfig) -> None:
        import torch
        from ray import serve

        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self.deployable = load_deployable(cfg.model, device="auto", kind=cfg.kind)
        info = self.deployable.info
        self.model = {"kind": info.kind, "source": info.source, "provenance": info.provenance}
        self.model_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="effray-model"
        )  # one model call at a time
        self.batch_sizes: Counter[int] = Counter()
        self.counts: Counter[str] = Counter()
        # one image in, its logits out; Serve gathers concurrent calls into one model_call
        self.infer = serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)(
            self.model_call
        )

    async def model_call(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Logits of images queued by concurrent requests, in one model call; the call runs
        in a thread so the event loop keeps accepting (and queueing) requests meanwhile."""
        batch = np.stack(images)
        logits = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.deployable.logits, batch)
        self.batch_sizes[len(images)] += 1
        return list(logits)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        def reply(body: Any, status: int = 200) -> Response:
            return Response(json.dumps(body, default=str), status_code=status, media_type="application/json")

        route = (request.method, request.url.path.rstrip("/") or "/")
        try:
            if route == ("POST", "/predict"):
                images, batched = await self.read_images(request)
                logits = await asyncio.gather(*(self.infer(img) for img in images))
                answers = [answer(z, self.deployable.info.classes, self.model) for z in logits]
                self.counts["requests"] += 1
                self.counts["images"] += len(images)
                return reply({"predictions": answers} if batched else answers[0])
            if route == ("GET", "/healthz"):
                info = self.deployable.info
                return reply(
                    {
                        "status": "ok",
                        "model": info.provenance.get("model") or info.source,
                        "kind": info.kind,
                        "classes": info.classes,
                        "image_shape": info.image_shape,
                        "source": info.source,
                    }
                )
            if route == ("GET", "/stats"):
                return reply(
                    {
                        **self.counts,
                        "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                        "max_batch_size": self.cfg.max_batch_size,
                    }
                )
            known = {"/predict": "POST", "/healthz": "GET", "/stats": "GET"}
            if route[1] in known:
                raise BadRequest(405, f"{route[0]} {route[1]} is not served; use {known[route[1]]} {route[1]}")
            raise BadRequest(404, f"no route {route[1]}; use POST /predict, GET /healthz or GET /stats")
        except BadRequest as bad:
            self.counts["bad_requests"] += 1
            return reply({"error": bad.reason}, bad.status)
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the replica down
            self.counts["failed_requests"] += 1
            return reply(
                {
                    "error": f"prediction failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
                },
                500,
            )

    async def read_body(self, request: Any) -> bytes:
        """The body, refused with 413 once it passes the limit: from Content-Length before
        reading, and while reading (a client may send more than it declared, or no length)."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(400, f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                raise BadRequest(
                    413, f"body of {int(declared)} bytes is over the {limit}-byte limit (--max-request-bytes)"
                )
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise BadRequest(413, f"body is over the {limit}-byte limit (--max-request-bytes)")
            parts.append(part)
        body = b"".join(parts)
        if not body:
            raise BadRequest(
                400, 'empty body: POST one PNG/JPEG image (Content-Type image/png) or JSON {"images": [base64, ...]}'
            )
        return body

    async def read_images(self, request: Any) -> tuple[list[np.ndarray], bool]:
        """(decoded images, whether the request was a JSON batch)."""
        body = await self.read_body(request)
        shape = self.deployable.info.image_shape
        if not request.headers.get("content-type", "").startswith("application/json"):
            return [decode_request_image(body, shape)], False
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise BadRequest(
                400,
                f"body is not valid JSON ({exc.msg} at byte {exc.pos})"
                if hasattr(exc, "msg")
                else "body is not valid JSON",
            ) from None
        items = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
            raise BadRequest(400, 'JSON body must be {"images": ["<base64 PNG/JPEG>", ...]} with at least one image')
        if len(items) > self.cfg.max_images_per_request:
            raise BadRequest(
                400,
                f"{len(items)} images in one request, at most {self.cfg.max_images_per_request} "
                "(--max-images-per-request); split the batch",
            )
        images = []
        for i, text in enumerate(items):
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(400, f"images[{i}] is not valid base64") from None
            try:
                images.append(decode_request_image(data, shape))
            except BadRequest as bad:
                raise BadRequest(bad.status, f"images[{i}]: {bad.reason}") from None
        return images, True


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

    load_deployable(cfg.model, device="cpu", kind=cfg.kind)  # a bad model fails here, not in a replica's retries
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
