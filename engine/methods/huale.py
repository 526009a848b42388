"""HUALE: hierarchical uncertainty aggregation for detection (docs/methods.md §3).

The acquisition side; the training-side losses live in engine/losses.py and
engine/roi_heads.py.

1. Retrieval gate [paper]: E(I) = max_j H(p_j) (the `entropy:max` signal); a `retrieve`
   stage keeps the top rho x budget (rho = 2).
2. Ranking metrics on the original and the horizontally flipped view, boxes matched by max
   IoU (any class) after un-flipping; all four are image-level signals, HIGH = informative:

   - `huale_sa`, semantic affinity [ours]: BC_j = sum_c sqrt(p_c q_c) over the C + 1
     classes, D_j = sqrt(1 - BC_j); SA = max_j [1 - IoU_j (1 - D_j)]. A box without a
     counterpart has IoU 0, so SA = 1.
   - `huale_cd`, category diversity [ours]: (1/n) sum_j 1[argmax p_j != argmax q_j]
     (s_j + s'_j) / 2 over the n boxes of the original view, argmax over the C + 1
     columns, s = detection score. A box without a counterpart counts as a disagreement
     with s' = 0.
   - `huale_or`, overlap ratio [ours]: the fraction of pairs of kept boxes (score >= 0.05)
     with IoU > 0.5; 0 for fewer than two boxes.
   - `huale_lc`, localisation uncertainty [ours]: the mean over boxes of the mean of the 4
     predicted variances of the uncertainty-aware head (He et al. 2019), in the units of
     the box coder's normalised deltas. NaN for every image when the detector has no
     variance head; the aggregation then leaves the metric out (and says so).

   Images without boxes get NaN from every metric (the score job's empty rule fills them).
3. Aggregation [paper], the `weighted_l2` selector: min-max normalise each metric over the
   candidates (oriented so that 1 = most informative), l = sqrt(sum_m w_m d_m^2), take the
   top `budget` by l.

Reference: "Hierarchical Uncertainty Aggregation and Emphasis Loss for Active Learning in
Object Detection" (HUALE).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from poolscout.engine.acquisition import signals as S
from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext, Selection, check_budget, json_float, resolve_by, topk_indices
from poolscout.engine.acquisition.signals import register_signal

OR_SCORE_THRESH = 0.05
OR_IOU_THRESH = 0.5


def _match_flip(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from poolscout.kernels.boxes import ragged_max_iou

    if "hflip_offsets" not in batch:
        raise KeyError("HUALE metrics need the 'hflip' view in the predictions (score.views)")
    return ragged_max_iou(batch["boxes"], batch["offsets"], batch["hflip_boxes"], batch["hflip_offsets"])


def _per_image(values: np.ndarray, offsets: np.ndarray, reduce: str) -> np.ndarray:
    return S.reduce_boxes(values, offsets, reduce, None, "high")


def semantic_affinity(batch: dict[str, np.ndarray]) -> np.ndarray:
    """SA per image: (N,) float64, NaN without boxes (see the module docstring)."""
    from poolscout.kernels.consistency import bhattacharyya

    iou, idx = _match_flip(batch)
    per_box = np.ones(len(iou))
    hit = idx >= 0
    if hit.any():
        p = np.asarray(batch["probs"], np.float64)[hit]
        q = np.asarray(batch["hflip_probs"], np.float64)[idx[hit]]
        _, dist = bhattacharyya(p, q)
        per_box[hit] = 1.0 - iou[hit] * (1.0 - dist)
    return _per_image(per_box, batch["offsets"], "max")


def category_diversity(batch: dict[str, np.ndarray]) -> np.ndarray:
    """CD per image: (N,) float64, NaN without boxes (see the module docstring)."""
    _, idx = _match_flip(batch)
    p = np.asarray(batch["probs"], np.float64)
    s = np.asarray(batch["scores"], np.float64)
    per_box = s / 2.0  # no counterpart: a disagreement with s' = 0
    hit = idx >= 0
    if hit.any():
        q = np.asarray(batch["hflip_probs"], np.float64)[idx[hit]]
        s2 = np.asarray(batch["hflip_scores"], np.float64)[idx[hit]]
        differ = p[hit].argmax(1) != q.argmax(1)
        per_box[hit] = np.where(differ, (s[hit] + s2) / 2.0, 0.0)
    return _per_image(per_box, batch["offsets"], "mean")


def overlap(batch: dict[str, np.ndarray]) -> np.ndarray:
    """OR per image: (N,) float64, NaN without boxes (see the module docstring)."""
    from poolscout.kernels.consistency import overlap_ratio

    off = np.asarray(batch["offsets"], np.int64)
    out = overlap_ratio(batch["boxes"], batch["scores"], off - off[0], OR_SCORE_THRESH, OR_IOU_THRESH)
    out = np.asarray(out, np.float64).copy()
    out[np.diff(off) == 0] = np.nan
    return out


def localization_uncertainty(batch: dict[str, np.ndarray]) -> np.ndarray:
    """LC per image: (N,) float64; all NaN without a variance head (see the module docstring)."""
    n = len(batch["image_id"])
    var = batch.get("box_var")
    if var is None or len(np.asarray(var).reshape(-1)) != 4 * int(batch["offsets"][-1] - batch["offsets"][0]):
        return np.full(n, np.nan)
    per_box = np.asarray(var, np.float64).reshape(-1, 4).mean(1)
    return _per_image(per_box, batch["offsets"], "mean")


@register_signal("huale_sa", direction="high", per_box=False, fields=("boxes", "probs"), views=("hflip",))
def huale_sa(batch: dict[str, np.ndarray]) -> np.ndarray:
    """HUALE semantic affinity, see `semantic_affinity`."""
    return semantic_affinity(batch)


@register_signal("huale_cd", direction="high", per_box=False, fields=("boxes", "probs", "scores"), views=("hflip",))
def huale_cd(batch: dict[str, np.ndarray]) -> np.ndarray:
    """HUALE category diversity, see `category_diversity`."""
    return category_diversity(batch)


@register_signal("huale_or", direction="high", per_box=False, fields=("boxes", "scores"))
def huale_or(batch: dict[str, np.ndarray]) -> np.ndarray:
    """HUALE overlap ratio, see `overlap`."""
    return overlap(batch)


@register_signal("huale_lc", direction="high", per_box=False, fields=("box_var",))
def huale_lc(batch: dict[str, np.ndarray]) -> np.ndarray:
    """HUALE localisation uncertainty, see `localization_uncertainty`."""
    return localization_uncertainty(batch)


def minmax(values: np.ndarray, direction: str = "high") -> np.ndarray | None:
    """Min-max normalise to [0, 1] with 1 = most informative; None when there is nothing
    to normalise (all NaN, or all finite values equal). NaN stays NaN."""
    v = np.asarray(values, np.float64)
    fin = np.isfinite(v)
    if not fin.any():
        return None
    lo, hi = v[fin].min(), v[fin].max()
    if hi <= lo:
        return None
    d = (v - lo) / (hi - lo)
    return d if direction == "high" else 1.0 - d


@SELECTORS.register("weighted_l2", final=True, needs_embedding=False)
def weighted_l2(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, signals: Sequence[str],
                weights: Sequence[float] | None = None) -> Selection:
    """HUALE's aggregation: l = sqrt(sum_m w_m d_m^2) over min-max normalised metrics.

    Args:
        table: candidates with one column per signal.
        budget: images to pick.
        ctx: unused.
        signals: signal specs (or columns) of the metrics.
        weights: w_m >= 0, one per signal (default all 1; Ray Tune tunes them).

    Returns:
        Selection with score = l; rationale {"weighted_l2": {"l", "rank", "terms": {column:
        w d^2}, "dropped": [columns without spread or values]}}. A NaN metric value
        contributes 0 to that image's l. When no metric has any spread (every candidate
        ties on all of them), the first `budget` candidates in table order are kept (the
        gate's order after a narrowing stage), score NaN, with a "fallback" reason.
    """
    budget = check_budget(budget)
    signals = list(signals)
    if not signals:
        raise ValueError("weighted_l2 needs at least one signal")
    w = np.ones(len(signals)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (len(signals),):
        raise ValueError(f"weighted_l2: {len(w)} weights for {len(signals)} signals")
    if np.any(w < 0) or not np.isfinite(w).all():
        raise ValueError(f"weighted_l2: weights must be finite and >= 0, got {w.tolist()}")
    ids = np.asarray(table["image_id"], np.int64)
    total = np.zeros(len(ids))
    terms: dict[str, np.ndarray] = {}
    dropped = []
    for spec, wm in zip(signals, w):
        col, dirn = resolve_by(spec, table)
        d = minmax(table[col], dirn)
        if d is None:
            dropped.append(col)
            continue
        t = wm * np.nan_to_num(d, nan=0.0) ** 2
        terms[col] = t
        total += t
    if len(dropped) == len(signals):
        # every metric ties (or is missing) on every candidate: nothing to rank by, so keep
        # the order the candidates came in (the gate's rank order when a stage narrowed
        # them, else image_id order), and say so
        why = (f"no metric has any spread over the {len(ids)} candidates: kept the order they came in "
               f"(the previous stage's ranking)")
        b = min(budget, len(ids))
        rat = [{"weighted_l2": {"l": None, "rank": i, "fallback": why, "dropped": dropped}}
               for i in range(1, b + 1)]
        return Selection(ids[:b], np.full(b, np.nan), rat)
    score = np.sqrt(total)
    rows = topk_indices(score, ids, budget, "high")
    rat = [{"weighted_l2": {"l": json_float(score[r]), "rank": i,
                            "terms": {c: json_float(t[r]) for c, t in terms.items()}, "dropped": dropped}}
           for i, r in enumerate(rows.tolist(), start=1)]
    return Selection(ids[rows], score[rows], rat)


__all__ = ["semantic_affinity", "category_diversity", "overlap", "localization_uncertainty", "minmax",
           "weighted_l2", "huale_sa", "huale_cd", "huale_or", "huale_lc"]
