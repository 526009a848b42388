"""Consistency kernels: view box mapping, distribution distances, entropy, overlap ratio.

Used by the consistency-based strategies (CALD, HUALE): boxes predicted on an augmented
view of an image are mapped back into the original frame, matched to the original
predictions (kernels.boxes.ragged_max_iou) and the class distributions of matched boxes
compared with the Bhattacharyya coefficient or the Jensen-Shannon divergence.

Each public function validates and converts its inputs, then runs a Numba kernel; each has
a plain-NumPy reference twin (`*_ref`) with the same arithmetic in float64 which the
property tests compare against.

Conventions:

- A ragged batch is flat per-box arrays plus `offsets` (N + 1,) int64: image i owns rows
  offsets[i]:offsets[i + 1]. offsets[0] need not be 0; only rows offsets[0]:offsets[-1]
  belong to images (rows outside are copied unchanged by the box mappers and ignored by
  `overlap_ratio`).
- Boxes are (M, 4) x1, y1, x2, y2 in pixels; every mapped box is clipped to [0, W] x [0, H]
  of its image.
- Probability rows (M, K) are used as given (not renormalised); negative entries are
  rejected. 0 log 0 = 0.
- NaN or infinite boxes, probabilities, scores or image sizes are rejected with a
  ValueError naming the array and its first bad row, before any kernel runs.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .boxes import _boxes, _iou_pair, _pairwise_ref

VIEWS = ("orig", "hflip", "cutout", "resize", "rotate")
_VIEW_CODE = {"orig": 0, "cutout": 0, "hflip": 1, "resize": 2, "rotate": 3}
LN2 = math.log(2.0)


# --- validation ---------------------------------------------------------------------------
def _first_bad_row(a: np.ndarray, name: str) -> None:
    ok = np.isfinite(a) if a.ndim == 1 else np.isfinite(a).all(axis=1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{name} row {bad} is not finite: {np.atleast_1d(a[bad]).tolist()}")


def _vector(v, name: str) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    _first_bad_row(v, name)
    return v


def _probs(p, name: str) -> np.ndarray:
    p = np.ascontiguousarray(p, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape (M, K), got {p.shape}")
    _first_bad_row(p, name)
    neg = (p < 0).any(axis=1)
    if neg.any():
        bad = int(np.flatnonzero(neg)[0])
        raise ValueError(f"{name} row {bad} has a negative entry: {p[bad].tolist()}")
    return p


def _prob_pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    p, q = _probs(p, "p"), _probs(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got p {p.shape} and q {q.shape}")
    return p, q


def _offsets(off, m: int, name: str = "offsets") -> np.ndarray:
    off = np.ascontiguousarray(off, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1:
        raise ValueError(f"{name} must be a 1-D array of N + 1 offsets, got shape {off.shape}")
    if off[0] < 0 or off[-1] > m or np.any(np.diff(off) < 0):
        raise ValueError(f"{name} must be non-decreasing offsets within [0, {m}] (the rows of the box "
                         f"array), got {off[:5].tolist()}{'...' if len(off) > 5 else ''}")
    return off


def _sizes(widths, heights, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    w, h = _vector(widths, "widths"), _vector(heights, "heights")
    for v, name in ((w, "widths"), (h, "heights")):
        if len(v) != n_images:
            raise ValueError(f"{name} has {len(v)} entries but offsets describe {n_images} images")
        if np.any(v <= 0):
            bad = int(np.flatnonzero(v <= 0)[0])
            raise ValueError(f"{name} row {bad} must be > 0, got {v[bad]}")
    return w, h


def _view_args(boxes, offsets, widths, heights, view, param):
    if view not in _VIEW_CODE:
        raise ValueError(f"unknown view {view!r}; known views: {', '.join(VIEWS)}")
    b = _boxes(boxes, "boxes")
    off = _offsets(offsets, len(b))
    w, h = _sizes(widths, heights, len(off) - 1)
    param = float(param)
    code = _VIEW_CODE[view]
    if code >= 2 and not math.isfinite(param):
        raise ValueError(f"view {view!r} needs a finite param, got {param}")
    if code == 2 and param <= 0.0:
        raise ValueError(f"view 'resize' needs a scale factor param > 0, got {param}")
    t = math.radians(param) if code == 3 else 0.0
    return b, off, w, h, code, param, math.cos(t), math.sin(t)


# --- view box mapping -----------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _map_views(boxes, off, widths, heights, code, param, c, s, forward):
    out = boxes.copy()
    xs = np.empty(4, np.float64)
    ys = np.empty(4, np.float64)
    for img in range(off.shape[0] - 1):
        w, h = widths[img], heights[img]
        cx, cy = 0.5 * w, 0.5 * h
        for i in range(off[img], off[img + 1]):
            x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            if code == 1:  # hflip: its own inverse
                x1, x2 = w - x2, w - x1
            elif code == 2:  # resize anchored at (0, 0)
                if forward:
                    x1, y1, x2, y2 = x1 * param, y1 * param, x2 * param, y2 * param
                else:
                    x1, y1, x2, y2 = x1 / param, y1 / param, x2 / param, y2 / param
            elif code == 3:  # rotate about the centre; the inverse rotates by -t
                xs[0], ys[0] = x1, y1
                xs[1], ys[1] = x2, y1
                xs[2], ys[2] = x1, y2
                xs[3], ys[3] = x2, y2
                for k in range(4):
                    dx, dy = xs[k] - cx, ys[k] - cy
                    if forward:
                        xs[k] = cx + dx * c + dy * s
                        ys[k] = cy - dx * s + dy * c
                    else:
                        xs[k] = cx + dx * c - dy * s
                        ys[k] = cy + dx * s + dy * c
                x1, x2 = xs.min(), xs.max()
                y1, y2 = ys.min(), ys.max()
            out[i, 0] = min(max(x1, 0.0), w)
            out[i, 1] = min(max(y1, 0.0), h)
            out[i, 2] = min(max(x2, 0.0), w)
            out[i, 3] = min(max(y2, 0.0), h)
    return out


def _map_views_ref(boxes, off, widths, heights, code, param, c, s, forward):
    out = boxes.copy()
    r0, r1 = off[0], off[-1]
    img = np.repeat(np.arange(len(off) - 1), np.diff(off))
    w, h = widths[img], heights[img]
    b = boxes[r0:r1]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    if code == 1:
        x1, x2 = w - x2, w - x1
    elif code == 2:
        b = b * param if forward else b / param
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    elif code == 3:
        cx, cy = 0.5 * w[:, None], 0.5 * h[:, None]
        dx = np.stack([x1, x2, x1, x2], 1) - cx
        dy = np.stack([y1, y1, y2, y2], 1) - cy
        if forward:
            xs, ys = cx + dx * c + dy * s, cy - dx * s + dy * c
        else:
            xs, ys = cx + dx * c - dy * s, cy + dx * s + dy * c
        x1, x2, y1, y2 = xs.min(1), xs.max(1), ys.min(1), ys.max(1)
    out[r0:r1] = np.stack([np.clip(x1, 0.0, w), np.clip(y1, 0.0, h), np.clip(x2, 0.0, w), np.clip(y2, 0.0, h)], 1)
    return out


def map_view_boxes(boxes: np.ndarray, offsets: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                   view: str, param: float = 0.0) -> np.ndarray:
    """Map boxes predicted on an augmented view back into the original image frame (Numba).

    Views: "orig" and "cutout" are the identity; "hflip" mirrors x -> W - x; "resize" is
    the original scaled by `param` anchored at (0, 0) (coordinates are divided by param);
    "rotate" is the original rotated by `param` degrees counter-clockwise as displayed
    (y axis down) about (W/2, H/2) on the same canvas: the 4 corners of each view box are
    rotated back and their enclosing axis-aligned box taken. Results are clipped to
    [0, W] x [0, H] of each box's image.

    Args:
        boxes: (M, 4) x1, y1, x2, y2 on the view, flat over N images.
        offsets: (N + 1,) int64; image i owns rows offsets[i]:offsets[i + 1].
        widths, heights: (N,) original image sizes (> 0).
        view: one of VIEWS.
        param: the resize factor (> 0) or the rotation angle in degrees; unused otherwise.

    Returns:
        (M, 4) float64 boxes in the original frame (rows outside offsets[0]:offsets[-1]
        copied unchanged).
    """
    return _map_views(*_view_args(boxes, offsets, widths, heights, view, param), False)


def map_view_boxes_ref(boxes, offsets, widths, heights, view, param=0.0):
    """NumPy reference twin of `map_view_boxes`."""
    return _map_views_ref(*_view_args(boxes, offsets, widths, heights, view, param), False)


def view_boxes_forward(boxes: np.ndarray, offsets: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                       view: str, param: float = 0.0) -> np.ndarray:
    """Map boxes of the original image into an augmented view's frame (Numba).

    The inverse of `map_view_boxes` (same conventions): hflip uses the same formula,
    resize multiplies by `param`, rotate rotates the 4 corners by `param` degrees
    counter-clockwise as displayed, x' = cx + (x-cx) cos t + (y-cy) sin t,
    y' = cy - (x-cx) sin t + (y-cy) cos t, and takes their enclosing box. Results are
    clipped to the view canvas [0, W] x [0, H].

    Args:
        boxes: (M, 4) x1, y1, x2, y2 in the original frame; offsets: (N + 1,).
        widths, heights: (N,) original image sizes (the canvas of the view).
        view: one of VIEWS; param: as for `map_view_boxes`.

    Returns:
        (M, 4) float64 boxes on the view.
    """
    return _map_views(*_view_args(boxes, offsets, widths, heights, view, param), True)


def view_boxes_forward_ref(boxes, offsets, widths, heights, view, param=0.0):
    """NumPy reference twin of `view_boxes_forward`."""
    return _map_views_ref(*_view_args(boxes, offsets, widths, heights, view, param), True)


# --- distribution distances -----------------------------------------------------------------
@njit(cache=True, nogil=True)
def _bhattacharyya(p, q):
    m = p.shape[0]
    bc = np.empty(m, np.float64)
    dist = np.empty(m, np.float64)
    for i in range(m):
        s = 0.0
        for k in range(p.shape[1]):
            s += math.sqrt(p[i, k] * q[i, k])
        s = min(s, 1.0)
        bc[i] = s
        dist[i] = math.sqrt(max(0.0, 1.0 - s))
    return bc, dist


def bhattacharyya(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bhattacharyya coefficient and distance of paired distributions (Numba).

    Args:
        p, q: (M, K) rows are distributions (non-negative, used as given).

    Returns:
        (bc (M,), dist (M,)) float64: bc = sum_c sqrt(p_c q_c), clipped to at most 1
        (rounding, unnormalised rows); dist = sqrt(max(0, 1 - bc)) in [0, 1].
    """
    return _bhattacharyya(*_prob_pair(p, q))


