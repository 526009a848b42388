"""TypiClust: typicality by hand, one typical pick per cluster, largest uncovered first."""
from __future__ import annotations

import numpy as np
import pytest

from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
from poolscout.engine.methods.typiclust import typicality


def test_typicality_by_hand():
    x = np.array([[0.0], [1.0], [3.0]])
    assert typicality(x, 1) == pytest.approx([1.0, 1.0, 0.5])
    assert typicality(x, 2) == pytest.approx([1 / 2.0, 1 / 1.5, 1 / 2.5])
    assert typicality(x, 20) == pytest.approx(typicality(x, 2))  # k is capped at n - 1
    big = np.random.default_rng(0).standard_normal((2500, 3))  # rows in two chunks of 2048
    rows = [0, 2047, 2048, 2499]
    d = np.sqrt(((big[rows, None, :] - big[None, :, :]) ** 2).sum(-1))
    d[np.arange(4), rows] = np.inf
    brute = 1.0 / np.sort(d, axis=1)[:, :5].mean(axis=1)
    assert typicality(big, 5)[rows] == pytest.approx(brute, rel=1e-9)


def _clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    parts, label = [], []
    for c, (centre, size) in enumerate(zip(centres, (20, 12, 8))):
        pts = centre + rng.uniform(-1, 1, (size, 2))
        pts[0] = centre  # the cluster's most typical point
        parts.append(pts)
        label += [c] * size
    return np.concatenate(parts), np.asarray(label)


def _table(x):
    return {"image_id": np.arange(500, 500 + len(x), dtype=np.int64), "embedding": x.astype(np.float32)}


def test_one_typical_pick_per_cluster_largest_first():
    x, label = _clusters()
    fn = SELECTORS.get("typiclust")
    sel = fn(_table(x), 3, ctx=SelectContext(rng=np.random.default_rng(0)), max_clusters=3)
    rows = sel.image_id - 500
    assert label[rows].tolist() == [0, 1, 2]
    starts = [0, 20, 32]
    assert rows.tolist() == starts  # each cluster's centre point
    assert [r["typiclust"]["cluster_size"] for r in sel.rationale] == [20, 12, 8]


def test_labeled_images_cover_their_cluster():
    x, label = _clusters()
    fn = SELECTORS.get("typiclust")
    ctx = SelectContext(rng=np.random.default_rng(0), labeled_embedding=x[[1]].astype(np.float32))
    sel = fn(_table(x), 2, ctx=ctx, max_clusters=3)
    assert label[sel.image_id - 500].tolist() == [1, 2]


def test_more_picks_than_clusters_and_small_clusters_skipped():
    x, label = _clusters()
    fn = SELECTORS.get("typiclust")
    sel = fn(_table(x), 5, ctx=SelectContext(rng=np.random.default_rng(0)), max_clusters=3, min_cluster=10)
    assert len(set(sel.image_id.tolist())) == 5
    assert 2 not in label[sel.image_id - 500].tolist()  # the 8-point cluster is below min_cluster
    assert label[sel.image_id - 500].tolist()[:2] == [0, 1]
