"""Bounded k-center greedy: the same picks, scores and rationale as the plain exact greedy,
and the Numba kernels agree with their NumPy twins."""
from __future__ import annotations

import numpy as np
import pytest

from poolscout.engine.acquisition import selectors as Z
from poolscout.engine.methods import coreset as C
from poolscout.kernels import kcenter as K


def ctx(**kw) -> Z.SelectContext:
    return Z.SelectContext(rng=np.random.default_rng(7), **kw)


def blobs(seed: int, n: int, d: int, k: int = 12, scale: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3.0
    x = centres[rng.integers(k, size=n)] + scale * rng.normal(size=(n, d))
    return x.astype(np.float32)


def brute_force(x: np.ndarray, lab: np.ndarray | None, b: int, first_row: int | None) -> tuple[list[int], list[float]]:
    """Plain greedy with the float64 in-order sums of `update_argmax` (lowest row on ties)."""
    x64 = x.astype(np.float64)

    def d2(c):
        s = np.zeros(len(x))
        for j in range(x.shape[1]):
            t = x64[:, j] - np.float64(c[j])
            s += t * t
        return s

    md = np.full(len(x), np.inf)
    if lab is not None:
        for c in lab:
            md = np.minimum(md, d2(c))
        nxt = int(np.argmax(md))
    else:
        nxt = first_row
    rows, score = [], []
    for t in range(b):
        rows.append(nxt)
        score.append(np.inf if (t == 0 and lab is None) else float(np.sqrt(max(md[nxt], 0.0))))
        md[nxt] = -np.inf
        md = np.minimum(md, d2(x[nxt]))
        nxt = int(np.argmax(md))
    return rows, score


def assert_same(table, b, lab=None, **kw):
    p = C.coreset(table, b, ctx=ctx(labeled_embedding=lab), bounds=False, **kw)
    q = C.coreset(table, b, ctx=ctx(labeled_embedding=lab), bounds=True, **kw)
    np.testing.assert_array_equal(q.image_id, p.image_id)
    np.testing.assert_array_equal(q.score, p.score)  # bitwise: same float64 distances
    assert q.rationale == p.rationale
    return p


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_labeled", [False, True])
def test_bounded_equals_plain_on_clustered_data(seed, with_labeled):
    n = 3001 + 17 * seed  # not a multiple of anything in the layout
    x = blobs(seed, n, 16)
    lab = blobs(seed + 100, 20, 16) if with_labeled else None
    t = {"image_id": np.arange(10_000, 10_000 + n), "embedding": x}
    p = assert_same(t, 150, lab)
    # and both equal an independent brute force
    first = None if with_labeled else int(np.argmax(((x.astype(np.float64) - x.mean(0, dtype=np.float64)
                                                      .astype(np.float32)) ** 2).sum(1)))
    if not with_labeled:
        rows, score = brute_force(x, None, 150, first)
        np.testing.assert_array_equal(p.image_id - 10_000, rows)
        np.testing.assert_allclose(p.score, score, rtol=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_bounded_equals_plain_random_first_and_gaussian_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2500, 24)).astype(np.float32)  # no cluster structure at all
    t = {"image_id": rng.permutation(2500) + 5, "embedding": x}
    assert_same(t, 120, first="random")
    assert_same(t, 120, first="farthest")


def test_duplicates_and_exact_ties_go_to_the_lowest_row():
    rng = np.random.default_rng(11)
    base = rng.integers(-3, 4, size=(40, 6)).astype(np.float32)  # integer grid: many equal distances
    x = base[rng.integers(40, size=1500)]  # every point repeated ~37 times
    t = {"image_id": np.arange(1500), "embedding": x}
    p = assert_same(t, 200)  # more picks than distinct points: zero distances, ties everywhere
    assert len(set(p.image_id.tolist())) == 200
    lab = base[:5]
    assert_same(t, 60, lab)


def test_large_common_offset_and_rounding():
    rng = np.random.default_rng(5)
    x = (1000.0 + blobs(5, 2000, 8, scale=1e-3)).astype(np.float32)  # cancellation-prone
    x[::7] = x[3]  # exact duplicates far from their centroid's
    t = {"image_id": np.arange(2000), "embedding": x}
    assert_same(t, 100)
    assert_same(t, 100, rng.normal(1000.0, 1.0, size=(3, 8)).astype(np.float32))