def bhattacharyya_ref(p, q):
    """NumPy reference twin of `bhattacharyya`."""
    p, q = _prob_pair(p, q)
    bc = np.minimum(np.sqrt(p * q).sum(axis=1), 1.0)
    return bc, np.sqrt(np.maximum(0.0, 1.0 - bc))


@njit(cache=True, nogil=True)
def _js(p, q, cap):
    m = p.shape[0]
    out = np.empty(m, np.float64)
    for i in range(m):
        s = 0.0
        for k in range(p.shape[1]):
            a, b = p[i, k], q[i, k]
            mid = 0.5 * (a + b)
            if a > 0.0:
                s += a * math.log(a / mid)
            if b > 0.0:
                s += b * math.log(b / mid)
        out[i] = min(max(0.5 * s, 0.0), cap)
    return out


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence of paired distributions, natural log (Numba).

    JS = 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2, with 0 log 0 = 0.

    Args:
        p, q: (M, K) rows are distributions (non-negative, used as given).

    Returns:
        (M,) float64 clipped to [0, ln 2].
    """
    return _js(*_prob_pair(p, q), LN2)


def js_divergence_ref(p, q):
    """NumPy reference twin of `js_divergence`."""
    p, q = _prob_pair(p, q)
    mid = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.where(p > 0, p * np.log(p / np.where(mid > 0, mid, 1.0)), 0.0)
        tq = np.where(q > 0, q * np.log(q / np.where(mid > 0, mid, 1.0)), 0.0)
    return np.clip(0.5 * (tp + tq).sum(axis=1), 0.0, LN2)


@njit(cache=True, nogil=True)
def _entropy(p):
    m = p.shape[0]
    out = np.empty(m, np.float64)
    for i in range(m):
        s = 0.0
        for k in range(p.shape[1]):
            a = p[i, k]
            if a > 0.0:
                s += a * math.log(a)
        out[i] = 0.0 - s
    return out


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, natural log, 0 log 0 = 0 (Numba).

    Args:
        p: (M, K) rows are distributions (non-negative, used as given).

    Returns:
        (M,) float64 -sum_c p_c log p_c.
    """
    return _entropy(_probs(p, "p"))


