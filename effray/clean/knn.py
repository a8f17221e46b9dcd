"""Cosine k-nearest neighbours, blockwise on Ray: memory per task O(block^2 + block*k), never N^2.

The L2-normalised embeddings go into the object store once; one task per query block
maps them (zero-copy) and loops over the key blocks, keeping the best ``k`` with
``torch.topk`` over [its running top-k | this block's similarities]. Queries and keys
may be different sets (train against train + eval + a reference dataset); a query is
never its own neighbour (rows with equal ids are masked).

An embedding may hold several *views* per image (``(N, V, d)``): the similarity of two
images is then the best of ``<a_v, b_0>`` and ``<a_0, b_v>`` over the views ``v``, i.e.
the best alignment of either image's view onto the other's original (see
:mod:`effray.clean.embed`). With one view it is the plain cosine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def pair_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n, V, d) x (m, V, d) -> (n, m)``: max over views v of <a_v, b_0> and <a_0, b_v>;
    one (n, m) buffer, whatever V."""
    sims = a[:, 0] @ b[:, 0].T
    for v in range(1, a.shape[1]):
        torch.maximum(sims, a[:, v] @ b[:, 0].T, out=sims)
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


def row_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Similarity of row ``i`` of ``a`` to row ``i`` of ``b`` (the same measure as :func:`knn`)."""
    x, y = torch.from_numpy(_views(a)), torch.from_numpy(_views(b))
    sims = (x[:, 0] * y[:, 0]).sum(1)
    for v in range(1, x.shape[1]):
        sims = torch.maximum(sims, torch.maximum((x[:, v] * y[:, 0]).sum(1), (x[:, 0] * y[:, v]).sum(1)))
    return sims.numpy()
