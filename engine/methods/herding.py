"""MaxHerding (generalized coverage) and uncertainty herding, dense and on a kNN graph.

Objective (docs/methods.md section 6): C(S) = (1/N) sum_i w_i max_{s in S} k(x_i, s), a
weighted facility location (monotone submodular, so greedy is within 1 - 1/e of the best
and lazy greedy picks what plain greedy picks). With coverage c_i = max over chosen and
labeled points of k(x_i, .), a candidate x gains

    gain(x) = (1/N) sum_i w_i max(0, k(x_i, x) - c_i).

w = 1 is MaxHerding (Bae, Noh, Sutherland, ECCV 2024); w_i = u(x_i), an uncertainty that
is 0 on labeled points, is uncertainty herding. Labeled points are part of the N points
but never candidates; they only initialise c.

Kernels on squared distances d2 with bandwidth h: "rbf" exp(-d2 / (2 h^2)) and "tophat"
1[d2 <= h^2] (ProbCover's ball of radius h). h = None: the median-distance rule (the
median nearest-neighbour distance over a sample of the points).

Two paths with one greedy:
* dense (`herding_dense`): the N x N kernel, exact; the reference for small pools;
* sparse (`knn_graph` + `herding_sparse`): k(x_i, x) kept only when x is among the k
  nearest neighbours of x_i (itself included), as a reverse-neighbour CSR graph, memory
  O(N k); with k = N it equals the dense greedy. Lazy greedy keeps a max-heap of stale
  gains and recomputes only the top.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from poolscout.engine.acquisition.selectors import (SELECTORS, SelectContext, Selection, check_budget, json_float,
                                                    resolve_by)

KERNELS = ("rbf", "tophat")


def kernel_values(d2: np.ndarray, kernel: str, h: float) -> np.ndarray:
    """k on squared distances: "rbf" exp(-d2 / (2 h^2)), "tophat" 1[d2 <= h^2]."""
    if kernel not in KERNELS:
        raise ValueError(f"herding kernel must be one of {KERNELS}, got {kernel!r}")
    if not h > 0:
        raise ValueError(f"herding bandwidth h must be > 0, got {h!r}")
    d2 = np.maximum(np.asarray(d2, dtype=np.float64), 0.0)
    if kernel == "rbf":
        return np.exp(-d2 / (2.0 * h * h))
    return (d2 <= h * h).astype(np.float64)


def median_bandwidth(x: np.ndarray, sample: int = 4096, seed: int = 0) -> float:
    """The median distance of a point to its nearest other point, over a seeded sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, nn = index.search(x[idx], 2)
    other = np.where(nn[:, 0] == idx, d2[:, 1], d2[:, 0])
    med = float(np.sqrt(np.median(np.maximum(other, 0.0))))
    return med if med > 0 else 1.0


def adaptive_bandwidth(labeled: np.ndarray) -> float | None:
    """Uncertainty herding's adaptive radius: the smallest distance between two labeled
    points (exact, one FAISS 2-NN search over the labeled set), so the kernel narrows as
    labels grow; None with fewer than two labeled points or when all coincide."""
    lab = np.ascontiguousarray(labeled, dtype=np.float32)
    if len(lab) < 2:
        return None
    import faiss

    index = faiss.IndexFlatL2(lab.shape[1])
    index.add(lab)
    d2, nn = index.search(lab, 2)
    own = np.arange(len(lab))
    other = np.where(nn[:, 0] == own, d2[:, 1], d2[:, 0])
    other = np.maximum(other[nn[:, 1] >= 0], 0.0)
    pos = other[other > 0]
    return float(np.sqrt(pos.min())) if len(pos) else None


