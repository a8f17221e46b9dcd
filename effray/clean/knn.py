"""Nearest neighbours, blockwise on Ray: memory per task O(block^2 + block*m), never N^2.

The embeddings go into the object store once; one task per query block maps them
(zero-copy) and loops over the key blocks, keeping the best ``m`` with ``torch.topk`` over
[its running top-m | this block's similarities]. Queries and keys may be different sets
(every row and the calibration copies against every row); a query is never its own
neighbour (rows with equal ids are masked).

An embedding may hold several *views* per image (``(N, V, d)``): the similarity of two
images is then the best of ``<a_v, b_0>`` and ``<a_0, b_v>`` over the views ``v`` (keys
with one view: ``<a_v, b_0>`` only). With one view it is the plain cosine.

:func:`relative_knn` is the near-copy search: that pass shortlists ``m`` candidates per
query, the pixel embedder's alignment search re-scores them
(:func:`effray.clean.pixels.fine_views`), and each query keeps its best ``k`` with its
*baseline*, the mean similarity of its neighbours ranked :data:`BASELINE`. A pair's
:func:`relative_score` is how much closer it is than that baseline: a plain background
makes many unrelated images similar to a query, and a copy stands out from its query's
crowd, not from a fixed similarity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from effray.clean.pixels import best_view_similarity, fine_views

BASELINE = (10, 30)  # ranks (0 = the nearest other image) whose mean similarity is the query's baseline
SHORTLIST = 50  # candidates per query the first pass keeps (>= BASELINE[1])
REFINE_ROWS = 256  # queries re-scored at once: views of these x their candidates, bounded memory


def pair_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n, V, d) x (m, W, d) -> (n, m)``: max over views v of <a_v, b_0> and (when b has
    that view) <a_0, b_v>; one (n, m) buffer, whatever V."""
    sims = a[:, 0] @ b[:, 0].T
    for v in range(1, a.shape[1]):
        torch.maximum(sims, a[:, v] @ b[:, 0].T, out=sims)
        if v < b.shape[1]:
            torch.maximum(sims, a[:, 0] @ b[:, v].T, out=sims)
    return sims


