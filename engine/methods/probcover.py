"""ProbCover: greedy max coverage of delta-balls around L2-normalised image embeddings.

docs/methods.md section 7. With the top-hat kernel of radius delta, MaxHerding's gain of a
candidate x is the number of not-yet-covered points within delta of x (divided by N), so
ProbCover is `herding.maxherding` with kernel "tophat" and h = delta; this module reuses
herding.py's greedy (`herding_dense`, `herding_sparse`) and graph (`knn_graph`). Labeled
images are part of the N points; their balls are covered from the start and they are
never candidates.

delta is the largest radius whose balls stay `purity`-pure (default 95%) under k-means
pseudo-labels: K = |L| + B clusters (FAISS, seeded from ctx.rng) over candidates and
labeled images together; the ball of point i is pure if every point within delta of i
has i's pseudo-label; purity(delta) = the fraction of the N points whose ball is pure.
purity(delta) never increases with delta, so it is read off one number per point: the
squared distance to its nearest neighbour with another pseudo-label.

[ours] details the paper leaves open:
  * "auto" searches delta over a grid: the 0%, 1%, ..., 100% quantiles of the positive
    distances of the points to their `neighbours` nearest neighbours (the same grid on
    both paths); a list of numbers is searched as given. If no grid value reaches
    `purity`, the smallest one is used (its purity is reported in the rationale).
  * Pools of more than `dense_below` points (candidates + labeled) use the kNN graph with
    `neighbours` per point, memory O(N k): a ball is truncated to the point's k nearest
    neighbours, for the coverage and for the purity estimate alike (a delta beyond a point's
    k-th neighbour distance over-estimates its ball's purity). One kNN search (cached per
    cycle) serves both. Smaller pools are exact (full N x N distances, no truncation).
  * When every point is covered, the remaining picks gain 0 and follow herding's tie rule:
    the lowest remaining table row.

Reference: Yehuda, Dekel, Hacohen, Weinshall, "Active Learning Through a Covering Lens",
NeurIPS 2022.
"""
from __future__ import annotations

import math

import numpy as np

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, check_budget, json_float
from poolscout.engine.methods.herding import (cached_knn, graph_from_neighbours, herding_dense, herding_sparse,
                                              kernel_values, unit_embeddings)
from poolscout.engine.methods.typiclust import kmeans_labels

GRID_LEVELS = np.linspace(0.0, 1.0, 101)


def knn_lists(x: np.ndarray, k: int, *, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row (FAISS flat L2), each point among its own.

    Returns:
        (nbr (N, k) int64, d2 (N, k) float64 squared distances); memory O(N k).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = int(min(max(1, k), n))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    nbr = np.empty((n, k), dtype=np.int64)
    d2 = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, chunk):
        d2[a:a + chunk], nbr[a:a + chunk] = index.search(x[a:a + chunk], k)
    rows = np.arange(n)
    has_self = (nbr == rows[:, None]).any(axis=1)  # exact duplicates may push a point out
    nbr[~has_self, -1] = rows[~has_self]
    d2[~has_self, -1] = 0.0
    return nbr, np.maximum(d2.astype(np.float64), 0.0)