@pytest.mark.parametrize("n", [1, 2, 5, 31, 32, 33, 65])
def test_tiny_pools_every_budget(n):
    x = blobs(n, n, 3)
    t = {"image_id": np.arange(n) * 3, "embedding": x}
    for b in sorted({1, 2, n}):
        assert_same(t, b)
        assert_same(t, b, first="random")
        assert_same(t, b, blobs(99, 2, 3))


@pytest.mark.parametrize("clusters", [1, 7, 500])
def test_any_number_of_clusters_is_exact(clusters):
    x = blobs(8, 700, 10)
    t = {"image_id": np.arange(700), "embedding": x}
    p = C.coreset(t, 90, ctx=ctx(), bounds=False)
    q = C.coreset(t, 90, ctx=ctx(), bounds=True, clusters=clusters)
    np.testing.assert_array_equal(q.image_id, p.image_id)
    np.testing.assert_array_equal(q.score, p.score)


def test_auto_switch_custom_distance_and_errors():
    x = blobs(1, 500, 4)
    r = C.kcenter_greedy(x, 5)
    assert r.stats["path"] == "plain"  # auto: below BOUNDS_MIN_N
    r = C.kcenter_greedy(x, 5, bounds=True)
    assert r.stats["path"] == "bounded" and r.stats["clusters"] >= 1
    r = C.kcenter_greedy(x, 5, bounds=True, distance=C.sq_l2_faiss)
    assert r.stats["path"] == "plain"  # a custom kernel keeps the unbounded code
    with pytest.raises(ValueError, match="bounds"):
        C.coreset({"image_id": np.arange(500), "embedding": x}, 3, ctx=ctx(), bounds="sometimes")
    with pytest.raises(ValueError, match="clusters"):
        C.coreset({"image_id": np.arange(500), "embedding": x}, 3, ctx=ctx(), clusters=0)


def test_bounded_path_prunes_on_separated_clusters():
    x = blobs(2, 6000, 16, k=30, scale=0.05)
    r = C.kcenter_greedy(x, 200, bounds=True)
    assert r.stats["mean_fraction_swept"] < 0.5
    assert r.stats["mean_fraction_exact"] < 0.2


def test_set_up_threads_and_projection_do_not_change_anything():
    """The clustering split over threads gives the same clusters; the bounded path (clustered
    on principal axes, any threads) picks what the plain path picks."""
    x = blobs(5, 3000, 24, k=15)
    a = C.two_level_kmeans(x, 40, seed=3, threads=1, chunk=700)
    b = C.two_level_kmeans(x, 40, seed=3, threads=3, chunk=700)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    p = C.pca_projection(x, 4)
    assert p.shape == (3000, 4) and p.dtype == np.float32 and p.flags.c_contiguous
    # the leading axis carries the most variance of any direction tried
    assert p[:, 0].var() >= (x @ np.random.default_rng(0).normal(size=(24, 50)).astype(np.float32)
                             / np.linalg.norm(np.random.default_rng(0).normal(size=(24, 50)), axis=0)).var(0).max() - 1e-3
    assert C.pca_projection(x, 24) is x
    plain = C.kcenter_greedy(x, 60, bounds=False)
    for threads in (1, 2):
        r = C.kcenter_greedy(x, 60, bounds=True, threads=threads)
        np.testing.assert_array_equal(r.rows, plain.rows)
        np.testing.assert_array_equal(r.score, plain.score)
        assert r.stats["threads"] == threads


# --------------------------------------------------------------------------- kernel twins


def layout(seed: int, n: int = 1500, d: int = 12) -> C.BoundedLayout:
    x = blobs(seed, n, d)
    labels, _, key = C.two_level_kmeans(x, 20, seed=seed)
    return C.blocked_layout(x, labels, key, int(labels.max()) + 1)


