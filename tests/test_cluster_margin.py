"""Cluster-Margin: round-robin by hand, against a plain reimplementation, errors, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
from poolscout.engine.methods import cluster_margin as cm
from poolscout.engine.methods.cluster_margin import default_clusters, round_robin

# 12 images in three groups (rows 0-5, 6-9, 10-11) and their top-2 margins (small = uncertain)
GROUP = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
MARGIN = np.array([0.10, 0.20, 0.30, 0.90, 0.05, 0.80, 0.15, 0.25, 0.95, 0.85, 0.12, 0.99])


def _table(x, margin):
    return {"image_id": np.arange(100, 100 + len(x), dtype=np.int64), "embedding": np.asarray(x, np.float32),
            "margin_max": np.asarray(margin, np.float64)}


def _groups_x(rng=None):
    rng = rng or np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    return centres[GROUP] + 0.1 * rng.standard_normal((len(GROUP), 2))


def _fixed_clusters(monkeypatch, labels):
    """k-means replaced by a given clustering (the draw of its seed from ctx.rng stays)."""
    monkeypatch.setattr(cm, "kmeans_labels", lambda x, k, seed=0, niter=25: np.asarray(labels, np.int64))


def test_round_robin_by_hand(monkeypatch):
    # The clusters are the three groups (cluster ids 7, 3, 5, to see that ids are reported).
    # budget 4, keep 1.5 -> k_m = 6 lowest margins: 4 (.05), 0 (.10), 10 (.12), 6 (.15), 1 (.20), 7 (.25)
    # by cluster: group 0 {4, 0, 1} (size 3), group 1 {6, 7} (size 2), group 2 {10} (size 1)
    # smallest first: group 2, group 1, group 0; within: uncertain = rank order
    # round 1: 10, 6, 4; round 2: 7 -> budget reached.
    # Budget 6, keep 1 -> the same k_m = 6: round 2 goes on with 0, round 3: 1.
    ids = np.array([7, 3, 5])
    _fixed_clusters(monkeypatch, ids[GROUP])
    fn = SELECTORS.get("cluster_margin")
    t = _table(_groups_x(), MARGIN)
    sel = fn(t, 4, ctx=SelectContext(), keep=1.5, within="uncertain")
    assert (sel.image_id - 100).tolist() == [10, 6, 4, 7]
    assert sel.score.tolist() == [0.12, 0.15, 0.05, 0.25]
    r = [q["cluster_margin"] for q in sel.rationale]
    assert [q["cluster"] for q in r] == [5, 3, 7, 3]
    assert [q["cluster_size"] for q in r] == [1, 2, 3, 2]
    assert [q["round"] for q in r] == [1, 1, 1, 2]
    assert [q["rank"] for q in r] == [1, 2, 3, 4]
    assert [q["value"] for q in r] == [0.12, 0.15, 0.05, 0.25]
    sel = fn(t, 6, ctx=SelectContext(), keep=1, within="uncertain")
    assert (sel.image_id - 100).tolist() == [10, 6, 4, 7, 0, 1]
    assert [q["cluster_margin"]["round"] for q in sel.rationale] == [1, 1, 1, 2, 2, 3]
    # keep 1 (k_m = 4): {4, 0} in group 0, {10} in group 2, {6} in group 1: sizes 2, 1, 1;
    # ties in size go by cluster id: group 1 (id 3) before group 2 (id 5) -> 6, 10, 4, 0
    sel = fn(t, 4, ctx=SelectContext(), keep=1, within="uncertain")
    assert (sel.image_id - 100).tolist() == [6, 10, 4, 0]
    # random within a cluster: the same clusters in the same turns, members in some order:
    # [10, one of {6, 7}, one of {4, 0, 1}, the other of {6, 7}, two more of {4, 0, 1}]
    for seed in range(4):
        sel = fn(t, 6, ctx=SelectContext(rng=np.random.default_rng(seed)), keep=1)
        p = (sel.image_id - 100).tolist()
        assert p[0] == 10 and {p[1], p[3]} == {6, 7} and {p[2], p[4], p[5]} == {4, 0, 1}


def test_round_robin_helper():
    assert round_robin([np.array([5]), np.array([1, 2]), np.array([3, 4, 6])], 5) == [
        (5, 0, 1), (1, 1, 1), (3, 2, 1), (2, 1, 2), (4, 2, 2)]
    assert len(round_robin([np.array([1]), np.array([2])], 10)) == 2
    assert round_robin([], 3) == []
    assert default_clusters(1) == 1 and default_clusters(3) == 2 and default_clusters(100) == 10
    assert default_clusters(10**8, max_clusters=500) == 500


def _reference(labels, margin, ids, budget, keep, within, rng):
    """Cluster-Margin written out plainly: sort, group, sort groups, take in turns."""
    rng.integers(2**31 - 1)  # the selector draws the k-means seed first
    order = sorted(range(len(ids)), key=lambda i: (math.isnan(margin[i]), 0.0 if math.isnan(margin[i]) else margin[i],
                                                   ids[i]))
    top = order[:min(math.ceil(keep * budget), len(ids))]
    groups: dict[int, list[int]] = {}
    for i in top:
        groups.setdefault(int(labels[i]), []).append(i)
    keys = sorted(groups, key=lambda c: (len(groups[c]), c))
    lists = [list(rng.permutation(groups[c])) if within == "random" else groups[c] for c in keys]
    out = []
    while len(out) < budget and any(lists):
        for lst in lists:
            if lst and len(out) < budget:
                out.append(int(lst.pop(0)))
    return out


@pytest.mark.parametrize("within", ["random", "uncertain"])
def test_matches_a_plain_reimplementation(monkeypatch, within):
    rng = np.random.default_rng(4)
    n = 80
    x = rng.standard_normal((n, 4))
    margin = np.round(rng.random(n), 2)  # ties in the margin: broken by image_id
    margin[[3, 17]] = np.nan  # no boxes: last
    seen = []
    real = cm.kmeans_labels

    def record(x, k, seed=0, niter=25):
        seen.append(real(x, k, seed=seed, niter=niter))
        return seen[-1]

    monkeypatch.setattr(cm, "kmeans_labels", record)
    fn = SELECTORS.get("cluster_margin")
    for budget, keep in ((5, 3.0), (12, 2.5), (30, 1.0), (40, 10.0)):
        sel = fn(_table(x, margin), budget, ctx=SelectContext(rng=np.random.default_rng(9)), keep=keep,
                 within=within, clusters=7)
        ids = np.arange(100, 100 + n)
        want = _reference(seen[-1], margin, ids, budget, keep, within, np.random.default_rng(9))
        assert (sel.image_id - 100).tolist() == want
        assert len(np.unique(seen[-1])) <= 7


def test_real_kmeans_determinism_and_strategy_file():
    from poolscout.engine.acquisition.strategies import load_strategy, select

    rng = np.random.default_rng(2)
    x = rng.standard_normal((150, 8))
    margin = rng.random(150)
    fn = SELECTORS.get("cluster_margin")
    a = fn(_table(x, margin), 20, ctx=SelectContext(rng=np.random.default_rng(3)))
    b = fn(_table(x, margin), 20, ctx=SelectContext(rng=np.random.default_rng(3)))
    assert a.image_id.tolist() == b.image_id.tolist() and a.rationale == b.rationale
    assert len(set(a.image_id.tolist())) == 20
    kept = set(np.argsort(margin)[:150].tolist())  # keep 10 x 20 > 150: all candidates
    assert set((a.image_id - 100).tolist()) <= kept
    sizes = [q["cluster_margin"]["cluster_size"] for q in a.rationale if q["cluster_margin"]["round"] == 1]
    assert sizes == sorted(sizes)  # round 1 visits clusters smallest first
    st = load_strategy("cluster_margin")
    assert st.needs.embedding and [s.column for s in st.needs.signals] == ["margin_max"]
    sel = select(st, _table(x, margin), 20, ctx=SelectContext(rng=np.random.default_rng(3)))
    assert sel.image_id.tolist() == a.image_id.tolist()  # keep: 10, by: margin:max are the defaults
    small = fn(_table(x[:3], margin[:3]), 10, ctx=SelectContext())
    assert sorted(small.image_id.tolist()) == [100, 101, 102]  # budget beyond the pool


@pytest.mark.parametrize("kw, match", [
    ({"keep": 0.5}, "keep"), ({"keep": float("inf")}, "keep"), ({"clusters": 0}, "clusters"),
    ({"max_clusters": 0}, "max_clusters"), ({"within": "largest"}, "within"), ({"clusters": 2.5}, "clusters"),
    ({"keep": "all"}, "keep"),
])
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=f"cluster_margin: {match}"):
        SELECTORS.get("cluster_margin")(_table(_groups_x(), MARGIN), 2, ctx=SelectContext(), **kw)


def test_bad_inputs():
    fn = SELECTORS.get("cluster_margin")
    t = _table(_groups_x(), MARGIN)
    with pytest.raises(ValueError, match="by="):
        fn(t, 2, ctx=SelectContext(), by="entropy:max")  # no such column
    with pytest.raises(ValueError, match="embedding"):
        fn({"image_id": t["image_id"], "margin_max": MARGIN}, 2, ctx=SelectContext())
    with pytest.raises(ValueError, match="budget"):
        fn(t, 0, ctx=SelectContext())
