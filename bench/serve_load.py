"""Requests/s and latency of `effray serve` with dynamic batching on vs off, side by side.

Starts the app on a free 127.0.0.1 port (never another address), sends a fixed number of
PNG requests from a few concurrent client threads (each request bounded in time, the
whole run bounded in count and time), reads the replica's model-call sizes from
``GET /stats``, and shuts Serve down. "Off" is ``max_batch_size=1``: one model call per
request. The clients run on the same machine as the server, so on a small machine they
compete with it for the cores: the ratio is the figure, not the absolute numbers.

    python bench/serve_load.py --model CHECKPOINT_OR_ARTIFACT_OR_EXPORT [--requests 400 --clients 8]

``bench/deploy.py`` calls :func:`measure_serve`.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import threading
import time
from typing import Any

import numpy as np

TIMEOUT_S = 30.0  # one request's longest wait
MAX_BATCH = 32


def png_payloads(image_shape: list[int], n: int, seed: int = 0) -> list[bytes]:
    """``n`` seeded random images of the model's size, PNG-encoded (the bytes a client sends)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _client(
    port: int, payloads: list[bytes], count: int, deadline: float, latencies: list[float], errors: list[str]
) -> None:
    """One client: ``count`` POSTs on one keep-alive connection (reopened after a failure)."""
    conn = None
    for i in range(count):
        if time.monotonic() > deadline:
            errors.append("run deadline passed")
            break
        body = payloads[i % len(payloads)]
        started = time.perf_counter()
        try:
            conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                continue
            latencies.append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(type(exc).__name__)
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def measure_serve(
    model_path: str,
    *,
    requests: int,
    clients: int,
    batching: bool,
    max_batch_size: int = MAX_BATCH,
    batch_wait_timeout_s: float = 0.005,
    run_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Serve ``model_path`` on a free loopback port, send ``requests`` single-image POSTs
    from ``clients`` threads, shut Serve down. Batching on: ``max_batch_size`` per model
    call; off: 1. Returns ``requests_per_s``, ``p50_ms``, ``p99_ms``, ``errors`` and the
    model calls' mean size. Joins the current Ray, or starts a local one (left running)."""
    import ray
    import torch

    from effray.cluster import free_port, init_ray
    from effray.deploy.config import ServeConfig
    from effray.deploy.model import load_deployable
    from effray.deploy.serve import start, stop

    if not ray.is_initialized():
        init_ray(log_to_driver=False)
    info = load_deployable(model_path, device="cpu").info
    port = free_port()
    cfg = ServeConfig(
        model=model_path,
        host="127.0.0.1",
        port=port,
        max_batch_size=max_batch_size if batching else 1,
        batch_wait_timeout_s=batch_wait_timeout_s if batching else 0.0,
    )
    payloads = png_payloads(info.image_shape, 16)
    url = start(cfg)
    assert url == f"http://127.0.0.1:{port}", url  # only ever loopback
    try:
        warm_lat: list[float] = []
        _client(
            port, payloads, 2 * clients, time.monotonic() + run_timeout_s, warm_lat, []
        )  # first calls pay for lazy init
        before = _get_json(port, "/stats")
        latencies: list[float] = []
        errors: list[str] = []
        per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
        deadline = time.monotonic() + run_timeout_s
        threads = [
            threading.Thread(target=_client, args=(port, payloads, n, deadline, latencies, errors), daemon=True)
            for n in per_client
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + TIMEOUT_S)
        seconds = time.perf_counter() - started
        after = _get_json(port, "/stats")
    finally:
        stop()
    calls = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    n_calls = sum(calls.values())
    ms = np.asarray(latencies) * 1000.0
    return {
        "batching": batching,
        "max_batch_size": cfg.max_batch_size,
        "requests": requests,
        "clients": clients,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / max(seconds, 1e-9), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "model_calls": n_calls,
        "mean_batch": round(sum(k * v for k, v in calls.items()) / max(n_calls, 1), 2),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model_kind": info.kind,
    }


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint, compressed artifact or `effray export` output")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH)
    args = p.parse_args()
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's per-start INFO lines; the table is the output
    off = measure_serve(args.model, requests=args.requests, clients=args.clients, batching=False)
    on = measure_serve(
        args.model, requests=args.requests, clients=args.clients, batching=True, max_batch_size=args.max_batch_size
    )
    print(
        f"# effray serve, {args.requests} PNG requests from {args.clients} client threads on 127.0.0.1; "
        f"{on['model_kind']} model; cpu capability {on['cpu_capability']}, {os.cpu_count()} cores"
    )
    print(f"| | batching off (max_batch_size 1) | batching on (max_batch_size {on['max_batch_size']}) | on / off |")
    print("| --- | --- | --- | --- |")
    for label, key, better in (
        ("requests/s", "requests_per_s", "higher"),
        ("p50 latency (ms)", "p50_ms", "lower"),
        ("p99 latency (ms)", "p99_ms", "lower"),
        ("images per model call", "mean_batch", ""),
        ("errors", "errors", ""),
    ):
        ratio = f"{on[key] / off[key]:.2f}x" if better and on[key] and off[key] else ""
        print(f"| {label} | {off[key]} | {on[key]} | {ratio} |")
    print(
        json.dumps(
            {
                "off": off,
                "on": on,
                "ratio_requests_per_s": round(on["requests_per_s"] / max(off["requests_per_s"], 1e-9), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