def entropy_ref(p):
    """NumPy reference twin of `entropy`."""
    p = _probs(p, "p")
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return 0.0 - t.sum(axis=1)


# --- overlap ratio ----------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _overlap_ratio(boxes, scores, off, score_thresh, iou_thresh):
    n = off.shape[0] - 1
    out = np.zeros(n, np.float64)
    keep = np.empty(boxes.shape[0], np.int64)
    for img in range(n):
        k = 0
        for i in range(off[img], off[img + 1]):
            if scores[i] >= score_thresh:
                keep[k] = i
                k += 1
        if k < 2:
            continue
        hits = 0
        for a in range(k):
            for b in range(a + 1, k):
                if _iou_pair(boxes[keep[a]], boxes[keep[b]], False) > iou_thresh:
                    hits += 1
        out[img] = hits / (0.5 * k * (k - 1))
    return out


def _overlap_args(boxes, scores, offsets, score_thresh, iou_thresh):
    b = _boxes(boxes, "boxes")
    s = _vector(scores, "scores")
    if len(s) != len(b):
        raise ValueError(f"scores has {len(s)} entries but boxes has {len(b)} rows")
    off = _offsets(offsets, len(b))
    st, it = float(score_thresh), float(iou_thresh)
    if not (math.isfinite(st) and math.isfinite(it)):
        raise ValueError(f"score_thresh and iou_thresh must be finite, got {st}, {it}")
    return b, s, off, st, it


