"""TypiClust: typical points of the largest uncovered clusters (the low-budget regime).

docs/methods.md section 7: k-means with |L| + B clusters over candidates and labeled
images; clusters holding a labeled image are covered; repeatedly, in the largest uncovered
cluster (ties: lower cluster index), pick its most typical point, typicality = 1 / mean
distance to its `neighbours` nearest neighbours within the cluster; clusters of fewer than
`min_cluster` points are skipped. When no uncovered cluster is left, the largest clusters
give a second point (most typical not yet picked), and so on.

Reference: Hacohen, Dekel, Weinshall, "Active Learning on a Budget: Opposite Strategies
Suit High and Low Budgets", ICML 2022.
"""
from __future__ import annotations

import numpy as np

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, check_budget, json_float


def typicality(x: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """(n,) 1 / mean Euclidean distance to the `neighbours` nearest other points (exact)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.full(n, np.inf)
    k = min(int(neighbours), n - 1)
    out = np.empty(n)
    sq = (x * x).sum(1)
    for a in range(0, n, 2048):  # chunks: memory O(2048 n), not O(n^2)
        d2 = np.maximum(sq[a:a + 2048, None] + sq[None, :] - 2.0 * x[a:a + 2048] @ x.T, 0.0)
        np.fill_diagonal(d2[:, a:a + 2048], np.inf)
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        out[a:a + 2048] = 1.0 / np.maximum(np.sqrt(part).mean(axis=1), 1e-12)
    return out


def kmeans_labels(x: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """FAISS k-means (seeded) -> cluster of each row."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = int(min(max(1, k), len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, lab = km.index.search(x, 1)
    return lab[:, 0].astype(np.int64)


@SELECTORS.register("typiclust", final=True, needs_embedding=True)
def typiclust(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, neighbours: int = 20,
              min_cluster: int = 5, max_clusters: int = 500) -> Selection:
    """TypiClust over image embeddings (labeled images from `ctx.labeled_embedding`).

    Args:
        neighbours: k of the typicality (nearest neighbours within the cluster).
        min_cluster: clusters smaller than this are skipped (the paper's 5).
        max_clusters: cap on |L| + B clusters (k-means cost).

    Returns:
        Selection with score = typicality; rationale {"typiclust": {cluster, cluster_size,
        typicality, rank}}.
    """
    budget = check_budget(budget)
    if "embedding" not in table or table["embedding"] is None:
        raise ValueError("typiclust needs an 'embedding' column (N, d) in the table")
    ids = np.asarray(table["image_id"], dtype=np.int64)
    x = np.ascontiguousarray(table["embedding"], dtype=np.float32)
    n = len(ids)
    lab = ctx.labeled_embedding
    lab = np.zeros((0, x.shape[1]), np.float32) if lab is None or not len(lab) else np.asarray(lab, np.float32)
    b = min(budget, n)
    if b == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    pts = np.concatenate([x, lab])
    seed = int(ctx.rng.integers(2**31 - 1))
    labels = kmeans_labels(pts, min(len(lab) + b, int(max_clusters), len(pts)), seed=seed)
    cand_lab = labels[:n]
    covered = set(labels[n:].tolist())
    sizes = np.bincount(labels, minlength=int(labels.max()) + 1)
    typ = np.full(n, -np.inf)
    for c in np.unique(cand_lab):
        rows = np.flatnonzero(cand_lab == c)
        typ[rows] = typicality(x[rows], neighbours)
    taken = np.zeros(n, dtype=bool)
    picks, scores, rat = [], [], []
    big_enough = [c for c in range(len(sizes)) if sizes[c] >= int(min_cluster)] or list(range(len(sizes)))
    while len(picks) < b:
        pool = [c for c in big_enough if c not in covered and np.any((cand_lab == c) & ~taken)]
        if not pool:  # every cluster covered: start another round over all clusters
            covered = set()
            pool = [c for c in big_enough if np.any((cand_lab == c) & ~taken)]
            if not pool:
                pool = [c for c in range(len(sizes)) if np.any((cand_lab == c) & ~taken)]
        c = max(pool, key=lambda q: (sizes[q], -q))
        rows = np.flatnonzero((cand_lab == c) & ~taken)
        r = int(rows[np.argmax(typ[rows])])
        taken[r] = True
        covered.add(c)
        picks.append(r)
        scores.append(float(typ[r]))
        rat.append({"typiclust": {"cluster": int(c), "cluster_size": int(sizes[c]), "typicality": json_float(typ[r]),
                                  "rank": len(picks)}})
    return Selection(ids[np.asarray(picks, dtype=np.int64)], np.asarray(scores), rat)


__all__ = ["kmeans_labels", "typicality", "typiclust"]
