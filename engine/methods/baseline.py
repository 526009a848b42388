"""The random baseline: a seeded, order-free hash of (image id, seed, cycle), so a pick does
not depend on how the pool is sharded or on the order rows arrive in."""
from __future__ import annotations

import numpy as np

from poolscout.engine.acquisition.signals import register_signal


# --------------------------------------------------------------------------------------
# image-level signals
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_uniform(image_id: np.ndarray, seed: int = 0, cycle: int = 0) -> np.ndarray:
    """Uniform [0, 1) values from a SplitMix64 hash of (seed, cycle, image_id).

    Args:
        image_id: (N,) int64.

    Returns:
        (N,) float64; each value depends only on its own (seed, cycle, image_id).

    References:
        Steele, Lea & Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014.
    """
    ids = np.asarray(image_id, dtype=np.int64).view(np.uint64)
    key = _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))
    key = _splitmix64(key ^ np.array([cycle], dtype=np.int64).view(np.uint64))
    h = _splitmix64(ids ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@register_signal("random", direction="high", per_box=False, model_free=True)
def random_signal(batch: dict[str, np.ndarray], *, seed: int = 0, cycle: int = 0) -> np.ndarray:
    """Random baseline: (N,) uniform [0, 1) from a hash of (seed, cycle, image_id), so a
    value is the same however the pool is batched or ordered.

    References:
        The random-sampling baseline of every active-learning benchmark.
    """
    return hash_uniform(batch["image_id"], seed, cycle)
