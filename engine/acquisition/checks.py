"""What a selection must say about itself: picks whose score came from the empty-image rule,
batches that are mostly ties, and budgets larger than the pool.

A pick of an image on which the model detected nothing gets its box-reduced signal values
from `score.empty_value` (`signals.fill_empty`), not from the model; its rationale then
carries a top-level "note" saying so. Batch-level warnings go to the selection summary
(select.json "warnings"), which the CLI prints and the report shows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TIE_FRACTION = 0.5  # warn when more than this share of a batch is tied


def parse_empty_rule(text: str | float) -> str | float:
    """score.empty_value as fill_empty takes it: "pool_max", "pool_min" or a number."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return str(text)


def empty_note(rule: str | float) -> str:
    """The rationale note of a pick without detections, for the configured empty rule."""
    if rule == "pool_max":
        how = "scored as the pool maximum"
    elif rule == "pool_min":
        how = "scored as the pool minimum"
    else:
        how = f"scored as {float(rule):g}"
    return f"no detections: {how} (score.empty_value: {rule})"


def note_empty(rationale: Sequence[dict], empty: np.ndarray, rule: str | float) -> list[dict]:
    """Copies of `rationale` with a "note" on the picks whose image had no detections.

    Args:
        rationale: one dict per pick, in rank order.
        empty: (B,) bool, True where the picked image had no boxes.
        rule: score.empty_value ("pool_max", "pool_min" or a number).
    """
    empty = np.asarray(empty, dtype=bool)
    if len(empty) != len(rationale):
        raise ValueError(f"empty has {len(empty)} rows, rationale {len(rationale)}")
    note = empty_note(rule)
    return [{**r, "note": note} if e else dict(r) for r, e in zip(rationale, empty)]


def selection_warnings(scores: np.ndarray, *, budget: int, candidates: int,
                       empty: np.ndarray | None = None) -> list[str]:
    """One-line warnings about a selected batch.

    Args:
        scores: (B,) final-stage scores of the picks, in rank order.
        budget: images asked for.
        candidates: pool images that could be picked.
        empty: (B,) bool, picks without detections (None: not known / not box-based).

    Returns:
        Warnings, e.g. "budget 5000 > 1368 pool images: selected all of them" or
        "20 of 20 picks are tied (at 0): ties are ordered by image id, not by the model;
        20 of them have no detections".
    """
    out: list[str] = []
    if budget > candidates:
        out.append(f"budget {budget} > {candidates} pool images: selected all of them")
    s = np.asarray(scores, dtype=np.float64)
    b = len(s)
    if b >= 2:
        vals, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
        tied = counts[inv] > 1
        n_tied = int(tied.sum())
        if n_tied > TIE_FRACTION * b:
            top = vals[np.argmax(counts)]
            msg = (f"{n_tied} of {b} picks are tied (most at {top:.6g}): ties are ordered by image id, "
                   f"not by the model")
            if empty is not None:
                n_empty = int(np.asarray(empty, dtype=bool)[tied].sum())
                if n_empty:
                    msg += (f"; {n_empty} of them have no detections (their score is score.empty_value's; "
                            f"a model that detects nothing needs more training or a lower detector.score_thresh)")
            out.append(msg)
    return out


__all__ = ["TIE_FRACTION", "parse_empty_rule", "empty_note", "note_empty", "selection_warnings"]
