"""ProbCover: coverage greedy by hand, purity / delta search by hand, dense = sparse at k = N,
brute-force max coverage, parameter errors, determinism."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
from poolscout.engine.methods import probcover  # noqa: F401  (registers the selector)
from poolscout.engine.methods.probcover import choose_delta, impure_radius2, knn_lists, purity_curve

ANGLES = np.array([0.0, 0.1, 0.2, 0.35, 1.0, 1.1, 2.0])


def _circle(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def _table(x):
    return {"image_id": np.arange(100, 100 + len(x), dtype=np.int64), "embedding": np.asarray(x, np.float32)}


def _run(x, budget, **kw):
    ctx = kw.pop("ctx", None) or SelectContext(rng=np.random.default_rng(0))
    return SELECTORS.get("probcover")(_table(x), budget, ctx=ctx, **kw)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_greedy_coverage_by_hand(path):
    # Unit vectors at angles t on the circle; the chord between t and s is 2 sin(|t - s| / 2),
    # so delta = 0.16 holds angle gaps <= 2 asin(0.08) = 0.1601 rad (0.15 is in, 0.65 out).
    # balls: 0:{0,1} 1:{0,1,2} 2:{1,2,3} 3:{2,3} 4:{4,5} 5:{4,5} 6:{6}
    # pick 1: 1 and 2 cover 3 each -> row 1 (lowest), covers {0,1,2}
    # pick 2: gains 0:0 2:1 3:1 4:2 5:2 6:1 -> row 4, covers {4,5}
    # pick 3: gains 2:1 3:1 6:1 -> row 2, covers {3}; pick 4: row 6 covers {6}
    # pick 5: everything covered -> gain 0, lowest remaining row: 0
    x = _circle(ANGLES)
    kw = {"dense_below": 0, "neighbours": len(x)} if path == "sparse" else {}
    sel = _run(x, 5, delta=0.16, **kw)
    assert (sel.image_id - 100).tolist() == [1, 4, 2, 6, 0]
    assert sel.score.tolist() == [3, 2, 1, 1, 0]
    r = sel.rationale
    assert [q["probcover"]["covered"] for q in r] == [3, 2, 1, 1, 0]
    assert [q["probcover"]["rank"] for q in r] == [1, 2, 3, 4, 5]
    assert r[0]["probcover"]["delta"] == pytest.approx(0.16)
    assert r[0]["probcover"]["path"] == ("dense" if path == "dense" else f"knn k={len(x)}")
    # a labeled image at angle 0.05 is within 0.15 rad of rows 0, 1, 2: they start covered
    # -> gains 2:1 3:1 4:2 ... -> 4 first, then 2 (covers 3), then 6
    ctx = SelectContext(rng=np.random.default_rng(0), labeled_embedding=_circle(np.array([0.05])))
    sel = _run(x, 3, delta=0.16, ctx=ctx, **kw)
    assert (sel.image_id - 100).tolist() == [4, 2, 6]
    assert sel.score.tolist() == [2, 1, 1]


def test_purity_and_delta_by_hand():
    # points 0, 1, 3, 4 on a line, labels 0, 0, 1, 1: the nearest point of another label is
    # at distance 3, 2, 2, 3 -> squared 9, 4, 4, 9. A ball includes its boundary, so the
    # ball of radius delta is pure iff delta^2 < that value:
    # delta 1 or 1.5: all pure (1.0); 2 or 2.5: points 1, 2 impure (0.5); 3: none pure (0.0)
    x = np.array([[0.0], [1.0], [3.0], [4.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    nbr, d2 = knn_lists(x, 4)
    assert impure_radius2(nbr, d2, labels).tolist() == [9.0, 4.0, 4.0, 9.0]
    grid = np.array([1.0, 1.5, 2.0, 2.5, 3.0])
    assert purity_curve(impure_radius2(nbr, d2, labels), grid).tolist() == [1.0, 1.0, 0.5, 0.5, 0.0]
    imp = impure_radius2(nbr, d2, labels)
    assert choose_delta(imp, grid, 0.95) == (1.5, 1.0)
    assert choose_delta(imp, grid, 0.5) == (2.5, 0.5)
    assert choose_delta(imp, grid[::-1], 0.5) == (2.5, 0.5)  # grid order does not matter
    assert choose_delta(imp, np.array([3.0, 4.0]), 0.95) == (3.0, 0.0)  # none pure enough: smallest
    # exactly the threshold counts: 1 impure ball in 20 is purity 0.95
    assert choose_delta(np.array([1.0] + [np.inf] * 19), np.array([0.5, 2.0]), 0.95) == (2.0, 0.95)
    # truncated lists (k = 2): each point sees itself and its nearest other point, which has
    # its label (0 <-> 1, 3 <-> 4): no other label seen, every ball counts as pure
    nbr2, d22 = knn_lists(x, 2)
    assert impure_radius2(nbr2, d22, labels).tolist() == [np.inf] * 4


def _brute_greedy(ball, budget, cand, covered):
    """Max coverage greedy by plain set arithmetic: ball[i, j] = j within delta of i."""
    cov = ball[covered].any(axis=0) if covered.any() else np.zeros(len(ball), bool)
    picks, gains = [], []
    left = cand.copy()
    for _ in range(min(budget, int(cand.sum()))):
        g = np.array([(ball[j] & ~cov).sum() if left[j] else -1 for j in range(len(ball))])
        j = int(np.argmax(g))
        picks.append(j)
        gains.append(int(g[j]))
        cov |= ball[j]
        left[j] = False
    return picks, gains, cov


def test_dense_and_sparse_match_brute_force_max_coverage():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((14, 3)).astype(np.float32)
    lab = rng.standard_normal((3, 3)).astype(np.float32)
    pts = np.concatenate([x, lab]).astype(np.float64)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    delta = 0.9
    ball = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) <= delta
    cand = np.arange(len(pts)) < len(x)
    picks, gains, _ = _brute_greedy(ball, 6, cand, ~cand)
    for kw in ({}, {"dense_below": 0, "neighbours": len(pts)}):
        sel = _run(x, 6, delta=delta, ctx=SelectContext(rng=np.random.default_rng(0), labeled_embedding=lab), **kw)
        assert (sel.image_id - 100).tolist() == picks
        assert sel.score.tolist() == gains
    # greedy is within 1 - 1/e of the best 3-subset (exhaustive search), no labels
    none = np.zeros(len(x), bool)
    sub = ball[:len(x), :len(x)]
    best = max(sub[list(s)].any(axis=0).sum() for s in itertools.combinations(range(len(x)), 3))
    sel = _run(x, 3, delta=delta)
    got = sub[sel.image_id - 100].any(axis=0).sum()
    assert got == sum(_brute_greedy(sub, 3, ~none, none)[1]) and got >= (1 - 1 / np.e) * best


def test_auto_delta_stays_pure_and_covers_each_cluster():
    rng = np.random.default_rng(5)
    dirs = np.eye(5)[:3]
    x = np.concatenate([d + 0.05 * rng.standard_normal((s, 5)) for d, s in zip(dirs, (12, 8, 5))])
    label = np.repeat([0, 1, 2], (12, 8, 5))
    for kw in ({}, {"dense_below": 0, "neighbours": 10}):
        sel = _run(x, 3, clusters=3, **kw)
        r = sel.rationale[0]["probcover"]
        assert r["purity"] >= 0.95
        assert 0 < r["delta"] < 1.0  # below the gap between clusters (about sqrt(2))
        assert sorted(label[sel.image_id - 100].tolist()) == [0, 1, 2]
        assert label[sel.image_id[0] - 100] == 0  # the biggest cluster first
    # with k = N the auto grid, the purity and the balls are the same on both paths
    dense = _run(x, 4, clusters=3, neighbours=len(x))
    sparse = _run(x, 4, clusters=3, neighbours=len(x), dense_below=0)
    assert dense.image_id.tolist() == sparse.image_id.tolist()
    delta = [s.rationale[0]["probcover"]["delta"] for s in (dense, sparse)]
    assert delta[0] == pytest.approx(delta[1], rel=1e-5)
    # an explicit grid is searched as given: the largest value that is pure enough
    sel = _run(x, 1, clusters=3, delta=[0.05, 0.2, 0.3, 5.0])
    assert sel.rationale[0]["probcover"]["delta"] == 0.3 and sel.score[0] == 12


def test_determinism_and_strategy_file():
    from poolscout.engine.acquisition.strategies import load_strategy, select

    rng = np.random.default_rng(8)
    x = rng.standard_normal((60, 6)).astype(np.float32)
    a = _run(x, 7, ctx=SelectContext(rng=np.random.default_rng(11)))
    b = _run(x, 7, ctx=SelectContext(rng=np.random.default_rng(11)))
    assert a.image_id.tolist() == b.image_id.tolist() and a.rationale == b.rationale
    assert len(set(a.image_id.tolist())) == 7
    st = load_strategy("probcover")
    assert st.needs.embedding and not st.needs.boxes
    sel = select(st, _table(x), 5, ctx=SelectContext(rng=np.random.default_rng(11)))
    assert len(sel) == 5 and "probcover" in sel.rationale[0]
    assert len(_run(x[:4], 10, delta=0.5)) == 4  # budget beyond the pool: all of it


@pytest.mark.parametrize("kw, match", [
    ({"delta": "big"}, "delta"), ({"delta": -1.0}, "delta"), ({"delta": []}, "delta"), ({"delta": [0.1, 0]}, "delta"),
    ({"purity": 0.0}, "purity"), ({"purity": 1.5}, "purity"), ({"neighbours": 0}, "neighbours"),
    ({"clusters": 0}, "clusters"), ({"clusters": 2.5}, "clusters"), ({"neighbours": "many"}, "neighbours"),
    ({"dense_below": -1}, "dense_below"), ({"delta": True}, "delta"),
])
def test_bad_parameters(kw, match):
    x = _circle(ANGLES)
    with pytest.raises(ValueError, match=f"probcover: {match}"):
        _run(x, 2, **kw)


def test_bad_inputs():
    x = _circle(ANGLES)
    with pytest.raises(ValueError, match="embedding"):
        SELECTORS.get("probcover")({"image_id": np.arange(3)}, 1, ctx=SelectContext())
    with pytest.raises(ValueError, match="labeled_embedding"):
        _run(x, 1, ctx=SelectContext(labeled_embedding=np.zeros((2, 5), np.float32)))
    with pytest.raises(ValueError, match="budget"):
        _run(x, 0)
