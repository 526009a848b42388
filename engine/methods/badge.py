"""BADGE: k-means++ seeding on gradient embeddings, in factorised form.

docs/methods.md section 7. For a softmax output p with predicted class yhat = argmax p
and penultimate features h, the gradient of the cross-entropy (with yhat as the label)
w.r.t. the last layer's weights is g = a (x) h with a = p - onehot(yhat). Its norm is
large for uncertain predictions, and k-means++ seeding (D^2 sampling) on g picks points
that are both uncertain and diverse. g is never materialised ((C+1) x d per point):

    |g_i - g_j|^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i . a_j)(h_i . h_j)

so each pick costs O(N (C + d)) and the seeding keeps O(N) state (a running minimum of
D^2 over the centres chosen so far).

[ours] the detection adaptation and details the paper leaves open:
  * An image is represented by one box: the one with the largest gradient norm |a| |h|
    (ties: the lowest box row, i.e. the higher score), with p = that box's softmax over C
    classes + background (`probs`, (M, C+1)), yhat its argmax (background included) and h
    its `roi_embedding`. An image without boxes has g = 0.
  * The first centre is the largest norm (ties: lowest row), deterministic as in the
    authors' code; later centres are drawn from ctx.rng with probability D^2 / sum D^2.
    When every remaining D^2 is 0 (e.g. only box-less images are left), the lowest
    remaining row is taken.
  * The score of a pick is D at pick time (the first centre's D is taken to g = 0, i.e.
    its norm).
  * The labeled set does not enter (as in the paper: seeding runs on the unlabeled pool).

Reference: Ash, Zhang, Krishnamurthy, Langford, Agarwal, "Deep Batch Active Learning by
Diverse, Uncertain Gradient Lower Bounds", ICLR 2020.
"""
from __future__ import annotations

import numpy as np

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, candidate_boxes, check_budget, json_float


