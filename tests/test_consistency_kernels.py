"""kernels/consistency.py: Numba kernels against their NumPy twins, hand cases and edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolscout.kernels import consistency as K

LN2 = math.log(2.0)
ONE = np.array([0, 1])


# --- hand cases: view mapping ----------------------------------------------------------------
def test_identity_views_copy():
    b = np.array([[1, 2, 30, 40], [5, 5, 5, 5]], float)
    for view in ("orig", "cutout"):
        out = K.map_view_boxes(b, [0, 2], [100], [50], view)
        np.testing.assert_array_equal(out, b)
        assert out is not b
    # clipped to the image like every other view
    out = K.map_view_boxes(np.array([[-5, -5, 120, 70]], float), ONE, [100], [50], "orig")
    np.testing.assert_array_equal(out, [[0, 0, 100, 50]])


def test_hflip_hand_case():
    # W = 100: x -> 100 - x, so (10, 20, 30, 40) -> (70, 20, 90, 40)
    out = K.map_view_boxes(np.array([[10, 20, 30, 40]], float), ONE, [100], [80], "hflip")
    np.testing.assert_array_equal(out, [[70, 20, 90, 40]])
    np.testing.assert_array_equal(K.view_boxes_forward(out, ONE, [100], [80], "hflip"), [[10, 20, 30, 40]])


def test_resize_hand_case():
    # the view is the image scaled by 0.5 at the top-left: view box (10, 10, 20, 30) -> (20, 20, 40, 60)
    out = K.map_view_boxes(np.array([[10, 10, 20, 30]], float), ONE, [100], [100], "resize", 0.5)
    np.testing.assert_array_equal(out, [[20, 20, 40, 60]])
    fwd = K.view_boxes_forward(np.array([[20, 20, 40, 60]], float), ONE, [100], [100], "resize", 0.5)
    np.testing.assert_array_equal(fwd, [[10, 10, 20, 30]])
    # mapped back beyond the image -> clipped
    out = K.map_view_boxes(np.array([[60, 0, 90, 10]], float), ONE, [100], [100], "resize", 0.8)
    np.testing.assert_allclose(out, [[75, 0, 100, 12.5]], atol=1e-12)


def test_rotate_hand_cases():
    # a 20 x 20 square at the centre of a 100 x 100 image turned by 45 degrees: its corners
    # lie on the axes at distance 10 sqrt(2) from (50, 50), so the enclosing box has
    # half-width 10 sqrt(2) about (50, 50), in both directions
    h = 10 * math.sqrt(2)
    want = [[50 - h, 50 - h, 50 + h, 50 + h]]
    sq = np.array([[40, 40, 60, 60]], float)
    np.testing.assert_allclose(K.view_boxes_forward(sq, ONE, [100], [100], "rotate", 45), want, atol=1e-12)
    np.testing.assert_allclose(K.map_view_boxes(sq, ONE, [100], [100], "rotate", 45), want, atol=1e-12)
    # direction: 90 degrees counter-clockwise as displayed (y down) takes the right of the
    # centre to the top: (x, y) -> (cx + (y - cy), cy - (x - cx)); (80..90, 45..55) -> (45..55, 10..20)
    right = np.array([[80, 45, 90, 55]], float)
    top = np.array([[45, 10, 55, 20]], float)
    np.testing.assert_allclose(K.view_boxes_forward(right, ONE, [100], [100], "rotate", 90), top, atol=1e-12)
    np.testing.assert_allclose(K.map_view_boxes(top, ONE, [100], [100], "rotate", 90), right, atol=1e-12)
    # non-square canvas, 180 degrees: a point reflection through (W/2, H/2) = (60, 20)
    b = np.array([[10, 5, 30, 15]], float)
    np.testing.assert_allclose(K.map_view_boxes(b, ONE, [120], [40], "rotate", 180), [[90, 25, 110, 35]],
                               atol=1e-12)
    # 30 degrees: the enclosing box agrees with the centre / half-extent formula
    t = math.radians(30)
    hw = 15 * abs(math.cos(t)) + 5 * abs(math.sin(t))
    hh = 15 * abs(math.sin(t)) + 5 * abs(math.cos(t))
    np.testing.assert_allclose(K.view_boxes_forward(np.array([[35, 45, 65, 55]], float), ONE, [100], [100],
                                                    "rotate", 30), [[50 - hw, 50 - hh, 50 + hw, 50 + hh]],
                               atol=1e-12)


def test_rotate_zero_is_identity():
    b = np.array([[3.5, 7.25, 40.1, 33.3], [0, 0, 64, 48], [10, 10, 10, 10]], float)
    for f in (K.map_view_boxes, K.view_boxes_forward):
        np.testing.assert_allclose(f(b, [0, 3], [64], [48], "rotate", 0.0), b, atol=1e-12)
        np.testing.assert_allclose(f(b, [0, 3], [64], [48], "rotate", 360.0), b, atol=1e-9)


def test_rotate_matches_pil():
    """view_boxes_forward follows the image transform of the rotate view (PIL, about the centre)."""
    Image = pytest.importorskip("PIL.Image")
    w, h, box = 64, 48, (20, 14, 44, 30)
    img = np.zeros((h, w), np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = 255
    for angle in (30.0, -20.0, 90.0):
        rot = np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BILINEAR, center=(w / 2, h / 2)))
        ys, xs = np.nonzero(rot > 127)
        seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        want = K.view_boxes_forward(np.array([box], float), ONE, [w], [h], "rotate", angle)[0]
        np.testing.assert_allclose(seen, want, atol=2.0)


def test_ragged_views_use_each_image_size_and_skip_foreign_rows():
    # rows 0 and 4 belong to no image (offsets start at 1 and end at 4): copied unchanged
    b = np.array([[1, 1, 2, 2], [10, 0, 20, 5], [10, 0, 20, 5], [0, 0, 1, 1], [-7, 3, 900, 4]], float)
    off = [1, 2, 2, 4]  # image 1 has no boxes
    out = K.map_view_boxes(b, off, [100, 50, 40], [10, 10, 10], "hflip")
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [80, 0, 90, 5], [20, 0, 30, 5], [39, 0, 40, 1],
                                        [-7, 3, 900, 4]])
    np.testing.assert_array_equal(out, K.map_view_boxes_ref(b, off, [100, 50, 40], [10, 10, 10], "hflip"))
    assert K.map_view_boxes(np.zeros((0, 4)), [0, 0, 0], [5, 5], [5, 5], "rotate", 10).shape == (0, 4)


# --- hand cases: distributions -----------------------------------------------------------------
def test_bhattacharyya_hand_cases():
    p = np.array([[0.2, 0.3, 0.5], [1, 0, 0], [0.5, 0.5, 0]])
    q = np.array([[0.2, 0.3, 0.5], [0, 0.4, 0.6], [1, 0, 0]])
    bc, dist = K.bhattacharyya(p, q)
    # identical -> 1, 0; disjoint supports -> 0, 1; sqrt(0.5 * 1) = sqrt(0.5)
    np.testing.assert_allclose(bc, [1, 0, math.sqrt(0.5)], atol=1e-12)
    np.testing.assert_allclose(dist, [0, 1, math.sqrt(1 - math.sqrt(0.5))], atol=1e-12)
    assert bc.dtype == np.float64 and dist.dtype == np.float64


def test_js_hand_cases():
    p = np.array([[0.2, 0.3, 0.5], [1, 0, 0], [0.5, 0.5, 0]])
    q = np.array([[0.2, 0.3, 0.5], [0, 1, 0], [1, 0, 0]])
    # (0.5, 0.5) vs (1, 0): m = (0.75, 0.25);
    # KL(p||m) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3); KL(q||m) = ln(1/0.75) = ln(4/3)
    # JS = 0.5 (0.5 ln(4/3) + ln(4/3)) = 0.75 ln(4/3) ~= 0.21576
    np.testing.assert_allclose(K.js_divergence(p, q), [0, LN2, 0.75 * math.log(4 / 3)], atol=1e-12)
    np.testing.assert_allclose(K.js_divergence(q, p), [0, LN2, 0.75 * math.log(4 / 3)], atol=1e-12)


def test_entropy_hand_cases():
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(K.entropy(p), [math.log(4), 0, LN2], atol=1e-12)
    for k in (1, 2, 7, 81):
        np.testing.assert_allclose(K.entropy(np.full((3, k), 1.0 / k)), math.log(k), atol=1e-12)
    assert K.entropy(np.zeros((0, 5))).shape == (0,)
    assert K.js_divergence(np.zeros((0, 5)), np.zeros((0, 5))).shape == (0,)
    assert K.bhattacharyya(np.zeros((0, 5)), np.zeros((0, 5)))[0].shape == (0,)


# --- hand cases: overlap ratio -----------------------------------------------------------------
def test_overlap_ratio_hand_cases():
    boxes = np.array([
        [0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60],  # image 0
        [0, 0, 10, 10], [0, 0, 10, 10],  # image 1: one kept box
        [3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 3],  # image 2: identical degenerate boxes
        [0, 0, 10, 10], [0, 0, 10, 5],  # image 4: IoU exactly 0.5, not > 0.5
    ], float)
    scores = np.array([0.9, 0.5, 0.05, 0.9, 0.9, 0.01, 1, 1, 1, 1, 1])
    off = [0, 4, 6, 9, 9, 11]  # image 3 has no boxes
    # image 0: 4 kept boxes, 6 pairs; (0,1) IoU 1, (0,2) and (1,2) IoU 90/110 > 0.5 -> 3/6
    want = [0.5, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(K.overlap_ratio(boxes, scores, off), want, atol=1e-12)
    np.testing.assert_allclose(K.overlap_ratio_ref(boxes, scores, off), want, atol=1e-12)
    # a higher score threshold keeps boxes 0 and 3 of image 0 only: no overlapping pair
    np.testing.assert_allclose(K.overlap_ratio(boxes, scores, off, score_thresh=0.6), [0.0] * 5, atol=1e-12)
    # IoU 0.5 counts for a lower IoU threshold
    assert K.overlap_ratio(boxes, scores, off, iou_thresh=0.4)[4] == 1.0
    assert K.overlap_ratio(np.zeros((0, 4)), np.zeros(0), [0]).shape == (0,)


# --- input validation ----------------------------------------------------------------------
def test_bad_input_is_named():
    b = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [np.nan, 0, 1, 1]])
    with pytest.raises(ValueError, match="boxes: box 2 has a NaN or infinite coordinate"):
        K.map_view_boxes(b, [0, 3], [5], [5], "hflip")
    with pytest.raises(ValueError, match="boxes: box 2 has a NaN or infinite coordinate"):
        K.overlap_ratio(b, np.ones(3), [0, 3])
    with pytest.raises(ValueError, match="scores row 1 is not finite"):
        K.overlap_ratio(np.zeros((2, 4)), [1.0, np.inf], [0, 2])
    p = np.full((4, 3), 1 / 3)
    q = p.copy()
    q[3, 1] = np.inf
    with pytest.raises(ValueError, match="q row 3 is not finite"):
        K.js_divergence(p, q)
    with pytest.raises(ValueError, match="q row 3 is not finite"):
        K.bhattacharyya(p, q)
    with pytest.raises(ValueError, match="p row 3 is not finite"):
        K.entropy(q)
    with pytest.raises(ValueError, match="p row 0 has a negative entry"):
        K.entropy([[-0.1, 1.1]])
    with pytest.raises(ValueError, match="widths row 0 is not finite"):
        K.map_view_boxes(np.zeros((1, 4)), [0, 1], [np.nan], [5], "orig")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="p and q"):
        K.bhattacharyya(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="p and q"):
        K.js_divergence(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"p must have shape \(M, K\)"):
        K.entropy(np.ones(3))
    with pytest.raises(ValueError, match=r"boxes must have shape \(M, 4\)"):
        K.map_view_boxes(np.zeros((2, 3)), [0, 2], [5], [5], "orig")
    with pytest.raises(ValueError, match="widths has 1 entries but offsets describe 2 images"):
        K.map_view_boxes(np.zeros((2, 4)), [0, 1, 2], [5], [5, 5], "orig")
    with pytest.raises(ValueError, match="heights row 1 must be > 0"):
        K.view_boxes_forward(np.zeros((2, 4)), [0, 1, 2], [5, 5], [5, 0], "orig")
    with pytest.raises(ValueError, match="offsets"):
        K.map_view_boxes(np.zeros((2, 4)), [0, 3], [5], [5], "orig")
    with pytest.raises(ValueError, match="offsets"):
        K.overlap_ratio(np.zeros((2, 4)), np.ones(2), [0, 2, 1])
    with pytest.raises(ValueError, match="scores has 3 entries but boxes has 2 rows"):
        K.overlap_ratio(np.zeros((2, 4)), np.ones(3), [0, 2])


def test_bad_view_and_param():
    with pytest.raises(ValueError, match="unknown view 'shear'.*orig, hflip, cutout, resize, rotate"):
        K.map_view_boxes(np.zeros((1, 4)), ONE, [5], [5], "shear")
    with pytest.raises(ValueError, match="resize.*> 0"):
        K.map_view_boxes(np.zeros((1, 4)), ONE, [5], [5], "resize", 0.0)
    with pytest.raises(ValueError, match="finite param"):
        K.view_boxes_forward(np.zeros((1, 4)), ONE, [5], [5], "rotate", np.nan)


# --- property tests against the reference twins ----------------------------------------------
@st.composite
def ragged_boxes(draw, max_images=5, max_boxes=6):
    """(boxes, offsets, widths, heights) with empty images, degenerate, repeated and
    out-of-image boxes, and optionally foreign rows before offsets[0] and after offsets[-1]."""
    n = draw(st.integers(0, max_images))
    sizes = [(float(draw(st.integers(1, 80))), float(draw(st.integers(1, 80)))) for _ in range(n)]
    rows, counts = [], []
    lead, tail = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    coord = st.floats(-20, 100, allow_nan=False, width=32)
    for _ in range(lead + tail):
        rows.append([0.0, 0.0, 1.0, 1.0])
    body = []
    for _ in range(n):
        k = draw(st.integers(0, max_boxes))
        counts.append(k)
        for _ in range(k):
            if body and draw(st.integers(0, 4)) == 0:
                body.append(list(body[-1]))  # identical to the previous box
                continue
            x1, y1 = draw(coord), draw(coord)
            w = draw(st.just(0.0) | st.floats(0, 60, width=32))  # degenerate often
            h = draw(st.just(0.0) | st.floats(0, 60, width=32))
            body.append([x1, y1, x1 + w, y1 + h])
    rows = rows[:lead] + body + rows[lead:]
    boxes = np.array(rows, float).reshape(-1, 4)
    off = lead + np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    w = np.array([s[0] for s in sizes], float)
    h = np.array([s[1] for s in sizes], float)
    return boxes, off, w, h


views = st.sampled_from(["orig", "cutout", "hflip", "resize", "rotate"])


def _param(view, data):
    if view == "resize":
        return data.draw(st.floats(0.05, 2.0))
    if view == "rotate":
        return data.draw(st.floats(-360, 360) | st.sampled_from([0.0, 90.0, 180.0, -90.0]))
    return 0.0


@settings(max_examples=200, deadline=None)
@given(ragged_boxes(), views, st.data())
def test_view_mapping_matches_reference(batch, view, data):
    boxes, off, w, h = batch
    param = _param(view, data)
    for f, ref in ((K.map_view_boxes, K.map_view_boxes_ref), (K.view_boxes_forward, K.view_boxes_forward_ref)):
        got = f(boxes, off, w, h, view, param)
        np.testing.assert_allclose(got, ref(boxes, off, w, h, view, param), atol=1e-9)
        assert got.shape == boxes.shape and got.dtype == np.float64
        # inside each image
        img = np.repeat(np.arange(len(off) - 1), np.diff(off))
        g = got[off[0]:off[-1]]
        assert np.all(g >= 0) and np.all(g[:, 0::2] <= w[img, None]) and np.all(g[:, 1::2] <= h[img, None])
        # foreign rows untouched
        np.testing.assert_array_equal(got[:off[0]], boxes[:off[0]])
        np.testing.assert_array_equal(got[off[-1]:], boxes[off[-1]:])


@st.composite
def inside_boxes(draw):
    """One image with integer boxes inside it (possibly degenerate)."""
    w, h = float(draw(st.integers(1, 200))), float(draw(st.integers(1, 200)))
    k = draw(st.integers(0, 6))
    out = []
    for _ in range(k):
        x1, x2 = sorted([draw(st.integers(0, int(w))), draw(st.integers(0, int(w)))])
        y1, y2 = sorted([draw(st.integers(0, int(h))), draw(st.integers(0, int(h)))])
        out.append([x1, y1, x2, y2])
    return np.array(out, float).reshape(-1, 4), np.array([0, k]), np.array([w]), np.array([h])


@settings(max_examples=100, deadline=None)
@given(inside_boxes(), st.sampled_from([1.0, 0.5, 0.25, 0.75, 0.8, 0.3]))
def test_hflip_and_resize_round_trip(batch, factor):
    boxes, off, w, h = batch
    # hflip of integer coordinates is exact both ways
    there = K.view_boxes_forward(boxes, off, w, h, "hflip")
    np.testing.assert_array_equal(K.map_view_boxes(there, off, w, h, "hflip"), boxes)
    np.testing.assert_array_equal(K.view_boxes_forward(K.map_view_boxes(boxes, off, w, h, "hflip"), off, w, h,
                                                       "hflip"), boxes)
    # a factor <= 1 keeps the scaled boxes on the canvas; x * f / f is x up to one rounding
    back = K.map_view_boxes(K.view_boxes_forward(boxes, off, w, h, "resize", factor), off, w, h, "resize", factor)
    np.testing.assert_allclose(back, boxes, rtol=1e-15, atol=0)
    if factor in (1.0, 0.5, 0.25):  # powers of two: exact
        np.testing.assert_array_equal(back, boxes)


@settings(max_examples=150, deadline=None)
@given(st.integers(4, 200), st.integers(4, 200), st.lists(st.floats(0, 1), min_size=4, max_size=4),
       st.floats(-720, 720))
def test_rotate_round_trip_contains_original(w, h, u, angle):
    # corners within the disc of radius r = min(W, H) / (2 sqrt 2) about the centre: the
    # forward enclosing box (corners within r sqrt 2 = min(W, H) / 2) is never clipped
    r = min(w, h) / (2 * math.sqrt(2)) * (1 - 1e-9)
    a = r / math.sqrt(2)  # a square of half-side a fits in that disc
    xs = sorted([w / 2 - a + 2 * a * u[0], w / 2 - a + 2 * a * u[1]])
    ys = sorted([h / 2 - a + 2 * a * u[2], h / 2 - a + 2 * a * u[3]])
    box = np.array([[xs[0], ys[0], xs[1], ys[1]]])
    W, H = np.array([w], float), np.array([h], float)
    there = K.view_boxes_forward(box, ONE, W, H, "rotate", angle)
    assert np.all(there[:, :2] > 0) and np.all(there[:, 2] < w) and np.all(there[:, 3] < h)
    back = K.map_view_boxes(there, ONE, W, H, "rotate", angle)
    eps = 1e-9
    assert back[0, 0] <= box[0, 0] + eps and back[0, 1] <= box[0, 1] + eps
    assert back[0, 2] >= box[0, 2] - eps and back[0, 3] >= box[0, 3] - eps
    # the centre of the box survives the round trip
    np.testing.assert_allclose((back[0, :2] + back[0, 2:]) / 2, (box[0, :2] + box[0, 2:]) / 2, atol=1e-9)


@st.composite
def prob_pairs(draw, max_rows=8, max_k=12):
    """Paired (M, K) distributions with sparse supports, one-hot and identical rows."""
    m, k = draw(st.integers(0, max_rows)), draw(st.integers(1, max_k))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))

    def rows():
        x = rng.gamma(rng.choice([0.1, 1.0, 5.0]), size=(m, k))
        x *= rng.random((m, k)) > draw(st.sampled_from([0.0, 0.3, 0.7]))  # zero out some classes
        one_hot = rng.random(m) < 0.15
        x[one_hot] = np.eye(k)[rng.integers(0, k, one_hot.sum())]
        x[x.sum(1) == 0, 0] = 1.0
        return x / x.sum(1, keepdims=True)

    p, q = rows(), rows()
    same = rng.random(m) < 0.2
    q[same] = p[same]
    return p, q


@settings(max_examples=200, deadline=None)
@given(prob_pairs())
def test_distributions_match_reference(pq):
    p, q = pq
    bc, dist = K.bhattacharyya(p, q)
    bc_r, dist_r = K.bhattacharyya_ref(p, q)
    np.testing.assert_allclose(bc, bc_r, atol=1e-12)
    np.testing.assert_allclose(dist, dist_r, atol=1e-7)  # sqrt near bc = 1 amplifies rounding
    js = K.js_divergence(p, q)
    np.testing.assert_allclose(js, K.js_divergence_ref(p, q), atol=1e-12)
    for x in (p, q):
        np.testing.assert_allclose(K.entropy(x), K.entropy_ref(x), atol=1e-12)
    # invariants
    assert np.all((bc >= 0) & (bc <= 1)) and np.all((dist >= 0) & (dist <= 1))
    np.testing.assert_allclose(bc, K.bhattacharyya(q, p)[0], atol=1e-12)
    assert np.all((js >= 0) & (js <= LN2))
    np.testing.assert_allclose(js, K.js_divergence(q, p), atol=1e-12)
    h = K.entropy(p)
    assert np.all(h >= -1e-12) and np.all(h <= math.log(p.shape[1]) + 1e-12)
    same = (p == q).all(1)
    np.testing.assert_allclose(js[same], 0.0, atol=1e-12)
    np.testing.assert_allclose(bc[same], 1.0, atol=1e-12)
    disjoint = ((p > 0) & (q > 0)).sum(1) == 0
    np.testing.assert_allclose(js[disjoint], LN2, atol=1e-12)
    np.testing.assert_array_equal(dist[disjoint], 1.0)


@settings(max_examples=200, deadline=None)
@given(ragged_boxes(), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.05, 0.5]),
       st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_overlap_ratio_matches_reference(batch, seed, score_thresh, iou_thresh):
    boxes, off, _, _ = batch
    rng = np.random.default_rng(seed)
    scores = rng.choice([0.0, 0.05, 0.3, 1.0], size=len(boxes))
    got = K.overlap_ratio(boxes, scores, off, score_thresh, iou_thresh)
    np.testing.assert_allclose(got, K.overlap_ratio_ref(boxes, scores, off, score_thresh, iou_thresh), atol=1e-12)
    assert got.shape == (len(off) - 1,) and np.all((got >= 0) & (got <= 1))
    for i in range(len(off) - 1):
        if np.count_nonzero(scores[off[i]:off[i + 1]] >= score_thresh) < 2:
            assert got[i] == 0.0
