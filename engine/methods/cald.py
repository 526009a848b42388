"""CALD: consistency-based active learning for object detection (docs/methods.md §2).

Yu, Lin, Zhou, Lai, Zhang, "Consistency-based Active Learning for Object Detection",
CVPR Workshops 2022 (the authors' code fixes the details below).

Stage 1, the `cald` signal (image-level, LOW = informative). For every box j of the
original view and every augmented view a (boxes already mapped back into the original
frame by engine.inference):

    IoU_j = max_k IoU(b_j, b'_k)              k* = argmax, any class
    JS_j  = JS(p_j || p'_k*)                  over the C + 1 classes, natural log
    m_j   = IoU_j + 0.5 (1 - JS_j)(pmax_j + pmax'_k*)          in [0, 2]
    s_a   = min(1, min_j |m_j - beta|)        beta = 1.3
    S     = mean_a s_a

with pmax = the largest object-class probability of a box (its detection score for
Faster R-CNN). [ours] A box with no counterpart in a view (the view found nothing) has
m_j = 0, i.e. |m_j - beta| = beta > 1, so it never makes the image informative. An image
without boxes gets NaN here; the score job's empty rule ("pool_max" = the most
informative value) then puts it first, as the authors' code does.

Stage 2, the `cald_rerank` selector: the stage-1 candidates (a `retrieve` stage keeping
1.2 x budget by `cald`) are re-ranked by JS(softmax(g) || softmax(r)), g = the labeled
set's class distribution (instances per class / total; uniform when nothing is labeled),
r = the candidate's per-class maximum probability over its boxes (0 for a class it does
not predict); the highest divergence first.
"""
from __future__ import annotations

import numpy as np

from poolscout.engine.models import predictions as P
from poolscout.engine.acquisition.selectors import (SELECTORS, SelectContext, Selection, candidate_boxes, check_budget,
                                                   json_float, topk_indices)
from poolscout.engine.acquisition.signals import register_signal

CALD_VIEWS = ("hflip", "cutout", "resize", "rotate")
BETA = 1.3


def view_consistency(ref_boxes: np.ndarray, ref_probs: np.ndarray, ref_off: np.ndarray, view_boxes: np.ndarray,
                     view_probs: np.ndarray, view_off: np.ndarray, beta: float = BETA) -> np.ndarray:
    """s_a per image for one augmented view: min(1, min_j |m_j - beta|); NaN without boxes.

    Args:
        ref_boxes, ref_probs, ref_off: original view, (M, 4), (M, C+1), (N+1,).
        view_boxes, view_probs, view_off: the augmented view mapped back, same layout.
        beta: the consistency level treated as most informative.

    Returns:
        (N,) float64.
    """
    from poolscout.kernels.boxes import ragged_max_iou
    from poolscout.kernels.consistency import js_divergence

    ref_off = np.asarray(ref_off, np.int64) - ref_off[0]
    view_off = np.asarray(view_off, np.int64) - view_off[0]
    n = len(ref_off) - 1
    iou, idx = ragged_max_iou(ref_boxes, ref_off, view_boxes, view_off)
    m = np.zeros(len(iou))
    hit = idx >= 0
    if hit.any():
        p = np.asarray(ref_probs, np.float64)[hit]
        q = np.asarray(view_probs, np.float64)[idx[hit]]
        js = js_divergence(p, q)
        m[hit] = iou[hit] + 0.5 * (1.0 - js) * (p[:, 1:].max(1) + q[:, 1:].max(1))
    dist = np.abs(m - beta)
    cnt = np.diff(ref_off)
    out = np.full(n, np.nan)
    ne = cnt > 0
    if ne.any():
        out[ne] = np.minimum(1.0, np.minimum.reduceat(dist, ref_off[:-1][ne]))
    return out


@register_signal("cald", direction="low", per_box=False, fields=("boxes", "probs"), views=CALD_VIEWS)
def cald(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """CALD stage-1 consistency S = mean over the augmented views present in the batch of
    s_a (see the module docstring): (N,) float64, LOW = informative, NaN without boxes.

    Raises:
        KeyError: the batch holds no augmented view.
    """
    views = [v for v in P.views_in(batch) if v != "orig" and v in CALD_VIEWS]
    if not views:
        raise KeyError(f"cald needs at least one augmented view of {CALD_VIEWS} in the predictions; "
                       f"the batch has {P.views_in(batch)}")
    per_view = []
    for v in views:
        pv = P.prefix(v)
        per_view.append(view_consistency(batch["boxes"], batch["probs"], batch["offsets"], batch[pv + "boxes"],
                                         batch[pv + "probs"], batch[pv + "offsets"]))
    return np.mean(np.stack(per_view, 0), axis=0)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_max_scores(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """r: per image, the maximum probability of each object class over its boxes: (N, C)."""
    off = np.asarray(offsets, np.int64) - offsets[0]
    p = np.asarray(probs, np.float64)
    n, c = len(off) - 1, p.shape[1] - 1
    out = np.zeros((n, c))
    ne = np.diff(off) > 0
    if ne.any():
        out[ne] = np.maximum.reduceat(p[:, 1:], off[:-1][ne], axis=0)
    return out


def class_prior_divergence(r: np.ndarray, labeled_counts: np.ndarray | None) -> np.ndarray:
    """JS(softmax(g) || softmax(r_i)) per candidate: (N,), g = labeled class frequencies."""
    from poolscout.kernels.consistency import js_divergence

    r = np.asarray(r, np.float64)
    c = r.shape[1]
    if labeled_counts is None or float(np.sum(labeled_counts)) <= 0:
        g = np.full(c, 1.0 / c)
    else:
        g = np.asarray(labeled_counts, np.float64).reshape(-1)
        if g.shape != (c,):
            raise ValueError(f"labeled_class_counts has {g.shape[0]} classes, predictions have {c}")
        g = g / g.sum()
    pg = np.broadcast_to(_softmax(g), r.shape)
    return js_divergence(np.ascontiguousarray(pg), _softmax(r))


@SELECTORS.register("cald_rerank", final=True, needs_embedding=False, needs_boxes=True, box_fields=("probs",))
def cald_rerank(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext) -> Selection:
    """CALD stage 2: the `budget` candidates whose predicted class mix diverges most from
    the labeled set's (see the module docstring).

    Returns:
        Selection with score = the divergence; rationale {"cald_rerank": {js, rank}}.
    """
    budget = check_budget(budget)
    ids = np.asarray(table["image_id"], np.int64)
    b = candidate_boxes("cald_rerank", ctx, ids, ("probs", "offsets"))
    js = class_prior_divergence(class_max_scores(b["probs"], b["offsets"]), ctx.labeled_class_counts)
    rows = topk_indices(js, ids, budget, "high")
    rat = [{"cald_rerank": {"js": json_float(js[r]), "rank": i}} for i, r in enumerate(rows.tolist(), start=1)]
    return Selection(ids[rows], js[rows], rat)


__all__ = ["CALD_VIEWS", "BETA", "view_consistency", "cald", "class_max_scores", "class_prior_divergence",
           "cald_rerank"]