def median_bandwidth_from_knn(nbr: np.ndarray, d2: np.ndarray, sample: int = 4096, seed: int = 0) -> float:
    """`median_bandwidth` read off kNN lists (k >= 2) instead of a new search: the same
    seeded sample of points, each one's nearest other point. Equal to `median_bandwidth`
    when the lists are exact (up to ties between equidistant neighbours)."""
    n = len(nbr)
    if n < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    rows, dd = nbr[idx], np.asarray(d2[idx], np.float64)
    other = np.where(rows != idx[:, None], dd, np.inf).min(axis=1)
    other = other[np.isfinite(other)]
    if len(other) == 0:
        return 1.0
    med = float(np.sqrt(np.median(np.maximum(other, 0.0))))
    return med if med > 0 else 1.0


@dataclass
class Graph:
    """Reverse kNN graph in CSR form: for column j, the points i that have j among their
    k nearest neighbours, with k(x_i, x_j).

    Attributes:
        indptr: (N + 1,) int64.
        rows: (nnz,) int64, the i of each entry.
        values: (nnz,) float64, k(x_i, x_j).
        k: neighbours kept per point.
    """

    indptr: np.ndarray
    rows: np.ndarray
    values: np.ndarray
    k: int
    info: dict | None = None

    @property
    def n(self) -> int:
        return len(self.indptr) - 1


def graph_from_neighbours(nbr: np.ndarray, kval: np.ndarray) -> Graph:
    """Reverse graph from per-point neighbour lists (N, k) and their kernel values (N, k)
    (entries < 0 in `nbr` are missing neighbours and dropped)."""
    nbr = np.asarray(nbr, dtype=np.int64)
    n, k = nbr.shape
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = nbr.reshape(-1)
    v = np.asarray(kval, dtype=np.float64).reshape(-1)
    ok = (j >= 0) & (v > 0)  # a zero kernel value (top-hat outside the ball) never adds coverage
    i, j, v = i[ok], j[ok], v[ok]
    order = np.argsort(j, kind="stable")  # i ascending within each column (i was sorted)
    i, j, v = i[order], j[order], v[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, j + 1, 1)
    return Graph(np.cumsum(indptr), i, v, int(k))


INDEXES = ("auto", "flat", "ivf", "hnsw")
FLAT_BELOW = 50_000


def _seconds_since(t0: float) -> float:
    import time

    return round(time.perf_counter() - t0, 3)


