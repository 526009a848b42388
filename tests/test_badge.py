"""BADGE: gradient embeddings and k-means++ by hand, factorised = materialised outer products,
errors, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
from poolscout.engine.methods import badge  # noqa: F401  (registers the selector)
from poolscout.engine.methods.badge import factorised_d2, image_factors, kmeanspp


class FixedU:
    """A stand-in rng whose uniform draws are all `u` (the seeding only calls .random())."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


def _hand_boxes():
    # C = 2 classes (+ background, column 0), d = 2. Four images:
    # image 0: box 0 p = [0, 1, 0] -> a = 0 (|g| = 0); box 1 p = [.5, .25, .25], yhat = 0,
    #          a = [-.5, .25, .25], |a|^2 = .375, h = [2, 0], |h|^2 = 4 -> |g|^2 = 1.5: box 1 represents it
    # image 1: p = [.25, .5, .25], yhat = 1, a = [.25, -.5, .25], |a|^2 = .375, h = [0, 1] -> |g|^2 = .375
    # image 2: no boxes -> g = 0
    # image 3: the same box as image 0's box 1 -> |g|^2 = 1.5, g_3 = g_0
    probs = np.array([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25]], np.float32)
    roi = np.array([[5.0, 5.0], [2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], np.float32)
    return {"image_id": np.array([10, 11, 12, 13], np.int64), "offsets": np.array([0, 2, 3, 3, 4], np.int64),
            "probs": probs, "roi_embedding": roi, "scores": np.ones(4, np.float32),
            "labels": np.array([1, 1, 1, 1], np.int64)}


def _run(boxes, budget, rng):
    table = {"image_id": boxes["image_id"]}
    return SELECTORS.get("badge")(table, budget, ctx=SelectContext(rng=rng, boxes=boxes))


def test_kmeanspp_by_hand():
    # first centre: the largest |g|^2 = 1.5, images 0 and 3 tie -> lowest row 0 (D = |g_0| = sqrt 1.5)
    # D^2 to g_0: image 1: 1.5 + .375 - 2 (a0.a1)(h0.h1) = 1.875 (h0.h1 = 0);
    #             image 2: |g_0|^2 = 1.5;   image 3: 1.5 + 1.5 - 2 (.375)(4) = 0
    # cumulative weights [0, 1.875, 3.375, 3.375]: u * 3.375 < 1.875 -> image 1, else image 2
    # u = 0: image 1 (D^2 1.875); then image 2's D^2 = min(1.5, |g_1|^2 = .375), image 3's 0
    #   -> image 2 (D = sqrt .375); then only image 3 is left, D^2 = 0: the lowest remaining row.
    # u = .9: image 2 (D^2 1.5); then image 1's D^2 = min(1.875, .375) -> image 1, then image 3.
    b = _hand_boxes()
    sel = _run(b, 4, FixedU(0.0))
    assert sel.image_id.tolist() == [10, 11, 12, 13]
    assert sel.score == pytest.approx([math.sqrt(1.5), math.sqrt(1.875), math.sqrt(0.375), 0.0])
    r = [q["badge"] for q in sel.rationale]
    assert [q["box"] for q in r] == [1, 0, None, 0]
    assert [q["norm"] for q in r] == pytest.approx([math.sqrt(1.5), math.sqrt(0.375), 0.0, math.sqrt(1.5)])
    assert [q["distance"] for q in r] == pytest.approx(sel.score.tolist())
    assert [q["rank"] for q in r] == [1, 2, 3, 4]
    sel = _run(b, 4, FixedU(0.9))
    assert sel.image_id.tolist() == [10, 12, 11, 13]
    assert sel.score == pytest.approx([math.sqrt(1.5), math.sqrt(1.5), math.sqrt(0.375), 0.0])
    assert _run(b, 1, FixedU(0.5)).image_id.tolist() == [10]


def _random_boxes(rng, n=40, c=4, d=6):
    counts = rng.integers(0, 4, n)
    counts[[0, 5]] = 0
    off = np.zeros(n + 1, np.int64)
    off[1:] = np.cumsum(counts)
    m = int(off[-1])
    logits = rng.standard_normal((m, c + 1)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    roi = rng.standard_normal((m, d))
    return {"image_id": np.arange(1000, 1000 + n, dtype=np.int64), "offsets": off,
            "probs": probs.astype(np.float32), "roi_embedding": roi.astype(np.float32)}


def _materialised(b):
    """Per image, the explicit g = (p - onehot(argmax p)) outer h of its box with the largest |g|."""
    off, n = b["offsets"], len(b["offsets"]) - 1
    c1, d = b["probs"].shape[1], b["roi_embedding"].shape[1]
    G = np.zeros((n, c1 * d))
    for i in range(n):
        best = -1.0
        for j in range(off[i], off[i + 1]):
            p = b["probs"][j].astype(np.float64)
            a = p - np.eye(c1)[np.argmax(p)]
            g = np.outer(a, b["roi_embedding"][j].astype(np.float64)).ravel()
            if np.linalg.norm(g) > best:
                best, G[i] = np.linalg.norm(g), g
    return G


def _reference_seeding(G, k, rng):
    """k-means++ on explicit vectors: first the largest norm, then D^2 sampling (same draws)."""
    def d2(j):
        return ((G - G[j]) ** 2).sum(1)

    rows = [int(np.argmax((G * G).sum(1)))]
    dmin = d2(rows[0])
    while len(rows) < k:
        w = dmin.copy()
        w[rows] = 0.0
        cdf = np.cumsum(w)
        j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        rows.append(j)
        dmin = np.minimum(dmin, d2(j))
    return rows


def test_factorised_distance_equals_materialised_outer_products():
    rng = np.random.default_rng(0)
    b = _random_boxes(rng)
    A, H, box = image_factors(b["offsets"], b["probs"], b["roi_embedding"])
    G = _materialised(b)
    np.testing.assert_allclose(np.einsum("ic,id->icd", A, H).reshape(len(A), -1), G, atol=1e-12)
    assert box[0] == -1 and box[5] == -1 and not A[0].any() and not H[5].any()
    sq = (A * A).sum(1) * (H * H).sum(1)
    for j in (1, 7, 0, 23):
        np.testing.assert_allclose(factorised_d2(A, H, sq, j), ((G - G[j]) ** 2).sum(1), rtol=1e-9, atol=1e-9)
    for seed in range(3):
        rows, d2 = kmeanspp(A, H, 12, np.random.default_rng(seed))
        assert rows.tolist() == _reference_seeding(G, 12, np.random.default_rng(seed))
        assert len(set(rows.tolist())) == 12 and d2[0] == pytest.approx((G[rows[0]] ** 2).sum())
    # offsets need not start at 0 (a slice of a bigger batch): rows offsets[0]:offsets[-1] are used
    pad = {k: np.concatenate([np.zeros((3,) + v.shape[1:], v.dtype), v]) for k, v in b.items()
           if k in ("probs", "roi_embedding")}
    A2, H2, box2 = image_factors(b["offsets"] + 3, pad["probs"], pad["roi_embedding"])
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(H2, H)
    np.testing.assert_array_equal(box2, box)


def test_selector_determinism_and_strategy_file():
    from poolscout.engine.acquisition.strategies import load_strategy, select
    from poolscout.engine.models import predictions as P

    b = _random_boxes(np.random.default_rng(1), n=60)
    a1 = _run(b, 10, np.random.default_rng(5))
    a2 = _run(b, 10, np.random.default_rng(5))
    assert a1.image_id.tolist() == a2.image_id.tolist() and a1.rationale == a2.rationale
    assert len(set(a1.image_id.tolist())) == 10
    G = _materialised(b)
    assert a1.image_id[0] - 1000 == int(np.argmax((G * G).sum(1)))
    st = load_strategy("badge")
    assert st.needs.boxes and not st.needs.embedding
    ids = b["image_id"]

    def loader(want):
        return P.take_rows(b, np.searchsorted(ids, want))

    sel = select(st, {"image_id": ids}, 10, ctx=SelectContext(rng=np.random.default_rng(5), boxes_loader=loader))
    assert sel.image_id.tolist() == a1.image_id.tolist()
    # the budget beyond the pool: every image, the box-less ones last (D = 0)
    few = P.take_rows(b, np.arange(6))
    sel = _run(few, 10, np.random.default_rng(0))
    assert sorted(sel.image_id.tolist()) == list(range(1000, 1006))
    assert sel.score[-1] == 0.0


def test_bad_inputs():
    b = _hand_boxes()
    fn = SELECTORS.get("badge")
    table = {"image_id": b["image_id"]}
    with pytest.raises(ValueError, match="ctx.boxes is None"):
        fn(table, 2, ctx=SelectContext())
    with pytest.raises(ValueError, match="differ"):
        fn({"image_id": b["image_id"][::-1].copy()}, 2, ctx=SelectContext(boxes=b))
    with pytest.raises(ValueError, match="roi_embedding.*store_roi_embeddings"):
        fn(table, 2, ctx=SelectContext(boxes={k: v for k, v in b.items() if k != "roi_embedding"}))
    with pytest.raises(ValueError, match="probs"):
        fn(table, 2, ctx=SelectContext(boxes={**b, "probs": None}))
    with pytest.raises(ValueError, match="offsets"):
        fn(table, 2, ctx=SelectContext(boxes={**b, "offsets": np.array([0, 2, 3, 4])}))
    with pytest.raises(ValueError, match="same rows"):
        fn(table, 2, ctx=SelectContext(boxes={**b, "roi_embedding": b["roi_embedding"][:, None, :]}))
    with pytest.raises(ValueError, match="budget"):
        fn(table, 0, ctx=SelectContext(boxes=b))