def overlap_ratio(boxes: np.ndarray, scores: np.ndarray, offsets: np.ndarray, score_thresh: float = 0.05,
                  iou_thresh: float = 0.5) -> np.ndarray:
    """Per image, the fraction of pairs of kept boxes that overlap (Numba).

    Args:
        boxes: (M, 4) flat over N images; scores: (M,); offsets: (N + 1,).
        score_thresh: boxes with score >= score_thresh are kept.
        iou_thresh: a pair (i < j) counts when its IoU (kernels.boxes convention:
            degenerate boxes have IoU 0 with everything) is strictly greater.

    Returns:
        (N,) float64 in [0, 1]; 0.0 for images with fewer than two kept boxes.
    """
    return _overlap_ratio(*_overlap_args(boxes, scores, offsets, score_thresh, iou_thresh))


def overlap_ratio_ref(boxes, scores, offsets, score_thresh=0.05, iou_thresh=0.5):
    """NumPy reference twin of `overlap_ratio` (one vectorised IoU matrix per image)."""
    b, s, off, st, it = _overlap_args(boxes, scores, offsets, score_thresh, iou_thresh)
    out = np.zeros(len(off) - 1, np.float64)
    for img in range(len(off) - 1):
        kb = b[off[img]:off[img + 1]][s[off[img]:off[img + 1]] >= st]
        k = len(kb)
        if k < 2:
            continue
        iu = np.triu_indices(k, 1)
        out[img] = np.count_nonzero(_pairwise_ref(kb, kb, False)[iu] > it) / (0.5 * k * (k - 1))
    return out


__all__ = ["VIEWS", "map_view_boxes", "map_view_boxes_ref", "view_boxes_forward", "view_boxes_forward_ref",
           "bhattacharyya", "bhattacharyya_ref", "js_divergence", "js_divergence_ref", "entropy", "entropy_ref",
           "overlap_ratio", "overlap_ratio_ref"]