def impure_radius2(nbr: np.ndarray, d2: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per point, the squared distance to its nearest listed neighbour with another label
    (inf if all listed neighbours share its label): ball(i, delta) is pure iff
    delta^2 < this value (balls include the boundary, d2 <= delta^2)."""
    labels = np.asarray(labels)
    other = labels[nbr] != labels[:, None]
    return np.where(other, d2, np.inf).min(axis=1, initial=np.inf)


def purity_curve(impure2: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """purity(delta) = fraction of points whose delta-ball is pure, for each delta."""
    r = np.sort(np.asarray(impure2, dtype=np.float64))
    deltas = np.asarray(deltas, dtype=np.float64)
    impure = np.searchsorted(r, deltas * deltas, side="right")  # points with impure2 <= delta^2
    return 1.0 - impure / max(len(r), 1)


def choose_delta(impure2: np.ndarray, grid: np.ndarray, purity: float) -> tuple[float, float]:
    """The largest grid value whose purity is >= `purity` (the smallest grid value if none).

    Returns:
        (delta, its purity).
    """
    grid = np.unique(np.asarray(grid, dtype=np.float64))
    pur = purity_curve(impure2, grid)
    ok = np.flatnonzero(pur >= purity - 1e-12)  # 1 - 1/20 must count as 0.95
    j = int(ok[-1]) if len(ok) else 0
    return float(grid[j]), float(pur[j])


def auto_grid(d2: np.ndarray) -> np.ndarray:
    """Quantiles (0, 1%, ..., 100%) of the positive distances among the squared distances
    `d2` (of points to their neighbours, themselves left out); [1.0] if there are none."""
    d2 = np.asarray(d2, dtype=np.float64)
    dist = np.sqrt(d2[(d2 > 0) & np.isfinite(d2)])
    if not len(dist):
        return np.array([1.0])
    return np.unique(np.quantile(dist, GRID_LEVELS))


def _is_int(v, lo: int) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo


def _check_params(name: str, delta, purity, neighbours, clusters, dense_below) -> list[float] | None:
    """Validate; returns the explicit delta grid (None for "auto")."""
    if isinstance(delta, str):
        if delta != "auto":
            raise ValueError(f"{name}: delta must be 'auto', a number > 0 or a list of them, got {delta!r}")
        grid = None
    else:
        vals = list(delta) if isinstance(delta, (list, tuple)) else [delta]
        if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v) and v > 0 for v in vals):
            raise ValueError(f"{name}: delta must be 'auto', a number > 0 or a list of them, got {delta!r}")
        grid = [float(v) for v in vals]
    if isinstance(purity, bool) or not isinstance(purity, (int, float)) or not 0 < purity <= 1:
        raise ValueError(f"{name}: purity must be in (0, 1], got {purity!r}")
    if not _is_int(neighbours, 1):
        raise ValueError(f"{name}: neighbours must be an integer >= 1, got {neighbours!r}")
    if clusters is not None and not _is_int(clusters, 1):
        raise ValueError(f"{name}: clusters must be an integer >= 1 or None, got {clusters!r}")
    if not _is_int(dense_below, 0):
        raise ValueError(f"{name}: dense_below must be an integer >= 0, got {dense_below!r}")
    return grid


@SELECTORS.register("probcover", final=True, needs_embedding=True, uses_cache=True)
def probcover(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, delta: float | str | list = "auto",
              purity: float = 0.95, neighbours: int = 50, clusters: int | None = None,
              dense_below: int = 2000, index: str = "auto", nprobe: int = 16) -> Selection:
    """ProbCover over L2-normalised image embeddings (labeled images from
    `ctx.labeled_embedding` count as covered).

    Args:
        delta: ball radius on unit vectors: "auto" (the purity search over a quantile grid
            of kNN distances), a number, or a list of numbers to search.
        purity: the purity the chosen delta must keep (the paper's 0.95).
        neighbours: k of the kNN lists (purity estimate, and the graph of large pools).
        clusters: k-means pseudo-label clusters; None = |L| + B (capped at N).
        dense_below: pools of at most this many points (candidates + labeled) are exact.
        index, nprobe: the kNN index of larger pools (`herding.knn_search`: exact flat
            below 50,000 points, IVF above); its neighbour lists are cached per cycle
            (`ctx.cache_dir`) and serve both the purity estimate and the graph.

    Returns:
        Selection with score = the number of points newly covered by each pick, in pick
        order; rationale {"probcover": {covered, rank, delta, purity, path}}, purity being
        the estimated purity at delta.

    Raises:
        ValueError: no embedding column, bad shapes, or a parameter out of range (the
            message names the parameter).

    References:
        Yehuda, Dekel, Hacohen, Weinshall, "Active Learning Through a Covering Lens",
        NeurIPS 2022.
    """
    budget = check_budget(budget)
    grid = _check_params("probcover", delta, purity, neighbours, clusters, dense_below)
    ids, x, lab = unit_embeddings("probcover", table, ctx)
    n = len(ids)
    b = min(budget, n)
    if b == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    pts = np.concatenate([x, lab])
    total = len(pts)
    cand = np.arange(total) < n
    dense = total <= int(dense_below)

    k_clusters = min(int(clusters) if clusters is not None else len(lab) + b, total)
    pseudo = kmeans_labels(pts, k_clusters, seed=int(ctx.rng.integers(2**31 - 1)))
    k = min(int(neighbours), total)
    if dense:  # every point is a neighbour: exact balls
        import faiss

        d2full = np.maximum(faiss.pairwise_distances(pts, pts).astype(np.float64), 0.0)
        impure2 = impure_radius2(np.broadcast_to(np.arange(total), d2full.shape), d2full, pseudo)
        if grid is None and k > 1:  # the grid of the sparse path: the k - 1 nearest other points
            others = d2full.copy()
            np.fill_diagonal(others, np.inf)
            grid = auto_grid(np.partition(others, k - 2, axis=1)[:, :k - 1])
            del others
    else:
        nbr, d2, info = cached_knn(pts, k, cache_dir=ctx.cache_dir, index=index, nprobe=int(nprobe))
        d2 = np.maximum(d2.astype(np.float64), 0.0)
        impure2 = impure_radius2(nbr, d2, pseudo)
        if grid is None:
            grid = auto_grid(d2[nbr != np.arange(total)[:, None]])
    radius, pur = choose_delta(impure2, np.asarray([1.0] if grid is None else grid), float(purity))

    if dense:
        res = herding_dense(kernel_values(d2full, "tophat", radius), b, candidates=cand, covered=~cand)
        path = "dense"
    else:
        graph = graph_from_neighbours(nbr, kernel_values(d2, "tophat", radius))
        res = herding_sparse(graph, b, candidates=cand, covered=~cand)
        path = f"knn k={k}"
        if info.get("index", "flat") != "flat":
            path += f" {info['index']} recall@{k} {info.get('recall')}"
    newly = np.rint(np.asarray(res.gains) * total).astype(np.int64)  # gain = newly covered / N
    rat = [{"probcover": {"covered": int(c), "rank": t + 1, "delta": json_float(radius), "purity": json_float(pur),
                          "path": path}}
           for t, c in enumerate(newly.tolist())]
    return Selection(ids[res.rows], newly.astype(np.float64), rat)


__all__ = ["auto_grid", "choose_delta", "impure_radius2", "knn_lists", "probcover", "purity_curve"]
