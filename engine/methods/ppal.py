"""PPAL: plug-and-play active learning for object detection (docs/methods.md §8).

Yang, Huang, Li, Wang, Wang, Zhang, "Plug and Play Active Learning for Object Detection",
CVPR 2024. Two stages:

Stage 1, the `dcus` signal (Difficulty-Calibrated Uncertainty Sampling, image-level, HIGH =
informative). The detector tracks a per-class quality Q_c in [0, 1] during training (an EMA
of sigmoid(s_gt)^0.6 IoU^0.4 in PPAL's RetinaNet; our Faster R-CNN heads use the softmax
probability of the GT class, engine/roi_heads.py, read by jobs/score.py
`model_class_quality`); a hard class (low
Q_c) gets a larger weight

    w_c  = 1 + a b log(1 + (e^{1/a} - 1)(1 - Q_c))          a = 0.3, b = 0.2
    U(I) = sum_{boxes j of I, s_j >= 0.05} w_{c_j} H_binary(s_j)
    H_binary(s) = -s log s - (1 - s) log(1 - s)              (0 at s = 0 and s = 1)

so w_c runs from 1 (Q_c = 1, an easy class) to 1 + b (Q_c = 0). A `retrieve` stage keeps
the 4 x budget images with the largest U.

Stage 2, the `ccms` selector (Category Conditioned Matching Similarity). The distance from
candidate i to candidate j is the score-weighted mean, over i's boxes with s >= 0.05, of
the smallest cosine distance (1 - cos) from the box's ROI embedding to a box of j with the
same predicted label (2, the largest cosine distance, when j has no box of that label):

    D(i -> j) = sum_b s_b min_{b' in j, c_b' = c_b} (1 - cos(e_b, e_b')) / sum_b s_b
    D = (D + D^T) / 2,   D_ii = 0

then k-medoids with K = budget on D; the medoids are the picks.

[ours] details the formulas leave open:
  * class_quality None (a detector that tracked no quality) -> every class weight is 1,
    i.e. U(I) is the plain sum of binary entropies of the kept boxes.
  * An image with no kept box has U = 0 and D(i -> j) = 2 for every j != i (it is far from
    everything, including other empty images).
  * An embedding of norm 0 is left at 0 after normalisation: its cosine with anything is 0
    (distance 1).
  * If all kept boxes of an image have score 0 (only possible with score_thresh <= 0) the
    mean over its boxes is unweighted.
  * k-medoids: k-means++-style seeding on D (first centre = the smallest total distance),
    then Voronoi iteration (assign, re-centre) until no medoid changes; see `k_medoids`.
  * The ccms selector keeps, per box, only its K = 64 most similar same-class boxes (FAISS,
    `neighbours`): an image of the class that none of them belongs to is put at the K-th
    neighbour's cosine distance (a lower bound of the true one). Exact for every class with
    at most K kept boxes; neighbours=None gives the paper's exact D (`ccms_distances`).
"""
from __future__ import annotations

import math

import numpy as np

from poolscout.engine.models import predictions as P
from poolscout.engine.acquisition.signals import register_signal
from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, candidate_boxes, check_budget, json_float

DCUS_A = 0.3
DCUS_B = 0.2
SCORE_THRESH = 0.05
RETRIEVE_KEEP = 4
_MAX_DIST = 2.0
_BLOCK_ELEMS = 1 << 22  # cosine-block size (elements) in ccms_distances
CCMS_NEIGHBOURS = 64  # default K of the ccms selector's kNN distances [ours]