def test_layout_kernels_match_twins():
    lay = layout(0)
    x = lay.x
    g = lay.n_clusters
    labels = np.full(len(x), -1)
    for c in range(g):
        s = lay.rows[lay.c_b0[c] * K.LANES : lay.c_b0[c + 1] * K.LANES]
        labels[s[s >= 0]] = c
    assert (labels >= 0).all()
    s1, s2 = np.empty((g, x.shape[1])), np.empty((g, x.shape[1]))
    K.cluster_sums(x, labels, s1)
    K.cluster_sums_numpy(x, labels, s2)
    np.testing.assert_array_equal(s1, s2)
    blk_cluster = np.repeat(np.arange(g), np.diff(lay.c_b0))
    outs = []
    for f in (K.quantize_rows, K.quantize_rows_numpy):
        o = (np.empty_like(lay.q8), *(np.empty(len(lay.rows)) for _ in range(4)))
        f(x, lay.rows, lay.mu, blk_cluster, K.rounding_margin(x.shape[1]), *o)
        outs.append(o)
    for a, b in zip(outs[0][:3], outs[1][:3]):  # codes, scales, |q|^2: exact
        np.testing.assert_array_equal(a, b)
    for a, b in zip(outs[0][3:], outs[1][3:]):  # norms: summed in another order
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-300)
    # split over threads: the same bytes
    for threads in (1, 3):
        o = (np.full_like(lay.q8, 7), *(np.full(len(lay.rows), 7.0) for _ in range(4)))
        K.quantize_rows_threaded(x, lay.rows, lay.slot_of_row, lay.mu, blk_cluster, K.rounding_margin(x.shape[1]),
                                 *o, threads=threads)
        for a, b in zip(o, outs[0]):
            np.testing.assert_array_equal(a, b)
    # the sketch reconstructs every real slot within its bound e
    real = lay.rows >= 0
    w = x[lay.rows[real]].astype(np.float64) - lay.mu[blk_cluster[np.flatnonzero(real) // K.LANES]]
    err = np.linalg.norm(w - lay.qa[real, None] * lay.q8[real], axis=1)
    assert np.all(err <= lay.qe[real])


@pytest.mark.parametrize("seed,with_labeled", [(0, False), (1, True), (2, False)])
def test_bounded_greedy_matches_twin_and_plain(seed, with_labeled):
    lay = layout(seed)
    x = lay.x
    n, d = x.shape
    rng = np.random.default_rng(seed)
    if with_labeled:
        lab = blobs(seed + 50, 10, d)
        md_rows = np.full(n, np.inf)
        for c in lab:
            K.update_argmax(x, c, md_rows)
        first_row = int(np.argmax(md_rows))
    else:
        md_rows = np.full(n, np.inf)
        first_row = int(rng.integers(n))
    budget = 80
    results = []
    for greedy, refresh in ((K.bounded_greedy, K.refresh_maxima), (K.bounded_greedy_numpy, K.refresh_maxima_numpy)):
        md = np.full(len(lay.rows), -np.inf)
        md[lay.slot_of_row] = md_rows
        nb, ng = len(lay.b_lo), lay.n_clusters
        st = (np.empty(nb), np.empty(nb, np.int64), np.empty(ng), np.empty(ng, np.int64))
        refresh(lay.c_b0, lay.rows, md, *st)
        out = (np.empty(budget, np.int64), np.empty(budget), np.zeros((budget, 4), np.int64))
        done = greedy(*lay.arrays(), md, *st, int(lay.slot_of_row[first_row]), budget, K.rounding_margin(d), *out)
        assert done == budget
        results.append((md, *st, *out))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    # the picks are those of the plain kernel
    md_rows = md_rows.copy()
    nxt, picks, d2s = first_row, [], []
    for t in range(budget):
        picks.append(nxt)
        d2s.append(md_rows[nxt])
        md_rows[nxt] = -np.inf
        nxt = int(K.update_argmax(x, x[nxt], md_rows))
    np.testing.assert_array_equal(lay.rows[results[0][5]], picks)
    np.testing.assert_array_equal(results[0][6], d2s)


def test_refresh_maxima_twin_and_ties():
    lay = layout(3, n=400)
    rng = np.random.default_rng(0)
    md = rng.integers(0, 4, size=len(lay.rows)).astype(np.float64)  # many equal values
    md[lay.rows < 0] = -np.inf
    md[rng.integers(len(md), size=50)] = -np.inf
    a = [np.empty(len(lay.b_lo)), np.empty(len(lay.b_lo), np.int64), np.empty(lay.n_clusters),
         np.empty(lay.n_clusters, np.int64)]
    b = [v.copy() for v in a]
    K.refresh_maxima(lay.c_b0, lay.rows, md, *a)
    K.refresh_maxima_numpy(lay.c_b0, lay.rows, md, *b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # the top cluster holds the global argmax, lowest row among ties
    ok = a[3] >= 0
    best = a[2][ok].max()
    top = min(a[3][ok][a[2][ok] == best], key=lambda s: lay.rows[s])
    by_row = np.full(len(lay.x), -np.inf)
    by_row[lay.rows[lay.rows >= 0]] = md[lay.rows >= 0]
    assert lay.rows[top] == int(np.argmax(by_row))
