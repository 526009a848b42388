"""GSAL (methods.md section 4): D / V by hand, box pooling against a loop, the concept graph,
and the lazy greedy against a brute-force recomputation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from poolscout.engine.acquisition.selectors import SelectContext
from poolscout.engine.methods import gsal as G


def test_d_and_v_by_hand():
    # one grey 1 x 2 image, K = 2 reconstructions
    x = np.array([[[1.0, 0.0]]])
    recon = np.array([[[[0.0, 0.0]]], [[[2.0, 1.0]]]])
    d, v = G.difficulty_maps(x, recon)
    # pixel 0: ((1-0)^2 + (1-2)^2) / 2 = 1; pixel 1: (0 + 1) / 2 = 0.5
    np.testing.assert_allclose(d, [[1.0, 0.5]])
    # Var_k of (0, 2) = 1, of (0, 1) = 0.25 (divisor K)
    np.testing.assert_allclose(v, [[1.0, 0.25]])
    # two channels: D sums the channels' squared errors, V their variances
    x2 = np.zeros((2, 1, 1))
    r2 = np.array([[[[1.0]], [[2.0]]], [[[3.0]], [[0.0]]]])  # (K=2, C=2, 1, 1)
    d2, v2 = G.difficulty_maps(x2, r2)
    assert d2[0, 0] == pytest.approx(((1 + 4) + (9 + 0)) / 2)
    assert v2[0, 0] == pytest.approx(np.var([1, 3]) + np.var([2, 0]))
    # batched = one by one
    rng = np.random.default_rng(0)
    xb, rb = rng.random((3, 2, 4, 5)), rng.random((3, 4, 2, 4, 5))
    db, vb = G.difficulty_maps(xb, rb)
    for i in range(3):
        di, vi = G.difficulty_maps(xb[i], rb[i])
        np.testing.assert_allclose(db[i], di)
        np.testing.assert_allclose(vb[i], vi)
    with pytest.raises(ValueError, match="do not match"):
        G.difficulty_maps(xb, rb[:, :, :1])


def _box_mean_loop(m, box, width, height):
    h, w = m.shape
    vals = []
    for yy in range(h):
        for xx in range(w):
            cx, cy = (xx + 0.5) * width / w, (yy + 0.5) * height / h
            if box[0] <= cx < box[2] and box[1] <= cy < box[3]:
                vals.append(m[yy, xx])
    return np.mean(vals) if vals else None


def test_box_means_match_a_pixel_loop():
    rng = np.random.default_rng(1)
    m = rng.random((16, 24))
    width, height = 96.0, 64.0  # the map is a quarter of the image
    boxes = []
    for _ in range(200):
        x1, y1 = rng.uniform(0, width - 9), rng.uniform(0, height - 9)
        boxes.append([x1, y1, x1 + rng.uniform(8, width - x1), y1 + rng.uniform(8, height - y1)])
    boxes = np.array(boxes)
    got = G.box_means(m, boxes, width, height)
    checked = 0
    for b, g in zip(boxes, got):
        ref = _box_mean_loop(m, b, width, height)
        if ref is not None:
            assert g == pytest.approx(ref, rel=1e-12)
            checked += 1
    assert checked > 150
    # a box smaller than a pixel still averages one pixel; boxes past the border are clipped
    tiny = G.box_means(m, np.array([[10.1, 10.1, 10.2, 10.2], [-50, -50, 500, 500]]), width, height)
    assert tiny[0] == pytest.approx(m[2, 2]) and tiny[1] == pytest.approx(m.mean())


def test_normalised_values_and_zscore():
    d = np.ones((4, 4))
    d[0, 0] = 9.0
    v = np.full((4, 4), 2.0)
    out = G.normalised_values(d, v, np.array([[0, 0, 1, 1], [2, 2, 4, 4]]), 4, 4, eps=0.0)
    np.testing.assert_allclose(out["d_box"], [9.0, 1.0])  # median D = 1
    np.testing.assert_allclose(out["v_box"], [1.0, 1.0])
    assert out["d_image"] == pytest.approx((15 + 9) / 16) and out["v_image"] == pytest.approx(1.0)
    np.testing.assert_allclose(G.zscore([1.0, 3.0], 2.0, 1.0), [-1.0, 1.0])
    np.testing.assert_array_equal(G.zscore([1.0, 3.0], 2.0, 0.0), [0.0, 0.0])


def test_concept_graph_levels_and_k_c():
    rng = np.random.default_rng(2)
    # class 1: 50 boxes in two far apart blobs; class 2: 8 boxes; class 3: none
    e1 = np.concatenate([rng.normal(0, 0.01, (25, 4)), rng.normal(5, 0.01, (25, 4))])
    e2 = rng.normal(-5, 0.01, (8, 4))
    labels = np.array([1] * 50 + [2] * 8)
    emb = np.concatenate([e1, e2]).astype(np.float32)
    g = G.build_concept_graph(labels, emb, 3, supercategory=["metal", "metal", "paint"])
    assert g.l1_names == ["metal", "paint"] and list(g.l1_of_class[1:]) == [0, 0, 1]
    # k_c = ceil(sqrt(50 / 2)) = 5 clusters for class 1, ceil(sqrt(4)) = 2 for class 2
    assert (g.l3_class == 1).sum() == 5 and (g.l3_class == 2).sum() == 2
    assert (g.l3_class[g.l3] == labels).all()
    # the two blobs of class 1 never share a cluster
    assert not set(g.l3[:25]) & set(g.l3[25:50])
    # masses: class 1 has 10 labeled instances, spread over its clusters by their boxes
    m1, m2, m3 = G.labeled_masses(g, np.array([10, 4, 0]))
    assert list(m1) == [14.0, 0.0] and list(m2) == [0.0, 10.0, 4.0, 0.0]
    assert m3[g.l3_class == 1].sum() == pytest.approx(10.0)
    k = g.l3[0]
    pri = G.node_prior(m1, m2, m3, g)
    assert pri[k] == pytest.approx(((14 + 1) * (10 + 1) * (m3[k] + 1)) ** (-1 / 3))
    # no super-categories: L1 from class prototypes (ceil(sqrt(2 / 2)) = 1 group)
    g2 = G.build_concept_graph(labels, emb, 3)
    assert len(g2.l1_names) == 1 and (g2.l1 == 0).all()
    with pytest.raises(ValueError, match="1..3"):
        G.build_concept_graph(np.array([4]), None, 3)


def _brute_greedy(offsets, g, graph, budget, counts, use_prior=True, update="all"):
    m1, m2, m3 = G.labeled_masses(graph, counts)
    n = len(offsets) - 1
    left = list(range(n))
    picks = []
    for _ in range(budget):
        pri = G.node_prior(m1, m2, m3, graph) if use_prior else np.ones(graph.n_l3)
        best, best_i, best_b = -math.inf, None, -1
        for i in left:
            for bj in range(offsets[i], offsets[i + 1]):
                s = g[bj] * pri[graph.l3[bj]]
                if s > best:
                    best, best_i, best_b = s, i, bj
            if best_i is None and offsets[i] == offsets[i + 1]:
                pass
        if best_i is None:  # only images without boxes left: lowest row
            best_i = min(left)
        picks.append(best_i)
        left.remove(best_i)
        if best_b >= 0:
            added = range(offsets[best_i], offsets[best_i + 1]) if update == "all" else [best_b]
            for a in added:
                m1[graph.l1[a]] += 1
                m2[graph.l2[a]] += 1
                m3[graph.l3[a]] += 1
    return picks


@pytest.mark.parametrize("seed,update", [(0, "all"), (1, "best"), (2, "all")])
def test_lazy_greedy_equals_brute_force(seed, update):
    rng = np.random.default_rng(seed)
    n = 40
    nb = rng.integers(0, 5, n)
    offsets = np.concatenate([[0], np.cumsum(nb)])
    m = int(offsets[-1])
    labels = rng.integers(1, 4, m)
    emb = rng.normal(size=(m, 6)).astype(np.float32)
    graph = G.build_concept_graph(labels, emb, 3, seed=seed)
    g = rng.random(m) + 0.1
    counts = np.array([5, 0, 1])
    res = G.greedy(offsets, g, graph, 25, class_counts=counts, update=update)
    assert res.rows.tolist() == _brute_greedy(offsets, g, graph, 25, counts, update=update)
    # difficulty only: the images by their best box
    res_d = G.greedy(offsets, g, graph, 10, class_counts=counts, use_prior=False)
    best = np.array([g[offsets[i]:offsets[i + 1]].max() if nb[i] else -np.inf for i in range(n)])
    assert res_d.rows.tolist() == list(np.argsort(-best, kind="stable")[:10])
    assert set(res.dominant) <= {"difficulty", "coverage"}


def test_prior_spreads_picks_over_classes():
    # class 1 is labeled a lot and its boxes are slightly harder; class 2 unlabeled
    offsets = np.arange(21)
    labels = np.array([1] * 10 + [2] * 10)
    g = np.array([1.2] * 10 + [1.0] * 10)
    graph = G.build_concept_graph(labels, None, 2)
    counts = np.array([50, 0])
    res = G.greedy(offsets, g, graph, 4, class_counts=counts, update="all")
    assert (labels[res.rows] == 2).sum() >= 3  # coverage wins over a small difficulty gap
    only_d = G.greedy(offsets, g, graph, 4, class_counts=counts, use_prior=False)
    assert (labels[only_d.rows] == 1).all()
    assert res.dominant[0] == "coverage" and only_d.dominant[0] == "difficulty"


def test_selector_rationale_and_errors():
    ids = np.array([10, 11, 12], dtype=np.int64)
    boxes = {"image_id": ids, "offsets": np.array([0, 2, 2, 3]), "labels": np.array([1, 2, 1]),
             "roi_embedding": np.eye(3, 4, dtype=np.float32), "gsal_d": np.array([1.5, 0.2, 3.0]),
             "gsal_v": np.array([1.0, 0.5, 2.0])}
    ctx = SelectContext(boxes=boxes, labeled_class_counts=np.array([3, 0]))
    sel = G.gsal({"image_id": ids}, 3, ctx=ctx, supercategory=["defect", "defect"])
    assert len(set(sel.image_id.tolist())) == 3 and sel.image_id[-1] == 11  # no boxes: last
    r = sel.rationale[0]["gsal"]
    assert r["path"][0] == "defect" and r["dominant"] in ("difficulty", "coverage") and r["rank"] == 1
    assert len(r["mass"]) == 3 and r["prior"] > 0
    assert sel.rationale[-1]["gsal"]["dominant"] == "none"
    # g = z(D) + z(V) over the candidates' boxes, shifted to min 1
    d, v = boxes["gsal_d"], boxes["gsal_v"]
    g = (d - d.mean()) / d.std() + (v - v.mean()) / v.std()
    assert sel.rationale[0]["gsal"]["g"] == pytest.approx((g - g.min() + 1.0)[sel.rationale[0]["gsal"]["box"]
                                                                            + (0 if sel.image_id[0] == 10 else 2)])
    # the run's categories: class names in the path, super-categories as L1 (two or more)
    cats = [{"id": 1, "name": "scratch", "supercategory": "line"}, {"id": 2, "name": "pit", "supercategory": "spot"}]
    named = G.gsal({"image_id": ids}, 2, ctx=SelectContext(boxes=boxes, labeled_class_counts=np.array([3, 0]),
                                                             categories=cats))
    p0 = named.rationale[0]["gsal"]["path"]
    assert p0[0] in ("line", "spot") and p0[1] in ("scratch", "pit") and p0[2].startswith(p0[1] + "/")
    assert {"scratch": "line", "pit": "spot"}[p0[1]] == p0[0]
    # "clusters": the categories' super-categories are ignored (L1 from class prototypes)
    clus = G.gsal({"image_id": ids}, 2, ctx=SelectContext(boxes=boxes, labeled_class_counts=np.array([3, 0]),
                                                            categories=cats), supercategory="clusters")
    assert clus.rationale[0]["gsal"]["path"][0].startswith("group")
    with pytest.raises(ValueError, match="clusters"):
        G.gsal({"image_id": ids}, 1, ctx=ctx, supercategory="metadata")
    cov = G.gsal({"image_id": ids}, 2, ctx=ctx, difficulty=False)
    assert cov.rationale[0]["gsal"]["dominant"] == "coverage"
    bad = dict(boxes, gsal_d=np.array([np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        G.gsal({"image_id": ids}, 1, ctx=SelectContext(boxes=bad))
    with pytest.raises(ValueError, match="gsal_v"):
        G.gsal({"image_id": ids}, 1, ctx=SelectContext(boxes={k: v for k, v in boxes.items() if k != "gsal_v"}))
    with pytest.raises(ValueError, match="shift"):
        G.gsal({"image_id": ids}, 1, ctx=ctx, shift="abs")
    with pytest.raises(ValueError, match="at least one"):
        G.gsal({"image_id": ids}, 1, ctx=ctx, prior=False, difficulty=False)


def test_report_reads_gsal_rationales_as_a_sentence_and_a_tree():
    from poolscout.engine.evaluation import report as R

    rat = {"gsal": {"path": ["<metal>", 3, "3/1"], "mass": [12.0, 4.0, 0.5], "g": 2.5, "prior": 0.25,
                    "score": 0.625, "box": 0, "dominant": "coverage", "rank": 1}}
    text = R.rationale_sentence(rat, 1, 0.625)
    assert text.startswith("rank 1: gsal picked it for its box 0 in <metal> (12 labeled) > class 3 (4) > cluster 3/1")
    assert "difficulty 2.50 x coverage prior 0.25 = 0.625" in text and "few labels cover" in text
    none = R.rationale_sentence({"gsal": {"path": None, "dominant": "none", "rank": 9}}, 9, None)
    assert "without predicted boxes" in none
    sel = [{"image_id": 1, "rank": 1, "rationale": json.dumps(rat)},
           {"image_id": 2, "rank": 2, "rationale": json.dumps({"gsal": dict(rat["gsal"], path=["<metal>", 3, "3/0"],
                                                                           dominant="difficulty")})},
           {"image_id": 3, "rank": 3, "rationale": json.dumps({"entropy": 1})}]
    ct = R.concept_tree(sel)
    assert ct["tree"] == {"<metal>": {"3": {"3/1": 1, "3/0": 1}}}
    assert ct["dominant"] == {"coverage": 1, "difficulty": 1}
    html = R._concept_tree_html(sel)
    assert "&lt;metal&gt;: 2 picks" in html and "<metal>" not in html and "cluster 3/1: 1 pick<" in html
    assert R.concept_tree(sel[2:]) == {} and R._concept_tree_html(sel[2:]) == ""


def test_supercategories_from_the_dataset_config_or_hidden():
    from poolscout.engine.core.config import ConfigError, load_config
    from poolscout.jobs.query import categories_for_selectors

    cats = [{"id": 1, "name": "scratch", "supercategory": "defect"}, {"id": 2, "name": "hairline",
                                                                        "supercategory": "subtle"}]
    base = ["dataset.classes=[scratch,hairline]"]
    assert categories_for_selectors(cats, load_config([], base).dataset) == cats
    cfg = load_config([], [*base, "dataset.supercategories=[line,line]"])
    assert [c["supercategory"] for c in categories_for_selectors(cats, cfg.dataset)] == ["line", "line"]
    hidden = categories_for_selectors(cats, load_config([], [*base, "dataset.use_supercategories=false"]).dataset)
    assert hidden == [{"id": 1, "name": "scratch"}, {"id": 2, "name": "hairline"}]
    with pytest.raises(ConfigError, match="dataset.supercategories"):
        load_config([], [*base, "dataset.supercategories=[line]"])
