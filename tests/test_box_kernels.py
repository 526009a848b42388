"""kernels/boxes.py: Numba kernels against their NumPy twins, hand cases and edge cases."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolscout.kernels import boxes as K


def test_hand_cases():
    a = np.array([[0, 0, 2, 2]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], float)
    # overlap 1, union 4 + 4 - 1 = 7; identical -> 1; disjoint -> 0
    assert K.pairwise_iou(a, b) == pytest.approx(np.array([[1 / 7, 1.0, 0.0]]))
    # GIoU: hull of a and b[0] is 3x3 = 9 -> 1/7 - (9 - 7)/9; a vs b[2]: hull 6x6 = 36, union 5
    assert K.pairwise_giou(a, b) == pytest.approx(np.array([[1 / 7 - 2 / 9, 1.0, 0 - 31 / 36]]))
    # degenerate boxes: zero union -> 0, zero hull -> GIoU = IoU
    d = np.array([[1, 1, 1, 1]], float)
    assert K.pairwise_iou(d, d)[0, 0] == 0.0 and K.pairwise_giou(d, d)[0, 0] == 0.0


def test_ragged_matching_hand_case():
    pred = np.array([[0, 0, 2, 2], [10, 10, 12, 12], [0, 0, 1, 1]], float)
    ref = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [10, 10, 12, 12]], float)
    # image 0: preds 0, 1 vs refs 0, 1; image 1: pred 2 vs no refs; image 2: no preds vs ref 2
    po, ro = np.array([0, 2, 3, 3]), np.array([0, 2, 2, 3])
    best, idx = K.ragged_max_iou(pred, po, ref, ro)
    assert best == pytest.approx([1.0, 0.0, 0.0]) and idx.tolist() == [1, 0, -1]
    # per class: pred 0 (class 1) may only match ref 0 (class 1)
    best, idx = K.ragged_max_iou(pred, po, ref, ro, np.array([1, 2, 1]), np.array([1, 2, 2]))
    # pred 1 (class 2) has an eligible ref (1) that does not overlap: IoU 0, index kept
    assert best == pytest.approx([1 / 7, 0.0, 0.0]) and idx.tolist() == [0, 1, -1]


def test_no_boxes_anywhere():
    z = np.zeros((0, 4))
    best, idx = K.ragged_max_iou(z, [0, 0], z, [0, 0])
    assert best.shape == (0,) and idx.shape == (0,)
    assert K.pairwise_iou(z, np.ones((3, 4))).shape == (0, 3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="pred_boxes: box 1 has a NaN"):
        K.ragged_max_iou(np.array([[0, 0, 1, 1], [np.nan, 0, 1, 1]]), [0, 2], np.zeros((0, 4)), [0, 0])
    with pytest.raises(ValueError, match="ref_offsets"):
        K.ragged_max_iou(np.zeros((1, 4)), [0, 1], np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="images"):
        K.ragged_max_iou(np.zeros((1, 4)), [0, 1], np.zeros((1, 4)), [0, 0, 1])
    with pytest.raises(ValueError, match="both"):
        K.ragged_max_iou(np.zeros((1, 4)), [0, 1], np.zeros((1, 4)), [0, 1], pred_labels=[1])
    with pytest.raises(ValueError, match="shape"):
        K.pairwise_iou(np.zeros((2, 3)), np.zeros((1, 4)))


coord = st.integers(0, 40).map(float)


@st.composite
def box_sets(draw, max_boxes=6):
    n = draw(st.integers(0, max_boxes))
    out = []
    for _ in range(n):
        x1, y1 = draw(coord), draw(coord)
        # widths may be 0 (degenerate) and boxes may repeat
        out.append([x1, y1, x1 + draw(st.integers(0, 20)), y1 + draw(st.integers(0, 20))])
    return np.array(out, float).reshape(-1, 4)


@settings(max_examples=150, deadline=None)
@given(box_sets(), box_sets())
def test_pairwise_matches_reference(a, b):
    np.testing.assert_allclose(K.pairwise_iou(a, b), K.pairwise_iou_ref(a, b), atol=1e-12)
    np.testing.assert_allclose(K.pairwise_giou(a, b), K.pairwise_giou_ref(a, b), atol=1e-12)
    iou = K.pairwise_iou(a, b)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
    np.testing.assert_allclose(iou, K.pairwise_iou(b, a).T, atol=1e-12)  # symmetric


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(box_sets(4), box_sets(4)), min_size=0, max_size=5), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_ragged_matches_reference(images, per_class, seed):
    rng = np.random.default_rng(seed)
    pred = np.concatenate([p for p, _ in images] or [np.zeros((0, 4))])
    ref = np.concatenate([r for _, r in images] or [np.zeros((0, 4))])
    po = np.concatenate([[0], np.cumsum([len(p) for p, _ in images])]).astype(np.int64)
    ro = np.concatenate([[0], np.cumsum([len(r) for _, r in images])]).astype(np.int64)
    labels = (rng.integers(1, 3, len(pred)), rng.integers(1, 3, len(ref))) if per_class else (None, None)
    got = K.ragged_max_iou(pred, po, ref, ro, *labels)
    want = K.ragged_max_iou_ref(pred, po, ref, ro, *labels)
    np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    np.testing.assert_array_equal(got[1], want[1])
