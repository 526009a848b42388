"""BALD over MC-dropout box-head passes: H(mean p) - mean H(p) per box.

References: Houlsby et al., "Bayesian Active Learning for Classification and Preference
Learning", 2011; Gal, Islam, Ghahramani, "Deep Bayesian Active Learning with Image Data", 2017.
"""
from __future__ import annotations

import numpy as np

from poolscout.engine.acquisition.signals import register_signal

from poolscout.engine.methods.uncertainty import box_entropy


def bald_from_samples(samples: np.ndarray) -> np.ndarray:
    """BALD of each box from its T MC-dropout softmaxes.

    Args:
        samples: (M, T, K) probabilities.

    Returns:
        (M,) float64, H(mean_t p_t) - mean_t H(p_t) >= 0 (mutual information between the
        prediction and the weights).

    References:
        Houlsby et al., "Bayesian Active Learning for Classification and Preference
        Learning", 2011; Gal, Islam & Ghahramani, "Deep Bayesian Active Learning with Image
        Data", ICML 2017.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"samples must be (M, T, K), got shape {x.shape}")
    m, t, k = x.shape
    mean_h = box_entropy(x.reshape(m * t, k)).reshape(m, t).mean(1) if m else np.zeros(0)
    return np.maximum(box_entropy(x.mean(1)) - mean_h, 0.0)


@register_signal("bald", direction="high", per_box=True, fields=("mc_probs", "mc_entropy"), mc=True)
def bald(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box BALD from the stored MC-dropout moments: H(mc_probs) - mc_entropy, (M,).

    `mc_probs` is mean_t p_t and `mc_entropy` mean_t H(p_t) over score.mc_passes passes of
    the box head with dropout on (engine.inference.mc_dropout_moments), so this equals
    `bald_from_samples` of those passes. Original view only.
    """
    if view != "orig":
        raise ValueError("bald is computed on the original view only")
    if batch.get("mc_probs") is None or batch.get("mc_entropy") is None:
        raise KeyError("bald needs 'mc_probs' and 'mc_entropy' (score with score.mc_passes > 0 and a detector "
                       "trained with detector.dropout > 0)")
    p = np.asarray(batch["mc_probs"], dtype=np.float64)
    if p.ndim == 1:
        p = p.reshape(len(p), -1) if len(p) else p.reshape(0, 0)
    return np.maximum(box_entropy(p) - np.asarray(batch["mc_entropy"], dtype=np.float64), 0.0)
