"""The uncertainty family: box entropy, margin and least confidence over the C+1 class
probabilities (background included) of each kept box.

References: Settles, "Active Learning Literature Survey", 2009 (uncertainty sampling);
methods.md section 1.
"""
from __future__ import annotations

import numpy as np

from poolscout.engine.acquisition.signals import register_signal
from poolscout.engine.models import predictions as P


# --------------------------------------------------------------------------------------
# per-box functions (reused by later methods)
def box_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each box's softmax, natural log, 0 log 0 = 0.

    Args:
        probs: (M, C+1) class probabilities (background included).

    Returns:
        (M,) float64, H(p) = -sum_c p_c log p_c.

    References:
        Shannon 1948; as an acquisition function e.g. Settles, "Active Learning Literature
        Survey", 2009, §3.1.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (M, C+1), got shape {p.shape}")
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -np.einsum("ij,ij->i", p, logp) + 0.0  # + 0.0 turns -0.0 into 0.0


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.shape[1] == 0:
        z = np.zeros(p.shape[0])
        return z, z
    if p.shape[1] == 1:
        return p[:, 0], np.zeros(p.shape[0])
    part = np.partition(p, p.shape[1] - 2, axis=1)
    return part[:, -1], part[:, -2]


def box_margin(probs: np.ndarray) -> np.ndarray:
    """Margin between the two largest probabilities of each box (over all C+1 columns).

    Args:
        probs: (M, C+1).

    Returns:
        (M,) float64, p(1) - p(2) in [0, 1]; LOW = uncertain.

    References:
        Scheffer et al., "Active Hidden Markov Models for Information Extraction", 2001.
    """
    p1, p2 = _top2(np.asarray(probs, dtype=np.float64))
    return p1 - p2


def box_least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - the largest probability of each box.

    Args:
        probs: (M, C+1).

    Returns:
        (M,) float64 in [0, 1); high = uncertain.

    References:
        Culotta & McCallum, "Reducing Labeling Effort for Structured Prediction Tasks", 2005.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 0:
        return np.ones(p.shape[0])
    return 1.0 - p.max(axis=1)


def _probs(batch: dict[str, np.ndarray], view: str) -> np.ndarray:
    key = P.prefix(view) + "probs"
    if key not in batch or batch[key] is None:
        raise KeyError(f"signal needs {key!r} but the batch has no such field")
    p = np.asarray(batch[key])
    if p.ndim == 1:  # an empty batch may come back as (0,)
        p = p.reshape(len(p), -1) if len(p) else p.reshape(0, 0)
    return p


@register_signal("entropy", direction="high", per_box=True, fields=("probs",))
def entropy(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box entropy of the (C+1)-way softmax of `view`: (M,). See `box_entropy`."""
    return box_entropy(_probs(batch, view))


@register_signal("margin", direction="low", per_box=True, fields=("probs",))
def margin(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box margin p(1) - p(2) of `view`: (M,). See `box_margin`."""
    return box_margin(_probs(batch, view))




@register_signal("least_confidence", direction="high", per_box=True, fields=("probs",))
def least_confidence(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box 1 - p(1) of `view`: (M,). See `box_least_confidence`."""
    return box_least_confidence(_probs(batch, view))