def _build_index(x: np.ndarray, index: str, *, nlist: int | None, nprobe: int, hnsw_m: int, ef_search: int,
                 seed: int):
    """A FAISS index over x of the given kind (index = "flat" | "ivf" | "hnsw") and a description."""
    import faiss

    n, d = x.shape
    if index == "flat":
        ix = faiss.IndexFlatL2(d)
        ix.add(x)
        return ix, {"index": "flat"}
    if index == "ivf":
        nl = int(nlist) if nlist else int(min(max(1, round(4 * np.sqrt(n))), max(1, n // 39)))
        quant = faiss.IndexFlatL2(d)
        ix = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_L2)
        rng = np.random.default_rng(seed)
        train = x if n <= 64 * nl else x[np.sort(rng.choice(n, 64 * nl, replace=False))]
        ix.cp.seed = int(seed)
        ix.cp.min_points_per_centroid = 1
        ix.train(train)
        ix.add(x)
        ix.nprobe = int(min(nprobe, nl))
        return ix, {"index": "ivf", "nlist": nl, "nprobe": int(ix.nprobe)}
    if index == "hnsw":
        ix = faiss.IndexHNSWFlat(d, int(hnsw_m))
        ix.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
        ix.add(x)
        ix.hnsw.efSearch = int(ef_search)
        return ix, {"index": "hnsw", "M": int(hnsw_m), "efSearch": int(ef_search)}
    raise ValueError(f"knn index must be one of {INDEXES}, got {index!r}")


def knn_search(x: np.ndarray, k: int, *, index: str = "auto", flat_below: int = FLAT_BELOW, nlist: int | None = None,
               nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64, recall_sample: int = 500, seed: int = 0,
               chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, dict]:
    """k nearest neighbours of every row of x among the rows of x (itself included).

    The index is chosen by size: `index="auto"` is an exact flat search below `flat_below`
    points and an IVF index above (nlist = 4 sqrt(N) unless given, `nprobe` lists probed);
    "hnsw" is the graph index (`hnsw_m` links, `ef_search`). Approximate searches report
    their recall@k, measured against an exact search for `recall_sample` seeded rows.
    A point missing from its own list (approximate search, or exact duplicates ahead of
    it) is put in its last slot, so every point covers itself.

    Returns:
        (neighbours (N, k) int64, squared distances (N, k) float32, info dict with the
        index, its parameters, recall@k (1.0 for flat) and seconds).
    """
    import time

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = int(min(max(1, k), n))
    if index not in INDEXES:
        raise ValueError(f"knn index must be one of {INDEXES}, got {index!r}")
    kind = ("flat" if n < int(flat_below) else "ivf") if index == "auto" else index
    ix, info = _build_index(x, kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, seed=seed)
    info["build_seconds"] = _seconds_since(t0)
    nbr = np.empty((n, k), dtype=np.int64)
    d2 = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, chunk):
        d2[a:a + chunk], nbr[a:a + chunk] = ix.search(x[a:a + chunk], k)
    if kind == "flat":
        info["recall"] = 1.0
    else:
        import faiss

        rng = np.random.default_rng(seed)
        q = np.sort(rng.choice(n, size=min(n, int(recall_sample)), replace=False))
        exact = faiss.IndexFlatL2(x.shape[1])
        exact.add(x)
        _, truth = exact.search(x[q], k)
        hits = sum(len(np.intersect1d(a[a >= 0], b)) for a, b in zip(nbr[q], truth))
        info["recall"] = round(hits / float(truth.size), 4)
        info["recall_sample"] = int(len(q))
    missing = nbr < 0  # approximate searches may return fewer than k
    d2[missing] = np.inf
    rows = np.arange(n)
    has_self = (nbr == rows[:, None]).any(axis=1)
    nbr[~has_self, -1] = rows[~has_self]
    d2[~has_self, -1] = 0.0
    info.update(k=k, n=n, seconds=_seconds_since(t0))
    return nbr, d2, info


def _cache_key(x: np.ndarray, params: dict) -> str:
    import hashlib
    import json

    hsh = hashlib.blake2b(digest_size=16)
    hsh.update(json.dumps({**params, "shape": list(x.shape)}, sort_keys=True).encode())
    hsh.update(np.ascontiguousarray(x, dtype=np.float32).data)
    return hsh.hexdigest()


def cached_knn(x: np.ndarray, k: int, *, cache_dir=None, **search) -> tuple[np.ndarray, np.ndarray, dict]:
    """`knn_search`, memoised in `cache_dir` (a cycle's cache folder) by the content of x and
    the search parameters: the kNN graph is built once per cycle and every later query on
    the same points reuses it. Files are written atomically; a damaged one is rebuilt."""
    from pathlib import Path

    if cache_dir is None:
        return knn_search(x, k, **search)
    import json
    import os

    key = _cache_key(x, {"k": int(k), **{a: (b if not isinstance(b, np.generic) else b.item())
                                          for a, b in search.items()}})
    d = Path(cache_dir)
    path = d / f"knn-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                nbr, d2 = z["nbr"].astype(np.int64), z["d2"]
                info = json.loads(str(z["info"]))
            if nbr.shape == (len(x), min(max(1, int(k)), len(x))):
                info["cached"] = True
                return nbr, d2, info
        except (OSError, ValueError, KeyError):
            pass  # rebuilt below
    nbr, d2, info = knn_search(x, k, **search)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        small = nbr.astype(np.int32) if len(x) < 2**31 else nbr
        np.savez(f, nbr=small, d2=d2, info=np.array(json.dumps(info)))
    os.replace(tmp, path)
    info = {**info, "cached": False}
    return nbr, d2, info


def knn_graph(x: np.ndarray, k: int, kernel: str = "rbf", h: float | None = None, *,
              chunk: int = 65536, cache_dir=None, **search) -> tuple[Graph, float]:
    """The reverse kNN graph with kernel values (see `knn_search` for the index choice;
    `cache_dir` memoises the neighbour lists per cycle).

    Returns:
        (the reverse graph, the bandwidth used); the search info is `graph.info`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    nbr, d2, info = cached_knn(x, k, cache_dir=cache_dir, chunk=chunk, **search)
    if h is None:
        h = median_bandwidth_from_knn(nbr, d2) if nbr.shape[1] >= 2 else median_bandwidth(x)
    h = float(h)
    g = graph_from_neighbours(nbr, kernel_values(d2, kernel, h))
    g.info = info
    return g, h


@dataclass
class HerdingResult:
    rows: np.ndarray  # (B,) picked rows (candidates), in pick order
    gains: np.ndarray  # (B,) the gain of each pick when it was made
    objective: float  # C(S) after the picks, labeled points included


def _check(n: int, budget: int, candidates: np.ndarray | None, weights: np.ndarray | None):
    cand = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    if cand.shape != (n,):
        raise ValueError(f"candidates must be a boolean mask of {n} points, got shape {cand.shape}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {n} finite values >= 0")
    if int(budget) < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return cand, w


def herding_dense(kmat: np.ndarray, budget: int, *, candidates: np.ndarray | None = None,
                  covered: np.ndarray | None = None, weights: np.ndarray | None = None) -> HerdingResult:
    """Plain greedy on a dense kernel matrix K (N, N), K[i, j] = k(x_i, x_j).

    Args:
        candidates: (N,) bool, the points that may be picked (default all).
        covered: (N,) bool, labeled points: they initialise c (c_i = max_l K[i, l]).
        weights: (N,) w_i >= 0 (uncertainty herding); default 1.

    Ties go to the lowest row.
    """
    kmat = np.asarray(kmat, dtype=np.float64)
    n = len(kmat)
    cand, w = _check(n, budget, candidates, weights)
    c = np.zeros(n)
    if covered is not None and np.any(covered):
        c = kmat[:, np.asarray(covered, dtype=bool)].max(axis=1)
    avail = cand.copy()
    rows, gains = [], []
    for _ in range(min(int(budget), int(avail.sum()))):
        g = (w[:, None] * np.maximum(0.0, kmat - c[:, None])).sum(axis=0) / n
        g[~avail] = -np.inf
        j = int(np.argmax(g))
        rows.append(j)
        gains.append(float(g[j]))
        c = np.maximum(c, kmat[:, j])
        avail[j] = False
    return HerdingResult(np.asarray(rows, dtype=np.int64), np.asarray(gains), float((w * c).sum() / n))


def _gain(graph: Graph, j: int, c: np.ndarray, w: np.ndarray) -> float:
    a, b = graph.indptr[j], graph.indptr[j + 1]
    i = graph.rows[a:b]
    return float((w[i] * np.maximum(0.0, graph.values[a:b] - c[i])).sum())


def herding_sparse(graph: Graph, budget: int, *, candidates: np.ndarray | None = None,
                   covered: np.ndarray | None = None, weights: np.ndarray | None = None,
                   lazy: bool = True) -> HerdingResult:
    """Greedy on the kNN graph; `lazy` uses a max-heap of stale gains (same picks, since
    gains only shrink as coverage grows). Memory O(nnz + N). Ties go to the lowest row."""
    n = graph.n
    cand, w = _check(n, budget, candidates, weights)
    c = np.zeros(n)
    if covered is not None:
        for j in np.flatnonzero(np.asarray(covered, dtype=bool)):
            a, b = graph.indptr[j], graph.indptr[j + 1]
            np.maximum.at(c, graph.rows[a:b], graph.values[a:b])
    b_eff = min(int(budget), int(cand.sum()))
    rows, gains = [], []
    if lazy:
        # initial gains in one vectorised pass, inflated a hair so that they are upper
        # bounds of the exactly recomputed ones (lazy greedy then picks what plain does)
        contrib = w[graph.rows] * np.maximum(0.0, graph.values - c[graph.rows])
        cs = np.concatenate([[0.0], np.cumsum(contrib)])
        g0 = cs[graph.indptr[1:]] - cs[graph.indptr[:-1]]
        g0 = g0 * (1 + 1e-9) + 1e-12 * (1 + np.abs(cs[-1]))
        cj = np.flatnonzero(cand)
        heap = list(zip((-g0[cj]).tolist(), cj.tolist()))
        heapq.heapify(heap)
        while len(rows) < b_eff:
            neg, j = heapq.heappop(heap)
            g = _gain(graph, j, c, w)
            # fresh and still the best (stale gains are upper bounds): pick; ties -> lower row
            if not heap or (-g, j) <= heap[0]:
                rows.append(j)
                gains.append(g / n)
                a, b = graph.indptr[j], graph.indptr[j + 1]
                np.maximum.at(c, graph.rows[a:b], graph.values[a:b])
            else:
                heapq.heappush(heap, (-g, j))
    else:
        avail = cand.copy()
        for _ in range(b_eff):
            best, bj = -np.inf, -1
            for j in np.flatnonzero(avail):
                g = _gain(graph, int(j), c, w)
                if g > best:
                    best, bj = g, int(j)
            rows.append(bj)
            gains.append(best / n)
            a, b = graph.indptr[bj], graph.indptr[bj + 1]
            np.maximum.at(c, graph.rows[a:b], graph.values[a:b])
            avail[bj] = False
    return HerdingResult(np.asarray(rows, dtype=np.int64), np.asarray(gains), float((w * c).sum() / n))


__all__ = ["Graph", "INDEXES", "cached_knn", "knn_search", "HerdingResult", "KERNELS", "graph_from_neighbours", "herding_dense", "herding_sparse",
           "kernel_values", "knn_graph", "median_bandwidth", "median_bandwidth_from_knn"]


# --------------------------------------------------------------------------- the selector


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def unit_embeddings(name: str, table: dict, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, candidates' unit embeddings (N, d), labeled unit embeddings (L, d)) for a
    coverage selector, with a ValueError naming selector `name` on a missing or misshapen
    embedding."""
    if "embedding" not in table or table["embedding"] is None:
        raise ValueError(f"{name} needs an 'embedding' column (N, d) in the table")
    ids = np.asarray(table["image_id"], dtype=np.int64)
    x = _unit_rows(table["embedding"])
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError(f"{name}: embedding must be (N={len(ids)}, d), got {x.shape}")
    lab = ctx.labeled_embedding
    lab = _unit_rows(lab) if lab is not None and len(lab) else np.zeros((0, x.shape[1]), np.float32)
    if lab.ndim != 2 or lab.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: labeled_embedding must be (L, {x.shape[1]}), got {lab.shape}")
    return ids, x, lab


def uncertainty_weights(values: np.ndarray, direction: str) -> np.ndarray:
    """u in [0, 1] from a signal column: min-max scaled so that the most uncertain is 1
    (for a "low" signal the lowest value); NaN (no boxes) -> 0."""
    v = np.asarray(values, dtype=np.float64)
    if direction == "low":
        v = -v
    ok = np.isfinite(v)
    if not ok.any():
        return np.zeros(len(v))
    lo, hi = v[ok].min(), v[ok].max()
    u = np.zeros(len(v))
    u[ok] = (v[ok] - lo) / (hi - lo) if hi > lo else 1.0
    return u


@SELECTORS.register("maxherding", final=True, needs_embedding=True, uses_cache=True)
def maxherding(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, by: str | None = None,
               kernel: str = "rbf", h: float | str = "median", neighbours: int = 20,
               dense_below: int = 2000, index: str = "auto", flat_below: int = FLAT_BELOW, nprobe: int = 16,
               ef_search: int = 64) -> Selection:
    """MaxHerding (generalized coverage) over L2-normalised image embeddings; with `by`,
    uncertainty herding (each point's term weighted by its uncertainty, 0 on labeled points).

    Labeled images (`ctx.labeled_embedding`) only initialise the coverage. Pools of at most
    `dense_below` points (candidates + labeled) use the exact dense kernel; larger ones the
    kNN graph with `neighbours` per point (memory O(N k)) and lazy greedy. The graph's
    index is chosen by size (`index: auto`: exact flat search below `flat_below` points,
    IVF above, probing `nprobe` lists; or `flat`, `ivf`, `hnsw` with `ef_search`), its
    recall@k is measured on a sample and reported, and it is cached per cycle
    (`ctx.cache_dir`), so a second query on the same points does not rebuild it.

    Args:
        by: a signal spec (e.g. margin:max) whose values, min-max scaled to [0, 1] toward
            the uncertain end, weight the coverage terms; None = MaxHerding.
        kernel: "rbf" or "tophat".
        h: bandwidth (on unit vectors); "median" for the median nearest-neighbour distance;
            "adaptive" for uncertainty herding's adaptive radius, the smallest distance within
            the labeled set (the median rule while fewer than two distinct labeled points).

    Returns:
        Selection with score = the gain at pick time; rationale {"maxherding": {gain, rank,
        path, h, weighted_by}}.

    References:
        Bae, Noh, Sutherland, "Generalized Coverage for More Robust Low-Budget Active
        Learning", ECCV 2024; uncertainty herding: Bae et al. 2024 (arXiv 2412.20644).
    """
    budget = check_budget(budget)
    ids, x, lab = unit_embeddings("maxherding", table, ctx)
    n = len(ids)
    if int(neighbours) < 1 or int(dense_below) < 0:
        raise ValueError("maxherding: neighbours must be >= 1 and dense_below >= 0")
    pts = np.concatenate([x, lab])
    total = len(pts)
    cand = np.arange(total) < n
    covered = ~cand
    w = None
    if by is not None:
        col, direction = resolve_by(by, table)
        w = np.concatenate([uncertainty_weights(table[col], direction), np.zeros(len(lab))])
    if h == "adaptive":
        bw = adaptive_bandwidth(lab)
    elif h == "median":
        bw = None
    else:
        try:
            bw = float(h)
        except (TypeError, ValueError):
            raise ValueError(f"maxherding: h must be a number, 'median' or 'adaptive', got {h!r}") from None
    if total <= int(dense_below):
        bw = median_bandwidth(pts) if bw is None else bw
        import faiss

        kmat = kernel_values(faiss.pairwise_distances(pts, pts), kernel, bw)
        res = herding_dense(kmat, budget, candidates=cand, covered=covered, weights=w)
        path = "dense"
    else:
        if ctx.log is not None and total >= int(flat_below):
            ctx.log(f"maxherding: kNN graph of {total:,} points (k={int(neighbours)}, index {index})")
        graph, bw = knn_graph(pts, int(neighbours), kernel, bw, cache_dir=ctx.cache_dir, index=index,
                             flat_below=int(flat_below), nprobe=int(nprobe), ef_search=int(ef_search))
        res = herding_sparse(graph, budget, candidates=cand, covered=covered, weights=w)
        info = graph.info or {}
        path = f"knn k={graph.k}"
        if info.get("index", "flat") != "flat":
            path += f" {info['index']} recall@{graph.k} {info.get('recall')}"
    rat = [{"maxherding": {"gain": json_float(g), "rank": t + 1, "path": path, "h": json_float(bw),
                           **({"weighted_by": by} if by is not None else {})}}
           for t, g in enumerate(res.gains)]
    return Selection(ids[res.rows], np.asarray(res.gains, dtype=np.float64), rat)


__all__ += ["maxherding", "uncertainty_weights"]