def box_factors(probs: np.ndarray, roi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a = p - onehot(argmax p) (M, C+1) and h (M, d), float64, for every box."""
    p = np.asarray(probs, dtype=np.float64)
    h = np.asarray(roi, dtype=np.float64)
    if p.ndim != 2 or h.ndim != 2 or len(p) != len(h):
        raise ValueError(f"badge: probs (M, C+1) and roi_embedding (M, d) must have the same rows, "
                         f"got {p.shape} and {h.shape}")
    a = p.copy()
    if len(a):
        a[np.arange(len(a)), np.argmax(p, axis=1)] -= 1.0
    return a, h


def image_factors(offsets: np.ndarray, probs: np.ndarray, roi: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One gradient embedding per image: its box with the largest |a| |h|.

    Args:
        offsets: (N+1,) box offsets (rows offsets[0]:offsets[-1] are used).
        probs: (M, C+1) softmax per box, column 0 = background.
        roi: (M, d) box-head features.

    Returns:
        (A (N, C+1), H (N, d), box (N,) int64): the factors of each image's box (zeros for
        an image without boxes) and the box's position within its image (-1 if none).
    """
    off = np.asarray(offsets, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1 or np.any(np.diff(off) < 0):
        raise ValueError(f"badge: offsets must be (N+1,) non-decreasing, got shape {off.shape}")
    lo, hi = int(off[0]), int(off[-1])
    if len(probs) < hi or len(roi) < hi:
        raise ValueError(f"badge: offsets reach row {hi} but probs has {len(probs)} and roi_embedding "
                         f"{len(roi)} rows")
    a, h = box_factors(np.asarray(probs)[lo:hi], np.asarray(roi)[lo:hi])
    off = off - lo
    n, m = len(off) - 1, hi - lo
    cnt = np.diff(off)
    img = np.repeat(np.arange(n), cnt)
    norm = np.sqrt((a * a).sum(1) * (h * h).sum(1))
    order = np.lexsort((np.arange(m), -norm, img))  # per image: largest norm, then lowest row
    A = np.zeros((n, a.shape[1]))
    H = np.zeros((n, h.shape[1]))
    box = np.full(n, -1, dtype=np.int64)
    has = cnt > 0
    best = order[off[:-1][has]]
    A[has], H[has] = a[best], h[best]
    box[has] = best - off[:-1][has]
    return A, H, box


def factorised_d2(A: np.ndarray, H: np.ndarray, sq: np.ndarray, j: int) -> np.ndarray:
    """|g_i - g_j|^2 for all i, with g = a (x) h and sq = |a|^2 |h|^2: (N,), clipped at 0."""
    return np.maximum(sq + sq[j] - 2.0 * (A @ A[j]) * (H @ H[j]), 0.0)


def kmeanspp(A: np.ndarray, H: np.ndarray, k: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding on g_i = A_i (x) H_i (see the module docstring for the rules).

    Returns:
        (rows (k,) in pick order, D^2 of each at its pick time; the first one's is its
        squared norm).
    """
    sq = (A * A).sum(1) * (H * H).sum(1)
    n = len(sq)
    k = min(int(k), n)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    j = int(np.argmax(sq))
    rows, dist2 = [j], [float(sq[j])]
    chosen = np.zeros(n, dtype=bool)
    chosen[j] = True
    dmin = factorised_d2(A, H, sq, j)
    dmin[chosen] = 0.0
    while len(rows) < k:
        w = np.where(chosen, 0.0, dmin)
        cdf = np.cumsum(w)
        if not cdf[-1] > 0:
            j = int(np.flatnonzero(~chosen)[0])
        else:
            j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
            if j >= n or w[j] <= 0:  # u rounded up to the total: the last positive weight
                j = int(np.flatnonzero(w > 0)[-1])
        rows.append(j)
        dist2.append(float(w[j]))
        chosen[j] = True
        dmin = np.minimum(dmin, factorised_d2(A, H, sq, j))
        dmin[chosen] = 0.0
    return np.asarray(rows, dtype=np.int64), np.asarray(dist2)


@SELECTORS.register("badge", final=True, needs_embedding=False, needs_boxes=True, box_fields=("probs", "roi_embedding"))
def badge(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext) -> Selection:
    """BADGE on per-image gradient embeddings of the candidates' boxes (`ctx.boxes`).

    Returns:
        Selection with score = D (sqrt of D^2) at pick time, in pick order; rationale
        {"badge": {norm, distance, rank, box}}: norm = |g| of the image, distance = D,
        box = the position of the representative box within the image (None if it has
        no boxes).

    Raises:
        ValueError: ctx.boxes missing or its image_id differing from the table's, or
            `offsets`, `probs` or `roi_embedding` missing from it.

    References:
        Ash et al., "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower
        Bounds", ICLR 2020.
    """
    budget = check_budget(budget)
    ids = np.asarray(table["image_id"], dtype=np.int64)
    b = candidate_boxes("badge", ctx, ids, ("offsets", "probs", "roi_embedding"))
    n = len(ids)
    if n == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    A, H, box = image_factors(b["offsets"], b["probs"], b["roi_embedding"])
    if len(A) != n:
        raise ValueError(f"selector badge: ctx.boxes offsets describe {len(A)} images, the table has {n}")
    rows, d2 = kmeanspp(A, H, min(budget, n), ctx.rng)
    norm = np.sqrt((A * A).sum(1) * (H * H).sum(1))
    dist = np.sqrt(d2)
    rat = [{"badge": {"norm": json_float(norm[r]), "distance": json_float(d), "rank": t + 1,
                      "box": int(box[r]) if box[r] >= 0 else None}}
           for t, (r, d) in enumerate(zip(rows.tolist(), dist.tolist()))]
    return Selection(ids[rows], dist, rat)


__all__ = ["badge", "box_factors", "factorised_d2", "image_factors", "kmeanspp"]