# --------------------------------------------------------------------------------------
# DCUS
def dcus_class_weights(quality: np.ndarray, a: float = DCUS_A, b: float = DCUS_B) -> np.ndarray:
    """Difficulty-calibrated class weights of PPAL's DCUS.

    w_c = 1 + a b log(1 + (e^{1/a} - 1)(1 - Q_c)): 1 for a perfectly learnt class (Q_c = 1),
    1 + b for a class the detector cannot fit at all (Q_c = 0), increasing as Q_c falls.

    Args:
        quality: (C,) per-class quality Q_c in [0, 1], index 0 = class 1.
        a: > 0, the curvature (smaller: the weight rises faster as Q_c drops from 1).
        b: >= 0, the largest extra weight.

    Returns:
        (C,) float64.

    Raises:
        ValueError: quality not 1-D, not finite or outside [0, 1]; a <= 0 or b < 0.

    References:
        Yang et al., "Plug and Play Active Learning for Object Detection", CVPR 2024, DCUS.
    """
    q = np.asarray(quality, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"class quality must be (C,), got shape {q.shape}")
    if not np.all(np.isfinite(q)) or np.any(q < 0.0) or np.any(q > 1.0):
        bad = q[~(np.isfinite(q) & (q >= 0.0) & (q <= 1.0))]
        raise ValueError(f"class quality must be finite and in [0, 1], got {bad[:5].tolist()}")
    a, b = float(a), float(b)
    if not (math.isfinite(a) and a > 0.0):
        raise ValueError(f"DCUS a must be > 0, got {a!r}")
    if not (math.isfinite(b) and b >= 0.0):
        raise ValueError(f"DCUS b must be >= 0, got {b!r}")
    x = 1.0 - q
    inv = 1.0 / a
    if inv <= 700.0:  # e^{1/a} representable: direct form, exact 0 at x = 0
        log_term = np.log1p(np.expm1(inv) * x)
    else:  # log(1 + (E - 1) x) = 1/a + log(x + (1 - x) / E), with 1/E -> 0
        with np.errstate(divide="ignore"):
            log_term = np.where(x > 0, inv + np.log(np.maximum(x, 0.0) + (1.0 - x) * math.exp(-inv)), 0.0)
    return 1.0 + a * b * log_term


def binary_entropy(s: np.ndarray) -> np.ndarray:
    """H_binary(s) = -s log s - (1 - s) log(1 - s), natural log, 0 at s in {0, 1}: same shape, float64."""
    s = np.asarray(s, dtype=np.float64)
    t = 1.0 - s
    ls = np.log(s, out=np.zeros_like(s), where=s > 0)
    lt = np.log(t, out=np.zeros_like(t), where=t > 0)
    return -(s * ls) - (t * lt) + 0.0


