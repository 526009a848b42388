"""Two-stage eDALD: pixel acquisition for segmentation (docs/methods.md section 5).

Stage 1 keeps representative pixels, stage 2 ranks them by uncertainty:

* 1a, per image: N_c random candidate pixels; MaxHerding picks b of them (the first is the
  pixel with the largest mean kernel, then the largest coverage gain);
* 1b, over the pool: MaxHerding over every image's local picks, its coverage started from
  the already labeled pixels; keeps a share (`keep`, 0.5) of the local picks;
* 2: eDALD(u) = H(p_0(u)) + MI(u), MI(u) = H(mean_k p_k(u)) - mean_k H(p_k(u)), p_0 the
  head's prediction on the features of the fixed base noise, p_1..p_K on K other fixed
  noises; the top B pixels are labeled. Round 0 (no head yet): global herding alone picks
  B pixels.

Kernel k(x, y) = exp(-|x - y|^2 / h^2) with h = 2 x the median pairwise distance of a 1%
sample (at least `min_sample` points). The herding greedy is `engine.methods.herding`'s:
dense (exact) up to `dense_below` points, beyond on the reverse kNN graph of FAISS (memory
O(N k); with k = N it equals the dense greedy), so the global stage runs exactly on
candidate counts where a dense kernel would not fit, without the authors' 50k chunks.
"""
from __future__ import annotations

import math

import numpy as np

from poolscout.engine.methods.herding import HerdingResult, graph_from_neighbours, herding_dense, herding_sparse

DENSE_BELOW = 4096  # points; a dense float64 kernel of 4096^2 is 128 MB


def _f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or inf values")
    return x


def sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a, b) squared Euclidean distances, float64, clipped at 0."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d2, 0.0)


def bandwidth(x: np.ndarray, *, fraction: float = 0.01, min_sample: int = 100, max_sample: int = 2000,
              seed: int = 0) -> float:
    """h = 2 x the median pairwise distance of a seeded sample of `fraction` of the points
    (clipped to [min_sample, max_sample], at most all of them); 1.0 when that is 0."""
    x = _f32(x)
    n = len(x)
    if n < 2:
        return 1.0
    s = int(min(n, max(min_sample, min(max_sample, round(fraction * n)))))
    idx = np.sort(np.random.default_rng(seed).choice(n, size=s, replace=False))
    d2 = sq_dists(x[idx], x[idx])
    iu = np.triu_indices(s, 1)
    med = float(np.sqrt(np.median(d2[iu])))
    return 2.0 * med if med > 0 else 1.0


def kernel(d2: np.ndarray, h: float) -> np.ndarray:
    """exp(-d2 / h^2)."""
    if not h > 0:
        raise ValueError(f"kernel bandwidth h must be > 0, got {h!r}")
    return np.exp(-np.maximum(np.asarray(d2, np.float64), 0.0) / (h * h))


def _herd(x: np.ndarray, budget: int, h: float, *, candidates: np.ndarray | None, covered: np.ndarray | None,
          k: int, dense_below: int) -> HerdingResult:
    n = len(x)
    if n <= dense_below:
        return herding_dense(kernel(sq_dists(x, x), h), budget, candidates=candidates, covered=covered)
    from poolscout.engine.methods.herding import knn_search

    kk = int(min(n, max(2, k)))
    nbr, d2, _ = knn_search(x, kk)
    return herding_sparse(graph_from_neighbours(nbr, kernel(d2, h)), budget, candidates=candidates, covered=covered)


def local_herding(feats: np.ndarray, budget: int, *, h: float | None = None, k: int = 64,
                  dense_below: int = DENSE_BELOW, seed: int = 0) -> tuple[np.ndarray, float]:
    """Stage 1a on one image's candidate pixels.

    Args:
        feats: (n, d) features of the candidates.
        budget: b, the pixels to keep (all n when n <= b).
        h: bandwidth (None: `bandwidth` of these candidates).
        k: neighbours per point on the sparse path (n > dense_below).

    Returns:
        (rows of the picks in pick order, h used).
    """
    x = _f32(feats)
    h = float(h) if h is not None else bandwidth(x, seed=seed)
    res = _herd(x, min(int(budget), len(x)), h, candidates=None, covered=None, k=k, dense_below=dense_below)
    return res.rows, h


def global_herding(new: np.ndarray, labeled: np.ndarray | None, budget: int, *, h: float | None = None,
                   k: int = 64, dense_below: int = DENSE_BELOW, seed: int = 0) -> tuple[np.ndarray, float]:
    """Stage 1b (and round 0): MaxHerding over the pool's local picks `new` (m, d), the
    coverage started from the `labeled` pixels' features (l, d) (they are never picked).

    Returns:
        (rows into `new` in pick order, h used).
    """
    x_new = _f32(new)
    x_lab = _f32(labeled) if labeled is not None and len(labeled) else np.zeros((0, x_new.shape[1]), np.float32)
    x = np.concatenate([x_lab, x_new]) if len(x_lab) else x_new
    h = float(h) if h is not None else bandwidth(x, seed=seed)
    l = len(x_lab)
    cand = np.zeros(len(x), bool)
    cand[l:] = True
    cov = ~cand if l else None
    res = _herd(x, min(int(budget), len(x_new)), h, candidates=cand, covered=cov, k=k, dense_below=dense_below)
    return res.rows - l, h


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) along `axis`, 0 log 0 = 0."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(axis=axis)


def edald_scores(p_base: np.ndarray, p_noisy: np.ndarray) -> dict[str, np.ndarray]:
    """Stage 2 scores of P pixels.

    Args:
        p_base: (P, C) class probabilities from the base noise's features.
        p_noisy: (K, P, C) the same from K other fixed noises.

    Returns:
        {"edald": H + MI, "entropy": H(p_base), "mi": H(mean_k p_k) - mean_k H(p_k)}, each (P,).
    """
    p0 = np.asarray(p_base, np.float64)
    pk = np.asarray(p_noisy, np.float64)
    if pk.ndim != 3 or p0.ndim != 2 or pk.shape[1:] != p0.shape:
        raise ValueError(f"need p_base (P, C) and p_noisy (K, P, C), got {p0.shape} and {pk.shape}")
    h = entropy(p0)
    mi = entropy(pk.mean(axis=0)) - entropy(pk).mean(axis=0)
    mi = np.maximum(mi, 0.0)  # >= 0 in exact arithmetic (Jensen); rounding can dip below
    return {"edald": h + mi, "entropy": h, "mi": mi}


def top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the `budget` highest scores, ties to the lower index."""
    s = np.asarray(scores, np.float64)
    b = max(0, min(int(budget), len(s)))
    return np.lexsort((np.arange(len(s)), -s))[:b]


def keep_count(n_local: int, keep: float) -> int:
    """Stage 1b's budget: `keep` of the local picks, at least 1 (0 when there are none)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return 0 if n_local == 0 else max(1, int(math.floor(keep * n_local + 0.5)))


__all__ = ["DENSE_BELOW", "bandwidth", "edald_scores", "entropy", "global_herding", "keep_count", "kernel",
           "local_herding", "sq_dists", "top"]
