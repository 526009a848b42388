"""Box kernels on ragged batches: pairwise IoU / GIoU and max-IoU matching.

A ragged batch holds the boxes of N images in one flat (M, 4) x1, y1, x2, y2 array plus
per-image offsets (N + 1,), so one call covers a whole Ray batch. Each Numba kernel has a
plain-NumPy reference twin (`*_ref`) with the same arithmetic in float64; the property
tests compare the two.

Conventions: IoU of two degenerate boxes (zero union) is 0; GIoU with a zero-area
enclosing box equals the IoU (there is nothing to penalise). Matching
returns, per predicted box, the best IoU among the reference boxes of the same image
(optionally only those of the same class) and the flat index of that reference box, or
-1 and 0.0 when the image has no (eligible) reference box. Ties go to the lowest index.
NaN or infinite coordinates are rejected with a ValueError before any kernel runs.
"""
from __future__ import annotations

import numpy as np
from numba import njit


# --- validation ---------------------------------------------------------------------------
def _boxes(b: np.ndarray, name: str) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        b = b.reshape(-1, 4) if b.size == 0 else b
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{name} must have shape (M, 4), got {b.shape}")
    if not np.isfinite(b).all():
        bad = int(np.flatnonzero(~np.isfinite(b).all(1))[0])
        raise ValueError(f"{name}: box {bad} has a NaN or infinite coordinate {b[bad].tolist()}")
    return b


def _offsets(off: np.ndarray, m: int, name: str) -> np.ndarray:
    off = np.ascontiguousarray(off, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != m or np.any(np.diff(off) < 0):
        raise ValueError(f"{name} must be non-decreasing offsets from 0 to {m}, got {off[:5]}...")
    return off


# --- pairwise -------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _iou_pair(a, b, giou):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if (iw > 0.0 and ih > 0.0) else 0.0
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0.0 else 0.0
    if not giou:
        return iou
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    hull = cw * ch
    if hull <= 0.0:
        return iou
    return iou - (hull - union) / hull


@njit(cache=True, nogil=True)
def _pairwise(a, b, giou):
    out = np.empty((a.shape[0], b.shape[0]), np.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = _iou_pair(a[i], b[j], giou)
    return out


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4), (m, 4) -> (n, m) IoU (Numba)."""
    return _pairwise(_boxes(a, "a"), _boxes(b, "b"), False)


def pairwise_giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4), (m, 4) -> (n, m) generalised IoU in [-1, 1] (Numba)."""
    return _pairwise(_boxes(a, "a"), _boxes(b, "b"), True)


def _pairwise_ref(a: np.ndarray, b: np.ndarray, giou: bool) -> np.ndarray:
    a, b = _boxes(a, "a")[:, None, :], _boxes(b, "b")[None, :, :]
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        if not giou:
            return iou
        hull = ((np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0]))
                * (np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])))
        return np.where(hull > 0, iou - (hull - union) / np.where(hull > 0, hull, 1.0), iou)


def pairwise_iou_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy reference twin of `pairwise_iou`."""
    return _pairwise_ref(a, b, False)


def pairwise_giou_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy reference twin of `pairwise_giou`."""
    return _pairwise_ref(a, b, True)


# --- ragged matching ------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _match(pred, pred_off, ref, ref_off, pred_lab, ref_lab, per_class):
    p = pred.shape[0]
    best = np.zeros(p, np.float64)
    idx = np.full(p, -1, np.int64)
    for img in range(pred_off.shape[0] - 1):
        r0, r1 = ref_off[img], ref_off[img + 1]
        for i in range(pred_off[img], pred_off[img + 1]):
            for j in range(r0, r1):
                if per_class and pred_lab[i] != ref_lab[j]:
                    continue
                v = _iou_pair(pred[i], ref[j], False)
                if idx[i] < 0 or v > best[i]:
                    best[i] = v
                    idx[i] = j
    return best, idx


def _match_args(pred, pred_off, ref, ref_off, pred_labels, ref_labels):
    pred, ref = _boxes(pred, "pred_boxes"), _boxes(ref, "ref_boxes")
    pred_off = _offsets(pred_off, len(pred), "pred_offsets")
    ref_off = _offsets(ref_off, len(ref), "ref_offsets")
    if len(pred_off) != len(ref_off):
        raise ValueError(f"pred_offsets describe {len(pred_off) - 1} images, ref_offsets {len(ref_off) - 1}")
    per_class = pred_labels is not None or ref_labels is not None
    if per_class and (pred_labels is None or ref_labels is None):
        raise ValueError("per-class matching needs both pred_labels and ref_labels")
    pl = np.ascontiguousarray(pred_labels if per_class else np.zeros(len(pred)), np.int64)
    rl = np.ascontiguousarray(ref_labels if per_class else np.zeros(len(ref)), np.int64)
    if len(pl) != len(pred) or len(rl) != len(ref):
        raise ValueError("labels must have one entry per box")
    return pred, pred_off, ref, ref_off, pl, rl, per_class


def ragged_max_iou(pred_boxes: np.ndarray, pred_offsets: np.ndarray, ref_boxes: np.ndarray,
                   ref_offsets: np.ndarray, pred_labels: np.ndarray | None = None,
                   ref_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU of every predicted box against the reference boxes of its own image (Numba).

    Args:
        pred_boxes: (P, 4) boxes of N images, flat; pred_offsets: (N + 1,).
        ref_boxes: (R, 4); ref_offsets: (N + 1,) for the same N images.
        pred_labels, ref_labels: give both to match only boxes of the same class.

    Returns:
        (best_iou (P,) float64, best_index (P,) int64 flat index into ref_boxes or -1).
    """
    return _match(*_match_args(pred_boxes, pred_offsets, ref_boxes, ref_offsets, pred_labels, ref_labels))


def ragged_max_iou_ref(pred_boxes, pred_offsets, ref_boxes, ref_offsets, pred_labels=None, ref_labels=None):
    """NumPy reference twin of `ragged_max_iou` (one vectorised IoU matrix per image)."""
    pred, po, ref, ro, pl, rl, per_class = _match_args(pred_boxes, pred_offsets, ref_boxes, ref_offsets,
                                                       pred_labels, ref_labels)
    best = np.zeros(len(pred), np.float64)
    idx = np.full(len(pred), -1, np.int64)
    for img in range(len(po) - 1):
        a, b = slice(po[img], po[img + 1]), slice(ro[img], ro[img + 1])
        if po[img] == po[img + 1] or ro[img] == ro[img + 1]:
            continue
        m = _pairwise_ref(pred[a], ref[b], False)
        if per_class:
            m = np.where(pl[a][:, None] == rl[b][None, :], m, -1.0)
        j = np.argmax(m, axis=1)
        v = m[np.arange(len(m)), j]
        ok = v >= 0
        best[a] = np.where(ok, v, 0.0)
        idx[a] = np.where(ok, j + ro[img], -1)
    return best, idx


__all__ = ["pairwise_iou", "pairwise_giou", "pairwise_iou_ref", "pairwise_giou_ref", "ragged_max_iou",
           "ragged_max_iou_ref"]
