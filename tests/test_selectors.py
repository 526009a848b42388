"""Selectors: top-k ordering and merging, retrieve, k-center greedy against brute force."""
from __future__ import annotations

import numpy as np
import pytest

from poolscout.engine.acquisition import selectors as Z
from poolscout.engine.methods import coreset as C
from poolscout.kernels import kcenter


def ctx(**kw) -> Z.SelectContext:
    return Z.SelectContext(rng=np.random.default_rng(0), **kw)


def test_topk_ties_by_id_and_direction():
    t = {"image_id": np.array([5, 3, 9, 1]), "entropy_max": np.array([0.5, 0.9, 0.5, 0.9])}
    s = Z.topk(t, 3, ctx=ctx(), by="entropy:max")
    np.testing.assert_array_equal(s.image_id, [1, 3, 5])
    np.testing.assert_array_equal(s.score, [0.9, 0.9, 0.5])
    assert s.rationale[2] == {"topk": {"by": "entropy_max", "direction": "high", "value": 0.5, "rank": 3}}
    low = Z.topk(t, 3, ctx=ctx(), by="entropy_max", direction="low")
    np.testing.assert_array_equal(low.image_id, [5, 9, 1])


def test_topk_default_direction_of_margin_is_low_and_nan_last():
    t = {"image_id": np.arange(5), "margin_max": np.array([0.3, np.nan, 0.1, 0.2, -np.inf])}
    s = Z.topk(t, 5, ctx=ctx(), by="margin:max")
    np.testing.assert_array_equal(s.image_id, [4, 2, 3, 0, 1])
    assert s.rationale[0]["topk"]["value"] is None and s.rationale[4]["topk"]["value"] is None
    s2 = Z.topk(t, 2, ctx=ctx(), by="margin")  # "margin" == "margin:max"
    np.testing.assert_array_equal(s2.image_id, [4, 2])


def test_topk_errors():
    t = {"image_id": np.arange(3), "entropy_max": np.zeros(3), "custom": np.array([1.0, 3.0, 2.0])}
    with pytest.raises(ValueError, match="no column 'margin_max'"):
        Z.topk(t, 1, ctx=ctx(), by="margin:max")
    with pytest.raises(ValueError, match="budget"):
        Z.topk(t, 0, ctx=ctx(), by="entropy:max")
    with pytest.raises(ValueError, match="unknown signal"):
        Z.topk(t, 1, ctx=ctx(), by="custom")  # a non-signal column needs an explicit direction
    np.testing.assert_array_equal(Z.topk(t, 2, ctx=ctx(), by="custom", direction="high").image_id, [1, 2])


def test_per_shard_topk_merge_equals_global():
    rng = np.random.default_rng(1)
    ids = rng.permutation(1000).astype(np.int64)
    vals = rng.integers(0, 20, size=1000).astype(np.float64)  # many ties
    for direction in ("high", "low"):
        g = Z.topk_indices(vals, ids, 37, direction)
        parts = []
        for a in range(0, 1000, 130):
            r = Z.topk_indices(vals[a : a + 130], ids[a : a + 130], 37, direction)
            parts.append((ids[a : a + 130][r], vals[a : a + 130][r]))
        mid, mval = Z.merge_topk(parts, 37, direction)
        np.testing.assert_array_equal(mid, ids[g])
        np.testing.assert_array_equal(mval, vals[g])
        # reference: full sort by (-key, id)
        key = vals if direction == "high" else -vals
        ref = np.lexsort((ids, -key))[:37]
        np.testing.assert_array_equal(g, ref)


def test_retrieve_keeps_ceil_keep_times_budget():
    t = {"image_id": np.arange(10), "least_confidence_max": np.arange(10) / 10.0}
    s = Z.retrieve(t, 3, ctx=ctx(), by="least_confidence:max", keep=1.5)
    np.testing.assert_array_equal(s.image_id, [9, 8, 7, 6, 5])  # ceil(4.5) = 5
    assert s.rationale[4]["retrieve"]["rank"] == 5
    assert len(Z.retrieve(t, 4, ctx=ctx(), by="least_confidence:max", keep=10)) == 10  # all
    with pytest.raises(ValueError, match="keep"):
        Z.retrieve(t, 3, ctx=ctx(), by="least_confidence:max", keep=0)


