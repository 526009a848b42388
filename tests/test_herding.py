"""MaxHerding and uncertainty herding: hand-made cases, sparse = dense at k = N, lazy = plain."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.methods.herding import (graph_from_neighbours, herding_dense, herding_sparse, kernel_values,
                                              knn_graph, median_bandwidth)


def _dense_k(x, kernel="rbf", h=1.0):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return kernel_values(d2, kernel, h)


def test_kernels_by_hand():
    assert kernel_values(np.array([0.0, 2.0]), "rbf", 1.0) == pytest.approx([1.0, math.exp(-1.0)])
    assert kernel_values(np.array([0.0, 4.0, 4.01]), "tophat", 2.0).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="kernel"):
        kernel_values(np.zeros(1), "gauss", 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        kernel_values(np.zeros(1), "rbf", 0.0)


def test_first_gain_by_hand():
    # points 0, 1, 3 on a line, rbf h = 1: K = exp(-d^2 / 2)
    x = np.array([[0.0], [1.0], [3.0]])
    k = _dense_k(x)
    res = herding_dense(k, 1)
    gains = [(1 + math.exp(-0.5) + math.exp(-4.5)) / 3, (math.exp(-0.5) + 1 + math.exp(-2)) / 3,
             (math.exp(-4.5) + math.exp(-2) + 1) / 3]
    assert res.rows.tolist() == [int(np.argmax(gains))] == [1]
    assert res.gains[0] == pytest.approx(max(gains))
    # second pick: 3 (covers itself, 1 - K[2,1] on point 2 minus nothing else)
    res2 = herding_dense(k, 2)
    assert res2.rows.tolist() == [1, 2]
    c = np.maximum(k[:, 1], 0)
    assert res2.gains[1] == pytest.approx(np.maximum(0, k[:, 2] - c).sum() / 3)
    assert res2.objective == pytest.approx(np.maximum(k[:, 1], k[:, 2]).sum() / 3)


def _clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [6, 4, 2]
    x = np.concatenate([c + 0.05 * rng.standard_normal((s, 2)) for c, s in zip(centres, sizes)])
    label = np.repeat([0, 1, 2], sizes)
    return x, label


def test_one_pick_per_cluster_biggest_first_and_labels_cover():
    x, label = _clusters()
    k = _dense_k(x)
    res = herding_dense(k, 3)
    assert label[res.rows].tolist() == [0, 1, 2]
    # a labeled point in the big cluster: coverage starts there, so it is not picked again first
    covered = np.zeros(len(x), bool)
    covered[0] = True
    res = herding_dense(k, 2, candidates=~covered, covered=covered)
    assert label[res.rows].tolist() == [1, 2]
    # uncertainty herding: no uncertainty in the big cluster -> its points add nothing
    w = np.where(label == 0, 0.0, 1.0)
    assert label[herding_dense(k, 1, weights=w).rows].tolist() == [1]


@pytest.mark.parametrize("kernel", ["rbf", "tophat"])
def test_sparse_with_k_equal_n_is_the_dense_greedy(kernel):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((70, 5)).astype(np.float32)
    h = median_bandwidth(x) * (1.0 if kernel == "rbf" else 1.5)
    graph, h_used = knn_graph(x, k=len(x), kernel=kernel, h=h)
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    k = kernel_values(d2, kernel, h)
    # every nonzero kernel value is an edge (zeros add no coverage and are dropped)
    assert h_used == h and len(graph.rows) == int((k > 0).sum())
    covered = np.zeros(len(x), bool)
    covered[[3, 40]] = True
    w = rng.random(len(x))
    for kw in ({}, {"covered": covered, "candidates": ~covered}, {"weights": w}):
        dense = herding_dense(k, 12, **kw)
        lazy = herding_sparse(graph, 12, **kw)
        plain = herding_sparse(graph, 12, lazy=False, **kw)
        assert lazy.rows.tolist() == plain.rows.tolist() == dense.rows.tolist()
        np.testing.assert_allclose(lazy.gains, dense.gains, rtol=1e-5, atol=1e-7)
        assert lazy.objective == pytest.approx(dense.objective, rel=1e-5)


def test_sparse_objective_close_to_dense_with_few_neighbours():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((8, 16)) * 3
    x = (centres[rng.integers(8, size=600)] + rng.standard_normal((600, 16)) * 0.7).astype(np.float32)
    h = median_bandwidth(x)
    graph, _ = knn_graph(x, k=20, h=h)
    assert len(graph.rows) == 600 * 20  # O(N k), not O(N^2)
    sparse = herding_sparse(graph, 30)
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    k = kernel_values(d2, "rbf", h)
    dense = herding_dense(k, 30)
    true_sparse = np.max(k[:, sparse.rows], axis=1).mean()  # the sparse picks under the full kernel
    assert true_sparse >= 0.97 * dense.objective
    lazy_plain = herding_sparse(graph, 30, lazy=False)
    assert sparse.rows.tolist() == lazy_plain.rows.tolist()


def test_graph_from_neighbours_drops_missing_and_indexes_by_column():
    nbr = np.array([[0, 1], [1, -1], [2, 1]])
    val = np.array([[1.0, 0.5], [1.0, 0.0], [1.0, 0.25]])
    g = graph_from_neighbours(nbr, val)
    assert g.n == 3 and g.indptr.tolist() == [0, 1, 4, 5]
    assert g.rows[1:4].tolist() == [0, 1, 2] and g.values[1:4].tolist() == [0.5, 1.0, 0.25]


def test_budget_beyond_candidates_and_bad_inputs():
    x, _ = _clusters()
    k = _dense_k(x)
    cand = np.zeros(len(x), bool)
    cand[:3] = True
    assert len(herding_dense(k, 10, candidates=cand).rows) == 3
    graph, _ = knn_graph(x.astype(np.float32), k=4, h=1.0)
    assert sorted(herding_sparse(graph, 10, candidates=cand).rows.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="weights"):
        herding_dense(k, 1, weights=-np.ones(len(x)))
    with pytest.raises(ValueError, match="candidates"):
        herding_sparse(graph, 1, candidates=np.ones(3, bool))


def _table(x, **cols):
    return {"image_id": np.arange(100, 100 + len(x), dtype=np.int64), "embedding": x.astype(np.float32), **cols}


def test_selector_picks_one_per_cluster_dense_and_sparse_agree():
    from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
    from poolscout.engine.acquisition.strategies import load_strategy, select

    rng = np.random.default_rng(4)
    dirs = np.eye(6)[:3] * 1.0
    x = np.concatenate([d + 0.03 * rng.standard_normal((s, 6)) for d, s in zip(dirs, (10, 6, 3))])
    label = np.repeat([0, 1, 2], (10, 6, 3))
    fn = SELECTORS.get("maxherding")
    ctx = SelectContext()
    dense = fn(_table(x), 3, ctx=ctx, h=0.3)
    assert label[dense.image_id - 100].tolist() == [0, 1, 2]
    assert dense.rationale[0]["maxherding"]["path"] == "dense"
    sparse = fn(_table(x), 3, ctx=ctx, h=0.3, dense_below=0, neighbours=len(x))
    assert sparse.image_id.tolist() == dense.image_id.tolist()
    assert sparse.rationale[0]["maxherding"]["path"] == f"knn k={len(x)}"
    np.testing.assert_allclose(sparse.score, dense.score, rtol=1e-5)
    # labeled images in cluster 0 cover it: the first pick goes elsewhere
    lab = SelectContext(labeled_embedding=x[:2].astype(np.float32))
    assert label[fn(_table(x), 1, ctx=lab, h=0.3).image_id - 100].tolist() == [1]
    # through a strategy file
    sel = select(load_strategy("maxherding"), _table(x), 3, ctx=ctx)
    assert sorted(label[sel.image_id - 100].tolist()) == [0, 1, 2]


def test_uncertainty_herding_follows_the_uncertain_cluster():
    from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
    from poolscout.engine.acquisition.strategies import load_strategy
    from poolscout.engine.methods.herding import uncertainty_weights

    rng = np.random.default_rng(5)
    dirs = np.eye(4)[:2]
    x = np.concatenate([d + 0.03 * rng.standard_normal((s, 4)) for d, s in zip(dirs, (12, 4))])
    margin = np.concatenate([np.full(12, 0.9), np.full(4, 0.1)])  # a small margin is uncertain
    fn = SELECTORS.get("maxherding")
    plain = fn(_table(x), 1, ctx=SelectContext(), h=0.3)
    weighted = fn(_table(x, margin_max=margin), 1, ctx=SelectContext(), h=0.3, by="margin:max")
    assert plain.image_id[0] < 112 <= weighted.image_id[0]  # coverage: big cluster; weighted: uncertain one
    assert weighted.rationale[0]["maxherding"]["weighted_by"] == "margin:max"
    assert uncertainty_weights(np.array([1.0, 3.0, np.nan]), "high").tolist() == [0.0, 1.0, 0.0]
    assert uncertainty_weights(np.array([1.0, 3.0]), "low").tolist() == [1.0, 0.0]  # low = uncertain
    assert load_strategy("uncertainty_herding").needs.embedding


def _blobs(n=3000, d=16, seed=5):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((30, d)).astype(np.float32)
    return (c[rng.integers(0, 30, n)] + 0.2 * rng.standard_normal((n, d))).astype(np.float32)


def test_knn_graph_does_not_depend_on_the_chunk_size():
    from poolscout.engine.methods.herding import knn_search

    x = _blobs(1500)
    a = knn_search(x, 8, chunk=1500)
    b = knn_search(x, 8, chunk=97)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2]["index"] == "flat" and a[2]["recall"] == 1.0


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_reports_its_recall_and_every_point_covers_itself(index):
    from poolscout.engine.methods.herding import knn_search

    x = _blobs()
    nbr, d2, info = knn_search(x, 10, index=index, nprobe=1, ef_search=10, recall_sample=300)
    exact, _, _ = knn_search(x, 10, index="flat")
    hits = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(nbr[:300], exact[:300])])
    assert info["index"] == index and 0.3 < info["recall"] <= 1.0
    assert abs(info["recall"] - hits) < 0.1  # the sampled estimate tracks the true recall
    assert (nbr == np.arange(len(x))[:, None]).any(axis=1).all()
    # auto picks IVF above the threshold, flat below
    assert knn_search(x, 5, flat_below=len(x) + 1)[2]["index"] == "flat"
    assert knn_search(x, 5, flat_below=10)[2]["index"] == "ivf"


def test_knn_graph_is_cached_per_content_and_parameters(tmp_path):
    from poolscout.engine.methods.herding import cached_knn

    x = _blobs(800)
    a = cached_knn(x, 6, cache_dir=tmp_path, index="ivf", nprobe=2)
    b = cached_knn(x, 6, cache_dir=tmp_path, index="ivf", nprobe=2)
    assert a[2]["cached"] is False and b[2]["cached"] is True
    np.testing.assert_array_equal(a[0], b[0])
    assert len(list(tmp_path.glob("knn-*.npz"))) == 1
    # other parameters or other points: another entry, not a stale hit
    assert cached_knn(x, 6, cache_dir=tmp_path, index="ivf", nprobe=4)[2]["cached"] is False
    y = x.copy()
    y[0, 0] += 1
    assert cached_knn(y, 6, cache_dir=tmp_path, index="ivf", nprobe=2)[2]["cached"] is False
    assert len(list(tmp_path.glob("knn-*.npz"))) == 3
    # a damaged file is rebuilt
    f = sorted(tmp_path.glob("knn-*.npz"))[0]
    f.write_bytes(b"garbage")
    assert cached_knn(x, 6, cache_dir=tmp_path, index="ivf", nprobe=2)[0].shape == (800, 6)


def test_maxherding_selector_on_an_ivf_graph_reports_recall(tmp_path):
    from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext

    x = _blobs(2500)
    fn = SELECTORS.get("maxherding")
    ctx = SelectContext(cache_dir=str(tmp_path))
    sel = fn(_table(x), 20, ctx=ctx, dense_below=100, flat_below=1000, nprobe=4)
    path = sel.rationale[0]["maxherding"]["path"]
    assert path.startswith("knn k=20 ivf recall@20 ")
    exact = fn(_table(x), 20, ctx=SelectContext(), dense_below=100)
    # a near-exact graph keeps most picks
    assert len(np.intersect1d(sel.image_id, exact.image_id)) >= 14
    again = fn(_table(x), 20, ctx=ctx, dense_below=100, flat_below=1000, nprobe=4)
    assert again.image_id.tolist() == sel.image_id.tolist()


def test_bandwidth_from_the_knn_lists_equals_the_search_one():
    from poolscout.engine.methods.herding import knn_search, median_bandwidth_from_knn

    x = _blobs(3000)
    nbr, d2, _ = knn_search(x, 5, index="flat")
    assert median_bandwidth_from_knn(nbr, d2) == pytest.approx(median_bandwidth(x), rel=1e-5)
    assert median_bandwidth_from_knn(nbr, d2, sample=100) == pytest.approx(median_bandwidth(x, sample=100), rel=1e-5)


def test_adaptive_radius_is_the_smallest_labeled_distance():
    """h: adaptive (uncertainty herding's radius): the smallest distance between two labeled
    points, by hand on the unit circle; the median rule while there are fewer than two."""
    from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
    from poolscout.engine.methods.herding import adaptive_bandwidth

    def circle(*angles):
        a = np.asarray(angles, dtype=np.float64)
        return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)

    lab = circle(0.0, 0.2, 1.0)  # chords 2 sin(0.1), 2 sin(0.4), 2 sin(0.5)
    assert adaptive_bandwidth(lab) == pytest.approx(2 * math.sin(0.1), rel=1e-5)
    assert adaptive_bandwidth(lab[:1]) is None and adaptive_bandwidth(circle(0.3, 0.3)) is None
    x = circle(*np.linspace(1.5, 3.0, 12))
    fn = SELECTORS.get("maxherding")
    ctx = SelectContext(labeled_embedding=lab)
    adaptive = fn(_table(x), 4, ctx=ctx, h="adaptive")
    fixed = fn(_table(x), 4, ctx=ctx, h=2 * math.sin(0.1))
    assert adaptive.image_id.tolist() == fixed.image_id.tolist()
    assert adaptive.rationale[0]["maxherding"]["h"] == pytest.approx(2 * math.sin(0.1), rel=1e-5)
    alone = SelectContext(labeled_embedding=lab[:1])
    assert (fn(_table(x), 4, ctx=alone, h="adaptive").image_id.tolist()
            == fn(_table(x), 4, ctx=alone, h="median").image_id.tolist())
    with pytest.raises(ValueError, match="'median' or 'adaptive'"):
        fn(_table(x), 1, ctx=ctx, h="wide")
