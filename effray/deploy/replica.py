"""One ``effray serve`` replica: the model, the request checks and the batching queue.

Each replica holds one :class:`~effray.deploy.model.Deployable` (loaded once, in
``__init__``) behind a plain Starlette ingress:

- ``POST /predict``: one image's bytes (PNG/JPEG), or JSON ``{"images": ["<base64>", ...]}``;
  answers class, label, per-class probabilities, top-5 and the model's provenance (a list
  of those for a batch). An image of another size than the model takes goes through the
  model's preprocessing (short side resized, centre cropped), and its answer says so
  (``resized``: from, to, the preprocessing).
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
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from effray.data.augment import preprocess_image
from effray.deploy.config import ServeConfig
from effray.deploy.model import load_deployable

TOP = 5  # classes in each answer's "top5"


class BadRequest(Exception):
    """A client's mistake: answered with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_request_image(
    data: bytes, image_shape: list[int], resize: str = "", max_pixels: int = 40_000_000
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """PNG/JPEG bytes -> (HWC uint8 of the model's size, what was resized or None). An image
    of another size goes through ``resize`` (the model's preprocessing). Its size is checked
    from the header before decoding, so a small file that would decode to a huge image
    costs nothing."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = image_shape
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise BadRequest(413, f"image is {im.size[0]}x{im.size[1]} (WxH), over the {max_pixels:,}-pixel limit")
            if im.size != (w, h) and not resize:
                raise BadRequest(400, f"image is {im.size[0]}x{im.size[1]} (WxH), the model takes {w}x{h}")
            im.load()
            arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise BadRequest(400, "body is not an image (PNG/JPEG expected)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise BadRequest(
            400, f"corrupt image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.shape[:2] == (h, w):
        return arr, None
    return preprocess_image(arr, resize), {"from": list(arr.shape[:2]), "to": [h, w], "preprocess": resize}


def answer(
    logits: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    model: dict[str, Any],
    resized: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image's JSON answer from its logits and its probabilities as the model gives them
    (:meth:`Deployable.calibrated`: its recorded temperature applied); ``resized``: the image
    was of another size."""
    p = probs
    order = np.argsort(-logits, kind="stable")[:TOP]
    best = int(order[0])
    return {
        "class_name": classes[best],
        "label": best,
        "probability": float(p[best]),
        "probabilities": {c: float(v) for c, v in zip(classes, p)},
        "top5": [{"label": int(i), "class_name": classes[int(i)], "probability": float(p[i])} for i in order],
        "model": model,
        **({"resized": resized} if resized else {}),
    }


class ClassifierServer:
    """A Serve replica: the model, the request checks, and the batching queue."""

    def __init__(self, cfg: ServeConfig) -> None:
        import torch
        from ray import serve

        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self.deployable = load_deployable(cfg.model, device="auto", kind=cfg.kind, trust_code=cfg.trust_code)
        info = self.deployable.info
        self.model = {
            "kind": info.kind,
            "source": info.source,
            "provenance": info.provenance,
            "temperature": info.temperature,  # the probabilities are softmax(logits / temperature)
        }
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
                images, resized, batched = await self.read_images(request)
                logits = await asyncio.gather(*(self.infer(img) for img in images))
                info = self.deployable.info
                probs = self.deployable.calibrated(logits)
                answers = [answer(z, q, info.classes, self.model, r) for z, q, r in zip(logits, probs, resized)]
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
                        "preprocess": info.resize,  # what an image of another size goes through
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

    async def read_images(self, request: Any) -> tuple[list[np.ndarray], list[dict[str, Any] | None], bool]:
        """(decoded images at the model's size, what each was resized from, whether the
        request was a JSON batch)."""
        body = await self.read_body(request)
        shape, resize = self.deployable.info.image_shape, self.deployable.info.resize
        if not request.headers.get("content-type", "").startswith("application/json"):
            image, resized = decode_request_image(body, shape, resize, self.cfg.max_image_pixels)
            return [image], [resized], False
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
        images, resized = [], []
        for i, text in enumerate(items):
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(400, f"images[{i}] is not valid base64") from None
            try:
                image, was = decode_request_image(data, shape, resize, self.cfg.max_image_pixels)
            except BadRequest as bad:
                raise BadRequest(bad.status, f"images[{i}]: {bad.reason}") from None
            images.append(image)
            resized.append(was)
        return images, resized, True