# --------------------------------------------------------------------------------------
def kcenter_reference(x: np.ndarray, lab: np.ndarray | None, b: int) -> tuple[list[int], list[float]]:
    """Brute-force k-center greedy on a full float64 distance matrix."""
    x64 = x.astype(np.float64)
    d = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    if lab is not None and len(lab):
        l64 = lab.astype(np.float64)
        mind = ((x64[:, None, :] - l64[None, :, :]) ** 2).sum(-1).min(axis=1)
        first = int(np.argmax(mind))
        dist = [float(np.sqrt(mind[first]))]
    else:
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float64)
        first = int(np.argmax(((x64 - mean) ** 2).sum(-1)))
        mind = np.full(len(x), np.inf)
        dist = [np.inf]
    picks = [first]
    mind = np.minimum(mind, d[first])
    mind[first] = -np.inf
    for _ in range(b - 1):
        j = int(np.argmax(mind))
        picks.append(j)
        dist.append(float(np.sqrt(mind[j])))
        mind = np.minimum(mind, d[j])
        mind[j] = -np.inf
    return picks, dist


def np_sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def test_coreset_hand_example_1d():
    x = np.array([[0.0], [1.0], [2.0], [10.0]], dtype=np.float32)
    t = {"image_id": np.array([100, 101, 102, 103]), "embedding": x}
    s = C.coreset(t, 3, ctx=ctx(labeled_embedding=np.array([[0.0]], np.float32)))
    np.testing.assert_array_equal(s.image_id, [103, 102, 101])
    np.testing.assert_allclose(s.score, [10.0, 2.0, 1.0])
    assert s.rationale[1] == {"coreset": {"distance": 2.0, "rank": 2}}
    # no labeled centres: the farthest from the mean (3.25) is 10, then 0 (d=10), then 2 (d=2 vs 1 from 1)
    s = C.coreset(t, 3, ctx=ctx())
    np.testing.assert_array_equal(s.image_id, [103, 100, 102])
    assert s.score[0] == np.inf and s.rationale[0]["coreset"]["init"] == "farthest_from_mean"
    assert s.rationale[0]["coreset"]["distance_to_mean"] == pytest.approx(6.75)


@pytest.mark.parametrize("with_labeled", [False, True])
def test_coreset_matches_brute_force_for_all_chunkings_and_kernels(with_labeled):
    rng = np.random.default_rng(42)
    # low intrinsic dimension, as in faiss's SyntheticDataset
    x = (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 16))).astype(np.float32)
    x += 0.01 * rng.normal(size=x.shape).astype(np.float32)
    lab = (rng.normal(size=(25, 3)) @ rng.normal(size=(3, 16))).astype(np.float32) if with_labeled else None
    ref, ref_d = kcenter_reference(x, lab, 40)
    t = {"image_id": np.arange(1000, 1300), "embedding": x}
    for chunk in (1, 7, 64, 100000):
        for dist in (None, np_sqdist, C.sq_l2_faiss):
            s = C.coreset(t, 40, ctx=ctx(labeled_embedding=lab, distance=dist), chunk_size=chunk)
            np.testing.assert_array_equal(s.image_id, np.array(ref) + 1000, err_msg=f"chunk={chunk} dist={dist}")
            tol = 1e-9 if dist is not C.sq_l2_faiss else 1e-3
            np.testing.assert_allclose(s.score, ref_d, rtol=tol)
    assert len(set(s.image_id.tolist())) == 40


def test_coreset_random_first_uses_rng_and_budget_over_n():
    x = np.random.default_rng(3).normal(size=(6, 2)).astype(np.float32)
    t = {"image_id": np.arange(6), "embedding": x}
    a = C.coreset(t, 10, ctx=Z.SelectContext(rng=np.random.default_rng(5)), first="random")
    b = C.coreset(t, 10, ctx=Z.SelectContext(rng=np.random.default_rng(5)), first="random")
    np.testing.assert_array_equal(a.image_id, b.image_id)
    assert sorted(a.image_id.tolist()) == list(range(6))  # clipped to N, no repeats
    assert a.image_id[0] == np.random.default_rng(5).integers(6)
    with pytest.raises(ValueError, match="embedding"):
        C.coreset({"image_id": np.arange(3)}, 1, ctx=ctx())


def test_kcenter_kernel_matches_numpy_twin():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    c = rng.normal(size=8).astype(np.float32)
    m1 = rng.random(500) * 20
    m1[[3, 9]] = -np.inf  # picked rows stay picked
    m2 = m1.copy()
    i1 = kcenter.update_argmax(x, c, m1)
    i2 = kcenter.update_argmax_numpy(x, c, m2)
    assert i1 == i2
    np.testing.assert_allclose(m1, m2, rtol=1e-12)
    assert m1[3] == -np.inf and m1[9] == -np.inf
    d = ((x.astype(np.float64) - c.astype(np.float64)) ** 2).sum(1)
    assert (m1[[0, 1, 2]] <= d[[0, 1, 2]] + 1e-12).all()
