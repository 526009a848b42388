"""Core-set: greedy k-center on image embeddings, labeled images as initial centres.

References: Sener, Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach", ICLR 2018.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, check_budget, json_float

DEFAULT_CHUNK = 65536
BOUNDS_MIN_N = 50_000  # bounds="auto" switches the bounded greedy on from this many candidates
CLUSTER_DIMS = 16  # principal axes the bounded path clusters on


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


# --------------------------------------------------------------------------- bounded greedy


@dataclass
class BoundedLayout:
    """The candidates ordered by cluster for the bounded greedy (`poolscout.kernels.kcenter`).

    Slots are indices into the untouched embeddings x (`rows`); no float copy is made.

    Attributes:
        x: (N, d) float32 the embeddings.
        q8, qa, qn2, qe: the int8 sketch of each slot against its centroid (`quantize_rows`).
        mu: (G, d) float64 centroids (the means of their members).
        rows: (S,) int64 row of each slot, -1 for padding.
        slot_of_row: (N,) int64 inverse of `rows`.
        c_b0: (G + 1,) int64, cluster g owns blocks c_b0[g] .. c_b0[g + 1] - 1.
        c_lo, c_hi: (G,) float64 min / max distance of a member to its centroid.
        b_lo, b_hi: (nblocks,) float64 the same per block.
    """

    x: np.ndarray
    q8: np.ndarray
    qa: np.ndarray
    qn2: np.ndarray
    qe: np.ndarray
    mu: np.ndarray
    rows: np.ndarray
    slot_of_row: np.ndarray
    c_b0: np.ndarray
    c_lo: np.ndarray
    c_hi: np.ndarray
    b_lo: np.ndarray
    b_hi: np.ndarray

    @property
    def n_clusters(self) -> int:
        return len(self.c_lo)

    def arrays(self) -> tuple:
        """The layout arguments of `bounded_greedy`, in order."""
        return (self.x, self.q8, self.qa, self.qn2, self.qe, self.mu, self.c_b0, self.c_lo, self.c_hi, self.b_lo,
                self.b_hi, self.rows)


@contextmanager
def faiss_threads(n: int | None):
    """Run FAISS with `n` OpenMP threads inside the block (None: leave as is), then restore.

    FAISS's OpenMP loops degrade badly when the cores are shared with other busy processes
    (a Ray node): a 1M x 32 assignment took 0.6 s on one thread and 4 s on two under load.
    """
    import faiss

    old = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray, chunk: int,
                      rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS flat search of each row of x (or of x[rows]) for its nearest centroid:
    (labels (n,) int64, approximate squared distances (n,) float32)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    n = len(x) if rows is None else len(rows)
    lab = np.empty(n, dtype=np.int64)
    d2 = np.empty(n, dtype=np.float32)
    for a in range(0, n, chunk):
        xb = x[a : a + chunk] if rows is None else x[rows[a : a + chunk]]
        dist, nn = index.search(np.ascontiguousarray(xb, dtype=np.float32), 1)
        lab[a : a + chunk] = nn[:, 0]
        d2[a : a + chunk] = dist[:, 0]
    return lab, d2


def _kmeans(points: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    import faiss

    k = int(min(max(1, k), len(points)))
    if k == 1:
        return points.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
    # k-means++ seeding: far fewer groups left merged under one centroid than a random start
    km = faiss.Kmeans(points.shape[1], k, niter=int(niter), seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30,
                      init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    km.train(np.ascontiguousarray(points, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def default_threads() -> int:
    """Threads of the bounded path's set-up (clustering, sketch): the cores this process may
    use, at most 8. Python threads over GIL-free kernels, each FAISS call on one OpenMP
    thread, so a busy machine slows them down without the spin-waits of OpenMP."""
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _thread_map(fn: Callable, items: list, threads: int) -> list:
    """[fn(i) for i in items], on `threads` threads when more than one (order kept)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(fn, items))


