"""engine.methods.edald: herding stages against the dense reference, eDALD by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.methods import edald as E


def _brute_herding(kmat, budget, candidates, covered):
    """Plain greedy of methods.md section 5, written out: gain_j = mean_i max(c_i, K_ij) - mean_i c_i."""
    n = len(kmat)
    c = kmat[:, covered].max(axis=1) if covered.any() else np.zeros(n)
    picks = []
    for _ in range(budget):
        best, bj = -1.0, -1
        for j in np.flatnonzero(candidates):
            if j in picks:
                continue
            g = np.maximum(c, kmat[:, j]).mean() - c.mean()
            if g > best + 1e-15:
                best, bj = g, j
        picks.append(bj)
        c = np.maximum(c, kmat[:, bj])
    return picks


def test_kernel_and_bandwidth_by_hand():
    x = np.array([[0, 0], [3, 4], [6, 8]], np.float32)
    # pairwise distances 5, 10, 5 -> median 5 -> h = 10
    assert E.bandwidth(x) == pytest.approx(10.0)
    assert E.kernel(np.array([25.0]), 10.0)[0] == pytest.approx(math.exp(-0.25))
    assert E.bandwidth(np.zeros((5, 3))) == 1.0
    with pytest.raises(ValueError, match="h must be > 0"):
        E.kernel(np.ones(2), 0.0)


def test_local_herding_first_pick_is_the_largest_mean_kernel_and_matches_brute_force():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (40, 4)), rng.normal(6, 0.5, (8, 4))]).astype(np.float32)
    rows, h = E.local_herding(x, 6)
    kmat = E.kernel(E.sq_dists(x, x), h)
    assert rows[0] == int(np.argmax(kmat.mean(axis=0)))
    assert rows.tolist() == _brute_herding(kmat, 6, np.ones(len(x), bool), np.zeros(len(x), bool))
    # the sparse path with every neighbour kept picks the same
    sparse, _ = E.local_herding(x, 6, h=h, k=len(x), dense_below=0)
    assert sparse.tolist() == rows.tolist()
    assert len(E.local_herding(x[:3], 10)[0]) == 3  # fewer candidates than b: all of them


def test_global_herding_starts_from_the_labeled_coverage():
    rng = np.random.default_rng(1)
    lab = rng.normal(0, 0.3, (5, 3)).astype(np.float32)  # labeled pixels cover cluster A
    new = np.concatenate([rng.normal(0, 0.3, (30, 3)), rng.normal(4, 0.3, (10, 3))]).astype(np.float32)
    rows, h = E.global_herding(new, lab, 4)
    x = np.concatenate([lab, new])
    kmat = E.kernel(E.sq_dists(x, x), h)
    cand = np.r_[np.zeros(5, bool), np.ones(40, bool)]
    ref = [j - 5 for j in _brute_herding(kmat, 4, cand, ~cand)]
    assert rows.tolist() == ref
    assert rows[0] >= 30  # the uncovered cluster first, though cluster A holds more points
    unlabeled, _ = E.global_herding(new, None, 4, h=h)
    assert unlabeled[0] < 30  # without labels, the big cluster's centre comes first
    sparse, _ = E.global_herding(new, lab, 4, h=h, k=len(x), dense_below=0)
    assert sparse.tolist() == rows.tolist()
    with pytest.raises(ValueError, match="NaN"):
        E.global_herding(np.full((3, 2), np.nan), None, 1)


def test_edald_scores_by_hand():
    p0 = np.array([[0.5, 0.5], [1.0, 0.0]])
    pk = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # K = 2
    s = E.edald_scores(p0, pk)
    ln2 = math.log(2)
    # pixel 0: H(p0) = ln 2; mean p = (0.5, 0.5): H = ln 2, each H(p_k) = 0 -> MI = ln 2
    # pixel 1: certain everywhere -> 0
    assert s["entropy"] == pytest.approx([ln2, 0.0])
    assert s["mi"] == pytest.approx([ln2, 0.0])
    assert s["edald"] == pytest.approx([2 * ln2, 0.0])
    # agreement without confidence: H > 0 but MI = 0
    flat = E.edald_scores(np.array([[0.5, 0.5]]), np.array([[[0.5, 0.5]], [[0.5, 0.5]]]))
    assert flat["mi"] == pytest.approx([0.0]) and flat["edald"] == pytest.approx([ln2])
    with pytest.raises(ValueError, match="p_noisy"):
        E.edald_scores(p0, pk[:, :1])


def test_top_and_keep_count():
    assert E.top(np.array([0.1, 0.9, 0.9, 0.5]), 3).tolist() == [1, 2, 3]
    assert E.top(np.array([1.0]), 5).tolist() == [0]
    assert E.keep_count(10, 0.5) == 5 and E.keep_count(1, 0.5) == 1 and E.keep_count(0, 0.5) == 0
    with pytest.raises(ValueError, match="keep"):
        E.keep_count(4, 0.0)