def block_topk(
    queries: np.ndarray,
    keys: np.ndarray,
    start: int,
    stop: int,
    k: int,
    block: int,
    query_ids: np.ndarray,
    key_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` keys of queries ``start:stop``: ``(similarities, key positions)``, best
    first; ``-1`` / ``-inf`` pad when there are fewer than ``k`` other keys."""
    q = torch.from_numpy(np.ascontiguousarray(queries[start:stop]))
    qid = torch.from_numpy(np.asarray(query_ids[start:stop]))
    best = torch.full((len(q), k), -torch.inf)
    where = torch.full((len(q), k), -1, dtype=torch.int64)
    for s in range(0, len(keys), block):
        kb = torch.from_numpy(np.ascontiguousarray(keys[s : s + block]))
        sims = pair_similarity(q, kb)
        sims.masked_fill_(qid[:, None] == torch.from_numpy(np.asarray(key_ids[s : s + block]))[None, :], -torch.inf)
        pos = torch.arange(s, s + len(kb)).expand(len(q), -1)
        best, pick = torch.topk(torch.cat([best, sims], 1), k, dim=1)
        where = torch.gather(torch.cat([where, pos], 1), 1, pick)
    where[torch.isinf(best)] = -1
    return best.numpy(), where.numpy()


def baseline(sims: torch.Tensor, ranks: tuple[int, int] = BASELINE) -> torch.Tensor:
    """(n, m) similarities, best first -> (n,) mean of the finite ones ranked ``ranks``
    (with fewer other images: of every finite one after the first; with none: 0)."""

    def mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ok = torch.isfinite(x)
        count = ok.sum(1)
        return torch.where(ok, x, 0.0).sum(1) / count.clamp_min(1), count

    main, count = mean(sims[:, ranks[0] : ranks[1]])
    rest, rest_count = mean(sims[:, 1:])
    return torch.where(count > 0, main, torch.where(rest_count > 0, rest, torch.zeros_like(rest)))


def relative_score(sims: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``(1 - baseline) / (1 - similarity)``: 1 for a pair no closer than the query's
    crowd, large for a copy (a missing neighbour, ``-inf``, scores 0)."""
    s = np.asarray(sims, np.float64)
    b = np.asarray(base, np.float64).reshape(-1, *([1] * (s.ndim - 1)))
    with np.errstate(invalid="ignore"):
        out = (1.0 - b) / np.maximum(1.0 - s, 1e-4)
    return np.where(np.isfinite(s), out, 0.0)


def relative_block(
    queries: np.ndarray,
    keys: np.ndarray,
    start: int,
    stop: int,
    k: int,
    shortlist: int,
    block: int,
    query_ids: np.ndarray,
    key_ids: np.ndarray,
    query_thumbs: np.ndarray | None,
    key_fine: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Ray task of :func:`relative_knn`: ``(similarities (n, k), key positions (n, k),
    baselines (n,))`` of queries ``start:stop``."""
    sims_np, where_np = block_topk(queries, keys, start, stop, shortlist, block, query_ids, key_ids)
    sims, where = torch.from_numpy(sims_np), torch.from_numpy(where_np)
    if query_thumbs is not None:
        fine = torch.from_numpy(np.asarray(key_fine))
        for a in range(0, len(sims), REFINE_ROWS):
            cand = where[a : a + REFINE_ROWS]
            views = fine_views(torch.from_numpy(np.ascontiguousarray(query_thumbs[start + a : start + a + len(cand)])))
            refined = best_view_similarity(views, fine[cand.clamp_min(0)])
            sims[a : a + len(cand)] = refined.masked_fill(cand < 0, -torch.inf)
        sims, order = torch.sort(sims, 1, descending=True)
        where = torch.gather(where, 1, order)
    return sims[:, :k].numpy(), where[:, :k].numpy(), baseline(sims).numpy()


def relative_knn(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray,
    key_ids: np.ndarray,
    shortlist: int = SHORTLIST,
    block: int = 2048,
    query_thumbs: np.ndarray | None = None,
    key_fine: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's ``k`` most similar keys and its baseline, on the current Ray cluster:
    ``(similarities (Nq, k), key positions (Nq, k), baselines (Nq,))``. ``queries``/``keys``
    are the first pass's embeddings (``(N, V, d)`` or ``(N, d)``); with ``query_thumbs`` and
    ``key_fine`` (the pixel embedder) the ``shortlist`` each query's first pass keeps is
    re-scored by the alignment search."""
    import ray

    keys, queries = _views(keys), _views(queries)
    refs = {
        "queries": ray.put(queries),
        "keys": ray.put(keys),
        "query_ids": ray.put(np.asarray(query_ids, np.int64)),
        "key_ids": ray.put(np.asarray(key_ids, np.int64)),
        "query_thumbs": None if query_thumbs is None else ray.put(query_thumbs),
        "key_fine": None if key_fine is None else ray.put(np.asarray(key_fine, np.float32)),
    }
    task = ray.remote(num_cpus=1, max_retries=2)(relative_block)
    m = max(k, min(shortlist, len(keys)))
    parts = ray.get(
        [
            task.remote(
                refs["queries"],
                refs["keys"],
                s,
                min(s + block, len(queries)),
                k,
                m,
                block,
                refs["query_ids"],
                refs["key_ids"],
                refs["query_thumbs"],
                refs["key_fine"],
            )
            for s in range(0, len(queries), block)
        ]
    )
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def knn(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    block: int = 2048,
    query_ids: np.ndarray | None = None,
    key_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` most similar keys on the current Ray cluster: ``(similarities
    (Nq, k), key positions (Nq, k))``. ``query_ids``/``key_ids`` (default: positions) say
    which query is which key, so it is not its own neighbour."""
    import ray

    same = queries is keys
    keys = _views(keys)
    queries = keys if same else _views(queries)
    query_ids = np.arange(len(queries)) if query_ids is None else np.asarray(query_ids, np.int64)
    key_ids = np.arange(len(keys)) if key_ids is None else np.asarray(key_ids, np.int64)
    k_ref = ray.put(keys)
    q_ref = k_ref if same else ray.put(queries)
    task = ray.remote(num_cpus=1, max_retries=2)(block_topk)
    qid_ref, kid_ref = ray.put(query_ids), ray.put(key_ids)
    refs = [
        task.remote(q_ref, k_ref, s, min(s + block, len(queries)), k, block, qid_ref, kid_ref)
        for s in range(0, len(queries), block)
    ]
    parts = ray.get(refs)
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def brute_knn(
    queries: np.ndarray, keys: np.ndarray, k: int, query_ids: Any = None, key_ids: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the whole (Nq, Nk) similarity matrix at once (tests only)."""
    q, kk = torch.from_numpy(_views(queries)), torch.from_numpy(_views(keys))
    sims = pair_similarity(q, kk)
    qid = torch.as_tensor(np.arange(len(q)) if query_ids is None else query_ids)
    kid = torch.as_tensor(np.arange(len(kk)) if key_ids is None else key_ids)
    sims.masked_fill_(qid[:, None] == kid[None, :], -torch.inf)
    best, where = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    where[torch.isinf(best)] = -1
    return best.numpy(), where.numpy()


def _views(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x[:, None, :] if x.ndim == 2 else x