def pca_projection(x: np.ndarray, dims: int, *, seed: int = 0, sample: int = 20000,
                   chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """x (N, d) float32 projected on its `dims` leading principal axes, estimated from a seeded
    sample of `sample` rows: (N, dims) float32, C-contiguous. x itself when dims >= d."""
    n, d = x.shape
    if dims >= d or n == 0:
        return x
    rng = np.random.default_rng(seed)
    s = x[np.sort(rng.choice(n, size=min(n, sample), replace=False))].astype(np.float64)
    s -= s.mean(axis=0)
    _, vec = np.linalg.eigh(s.T @ s)
    w = np.ascontiguousarray(vec[:, ::-1][:, :dims], dtype=np.float32)
    out = np.empty((n, dims), dtype=np.float32)
    for a in range(0, n, chunk):
        np.matmul(x[a : a + chunk], w, out=out[a : a + chunk])
    return out


def two_level_kmeans(x: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 4, sample: int = 32,
                     chunk: int = DEFAULT_CHUNK, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cheap clustering of N points into about `n_clusters` groups (FAISS k-means, k-means++ seeds).

    A coarse k-means with ~sqrt(n_clusters) centroids, trained on `sample` points per
    centroid, assigns every point; each coarse group is then split by its own k-means into a
    share of `n_clusters` proportional to its size. Assigning N points costs N (sqrt(G) +
    G / sqrt(G)) d instead of N G d for a flat k-means. The clustering only decides how much
    the bounded greedy can skip, never what it picks. `threads` splits the assignment and the
    fine k-means over threads; the result does not depend on it.

    Returns:
        (labels (N,) int64 in 0..G-1, centroids (G, d) float32, approximate squared distance
        of each point to its centroid (N,) float32). Every label has at least one point.
    """
    n = len(x)
    rng = np.random.default_rng(seed)
    g1 = int(min(n, max(1, round(math.sqrt(n_clusters)))))
    pick = np.sort(rng.choice(n, size=min(n, g1 * sample), replace=False))
    coarse = _kmeans(x[pick], g1, seed, niter)
    step = max(chunk, -(-n // max(1, threads)))
    parts = _thread_map(lambda a: _nearest_centroid(x[a : a + step], coarse, chunk), list(range(0, n, step)), threads)
    lab1 = np.concatenate([p[0] for p in parts])
    key1 = np.concatenate([p[1] for p in parts])
    del parts
    order = np.argsort(lab1, kind="stable")
    cuts = np.searchsorted(lab1[order], np.arange(len(coarse) + 1))
    labels = np.empty(n, dtype=np.int64)
    key = np.empty(n, dtype=np.float32)
    # the fine k-means' samples are drawn here, in group order, so that threads do not
    # change them
    jobs = []
    for a in range(len(coarse)):
        idx = order[cuts[a] : cuts[a + 1]]
        m = len(idx)
        if m == 0:
            continue
        k2 = int(min(m, max(1, round(n_clusters * m / n))))
        sub = None if k2 == 1 else np.sort(rng.choice(idx, size=min(m, k2 * sample), replace=False))
        jobs.append((a, idx, k2, sub))

    def fine_group(job):
        a, idx, k2, sub = job
        if k2 == 1:
            return coarse[a : a + 1], np.zeros(len(idx), dtype=np.int64), key1[idx]
        fine = _kmeans(x[sub], k2, seed + 1 + a, niter)
        return (fine, *_nearest_centroid(x, fine, chunk, rows=idx))

    cents: list[np.ndarray] = []
    base = 0
    for (a, idx, k2, sub), (fine, lab2, key2) in zip(jobs, _thread_map(fine_group, jobs, threads)):
        used, lab2 = np.unique(lab2, return_inverse=True)
        labels[idx] = base + lab2
        key[idx] = key2
        cents.append(fine[used])
        base += len(used)
    return labels, np.concatenate(cents), key


def blocked_layout(x: np.ndarray, labels: np.ndarray, key: np.ndarray, n_clusters: int, *,
                   threads: int = 1) -> BoundedLayout:
    """Order the candidates by cluster (inside a cluster by `key`, then by row) into whole
    blocks of `LANES` slots, take each cluster's mean as its centroid, and sketch each slot.

    Args:
        x: (N, d) float32 C-contiguous (kept, not copied).
        labels: (N,) int64 cluster of each row in 0..n_clusters-1, every label used.
        key: (N,) sort key inside a cluster (e.g. the approximate distance to the centroid).
        n_clusters: G.
        threads: threads of the sketch (same result for any number).
    """
    from poolscout.kernels.kcenter import LANES, cluster_sums, quantize_rows_threaded, rounding_margin

    n, d = x.shape
    g = int(n_clusters)
    counts = np.bincount(labels, minlength=g)
    # cluster-major, then by key, then by row (a stable sort of one float64 key)
    kf = np.asarray(key, dtype=np.float64)
    span = float(kf.max() - kf.min()) if n else 0.0
    order = np.argsort(labels * (2.0 * span + 1.0) + (kf - (kf.min() if n else 0.0)), kind="stable")
    nblk = (counts + LANES - 1) // LANES
    c_b0 = np.concatenate([[0], np.cumsum(nblk)]).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lab_sorted = labels[order]
    slot = c_b0[lab_sorted] * LANES + (np.arange(n) - first[lab_sorted])
    del lab_sorted
    nb = int(c_b0[-1])
    rows = np.full(nb * LANES, -1, dtype=np.int64)
    rows[slot] = order
    slot_of_row = np.empty(n, dtype=np.int64)
    slot_of_row[order] = slot
    del order, slot
    # any point works as a centroid; the members' mean keeps the radii small
    mu = np.empty((g, d))
    cluster_sums(x, labels, mu)
    mu /= counts[:, None]
    q8 = np.empty((nb * LANES, d), dtype=np.int8)
    qa, qn2, qe, dist = (np.empty(nb * LANES) for _ in range(4))
    quantize_rows_threaded(x, rows, slot_of_row, mu, np.repeat(np.arange(g, dtype=np.int64), nblk),
                           rounding_margin(d), q8, qa, qn2, qe, dist, threads=threads)
    real = (rows >= 0).reshape(nb, LANES)
    dist = dist.reshape(nb, LANES)
    b_lo = np.where(real, dist, np.inf).min(axis=1)
    b_hi = np.where(real, dist, -np.inf).max(axis=1)
    return BoundedLayout(x=x, q8=q8, qa=qa, qn2=qn2, qe=qe, mu=mu, rows=rows, slot_of_row=slot_of_row, c_b0=c_b0,
                         c_lo=np.minimum.reduceat(b_lo, c_b0[:-1]), c_hi=np.maximum.reduceat(b_hi, c_b0[:-1]),
                         b_lo=b_lo, b_hi=b_hi)


@dataclass
class KCenterResult:
    """Picks of `kcenter_greedy`.

    Attributes:
        rows: (B,) int64 rows of the candidates, in pick order.
        score: (B,) float64 distance to the nearest centre at pick time (+inf for a first
            pick made without labeled centres).
        init: extra rationale of the first pick (empty with labeled centres).
        stats: how the picks were computed (path, timings, work per step).
    """

    rows: np.ndarray
    score: np.ndarray
    init: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def default_clusters(n: int) -> int:
    """Clusters of the bounded path for n candidates: 1.5 sqrt(n) (k-means then splits most
    true groups; more clusters cost more per pick than their tighter bounds save)."""
    return max(1, int(round(1.5 * math.sqrt(max(int(n), 1)))))


def _use_bounds(bounds: bool | str, n: int, distance: Callable | None) -> bool:
    if bounds not in ("auto", True, False):
        raise ValueError(f"coreset: bounds must be 'auto', true or false, got {bounds!r}")
    if distance is not None:
        return False  # the bounds rest on the built-in float64 distances
    return n >= BOUNDS_MIN_N if bounds == "auto" else bool(bounds)


def _kcenter_plain(x, b, lab, first, rng, chunk, distance) -> KCenterResult:
    n = len(x)
    init: dict[str, Any] = {}
    if lab is not None:
        min_d2 = _min_d2_to_set(x, lab, chunk, distance)
        nxt = int(np.argmax(min_d2))
        first_d = math.sqrt(max(min_d2[nxt], 0.0))
    elif first == "farthest":
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        to_mean = np.full(n, np.inf)
        nxt = _update_argmax(x, mean, to_mean, chunk, distance)
        first_d = math.sqrt(max(to_mean[nxt], 0.0))
        init = {"init": "farthest_from_mean", "distance_to_mean": first_d}
        min_d2 = np.full(n, np.inf)
        first_d = math.inf  # no centre yet: infinitely far
    else:
        nxt = int(rng.integers(n))
        init = {"init": "random"}
        min_d2 = np.full(n, np.inf)
        first_d = math.inf
    rows = np.empty(b, dtype=np.int64)
    score = np.empty(b)
    for t in range(b):
        idx = nxt
        rows[t] = idx
        score[t] = first_d if t == 0 else math.sqrt(max(float(min_d2[idx]), 0.0))
        min_d2[idx] = -np.inf
        if t + 1 < b:
            nxt = _update_argmax(x, x[idx], min_d2, chunk, distance)
    return KCenterResult(rows, score, init, {"path": "plain"})


def _kcenter_bounded(x, b, lab, first, rng, chunk, clusters, threads) -> KCenterResult:
    from poolscout.kernels import kcenter as K

    n, d = x.shape
    t0 = time.perf_counter()
    init: dict[str, Any] = {}
    # initial state (in row order): FAISS search of the labeled centres, exactly as the plain path
    min_rows = _min_d2_to_set(x, lab, chunk, None) if lab is not None else None
    t1 = time.perf_counter()
    g = int(clusters) if clusters is not None else default_clusters(n)
    g = max(1, min(g, n))
    threads = default_threads() if threads is None else max(1, int(threads))
    with faiss_threads(1):
        # clustered on 16 principal axes: the clusters only decide what the bounds skip, and
        # the assignment of a million points costs a fraction of the full-dimension one
        xp = pca_projection(x, CLUSTER_DIMS, chunk=chunk)
        labels, _, key = two_level_kmeans(xp, g, chunk=chunk, threads=threads)
        del xp
    g = int(labels.max()) + 1
    t2 = time.perf_counter()
    lay = blocked_layout(x, labels, key, g, threads=threads)
    del labels, key
    t3 = time.perf_counter()
    slots = len(lay.rows)
    pad = lay.rows < 0
    pre_rows: list[int] = []
    if min_rows is None:
        if first == "farthest":
            mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
            to_mean = np.full(n, np.inf)
            row0 = int(K.update_argmax(x, mean, to_mean))  # exactly the plain path
            init = {"init": "farthest_from_mean", "distance_to_mean": math.sqrt(max(float(to_mean[row0]), 0.0))}
            del to_mean
        else:
            row0 = int(rng.integers(n))
            init = {"init": "random"}
        pre_rows.append(row0)
        if b == 1:
            return KCenterResult(np.array([row0], dtype=np.int64), np.array([math.inf]), init, {"path": "bounded"})
        # the first centre lowers every distance from +inf: one plain sweep in row order
        min_rows = np.full(n, np.inf)
        min_rows[row0] = -np.inf
        nxt_row = int(K.update_argmax(x, x[row0], min_rows))
    else:
        nxt_row = int(np.argmax(min_rows))
    min_d2 = np.full(slots, -np.inf)
    min_d2[lay.slot_of_row] = min_rows
    del min_rows
    nxt = int(lay.slot_of_row[nxt_row])
    b_rest = b - len(pre_rows)
    nb, ng = len(lay.b_lo), lay.n_clusters
    b_max, b_slot = np.empty(nb), np.empty(nb, dtype=np.int64)
    c_max, c_slot = np.empty(ng), np.empty(ng, dtype=np.int64)
    K.refresh_maxima(lay.c_b0, lay.rows, min_d2, b_max, b_slot, c_max, c_slot)
    out_slot = np.empty(b_rest, dtype=np.int64)
    out_d2 = np.empty(b_rest)
    counts = np.zeros((b_rest, 4), dtype=np.int64)
    done = K.bounded_greedy(*lay.arrays(), min_d2, b_max, b_slot, c_max, c_slot, nxt, b_rest, K.rounding_margin(d),
                            out_slot, out_d2, counts)
    t4 = time.perf_counter()
    if done != b_rest:  # pragma: no cover - only reachable with NaN embeddings
        raise RuntimeError(f"coreset: bounded greedy stopped after {done + len(pre_rows)} of {b} picks")
    rows = np.concatenate([np.asarray(pre_rows, dtype=np.int64), lay.rows[out_slot]])
    score = np.concatenate([np.full(len(pre_rows), math.inf), np.sqrt(np.maximum(out_d2, 0.0))])
    c = counts[: max(b_rest - 1, 0)]
    steps = max(len(c), 1)
    layout_mb = sum(a.nbytes for a in lay.arrays()[1:]) / 2**20 + lay.slot_of_row.nbytes / 2**20
    stats = {"path": "bounded", "threads": threads, "clusters": ng, "blocks": nb, "lanes": K.LANES, "layout_mb": layout_mb,
             "padding_slots": int(pad.sum()), "labeled_init_s": t1 - t0, "cluster_s": t2 - t1, "layout_s": t3 - t2,
             "greedy_s": t4 - t3, "mean_clusters_refreshed": float(c[:, 0].sum() / steps),
             "mean_clusters_swept": float(c[:, 1].sum() / steps), "mean_blocks_swept": float(c[:, 2].sum() / steps),
             "mean_exact": float(c[:, 3].sum() / steps), "mean_fraction_swept": float(c[:, 2].sum() / steps / nb),
             "mean_fraction_exact": float(c[:, 3].sum() / steps / n), "per_step": c.copy()}
    return KCenterResult(rows, score, init, stats)


def kcenter_greedy(x: np.ndarray, budget: int, *, labeled: np.ndarray | None = None, first: str = "farthest",
                   rng: np.random.Generator | None = None, chunk: int = DEFAULT_CHUNK,
                   distance: Callable | None = None, bounds: bool | str = "auto",
                   clusters: int | None = None, threads: int | None = None) -> KCenterResult:
    """Exact k-center greedy (the engine of the `coreset` selector; see there).

    Two paths with the same picks and scores: the plain one sweeps all N candidates per pick;
    the bounded one (`bounds`, built-in distance only) clusters the candidates once
    (`two_level_kmeans` on their CLUSTER_DIMS leading principal axes, `clusters` groups,
    default `default_clusters(N)`; the bounds use the full-dimension cluster means), keeps an int8
    sketch of each candidate against its centroid (N d bytes; the float32 embeddings are
    not copied) and runs the lazy bounded greedy of
    `poolscout.kernels.kcenter.bounded_greedy`: a cluster is only brought up to date when
    it could hold the farthest point, and then only its clusters / blocks / candidates that
    the triangle inequality or the sketch cannot rule out get the exact float64 distance.

    Args:
        x: (N, d) float32 candidates.
        budget: picks, 1 <= budget <= N.
        labeled: (L, d) float32 initial centres, or None.
        first: "farthest" | "random" (first pick without labeled centres).
        rng: for first="random".
        chunk: candidates per distance call.
        distance: custom squared-L2 kernel (plain path only), or None.
        bounds: "auto" (bounded from BOUNDS_MIN_N candidates), True or False.
        clusters: clusters of the bounded path (None: `default_clusters(N)`, 1.5 sqrt(N)).
        threads: threads of the bounded path's set-up (None: `default_threads()`); the
            picks do not depend on it.

    Returns:
        KCenterResult.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # no copy for a C-contiguous float32 array
    lab = None
    if labeled is not None and len(labeled) > 0:
        lab = np.ascontiguousarray(labeled, dtype=np.float32)
    if _use_bounds(bounds, len(x), distance):
        return _kcenter_bounded(x, int(budget), lab, first, rng, int(chunk), clusters, threads)
    return _kcenter_plain(x, int(budget), lab, first, rng, int(chunk), distance)


@SELECTORS.register("coreset", final=True, needs_embedding=True)
def coreset(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, chunk_size: int = DEFAULT_CHUNK,
            first: str = "farthest", bounds: bool | str = "auto", clusters: int | None = None) -> Selection:
    """k-center greedy: repeatedly take the candidate farthest from its nearest centre.

    Centres start as `ctx.labeled_embedding`. Every candidate keeps its squared distance to
    the nearest centre (N floats): initialised by a FAISS IndexFlatL2 search against the
    labeled centres in chunks of `chunk_size` candidates (or `ctx.distance` in chunks),
    then lowered after each pick with the distances to the new centre. Memory O(N + chunk),
    time O(B N d); never an N x N matrix.

    From `BOUNDS_MIN_N` candidates (`bounds="auto"`; True / False force it on / off) the
    built-in distance runs bounded (`kcenter_greedy`): the candidates are clustered once
    (two-level FAISS k-means, `clusters` groups, default 1.5 sqrt(N)) and sketched in int8
    against their centroid (N d bytes, no float copy of the embeddings); a pick then only
    updates the clusters that could hold the farthest point, and in them only the blocks
    of 32 candidates and the candidates that the triangle inequality on centroid distances,
    or the sketch, cannot rule out, with a rounding margin. The picks, scores and rationale
    are those of the plain sweep (same float64 distances, same ties); only the time
    changes. How much is skipped depends on how clustered the embeddings are: on one
    Gaussian cloud nearly every candidate is still visited each pick. A custom
    `ctx.distance` always takes the plain path.

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
        bounds: "auto" | true | false, the bounded sweep (see above).
        clusters: clusters of the bounded sweep (None: 1.5 sqrt(N)).

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
    if clusters is not None and int(clusters) < 1:
        raise ValueError(f"coreset: clusters must be >= 1, got {clusters!r}")
    ids = np.asarray(table["image_id"], dtype=np.int64)
    x = np.ascontiguousarray(table["embedding"], dtype=np.float32)
    n = len(ids)
    if x.ndim != 2 or len(x) != n:
        raise ValueError(f"coreset: embedding must be (N={n}, d), got {x.shape}")
    use_bounds = _use_bounds(bounds, n, ctx.distance)
    b = min(budget, n)
    if b == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    lab = ctx.labeled_embedding
    if lab is not None and len(lab) > 0:
        lab = np.ascontiguousarray(lab, dtype=np.float32)
        if lab.ndim != 2 or lab.shape[1] != x.shape[1]:
            raise ValueError(f"coreset: labeled_embedding must be (L, {x.shape[1]}), got {lab.shape}")
    else:
        lab = None
    res = kcenter_greedy(x, b, labeled=lab, first=first, rng=ctx.rng, chunk=int(chunk_size), distance=ctx.distance,
                         bounds=use_bounds, clusters=clusters)
    rat: list[dict] = []
    for t in range(b):
        r = {"distance": json_float(res.score[t]), "rank": t + 1}
        if t == 0:
            r.update(res.init)
        rat.append({"coreset": r})
    return Selection(ids[res.rows], res.score, rat)
