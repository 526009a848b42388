"""PPAL (docs/methods.md §8): DCUS weights and scores, CCMS distances, k-medoids, the ccms
selector and the ppal strategy, against hand-computed references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.methods import ppal as PP  # first: registers "dcus" and "ccms"
from poolscout.engine.acquisition import signals as S
from poolscout.engine.acquisition import strategies as St
from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext

A, B = 0.3, 0.2
R = 1.0 / math.sqrt(2.0)  # cos 45 degrees


def H(s: float) -> float:
    """Binary entropy, natural log."""
    return -s * math.log(s) - (1 - s) * math.log(1 - s)


# --------------------------------------------------------------------------------------
# DCUS
def test_class_weights_by_hand():
    w = PP.dcus_class_weights(np.array([0.0, 1.0, 0.5]), a=A, b=B)
    # Q = 0: 1 + a b log(1 + e^{1/a} - 1) = 1 + a b (1/a) = 1 + b = 1.2
    assert w[0] == pytest.approx(1.2, abs=1e-12)
    # Q = 1: 1 + a b log(1 + 0) = 1, exactly
    assert w[1] == 1.0
    # Q = 0.5: 1 + 0.06 log(1 + (e^{10/3} - 1) 0.5) = 1 + 0.06 log(14.5158) = 1.160514
    assert w[2] == pytest.approx(1 + 0.06 * math.log(1 + (math.exp(1 / 0.3) - 1) * 0.5), rel=1e-12)
    assert w[2] == pytest.approx(1.160514, abs=1e-6)
    # monotone: a harder class (lower Q) weighs more
    q = np.linspace(0, 1, 11)
    assert np.all(np.diff(PP.dcus_class_weights(q)) < 0)
    # a tiny `a` (e^{1/a} overflows) still gives 1 + b at Q = 0 and 1 at Q = 1
    wt = PP.dcus_class_weights(np.array([0.0, 1.0, 0.5]), a=1e-4, b=B)
    assert wt[0] == pytest.approx(1.2) and wt[1] == 1.0 and 1.0 < wt[2] < 1.2


def test_class_weights_validation():
    with pytest.raises(ValueError, match=r"\(C,\)"):
        PP.dcus_class_weights(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PP.dcus_class_weights(np.array([0.5, 1.2]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PP.dcus_class_weights(np.array([-0.1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PP.dcus_class_weights(np.array([np.nan]))
    with pytest.raises(ValueError, match="a must be > 0"):
        PP.dcus_class_weights(np.array([0.5]), a=0.0)
    with pytest.raises(ValueError, match="b must be >= 0"):
        PP.dcus_class_weights(np.array([0.5]), b=-1.0)


def _dcus_batch():
    # image 0: (s .5, class 1), (s .9, class 2), (s .01, class 3: under the threshold)
    # image 1: no boxes
    # image 2: (s 1.0, class 3: H = 0), (s .2, class 3), (s .05, class 2: AT the threshold, kept)
    scores = np.array([0.5, 0.9, 0.01, 1.0, 0.2, 0.05], np.float32)
    labels = np.array([1, 2, 3, 3, 3, 2], np.int64)
    offsets = np.array([0, 3, 3, 6], np.int64)
    return scores, labels, offsets


def test_dcus_scores_by_hand():
    scores, labels, offsets = _dcus_batch()
    q = np.array([0.0, 1.0, 0.5])  # w = [1.2, 1.0, 1.160514]
    w3 = 1 + 0.06 * math.log(1 + (math.exp(1 / 0.3) - 1) * 0.5)
    h5, h9, h2, h05 = H(0.5), H(0.9), H(0.2), H(np.float32(0.05))
    # H(.5) = log 2 = 0.693147, H(.9) = 0.325083, H(.2) = 0.500402, H(.05) = 0.198515
    assert (h5, h9, h2) == pytest.approx((0.693147, 0.325083, 0.500402), abs=1e-6)
    u = PP.dcus_scores(scores, labels, offsets, q)
    # U0 = 1.2 * 0.693147 + 1.0 * 0.325083 = 1.156860 (the 0.01 box is dropped)
    # U1 = 0 (no boxes)
    # U2 = w3 * 0 + w3 * 0.500402 + 1.0 * 0.198515 = 0.580724 + 0.198515 = 0.779239
    np.testing.assert_allclose(u, [1.2 * h5 + h9, 0.0, w3 * h2 + h05], rtol=1e-6)
    np.testing.assert_allclose(u, [1.156860, 0.0, 0.779239], atol=1e-5)
    assert u.dtype == np.float64 and u.shape == (3,)
    # no class quality: all weights 1 -> plain entropy sums
    np.testing.assert_allclose(PP.dcus_scores(scores, labels, offsets), [h5 + h9, 0.0, h2 + h05], rtol=1e-6)
    # a higher threshold drops the 0.05 box
    np.testing.assert_allclose(PP.dcus_scores(scores, labels, offsets, q, score_thresh=0.1),
                               [1.2 * h5 + h9, 0.0, w3 * h2], rtol=1e-6)


def test_dcus_scores_offsets_not_from_zero_and_errors():
    scores, labels, offsets = _dcus_batch()
    q = np.array([0.0, 1.0, 0.5])
    full = PP.dcus_scores(scores, labels, offsets, q)
    # the last two images as a slice whose offsets start at 3
    np.testing.assert_allclose(PP.dcus_scores(scores, labels, offsets[1:], q), full[1:])
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.2"):
        PP.dcus_scores(scores, labels, offsets, q[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PP.dcus_scores(np.array([1.5]), np.array([1]), np.array([0, 1]))
    assert PP.dcus_scores(np.zeros(0), np.zeros(0, np.int64), np.array([0, 0, 0])).tolist() == [0.0, 0.0]


def test_dcus_signal_registered_and_reads_the_view():
    meta = S.SIGNALS.entry("dcus").meta
    assert meta["direction"] == "high" and meta["per_box"] is False and meta["fields"] == ("scores", "labels")
    scores, labels, offsets = _dcus_batch()
    q = np.array([0.0, 1.0, 0.5])
    batch = {"image_id": np.array([7, 8, 9]), "scores": scores, "labels": labels, "offsets": offsets,
             "hflip_scores": scores[::-1].copy(), "hflip_labels": labels[::-1].copy(), "hflip_offsets": offsets}
    got = S.compute(batch, ["dcus", "hflip/dcus"], context={"class_quality": q})
    np.testing.assert_allclose(got["dcus"], PP.dcus_scores(scores, labels, offsets, q))
    np.testing.assert_allclose(got["hflip_dcus"], PP.dcus_scores(scores[::-1], labels[::-1], offsets, q))
    # without context: weights 1
    np.testing.assert_allclose(S.compute_one(batch, "dcus"), PP.dcus_scores(scores, labels, offsets))
    with pytest.raises(KeyError, match="cutout_scores"):
        S.compute_one(batch, "cutout/dcus")


# --------------------------------------------------------------------------------------
# CCMS distances
def _ccms_boxes():
    # image 0: a = (1, 0) class 1 s .8;   b = (0, 1) class 2 s .2
    # image 1: c = (2, 2) class 1 s .5 (45 deg; the norm must not matter); e = (-1, 0) class 1 s .9
    # image 2: f = (0, 1) class 1 s .6;   g = (0, 1) class 2 s .01 (under the threshold)
    # image 3: one box under the threshold only -> no kept boxes
    offsets = np.array([0, 2, 4, 6, 7], np.int64)
    labels = np.array([1, 2, 1, 1, 1, 2, 1], np.int64)
    scores = np.array([0.8, 0.2, 0.5, 0.9, 0.6, 0.01, 0.02], np.float32)
    emb = np.array([[1, 0], [0, 1], [2, 2], [-1, 0], [0, 1], [0, 1], [1, 0]], np.float16)
    return offsets, labels, scores, emb


def test_ccms_distances_by_hand():
    offsets, labels, scores, emb = _ccms_boxes()
    d = PP.ccms_distances(offsets, labels, scores, emb)
    # cosine distances: d(a,c) = 1 - R = 0.292893, d(a,e) = 2, d(a,f) = 1, d(c,f) = 1 - R, d(e,f) = 1
    # D(0->1) = (.8 min(1-R, 2) + .2 * 2 [no class 2 in image 1]) / 1.0 = 1.2 - .8 R = 0.634315
    # D(0->2) = (.8 * 1 + .2 * 2 [g is under the threshold]) / 1.0       = 1.2
    # D(1->0) = (.5 (1-R) + .9 * 2) / 1.4                                  = 1.390319
    # D(1->2) = (.5 (1-R) + .9 * 1) / 1.4                                  = 0.747462
    # D(2->0) = 1 (f to a);  D(2->1) = min(1-R, 1) = 1-R                   = 0.292893
    d01 = 1.2 - 0.8 * R
    d10 = (0.5 * (1 - R) + 1.8) / 1.4
    d12 = (0.5 * (1 - R) + 0.9) / 1.4
    d21 = 1 - R
    want = np.array([
        [0.0, (d01 + d10) / 2, (1.2 + 1.0) / 2, 2.0],   # 1.012317, 1.1
        [(d01 + d10) / 2, 0.0, (d12 + d21) / 2, 2.0],   # 0.520178
        [(1.2 + 1.0) / 2, (d12 + d21) / 2, 0.0, 2.0],
        [2.0, 2.0, 2.0, 0.0],                           # image 3: no kept box -> 2 to all
    ])
    assert want[0, 1] == pytest.approx(1.012317, abs=1e-6) and want[1, 2] == pytest.approx(0.520178, abs=1e-6)
    assert d.dtype == np.float64 and d.shape == (4, 4)
    np.testing.assert_allclose(d, want, atol=1e-6)
    np.testing.assert_array_equal(d, d.T)
    assert np.all(np.diag(d) == 0.0)
    # a lower threshold keeps g (class 2 now in image 2: d(b, g) = 0) and image 3's box (1, 0) class 1
    d2 = PP.ccms_distances(offsets, labels, scores, emb, score_thresh=0.0)
    # D(0->2) = (.8 * 1 + .2 * 0) / 1 = .8; D(2->0) = (.6 * 1 + .01 * 0) / .61
    assert d2[0, 2] == pytest.approx((0.8 + 0.6 / 0.61) / 2, abs=1e-6)
    # D(3->0) = 0 (same direction as a); D(0->3) = (.8 * 0 + .2 * 2) / 1 = .4
    assert d2[0, 3] == pytest.approx(0.2, abs=1e-6)


def _brute_ccms(offsets, labels, scores, emb, thresh):
    n = len(offsets) - 1
    e = emb.astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
    kept = [[b for b in range(offsets[i], offsets[i + 1]) if scores[b] >= thresh] for i in range(n)]
    d = np.full((n, n), 2.0)
    for i in range(n):
        if not kept[i]:
            continue
        for j in range(n):
            num = 0.0
            for b in kept[i]:
                same = [1 - e[b] @ e[bb] for bb in kept[j] if labels[bb] == labels[b]]
                num += scores[b] * (min(same) if same else 2.0)
            d[i, j] = num / sum(scores[b] for b in kept[i])
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0, 2)


def test_ccms_distances_match_brute_force_with_small_blocks(monkeypatch):
    rng = np.random.default_rng(5)
    n = 9
    cnt = rng.integers(0, 6, n)
    offsets = np.r_[0, np.cumsum(cnt)].astype(np.int64)
    m = int(offsets[-1])
    labels = rng.integers(1, 4, m)
    scores = rng.uniform(0, 1, m).astype(np.float32)
    emb = rng.normal(size=(m, 5)).astype(np.float16)
    want = _brute_ccms(offsets, labels, scores.astype(np.float64), emb, 0.3)
    np.testing.assert_allclose(PP.ccms_distances(offsets, labels, scores, emb, 0.3), want, atol=1e-5)
    monkeypatch.setattr(PP, "_BLOCK_ELEMS", 7)  # a few rows per block: blocks split images
    np.testing.assert_allclose(PP.ccms_distances(offsets, labels, scores, emb, 0.3), want, atol=1e-5)


# --------------------------------------------------------------------------------------
# CCMS distances from k nearest neighbours
def _ragged_case(seed: int, n: int = 14):
    """Random ragged boxes: images without boxes, classes of very different sizes (class 4
    in about one image of ten), scores 0 and under the threshold, zero-norm and duplicate
    embeddings."""
    rng = np.random.default_rng(seed)
    cnt = rng.integers(0, 7, n)
    cnt[rng.choice(n, 2, replace=False)] = 0
    offsets = np.r_[0, np.cumsum(cnt)].astype(np.int64)
    m = int(offsets[-1])
    labels = rng.choice([1, 2, 3, 4], size=m, p=[0.5, 0.3, 0.15, 0.05]).astype(np.int64)
    scores = rng.uniform(0, 1, m).astype(np.float32)
    scores[rng.random(m) < 0.15] = 0.0
    emb = rng.normal(size=(m, 6)).astype(np.float16)
    emb[rng.random(m) < 0.05] = 0.0
    if m > 4:
        emb[1] = emb[3]  # a duplicate (cosine 1 with another box)
    return offsets, labels, scores, emb


def _kept_class_sizes(labels, scores, thresh):
    return np.bincount(labels[scores >= thresh])


def _brute_ccms_knn(offsets, labels, scores, emb, thresh, k=None):
    """Reference of the kNN distances in float64: box b contributes min(t(b, j), d_K(b)) to an
    image j with its class (t: its true min cosine distance to j; d_K: 1 - the K-th largest
    cosine of b over the kept boxes of its class, itself included, no clipping when the class
    has <= K boxes), 2 otherwise. Also returns where that differs from the exact distance."""
    n = len(offsets) - 1
    e = emb.astype(np.float64)
    e = e / np.where(np.linalg.norm(e, axis=1, keepdims=True) > 0, np.linalg.norm(e, axis=1, keepdims=True), 1.0)
    s = scores.astype(np.float64)
    kept = [[b for b in range(offsets[i], offsets[i + 1]) if s[b] >= thresh] for i in range(n)]
    allk = [b for bs in kept for b in bs]
    dk = {}
    for b in allk:
        cls = sorted((e[b] @ e[bb] for bb in allk if labels[bb] == labels[b]), reverse=True)
        dk[b] = 1.0 - cls[k - 1] if k and len(cls) > k else math.inf
    d = np.full((n, n), 2.0)
    clipped = np.zeros((n, n), bool)
    for i in range(n):
        if not kept[i]:
            continue
        w = {b: s[b] for b in kept[i]}
        if sum(w.values()) <= 0:
            w = {b: 1.0 for b in kept[i]}
        for j in range(n):
            num = 0.0
            for b in kept[i]:
                same = [1 - e[b] @ e[bb] for bb in kept[j] if labels[bb] == labels[b]]
                t = min(same) if same else 2.0
                if same and t > dk[b] + 1e-6:
                    clipped[i, j] = True
                num += w[b] * (min(t, dk[b]) if same else 2.0)
            d[i, j] = num / sum(w.values())
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    clipped = clipped | clipped.T
    np.fill_diagonal(clipped, False)
    return np.clip(d, 0, 2), clipped


@pytest.mark.parametrize("seed", range(6))
def test_ccms_knn_equals_exact_when_k_covers_every_class(seed):
    offsets, labels, scores, emb = _ragged_case(seed)
    for thresh in (0.0, 0.3):
        exact = PP.ccms_distances_exact(offsets, labels, scores, emb, thresh)
        np.testing.assert_array_equal(exact, PP.ccms_distances(offsets, labels, scores, emb, thresh))
        np.testing.assert_allclose(exact, _brute_ccms_knn(offsets, labels, scores, emb, thresh)[0], atol=1e-5)
        biggest = int(_kept_class_sizes(labels, scores, thresh).max())
        for k in (biggest, biggest + 1, 64):
            got = PP.ccms_distances(offsets, labels, scores, emb, thresh, neighbours=k)
            np.testing.assert_allclose(got, exact, rtol=0, atol=1e-9)
        assert PP.ccms_distances(offsets, labels, scores, emb, thresh, neighbours=0).tolist() == exact.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_ccms_knn_class_gain_with_all_neighbours_is_the_exact_gain(seed):
    # the kNN accumulation itself (not the exact fallback) with K = m_c: same gain as the full matrix
    rng = np.random.default_rng(seed)
    n, m = 7, 23
    ic = np.sort(rng.integers(0, n, m))
    ic[ic == 3] = 4  # image 3 without the class
    ec = rng.normal(size=(m, 5)).astype(np.float32)
    ec /= np.linalg.norm(ec, axis=1, keepdims=True)
    sc = rng.uniform(0, 1, m)
    want = np.zeros((n, n))
    PP._class_gain_exact(want, ic, ec, sc)
    got = np.zeros((n, n))
    base = PP._class_gain_knn(got, ic, ec, sc, m)
    got += base[:, None] * (np.bincount(ic, minlength=n) > 0)[None, :]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got[:, 3] == 0.0) and np.all(want[:, 3] == 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_ccms_knn_small_k_is_exact_where_reached_and_a_lower_bound_elsewhere(seed, monkeypatch):
    offsets, labels, scores, emb = _ragged_case(seed, n=16)
    thresh = 0.1
    exact = PP.ccms_distances_exact(offsets, labels, scores, emb, thresh)
    sizes = _kept_class_sizes(labels, scores, thresh)
    n_lower = 0
    for k in (1, 2, 3, 5):
        assert sizes.max() > k  # at least one class goes through the kNN path
        got = PP.ccms_distances(offsets, labels, scores, emb, thresh, neighbours=k)
        want, clipped = _brute_ccms_knn(offsets, labels, scores, emb, thresh, k)
        np.testing.assert_allclose(got, want, atol=1e-5)  # min(true distance, d_K) per box, exactly
        assert np.all(got <= exact + 1e-6)  # a lower bound everywhere
        np.testing.assert_allclose(got[~clipped], exact[~clipped], atol=1e-5)  # exact where all boxes reach
        n_lower += int(np.sum(got < exact - 1e-3))
        np.testing.assert_array_equal(got, got.T)
        assert np.all(np.diag(got) == 0.0) and got.min() >= 0.0 and got.max() <= 2.0
        # images without kept boxes stay at 2
        empty = np.flatnonzero([not np.any(scores[offsets[i]:offsets[i + 1]] >= thresh)
                                for i in range(len(offsets) - 1)])
        off_diag = ~np.eye(len(got), dtype=bool)
        assert np.all(got[empty][off_diag[empty]] == 2.0)
        # query blocks of a row or a few give the same result
        monkeypatch.setattr(PP, "_BLOCK_ELEMS", 7)
        np.testing.assert_allclose(PP.ccms_distances(offsets, labels, scores, emb, thresh, neighbours=k), got,
                                   atol=1e-12)
        monkeypatch.undo()
    assert n_lower > 0  # the bound does bite with a small K


def test_ccms_neighbours_validation():
    offsets, labels, scores, emb = _ccms_boxes()
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="neighbours"):
            PP.ccms_distances(offsets, labels, scores, emb, neighbours=bad)
    ids, boxes = _select_case()
    with pytest.raises(ValueError, match="neighbours"):
        PP.ccms({"image_id": ids}, 2, ctx=SelectContext(rng=np.random.default_rng(0), boxes=boxes), neighbours=-3)


def test_ccms_selector_default_neighbours_picks_the_exact_medoids():
    rng = np.random.default_rng(11)
    n = 40
    cnt = rng.integers(0, 4, n)
    offsets = np.r_[0, np.cumsum(cnt)].astype(np.int64)
    m = int(offsets[-1])
    ids = np.arange(100, 100 + n, dtype=np.int64)
    boxes = {"image_id": ids, "offsets": offsets, "boxes": np.tile(np.array([[0, 0, 4, 4]], np.float32), (m, 1)),
             "scores": rng.uniform(0, 1, m).astype(np.float32), "labels": rng.integers(1, 4, m),
             "roi_embedding": rng.normal(size=(m, 8)).astype(np.float16)}
    assert np.bincount(boxes["labels"]).max() <= PP.CCMS_NEIGHBOURS  # K >= m_c for every class
    table = {"image_id": ids}
    for budget in (1, 6, 15):
        got = PP.ccms(table, budget, ctx=SelectContext(rng=np.random.default_rng(3), boxes=boxes))
        want = PP.ccms(table, budget, ctx=SelectContext(rng=np.random.default_rng(3), boxes=boxes), neighbours=None)
        np.testing.assert_array_equal(got.image_id, want.image_id)
        np.testing.assert_array_equal(got.score, want.score)
        assert got.rationale == want.rationale
    # a small K still gives `budget` distinct candidates
    few = PP.ccms(table, 6, ctx=SelectContext(rng=np.random.default_rng(3), boxes=boxes), neighbours=2)
    assert len(set(few.image_id.tolist())) == 6 and set(few.image_id.tolist()) <= set(ids.tolist())
    assert few.score.sum() == n


# --------------------------------------------------------------------------------------
# k-medoids
def _two_clusters():
    # points on a line: {0, 1, 2} and {10, 11, 13}; D = |x_i - x_j|
    # true medoids: 1 (sums 2 vs 3 and 3) and 11 (sums 1 + 2 = 3; 10: 1 + 3 = 4; 13: 3 + 2 = 5)
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 13.0])
    return np.abs(x[:, None] - x[None, :])


def test_k_medoids_two_clusters_true_medoids():
    d = _two_clusters()
    for seed in range(20):
        med = PP.k_medoids(d, 2, np.random.default_rng(seed))
        assert sorted(med.tolist()) == [1, 4], seed
    a = PP.k_medoids(d, 2, np.random.default_rng(3))
    b = PP.k_medoids(d, 2, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    # k = 1: the point of smallest total distance (totals 37, 33, 31, 31, 33, 41: index 2 first)
    assert PP.k_medoids(d, 1, np.random.default_rng(0)).tolist() == [2]
    np.testing.assert_array_equal(PP.k_medoids(d, 6, np.random.default_rng(0)), np.arange(6))
    np.testing.assert_array_equal(PP.k_medoids(d, 10, np.random.default_rng(0)), np.arange(6))


def test_k_medoids_fixed_point_and_duplicates():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(40, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    med, assign, _ = PP._kmedoids(d, 5, np.random.default_rng(2))
    assert len(set(med.tolist())) == 5
    np.testing.assert_array_equal(assign, np.argmin(d[:, med], axis=1))
    for t in range(5):  # every medoid is the best member of its cluster
        mem = np.flatnonzero(assign == t)
        assert d[med[t], mem].sum() <= d[np.ix_(mem, mem)].sum(1).min() + 1e-12
    # all points identical: distinct medoids all the same
    z = np.zeros((4, 4))
    assert sorted(PP.k_medoids(z, 3, np.random.default_rng(0)).tolist()) in ([0, 1, 2], [0, 1, 3], [0, 2, 3],
                                                                             [1, 2, 3])


def test_k_medoids_errors():
    with pytest.raises(ValueError, match="square"):
        PP.k_medoids(np.zeros((2, 3)), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="positive integer"):
        PP.k_medoids(np.zeros((2, 2)), 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        PP.k_medoids(np.array([[0, np.nan], [np.nan, 0]]), 1, np.random.default_rng(0))


# --------------------------------------------------------------------------------------
# the ccms selector and the strategy
def _angle(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _select_case():
    # one box per image, score .9. Images 10, 20, 30: class 1 at 0, 10, 20 degrees;
    # images 40, 50: class 2 at 90, 100 degrees. Across the groups no shared class -> D = 2;
    # inside: D = 1 - cos(angle difference). Medoid of {10, 20, 30}: 20 (sum 2 (1 - cos 10)
    # against (1 - cos 10) + (1 - cos 20) for 10 and 30).
    ids = np.array([10, 20, 30, 40, 50], np.int64)
    boxes = {
        "image_id": ids,
        "offsets": np.arange(6, dtype=np.int64),
        "boxes": np.tile(np.array([[0, 0, 4, 4]], np.float32), (5, 1)),
        "scores": np.full(5, 0.9, np.float32),
        "labels": np.array([1, 1, 1, 2, 2], np.int64),
        "roi_embedding": np.array([_angle(0), _angle(10), _angle(20), _angle(90), _angle(100)], np.float16),
    }
    return ids, boxes


def test_ccms_selector_by_hand():
    meta = SELECTORS.entry("ccms").meta
    assert meta["final"] is True and meta["needs_embedding"] is False and meta["needs_boxes"] is True
    ids, boxes = _select_case()
    table = {"image_id": ids, "dcus": np.arange(5.0)}
    sel = PP.ccms(table, 2, ctx=SelectContext(rng=np.random.default_rng(0), boxes=boxes))
    assert sel.image_id[0] == 20 and sel.image_id[1] in (40, 50)
    np.testing.assert_array_equal(sel.score, [3.0, 2.0])
    one_minus_cos10 = 1 - math.cos(math.radians(10))  # 0.015192
    r0, r1 = sel.rationale[0]["ccms"], sel.rationale[1]["ccms"]
    assert r0["cluster_size"] == 3 and r1["cluster_size"] == 2
    # cluster {10, 20, 30}, medoid 20: mean of D(20, 10) and D(20, 30) = 1 - cos 10
    # cluster {40, 50}: D(40, 50) = 1 - cos 10
    assert r0["mean_distance_in_cluster"] == pytest.approx(one_minus_cos10, abs=1e-3)
    assert r1["mean_distance_in_cluster"] == pytest.approx(one_minus_cos10, abs=1e-3)
    # budget >= N: every candidate, clusters of 1, ordered by image_id
    sel5 = PP.ccms(table, 9, ctx=SelectContext(rng=np.random.default_rng(0), boxes=boxes))
    np.testing.assert_array_equal(sel5.image_id, ids)
    assert all(r["ccms"] == {"cluster_size": 1, "mean_distance_in_cluster": 0.0} for r in sel5.rationale)


def test_ccms_selector_errors():
    ids, boxes = _select_case()
    table = {"image_id": ids}
    with pytest.raises(ValueError, match="ccms.*ctx.boxes is None"):
        PP.ccms(table, 2, ctx=SelectContext(rng=np.random.default_rng(0)))
    other = dict(boxes, image_id=ids[::-1].copy())
    with pytest.raises(ValueError, match="ccms.*differ"):
        PP.ccms(table, 2, ctx=SelectContext(rng=np.random.default_rng(0), boxes=other))
    no_emb = {k: v for k, v in boxes.items() if k != "roi_embedding"}
    with pytest.raises(ValueError, match="ccms needs 'roi_embedding'"):
        PP.ccms(table, 2, ctx=SelectContext(rng=np.random.default_rng(0), boxes=no_emb))
    with pytest.raises(ValueError, match="budget"):
        PP.ccms(table, 0, ctx=SelectContext(rng=np.random.default_rng(0), boxes=boxes))


def test_ppal_strategy_loads_and_runs():
    st = St.load_strategy("ppal")
    assert st.name == "ppal" and st.description
    assert [s.selector for s in st.stages] == ["retrieve", "ccms"]
    assert st.stages[0].params == {"by": "dcus", "keep": 4}
    assert [s.text for s in St.required_signals(st)] == ["dcus"]
    assert St.needs_boxes(st) and not St.needs_embedding(st)

    # end to end: 5 candidates, budget 1 -> retrieve keeps the 4 highest DCUS, ccms picks 1
    ids, boxes = _select_case()
    boxes = dict(boxes, scores=np.array([0.5, 0.6, 0.7, 0.99, 0.8], np.float32))
    table = {"image_id": ids, **S.compute(boxes, ["dcus"])}
    # H(.99) = 0.056 is the smallest entropy: image 40 is dropped by the retrieve stage
    loaded: list[list[int]] = []

    def loader(q):
        loaded.append(np.asarray(q).tolist())
        rows = np.searchsorted(ids, q)
        return {"image_id": ids[rows], "offsets": np.arange(len(rows) + 1, dtype=np.int64),
                **{k: boxes[k][rows] for k in ("boxes", "scores", "labels", "roi_embedding")}}

    sel = St.select(st, table, 1, ctx=SelectContext(rng=np.random.default_rng(0), boxes_loader=loader))
    assert sorted(loaded[0]) == [10, 20, 30, 50]
    # k = 1: the candidate of smallest total distance: 20 (1 - cos 10 twice, 2 to image 50)
    assert sel.image_id.tolist() == [20]
    r = sel.rationale[0]
    assert set(r) == {"retrieve", "ccms"} and r["ccms"]["cluster_size"] == 4
    assert r["retrieve"]["by"] == "dcus"
