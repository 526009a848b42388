"""Cluster-Margin: the most uncertain candidates, round-robin over embedding clusters.

docs/methods.md section 7. The candidates' image embeddings are clustered once; the
k_m = ceil(keep * B) most uncertain candidates (by default the smallest top-2 margin of an
image's least certain box) are grouped by cluster; clusters are visited in ascending size
(size counted within those k_m, ties by cluster id), one point per cluster per round, until
B points are taken. Small clusters first spreads the batch over rare regions of the
embedding space; the uncertainty pre-filter keeps it informative.

[ours] details that differ from, or are left open by, the paper:
  * The paper clusters the whole pool once with hierarchical agglomerative clustering
    (average linkage) and reuses the clusters across rounds; ours runs FAISS k-means
    (seeded from ctx.rng) on this stage's candidates at every call, with
    max(2, round(sqrt(N))) clusters by default (at most `max_clusters`, at most N).
  * Within a cluster the order is uniform at random from ctx.rng (`within: random`, the
    paper), or most informative first (`within: uncertain`; ties by image_id).
  * keep defaults to 10 (k_m = 10 B); keep < 1 could not fill the batch and is refused.

Reference: Citovsky, DeSalvo, Gentile, Karydas, Rajagopalan, Rostamizadeh, Kumar, "Batch
Active Learning at Scale", NeurIPS 2021.
"""
from __future__ import annotations

import math

import numpy as np

from poolscout.engine.acquisition.selectors import (SELECTORS, SelectContext, Selection, check_budget, json_float,
                                                    resolve_by, topk_indices)
from poolscout.engine.methods.typiclust import kmeans_labels

WITHIN = ("random", "uncertain")


def default_clusters(n: int, max_clusters: int = 500) -> int:
    """max(2, round(sqrt(n))), at most `max_clusters` and at most n (at least 1)."""
    return max(1, min(max(2, round(math.sqrt(n))), int(max_clusters), int(n)))


def _is_int(v, lo: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo


def round_robin(members: list[np.ndarray], budget: int) -> list[tuple[int, int, int]]:
    """Take one member of each group in turn (groups in the given order) until `budget`.

    Args:
        members: per group, its rows in the order they should be taken.
        budget: how many to take (all members when fewer).

    Returns:
        [(row, group index, round), ...] in pick order, rounds 1-based.
    """
    out: list[tuple[int, int, int]] = []
    r = 0
    longest = max((len(m) for m in members), default=0)
    while len(out) < budget and r < longest:
        for g, m in enumerate(members):
            if r < len(m):
                out.append((int(m[r]), g, r + 1))
                if len(out) == budget:
                    break
        r += 1
    return out


@SELECTORS.register("cluster_margin", final=True, needs_embedding=True)
def cluster_margin(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, by: str = "margin:max",
                   keep: float = 10.0, clusters: int | None = None, max_clusters: int = 500,
                   within: str = "random", direction: str | None = None) -> Selection:
    """Cluster-Margin over the candidates' image embeddings.

    Args:
        by: the uncertainty signal spec or column (default the smallest top-2 margin of an
            image's boxes, "margin:max"); most uncertain = the signal direction's
            informative end.
        keep: k_m = ceil(keep * budget) most uncertain candidates are clustered (>= 1).
        clusters: k-means clusters over the candidates; None = max(2, round(sqrt(N))).
        max_clusters: cap on the default number of clusters.
        within: "random" (the paper) or "uncertain" (most informative first).
        direction: "high" | "low" for a `by` column that is not a signal.

    Returns:
        Selection with score = the `by` value, in pick order; rationale {"cluster_margin":
        {cluster, cluster_size, round, value, rank}}, cluster_size counted among the k_m
        uncertain candidates, round and rank 1-based.

    Raises:
        ValueError: no embedding column, an unknown `by`, or a parameter out of range (the
            message names the parameter).

    References:
        Citovsky et al., "Batch Active Learning at Scale", NeurIPS 2021.
    """
    budget = check_budget(budget)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or keep < 1:
        raise ValueError(f"cluster_margin: keep must be a number >= 1, got {keep!r}")
    if clusters is not None and not _is_int(clusters, 1):
        raise ValueError(f"cluster_margin: clusters must be an integer >= 1 or None, got {clusters!r}")
    if not _is_int(max_clusters, 1):
        raise ValueError(f"cluster_margin: max_clusters must be an integer >= 1, got {max_clusters!r}")
    if within not in WITHIN:
        raise ValueError(f"cluster_margin: within must be one of {WITHIN}, got {within!r}")
    if "embedding" not in table or table["embedding"] is None:
        raise ValueError("cluster_margin needs an 'embedding' column (N, d) in the table")
    col, dirn = resolve_by(by, table, direction)
    ids = np.asarray(table["image_id"], dtype=np.int64)
    x = np.ascontiguousarray(table["embedding"], dtype=np.float32)
    n = len(ids)
    if x.ndim != 2 or len(x) != n:
        raise ValueError(f"cluster_margin: embedding must be (N={n}, d), got {x.shape}")
    b = min(budget, n)
    if b == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    vals = np.asarray(table[col], dtype=np.float64)
    k_clusters = min(int(clusters), n) if clusters is not None else default_clusters(n, max_clusters)
    labels = kmeans_labels(x, k_clusters, seed=int(ctx.rng.integers(2**31 - 1)))
    top = topk_indices(vals, ids, min(math.ceil(keep * b), n), dirn)  # rank order
    top_lab = labels[top]
    uniq, size = np.unique(top_lab, return_counts=True)
    order = np.lexsort((uniq, size))  # size ascending, then cluster id
    members = []
    for c in uniq[order]:
        rows = top[top_lab == c]  # rank order within the cluster (uncertain first)
        members.append(ctx.rng.permutation(rows) if within == "random" else rows)
    picks = round_robin(members, b)
    sizes = size[order]
    cl = uniq[order]
    rows = np.asarray([p[0] for p in picks], dtype=np.int64)
    rat = [{"cluster_margin": {"cluster": int(cl[g]), "cluster_size": int(sizes[g]), "round": rnd,
                               "value": json_float(vals[r]), "rank": t + 1}}
           for t, (r, g, rnd) in enumerate(picks)]
    return Selection(ids[rows], vals[rows], rat)


__all__ = ["WITHIN", "cluster_margin", "default_clusters", "round_robin"]
