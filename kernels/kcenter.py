"""k-center greedy update kernels: Numba with a plain-NumPy reference twin.

One greedy step of k-center (docs/methods.md §7) lowers every candidate's squared
distance to its nearest centre with the distance to the newly chosen centre, then picks
the farthest candidate. The two functions below do exactly that in one pass over the
embedding, never materialising a distance matrix.

Picked candidates are marked with `-inf` in `min_d2` so that `minimum` keeps them there
and `argmax` never returns them again.
"""
from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency of the project, but keep the reference usable without it
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None


def update_argmax_numpy(x: np.ndarray, centre: np.ndarray, min_d2: np.ndarray) -> int:
    """Reference twin of `update_argmax` (same arithmetic, vectorised).

    Args:
        x: (N, d) float32 candidate embeddings.
        centre: (d,) float32 the new centre.
        min_d2: (N,) float64 squared distance to the nearest centre so far; updated in place.

    Returns:
        The row with the largest updated `min_d2` (lowest row on ties).
    """
    diff = x.astype(np.float64) - centre.astype(np.float64)[None, :]
    d2 = np.einsum("ij,ij->i", diff, diff)
    np.minimum(min_d2, d2, out=min_d2)
    return int(np.argmax(min_d2))


def _update_argmax_py(x, centre, min_d2):  # pragma: no cover - compiled below
    n, d = x.shape
    best = -1
    best_v = -np.inf
    for i in range(n):
        s = 0.0
        for j in range(d):
            t = np.float64(x[i, j]) - np.float64(centre[j])
            s += t * t
        if s < min_d2[i]:
            min_d2[i] = s
        if min_d2[i] > best_v:
            best_v = min_d2[i]
            best = i
    return best


update_argmax = njit(cache=True, nogil=True)(_update_argmax_py) if njit is not None else update_argmax_numpy
update_argmax.__doc__ = """Lower `min_d2` with the squared distances to `centre`, return the new farthest row.

Args:
    x: (N, d) float32 C-contiguous candidate embeddings.
    centre: (d,) float32 the new centre.
    min_d2: (N,) float64, updated in place (picked rows hold -inf).

Returns:
    int, the row of the largest `min_d2` after the update (lowest row on ties; -1 if N = 0).

References:
    Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
    Approach", ICLR 2018.
"""