def _ragged(offsets: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Offsets rebased to 0 and the rows offsets[0]:offsets[-1] of each array."""
    off = np.asarray(offsets, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1:
        raise ValueError(f"offsets must be (N+1,), got shape {off.shape}")
    if np.any(np.diff(off) < 0):
        raise ValueError("offsets must be non-decreasing")
    lo, hi = int(off[0]), int(off[-1])
    out = []
    for arr in arrays:
        arr = np.asarray(arr)
        if len(arr) < hi:
            raise ValueError(f"offsets reach row {hi} but a per-box array has only {len(arr)} rows")
        out.append(arr[lo:hi])
    return off - lo, out


def dcus_scores(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                class_quality: np.ndarray | None = None, a: float = DCUS_A, b: float = DCUS_B,
                score_thresh: float = SCORE_THRESH) -> np.ndarray:
    """DCUS image uncertainty U(I) = sum over kept boxes of w_{label} H_binary(score).

    Args:
        scores: (M,) detection scores in [0, 1].
        labels: (M,) int labels in 1..C.
        offsets: (N+1,) box offsets per image (rows offsets[0]:offsets[-1] are used).
        class_quality: (C,) Q_c for classes 1..C, or None: every weight 1 [ours].
        a, b: DCUS weight parameters (`dcus_class_weights`).
        score_thresh: a box counts when its score >= score_thresh.

    Returns:
        (N,) float64; 0.0 for an image with no box at or above the threshold.

    Raises:
        ValueError: bad shapes, scores outside [0, 1], a label outside 1..C (with quality).

    References:
        Yang et al., "Plug and Play Active Learning for Object Detection", CVPR 2024, DCUS.
    """
    off, (s, lab) = _ragged(offsets, scores, labels)
    n = len(off) - 1
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    lab = np.asarray(lab).reshape(-1)
    if len(s) != len(lab):
        raise ValueError(f"scores ({len(s)}) and labels ({len(lab)}) differ in length")
    if s.size and not (np.all(np.isfinite(s)) and s.min() >= 0.0 and s.max() <= 1.0):
        raise ValueError("DCUS scores must be finite and in [0, 1]")
    img = np.repeat(np.arange(n), np.diff(off))
    keep = s >= score_thresh
    s, lab, img = s[keep], lab[keep], img[keep]
    h = binary_entropy(s)
    if class_quality is not None:
        w = dcus_class_weights(class_quality, a, b)
        lab = lab.astype(np.int64)
        if lab.size and (lab.min() < 1 or lab.max() > len(w)):
            raise ValueError(f"DCUS: labels must be in 1..{len(w)} (the class quality has {len(w)} classes), "
                             f"got {int(lab.min())}..{int(lab.max())}")
        h = h * w[lab - 1]
    return np.bincount(img, weights=h, minlength=n).astype(np.float64)


@register_signal("dcus", direction="high", per_box=False, fields=("scores", "labels"))
def dcus(batch: dict[str, np.ndarray], *, view: str = "orig", class_quality: np.ndarray | None = None) -> np.ndarray:
    """PPAL's DCUS image uncertainty of `view`: (N,), see `dcus_scores` (defaults a = 0.3,
    b = 0.2, score >= 0.05).

    `class_quality` is the (C,) quality the detector tracked while training (the score job
    passes it); None -> all class weights 1.
    """
    p = P.prefix(view)
    for f in ("scores", "labels", "offsets"):
        if batch.get(p + f) is None:
            raise KeyError(f"signal dcus needs {p + f!r} but the batch has no such field")
    return dcus_scores(batch[p + "scores"], batch[p + "labels"], batch[p + "offsets"], class_quality)


# --------------------------------------------------------------------------------------
# CCMS
def _check_neighbours(neighbours) -> int:
    """`neighbours` as an int >= 0 (0 = exact); None -> 0."""
    if neighbours is None:
        return 0
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 0:
        raise ValueError(f"ccms: neighbours must be None or an integer >= 0, got {neighbours!r}")
    return int(neighbours)


def _class_gain_exact(gain: np.ndarray, ic: np.ndarray, ec: np.ndarray, sc: np.ndarray) -> None:
    """Adds one class's s_b (1 + max cos(b, j)) to gain[i, j] for every image j with the class.

    Full cosine matrix of the class's boxes in row blocks (float32, at most ~_BLOCK_ELEMS
    cosines at a time); the best cosine per (box, image) is a `maximum.reduceat` over the
    image's columns. Rows of an image are contiguous in `ic`.
    """
    m = len(ic)
    col_starts = np.flatnonzero(np.r_[True, ic[1:] != ic[:-1]])
    col_imgs = ic[col_starts]
    step = max(1, _BLOCK_ELEMS // m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        cos = ec[r0:r1] @ ec.T  # (rows, m)
        best = np.maximum.reduceat(cos, col_starts, axis=1).astype(np.float64)  # (rows, images with c)
        np.clip(best, -1.0, 1.0, out=best)
        g = sc[r0:r1, None] * (1.0 + best)
        ri = ic[r0:r1]
        row_starts = np.flatnonzero(np.r_[True, ri[1:] != ri[:-1]])
        gain[np.ix_(ri[row_starts], col_imgs)] += np.add.reduceat(g, row_starts, axis=0)


def _class_gain_knn(gain: np.ndarray, ic: np.ndarray, ec: np.ndarray, sc: np.ndarray, k: int) -> np.ndarray:
    """One class's gain from its boxes' k most similar same-class boxes (FAISS, exact inner product).

    With c_K(b) the k-th (smallest) returned cosine of box b, every image j with the class
    gets s_b (1 + c_K(b)) (returned as the per-image sums, the caller spreads them over the
    images with the class); each image j among b's neighbours gets s_b (best returned cosine
    of j - c_K(b)) on top, scattered into gain[i, j] here. Needs 1 <= k <= len(ic).

    Returns:
        (N,) float64, sum over image i's boxes of the class of s_b (1 + c_K(b)).
    """
    import faiss

    n = gain.shape[0]
    m = len(ic)
    index = faiss.IndexFlatIP(ec.shape[1])
    index.add(ec)
    base = np.zeros(n)
    flat = gain.reshape(-1)  # a view: gain is C-contiguous
    step = max(1, _BLOCK_ELEMS // k)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        cos, nbr = index.search(ec[r0:r1], k)  # (rows, k), most similar first
        cos = np.clip(cos.astype(np.float64), -1.0, 1.0)
        cos_k = cos.min(axis=1)
        w = sc[r0:r1]
        ri = ic[r0:r1]
        base += np.bincount(ri, weights=w * (1.0 + cos_k), minlength=n)
        nj = ic[nbr]  # (rows, k) image of each neighbour
        o = np.lexsort((-cos, nj), axis=1)  # per row: by image, then the best cosine first
        nj = np.take_along_axis(nj, o, axis=1)
        cos = np.take_along_axis(cos, o, axis=1)
        first = np.ones(nj.shape, dtype=bool)
        first[:, 1:] = nj[:, 1:] != nj[:, :-1]
        row = np.nonzero(first)[0]
        np.add.at(flat, ri[row] * n + nj[first], w[row] * (cos[first] - cos_k[row]))
    return base


def ccms_distances(offsets: np.ndarray, labels: np.ndarray, scores: np.ndarray, emb: np.ndarray,
                   score_thresh: float = SCORE_THRESH, neighbours: int | None = None) -> np.ndarray:
    """PPAL's category-conditioned image distance matrix, exact or from k nearest neighbours.

    D(i -> j) = score-weighted mean over i's boxes with score >= score_thresh of the
    minimum cosine distance 1 - cos(e_b, e_b') to a box b' of j with the same label (kept
    boxes of j only), or 2 when j has none; then D = (D + D^T) / 2 with D_ii = 0. An image
    without kept boxes has D(i -> j) = 2 for all j != i. Values are clipped to [0, 2].

    Exact (neighbours None or 0, and any class with at most `neighbours` kept boxes): per
    class, the normalised embeddings of the class's kept boxes are multiplied in blocks
    (float32, at most ~4M cosines at a time), the best cosine per (box, image) is a
    `maximum.reduceat` over the image's columns, and the weighted sums are accumulated per
    (image, image) pair. Memory O(N^2 + block); time O(sum_c m_c^2 r) for the cosines plus
    O(sum_c m_c n_c) for the per-(box, image) reductions and scatters (m_c kept boxes and
    n_c images of class c, r the embedding width).

    kNN [ours] (neighbours = K >= 1, for a class with m_c > K boxes): the class's normalised
    embeddings go into a FAISS `IndexFlatIP` and each box b gets its K most similar boxes of
    the class (b itself and boxes of its own image included). For an image j owning one of
    them, the best of j's returned cosines is the exact max cosine of b to j (a better box of
    j would have been returned before the K-th). For an image j with the class but none of
    b's K neighbours, its min distance is >= d_K(b) = 1 - (K-th returned cosine), and d_K(b)
    is used; an image without the class still gets 2. So b contributes, to every j with the
    class, min(true min distance of b to j, d_K(b)): D is exact for the pairs whose boxes
    all reach each other within K and a lower bound (entry by entry, also after the
    symmetrisation) otherwise; it is exact for every pair when K >= each class's box count.
    Accumulation: s_b (1 + cos_K(b)) summed per image and spread over the images with the
    class by one (N, C) x (C, N) product, and the (box, reached image) corrections
    s_b (best cos - cos_K(b)) scattered with `np.add.at`: O(m_c K) per class instead of
    O(m_c n_c). The flat index still compares all m_c^2 pairs (BLAS, multithreaded, with a
    top-K heap) but keeps no (box, image) matrix; memory O(N^2 + m_c r + block).

    Args:
        offsets: (N+1,) box offsets per image.
        labels: (M,) int labels.
        scores: (M,) detection scores (also the weights).
        emb: (M, r) ROI embeddings (float16 is fine; computed in float32).
        score_thresh: a box is kept when its score >= score_thresh.
        neighbours: K of the kNN path; None or 0 -> exact for every class.

    Returns:
        (N, N) float64, symmetric, zero diagonal, in [0, 2].

    Raises:
        ValueError: lengths differ, non-finite scores, neighbours not None or an int >= 0.

    References:
        Yang et al., "Plug and Play Active Learning for Object Detection", CVPR 2024, CCMS.
    """
    k = _check_neighbours(neighbours)
    off, (lab, s, e) = _ragged(offsets, labels, scores, emb)
    n = len(off) - 1
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    lab = np.asarray(lab).reshape(-1)
    e = np.asarray(e)
    if e.ndim != 2:
        e = e.reshape(len(e), -1)
    if not (len(s) == len(lab) == len(e)):
        raise ValueError(f"labels ({len(lab)}), scores ({len(s)}) and emb ({len(e)}) differ in length")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("CCMS scores must be finite")
    img = np.repeat(np.arange(n), np.diff(off))
    keep = s >= score_thresh
    img, lab, s = img[keep], lab[keep], s[keep]
    e = e[keep].astype(np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float64)).astype(np.float32)
    e = np.divide(e, norm[:, None], out=np.zeros_like(e), where=norm[:, None] > 0)

    cnt = np.bincount(img, minlength=n)
    has = cnt > 0
    wsum = np.bincount(img, weights=s, minlength=n)
    flat = has & (wsum <= 0)  # [ours] all-zero scores: unweighted mean
    if flat.any():
        s = np.where(flat[img], 1.0, s)
        wsum = np.bincount(img, weights=s, minlength=n)

    # gain[i, j] = sum over i's boxes b whose class j has of s_b (2 - dmin(b, j)) = s_b (1 + max cos)
    gain = np.zeros((n, n))
    base_w: list[np.ndarray] = []  # kNN classes: per image, sum of s_b (1 + cos_K(b))
    base_has: list[np.ndarray] = []  # kNN classes: which images have the class
    order = np.lexsort((img, lab))  # by label, then image (rows of an image stay together)
    lab_o = lab[order]
    cls_starts = np.flatnonzero(np.r_[True, lab_o[1:] != lab_o[:-1]]) if len(order) else np.zeros(0, np.int64)
    cls_ends = np.r_[cls_starts[1:], len(order)].astype(np.int64)
    for c0, c1 in zip(cls_starts.tolist(), cls_ends.tolist()):
        rows = order[c0:c1]
        ic = img[rows]
        ec = np.ascontiguousarray(e[rows])
        sc = s[rows]
        if k == 0 or len(rows) <= k or ec.shape[1] == 0:
            _class_gain_exact(gain, ic, ec, sc)
        else:
            base_w.append(_class_gain_knn(gain, ic, ec, sc, k))
            base_has.append(np.bincount(ic, minlength=n) > 0)
    if base_w:
        gain += np.stack(base_w, axis=1) @ np.stack(base_has, axis=1).T.astype(np.float64)

    d = np.full((n, n), _MAX_DIST)
    if has.any():
        d[has] = (_MAX_DIST * wsum[has, None] - gain[has]) / wsum[has, None]
    d = 0.5 * (d + d.T)
    np.clip(d, 0.0, _MAX_DIST, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def ccms_distances_exact(offsets: np.ndarray, labels: np.ndarray, scores: np.ndarray, emb: np.ndarray,
                         score_thresh: float = SCORE_THRESH) -> np.ndarray:
    """The exact CCMS distances: `ccms_distances` with neighbours=None (full per-class cosines)."""
    return ccms_distances(offsets, labels, scores, emb, score_thresh, neighbours=None)


def _kmedoids(D: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 100
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """k-medoids on a distance matrix: (medoids (k,), assignment (N,) into 0..k-1, iterations)."""
    d = np.asarray(D, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"k_medoids: D must be a square (N, N) matrix, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("k_medoids: D must be finite")
    if int(k) != k or k < 1:
        raise ValueError(f"k_medoids: k must be a positive integer, got {k!r}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"k_medoids: max_iter must be a non-negative integer, got {max_iter!r}")
    n, k = d.shape[0], int(k)
    if k >= n:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), 0

    # k-means++-style seeding
    med = np.empty(k, dtype=np.int64)
    med[0] = int(np.argmin(d.sum(axis=1)))
    chosen = np.zeros(n, dtype=bool)
    chosen[med[0]] = True
    near = d[med[0]].copy()
    for t in range(1, k):
        p = np.where(chosen, 0.0, np.maximum(near, 0.0) ** 2)
        cum = np.cumsum(p)
        if not (cum[-1] > 0 and math.isfinite(cum[-1])):  # every candidate is on a centre: uniform
            p = (~chosen).astype(np.float64)
            cum = np.cumsum(p)
        nxt = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        nxt = min(nxt, n - 1)
        while chosen[nxt] or p[nxt] <= 0:  # guard rounding at the cumsum's end
            nxt -= 1
        med[t] = nxt
        chosen[nxt] = True
        np.minimum(near, d[nxt], out=near)

    it = 0
    assign = np.empty(n, dtype=np.int64)
    while True:
        assign = np.argmin(d[:, med], axis=1)  # ties: the earlier medoid
        assign[med] = np.arange(k)  # a medoid always owns itself: no empty cluster
        if it >= max_iter:
            break
        it += 1
        srt = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[srt], np.arange(k + 1))
        new = med.copy()
        for t in range(k):
            mem = srt[bounds[t] : bounds[t + 1]]
            cost = d[np.ix_(mem, mem)].sum(axis=1)
            best = int(np.argmin(cost))  # ties: the lowest index
            cur = int(np.flatnonzero(mem == med[t])[0])
            if cost[best] < cost[cur]:  # keep the current medoid on ties (no cycling)
                new[t] = mem[best]
        if np.array_equal(new, med):
            break
        med = new
    return med, assign, it


def k_medoids(D: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 100) -> np.ndarray:
    """k-medoids (Voronoi iteration) on a precomputed distance matrix.

    Seeding (k-means++ style): the first medoid is the point with the smallest total
    distance to all others (lowest index on ties); each next one is drawn from `rng` with
    probability proportional to the squared distance to its nearest chosen medoid (uniformly
    among the unchosen points if those are all 0). Then, until no medoid changes or
    `max_iter` rounds: assign every point to its nearest medoid (the earlier medoid on ties;
    a medoid always to itself), and move each medoid to the member of its cluster with the
    smallest sum of distances to the cluster (the current medoid is kept on ties).

    Args:
        D: (N, N) finite distances (symmetric, zero diagonal expected).
        k: number of medoids (>= 1); k >= N -> all indices 0..N-1.
        rng: random generator (one draw per seeded medoid after the first).
        max_iter: most assign/update rounds.

    Returns:
        (min(k, N),) int64 row indices of the medoids; position t is the medoid of cluster t
        (seeding order). Deterministic given the state of `rng`.

    References:
        Kaufman & Rousseeuw, "Finding Groups in Data", 1990 (k-medoids); Park & Jun, "A
        simple and fast algorithm for K-medoids clustering", 2009 (alternating updates);
        Arthur & Vassilvitskii, "k-means++", SODA 2007 (seeding).
    """
    return _kmedoids(D, k, rng, max_iter)[0]


@SELECTORS.register("ccms", final=True, needs_embedding=False, needs_boxes=True,
                    box_fields=("labels", "scores", "roi_embedding"))
def ccms(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext,
         score_thresh: float = SCORE_THRESH, neighbours: int | None = CCMS_NEIGHBOURS) -> Selection:
    """PPAL stage 2: k-medoids with K = budget on the CCMS distances of the candidates.

    Reads `ctx.boxes` (orig view: offsets, labels, scores, roi_embedding; rows in the order
    of table["image_id"]) and `ctx.rng`; other table columns are ignored.

    Args:
        table: candidates, "image_id" (N,).
        budget: K, clipped to N (k >= N: every candidate is its own medoid).
        ctx: boxes and rng.
        score_thresh: boxes with a lower score are ignored (`ccms_distances`).
        neighbours: per box, the most similar same-class boxes kept by the distance [ours]
            (`ccms_distances`: exact for classes with at most this many kept boxes, a lower
            bound for far pairs otherwise); None or 0 -> exact everywhere.

    Returns:
        Selection of the medoids in descending cluster size (ties by image_id); score = the
        cluster size; rationale {"ccms": {"cluster_size": n, "mean_distance_in_cluster": x}}
        with x = the mean distance from the medoid to the other members (0.0 alone).

    Raises:
        ValueError: ctx.boxes missing, its image_id differing from the table's, a needed
            field missing, or neighbours not None or an integer >= 0.

    References:
        Yang et al., "Plug and Play Active Learning for Object Detection", CVPR 2024, CCMS.
    """
    budget = check_budget(budget)
    _check_neighbours(neighbours)
    ids = np.asarray(table["image_id"], dtype=np.int64)
    b = candidate_boxes("ccms", ctx, ids, ("offsets", "labels", "scores", "roi_embedding"))
    n = len(ids)
    if n == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    d = ccms_distances(b["offsets"], b["labels"], b["scores"], b["roi_embedding"], score_thresh, neighbours)
    med, assign, _ = _kmedoids(d, budget, ctx.rng)
    k = len(med)
    size = np.bincount(assign, minlength=k)
    mean_d = np.zeros(k)
    for t in range(k):
        mem = np.flatnonzero(assign == t)
        if len(mem) > 1:
            mean_d[t] = d[med[t], mem].sum() / (len(mem) - 1)  # D(medoid, medoid) = 0
    order = np.lexsort((ids[med], -size))
    rat = [{"ccms": {"cluster_size": int(size[t]), "mean_distance_in_cluster": json_float(mean_d[t])}}
           for t in order.tolist()]
    return Selection(ids[med[order]], size[order].astype(np.float64), rat)


__all__ = ["DCUS_A", "DCUS_B", "SCORE_THRESH", "RETRIEVE_KEEP", "dcus_class_weights", "binary_entropy",
           "dcus_scores", "dcus", "CCMS_NEIGHBOURS", "ccms_distances", "ccms_distances_exact", "k_medoids", "ccms"]
