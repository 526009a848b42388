"""Core-set: greedy k-center on image embeddings, labeled images as initial centres.

References: Sener, Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach", ICLR 2018.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, check_budget, json_float

DEFAULT_CHUNK = 65536


def sq_l2_faiss(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """FAISS pairwise squared L2 distances.

    Args:
        x: (a, d) float32.
        y: (b, d) float32.

    Returns:
        (a, b) float32, |x_i - y_j|^2.
    """
    import faiss

    return faiss.pairwise_distances(np.ascontiguousarray(x, dtype=np.float32),
                                    np.ascontiguousarray(y, dtype=np.float32))


def _min_d2_to_set(x: np.ndarray, centres: np.ndarray, chunk: int,
                   distance: Callable | None) -> np.ndarray:
    """(N,) float64 squared distance of each row of x to its nearest centre, chunked."""
    n = len(x)
    out = np.empty(n, dtype=np.float64)
    if distance is None:
        import faiss

        index = faiss.IndexFlatL2(x.shape[1])
        index.add(centres)
        for a in range(0, n, chunk):
            xb = x[a : a + chunk]
            _, nn = index.search(xb, 1)
            # recompute the winner's distance exactly, so values do not depend on the
            # chunk size (FAISS switches between direct and BLAS code paths by batch size)
            diff = xb.astype(np.float64) - centres[nn[:, 0]].astype(np.float64)
            out[a : a + chunk] = np.einsum("ij,ij->i", diff, diff)
        return out
    for a in range(0, n, chunk):
        xb = x[a : a + chunk]
        best = np.full(len(xb), np.inf)
        for c in range(0, len(centres), chunk):
            d = np.asarray(distance(xb, centres[c : c + chunk]), dtype=np.float64)
            np.minimum(best, d.min(axis=1), out=best)
        out[a : a + chunk] = np.maximum(best, 0.0)
    return out


def _update_argmax(x: np.ndarray, centre: np.ndarray, min_d2: np.ndarray, chunk: int,
                   distance: Callable | None) -> int:
    if distance is None:
        from poolscout.kernels.kcenter import update_argmax

        return int(update_argmax(x, centre, min_d2))
    for a in range(0, len(x), chunk):
        d = np.asarray(distance(x[a : a + chunk], centre[None, :]), dtype=np.float64)[:, 0]
        np.minimum(min_d2[a : a + chunk], np.maximum(d, 0.0), out=min_d2[a : a + chunk])
    return int(np.argmax(min_d2))


@SELECTORS.register("coreset", final=True, needs_embedding=True)
def coreset(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, chunk_size: int = DEFAULT_CHUNK,
            first: str = "farthest") -> Selection:
    """k-center greedy: repeatedly take the candidate farthest from its nearest centre.

    Centres start as `ctx.labeled_embedding`. Every candidate keeps its squared distance to
    the nearest centre (N floats): initialised by a FAISS IndexFlatL2 search against the
    labeled centres in chunks of `chunk_size` candidates (or `ctx.distance` in chunks),
    then lowered after each pick with the distances to the new centre. Memory O(N + chunk),
    time O(B N d); never an N x N matrix.

    Without labeled centres the first pick is, by `first`:
      * "farthest" (default): the candidate farthest from the candidate mean (deterministic,
        independent of the RNG and of the row order up to exact ties);
      * "random": a uniform draw from `ctx.rng`.

    Ties go to the lowest row of `table`.

    Args:
        table: "image_id" (N,) and "embedding" (N, d).
        budget: picks (clipped to N).
        ctx: labeled_embedding, distance, rng.
        chunk_size: candidates per distance call.
        first: "farthest" | "random".

    Returns:
        Selection with score = Euclidean distance to the nearest centre at pick time
        (+inf for a random first pick); rationale {"coreset": {"distance", "rank"}} plus
        "init" on a first pick made without labeled centres.

    References:
        Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
        Approach", ICLR 2018; Gonzalez, "Clustering to minimize the maximum intercluster
        distance", TCS 1985.
    """
    budget = check_budget(budget)
    if "embedding" not in table or table["embedding"] is None:
        raise ValueError("coreset needs an 'embedding' column (N, d) in the table")
    if first not in ("farthest", "random"):
        raise ValueError(f"coreset: first must be 'farthest' or 'random', got {first!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"coreset: chunk_size must be >= 1, got {chunk_size!r}")
    chunk = int(chunk_size)
    ids = np.asarray(table["image_id"], dtype=np.int64)
    x = np.ascontiguousarray(table["embedding"], dtype=np.float32)
    n = len(ids)
    if x.ndim != 2 or len(x) != n:
        raise ValueError(f"coreset: embedding must be (N={n}, d), got {x.shape}")
    b = min(budget, n)
    if b == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    lab = ctx.labeled_embedding
    has_lab = lab is not None and len(lab) > 0
    init: dict[str, Any] = {}
    if has_lab:
        lab = np.ascontiguousarray(lab, dtype=np.float32)
        if lab.ndim != 2 or lab.shape[1] != x.shape[1]:
            raise ValueError(f"coreset: labeled_embedding must be (L, {x.shape[1]}), got {lab.shape}")
        min_d2 = _min_d2_to_set(x, lab, chunk, ctx.distance)
        nxt = int(np.argmax(min_d2))
        first_d = math.sqrt(max(min_d2[nxt], 0.0))
    elif first == "farthest":
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        to_mean = np.full(n, np.inf)
        nxt = _update_argmax(x, mean, to_mean, chunk, ctx.distance)
        first_d = math.sqrt(max(to_mean[nxt], 0.0))
        init = {"init": "farthest_from_mean", "distance_to_mean": first_d}
        min_d2 = np.full(n, np.inf)
        first_d = math.inf  # no centre yet: infinitely far
    else:
        nxt = int(ctx.rng.integers(n))
        init = {"init": "random"}
        min_d2 = np.full(n, np.inf)
        first_d = math.inf
    rows = np.empty(b, dtype=np.int64)
    score = np.empty(b)
    rat: list[dict] = []
    for t in range(b):
        idx = nxt
        d = first_d if t == 0 else math.sqrt(max(float(min_d2[idx]), 0.0))
        rows[t] = idx
        score[t] = d
        r = {"distance": json_float(d), "rank": t + 1}
        if t == 0:
            r.update(init)
        rat.append({"coreset": r})
        min_d2[idx] = -np.inf
        if t + 1 < b:
            nxt = _update_argmax(x, x[idx], min_d2, chunk, ctx.distance)
    return Selection(ids[rows], score, rat)
