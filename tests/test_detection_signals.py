"""Reference tests of the detection acquisition methods (docs/methods.md §1-3) on small
hand-made cases whose answers are computed by hand in the comments."""
from __future__ import annotations

import math

import numpy as np
import pytest

from poolscout.engine.acquisition import signals as S
from poolscout.engine.methods import bald as BALD
from poolscout.engine.methods import uncertainty as U
from poolscout.engine.acquisition import strategies as St
from poolscout.engine.methods.cald import cald_rerank, class_max_scores, view_consistency
from poolscout.engine.methods.huale import category_diversity, localization_uncertainty, overlap, semantic_affinity, weighted_l2
from poolscout.engine.acquisition.selectors import SelectContext

LN2 = math.log(2.0)


def _batch(views: dict[str, tuple[list, list, list, list]], n: int) -> dict[str, np.ndarray]:
    """views: name -> (per-image box lists, per-image prob lists, per-image score lists, counts)."""
    b: dict[str, np.ndarray] = {"image_id": np.arange(n, dtype=np.int64)}
    for v, (boxes, probs, scores, counts) in views.items():
        p = "" if v == "orig" else f"{v}_"
        off = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=off[1:])
        b[p + "offsets"] = off
        b[p + "boxes"] = np.asarray(boxes, np.float32).reshape(-1, 4)
        b[p + "probs"] = np.asarray(probs, np.float32).reshape(-1, 3)
        b[p + "scores"] = np.asarray(scores, np.float32).reshape(-1)
        b[p + "labels"] = (b[p + "probs"][:, 1:].argmax(1) + 1).astype(np.int64) if len(scores) else np.zeros(0, np.int64)
    return b


# ----------------------------------------------------------------------------------- BALD
def test_bald_from_samples_hand_case():
    # box 0: passes (1, 0) and (0, 1): mean (0.5, 0.5), H = ln 2; mean H = 0 -> BALD = ln 2
    # box 1: both passes (0.5, 0.5): H(mean) = ln 2 = mean H -> BALD = 0
    # box 2: (0.9, 0.1), (0.5, 0.5): mean (0.7, 0.3)
    #   H(mean) = -(0.7 ln 0.7 + 0.3 ln 0.3) = 0.610864; H1 = 0.325083, H2 = 0.693147
    #   BALD = 0.610864 - 0.509115 = 0.101749
    s = np.array([[[1, 0], [0, 1]], [[0.5, 0.5], [0.5, 0.5]], [[0.9, 0.1], [0.5, 0.5]]])
    np.testing.assert_allclose(BALD.bald_from_samples(s), [LN2, 0.0, 0.101749], atol=1e-6)


def test_bald_signal_reads_moments_and_reduces_per_image():
    s = np.array([[[1, 0, 0], [0, 1, 0]], [[0.5, 0.5, 0], [0.5, 0.5, 0]], [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]])
    mean_p = s.mean(1)
    mean_h = U.box_entropy(s.reshape(-1, 3)).reshape(3, 2).mean(1)
    batch = {"image_id": np.arange(2), "offsets": np.array([0, 2, 3]), "mc_probs": mean_p.astype(np.float32),
             "mc_entropy": mean_h.astype(np.float32)}
    want = BALD.bald_from_samples(s)
    out = S.compute(batch, ["bald:max", "bald:mean"])
    np.testing.assert_allclose(out["bald_max"], [want[:2].max(), want[2]], atol=1e-6)
    np.testing.assert_allclose(out["bald_mean"], [want[:2].mean(), want[2]], atol=1e-6)
    assert S.needs_mc(["bald:max"]) and not S.needs_mc(["entropy:max"])
    with pytest.raises(KeyError, match="mc_probs"):
        S.compute({"image_id": np.arange(1), "offsets": np.array([0, 0])}, ["bald:max"])


def test_mc_dropout_moments_equal_bald_of_the_passes():
    torch = pytest.importorskip("torch")
    from poolscout.engine.core.config import DetectorConfig
    from poolscout.engine.models.detectors import build_detector, set_mc_dropout
    from poolscout.engine.models.inference import mc_dropout_moments

    torch.manual_seed(0)
    model = build_detector(DetectorConfig(input_size=64, backbone_weights=None, dropout=0.3), 3,
                           load_pretrained=False).eval()
    pooled = torch.randn(5, model.roi_heads.box_head.fc6.in_features // 49, 7, 7)
    torch.manual_seed(1)
    with torch.no_grad():
        mp, mh = mc_dropout_moments(model, pooled, 4)
    torch.manual_seed(1)
    set_mc_dropout(model.roi_heads.box_head, True)
    with torch.no_grad():
        samples = torch.stack([torch.softmax(model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))[0], -1)
                               for _ in range(4)], 1).double().numpy()
    set_mc_dropout(model.roi_heads.box_head, False)
    assert not model.roi_heads.box_head.drop6.training  # switched back off
    np.testing.assert_allclose(mp.numpy(), samples.mean(1), atol=1e-5)
    bald = BALD.bald_from_samples(samples)
    np.testing.assert_allclose(U.box_entropy(mp.numpy()) - mh.numpy(), bald, atol=1e-5)
    assert bald.max() > 0  # the passes differ: dropout was on
    nodrop = build_detector(DetectorConfig(input_size=64, backbone_weights=None), 3, load_pretrained=False).eval()
    with pytest.raises(ValueError, match="detector.dropout"):
        mc_dropout_moments(nodrop, pooled, 2)


# ----------------------------------------------------------------------------------- CALD
def _cald_case():
    # image 0: one box, the view finds the same box with the same softmax
    #   IoU 1, JS 0, m = 1 + 0.5 * 1 * (0.9 + 0.9) = 1.9 -> s = |1.9 - 1.3| = 0.6
    # image 1: box (0,0,10,10) p = (0.5, 0.5, 0); view box (0,0,10,5) (IoU 0.5) q = (0.5, 0, 0.5)
    #   mixture (0.5, 0.25, 0.25); KL(p||m) = 0.5 ln 2 = KL(q||m) -> JS = 0.5 ln 2 = 0.346574
    #   m = 0.5 + 0.5 (1 - 0.346574)(0.5 + 0.5) = 0.826713 -> s = 0.473287
    # image 2: two boxes, the view finds nothing: m = 0 -> |0 - 1.3| = 1.3 -> s = min(1, 1.3) = 1
    # image 3: no boxes -> NaN
    orig = ([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30]],
            [[0.1, 0.9, 0], [0.5, 0.5, 0], [0.3, 0.7, 0], [0.3, 0, 0.7]], [0.9, 0.5, 0.7, 0.7], [1, 1, 2, 0])
    view = ([[0, 0, 10, 10], [0, 0, 10, 5]], [[0.1, 0.9, 0], [0.5, 0, 0.5]], [0.9, 0.5], [1, 1, 0, 0])
    return orig, view


def test_cald_view_consistency_hand_case():
    orig, view = _cald_case()
    b = _batch({"orig": orig, "hflip": view}, 4)
    s = view_consistency(b["boxes"], b["probs"], b["offsets"], b["hflip_boxes"], b["hflip_probs"],
                         b["hflip_offsets"])
    np.testing.assert_allclose(s[:3], [0.6, 0.473287, 1.0], atol=1e-5)
    assert np.isnan(s[3])


def test_cald_signal_averages_views():
    orig, view = _cald_case()
    # second view ("resize"): identical to the original everywhere -> image 1 gets
    #   m = 1 + 0.5 * (0.5 + 0.5) = 1.5 -> 0.2; image 2: box 0 m = 1 + 0.7 = 1.7 -> 0.4,
    #   box 1 m = 1.7 -> 0.4 -> s = 0.4; image 0 as before 0.6
    b = _batch({"orig": orig, "hflip": view, "resize": orig}, 4)
    out = S.compute(b, ["cald"])["cald"]
    np.testing.assert_allclose(out[:3], [0.6, (0.473287 + 0.2) / 2, (1.0 + 0.4) / 2], atol=1e-5)
    assert np.isnan(out[3])
    assert S.direction("cald") == "low"
    assert set(S.required_views(["cald"])) == {"orig", "hflip", "cutout", "resize", "rotate"}
    with pytest.raises(KeyError, match="augmented view"):
        S.compute(_batch({"orig": orig}, 4), ["cald"])


def test_cald_rerank_hand_case():
    # labeled class counts (3, 1): g = (0.75, 0.25) -> softmax(g) = (0.622459, 0.377541)
    # candidate 10: r = (0.9, 0.1) -> softmax (0.689974, 0.310026), close to g
    # candidate 11: r = (0, 0.9) -> softmax (0.289050, 0.710950), far from g
    # candidate 12: no boxes, r = (0, 0) -> softmax (0.5, 0.5)
    b = {"image_id": np.array([10, 11, 12]), "offsets": np.array([0, 2, 3, 3]),
         "probs": np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.1], [0.1, 0.0, 0.9]], np.float32)}
    np.testing.assert_allclose(class_max_scores(b["probs"], b["offsets"]), [[0.9, 0.1], [0.0, 0.9], [0, 0]],
                               atol=1e-7)

    def js(p, q):
        m = (p + q) / 2
        return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))

    g = np.array([0.622459, 0.377541])
    want = {10: js(g, np.array([0.689974, 0.310026])), 11: js(g, np.array([0.289050, 0.710950])),
            12: js(g, np.array([0.5, 0.5]))}
    table = {"image_id": b["image_id"]}
    ctx = SelectContext(boxes=b, labeled_class_counts=np.array([3, 1]))
    sel = cald_rerank(table, 2, ctx=ctx)
    assert sel.image_id.tolist() == [11, 12]
    np.testing.assert_allclose(sel.score, [want[11], want[12]], atol=1e-5)
    with pytest.raises(ValueError, match="ctx.boxes"):
        cald_rerank(table, 2, ctx=SelectContext())


# ----------------------------------------------------------------------------------- HUALE
def _huale_case():
    # image 0: box (0,0,10,10) p = (0.2, 0.8, 0); the flip view finds (0,0,10,5) (IoU 0.5)
    #   with the same softmax: BC = 1, D = 0 -> SA = 1 - 0.5 * 1 = 0.5; same class -> CD 0
    # image 1: box A (0,0,10,10) s 0.8 p = (0.2, 0.8, 0) matched to (0,0,10,5), same class
    #   (SA_A = 0.5, CD_A = 0); box B (20,20,30,30) s 1, p = (0, 1, 0), matched exactly
    #   (IoU 1) to a box with q = (0, 0, 1): BC 0, D 1 -> SA_B = 1 - 1 * 0 = 1; classes differ
    #   -> CD_B = (1 + 1) / 2 = 1. SA = max(0.5, 1) = 1, CD = (0 + 1) / 2 = 0.5
    # image 2: one box, nothing in the flip view: SA = 1, CD = s / 2 = 0.3
    orig = ([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 4, 4]],
            [[0.2, 0.8, 0], [0.2, 0.8, 0], [0, 1, 0], [0.4, 0.6, 0]], [0.8, 0.8, 1.0, 0.6], [1, 2, 1])
    flip = ([[0, 0, 10, 5], [0, 0, 10, 5], [20, 20, 30, 30]], [[0.2, 0.8, 0], [0.2, 0.8, 0], [0, 0, 1]],
            [0.8, 0.8, 1.0], [1, 2, 0])
    return _batch({"orig": orig, "hflip": flip}, 3)


def test_huale_semantic_affinity_and_category_diversity():
    b = _huale_case()
    np.testing.assert_allclose(semantic_affinity(b), [0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(category_diversity(b), [0.0, 0.5, 0.3], atol=1e-6)


def test_huale_overlap_ratio_and_localization():
    # image 0: (0,0,10,10), (0,0,10,9) IoU 0.9; (50,50,60,60) apart; a 4th box under the
    #   score threshold 0.05 is ignored -> 1 of 3 pairs -> 1/3
    # image 1: a single box -> 0; image 2: no boxes -> NaN
    b = {"image_id": np.arange(3), "offsets": np.array([0, 4, 5, 5]),
         "boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60], [0, 0, 10, 10], [1, 1, 2, 2]],
                           np.float32),
         "scores": np.array([0.9, 0.8, 0.7, 0.01, 0.9], np.float32)}
    o = overlap(b)
    np.testing.assert_allclose(o[:2], [1 / 3, 0.0], atol=1e-9)
    assert np.isnan(o[2])
    # LC: box variances (1,1,1,1) and (3,3,3,3) -> mean 2; (0.5, 0.5, 1.5, 1.5) -> 1
    b["box_var"] = np.array([[1] * 4, [3] * 4, [2] * 4, [2] * 4, [0.5, 0.5, 1.5, 1.5]], np.float32)
    np.testing.assert_allclose(localization_uncertainty(b)[:2], [2.0, 1.0])
    del b["box_var"]
    assert np.isnan(localization_uncertainty(b)).all()


def test_weighted_l2_hand_case():
    # a = (0, 1, 2) -> d_a = (0, 0.5, 1); b = (1, 0, 0) -> d_b = (1, 0, 0)
    # weights (1, 4): l = sqrt(d_a^2 + 4 d_b^2) = (2, 0.5, 1)
    # c is constant -> no spread -> dropped (and said so)
    table = {"image_id": np.array([5, 6, 7]), "huale_sa": np.array([0.0, 1.0, 2.0]),
             "huale_cd": np.array([1.0, 0.0, 0.0]), "huale_lc": np.full(3, np.nan)}
    ctx = SelectContext()
    sel = weighted_l2(table, 3, ctx=ctx, signals=["huale_sa", "huale_cd", "huale_lc"], weights=[1, 4, 1])
    assert sel.image_id.tolist() == [5, 7, 6]
    np.testing.assert_allclose(sel.score, [2.0, 1.0, 0.5])
    assert sel.rationale[0]["weighted_l2"]["dropped"] == ["huale_lc"]
    assert weighted_l2(table, 1, ctx=ctx, signals=["huale_sa", "huale_cd"]).image_id.tolist() in ([5], [7])
    with pytest.raises(ValueError, match="weights"):
        weighted_l2(table, 1, ctx=ctx, signals=["huale_sa"], weights=[1, 2])
    # every metric ties: the candidates' own order (the gate's), and the rationale says so
    tied = {"image_id": np.array([9, 4, 6]), "huale_sa": np.full(3, 0.5), "huale_lc": np.full(3, np.nan)}
    fb = weighted_l2(tied, 2, ctx=ctx, signals=["huale_sa", "huale_lc"])
    assert fb.image_id.tolist() == [9, 4] and np.isnan(fb.score).all()
    assert "no metric has any spread" in fb.rationale[0]["weighted_l2"]["fallback"]
    assert fb.rationale[1]["weighted_l2"]["rank"] == 2


def test_huale_signals_registered_and_strategy_loads():
    b = _huale_case()
    out = S.compute(b, ["huale_sa", "huale_cd", "huale_or", "huale_lc"])
    np.testing.assert_allclose(out["huale_sa"], [0.5, 1.0, 1.0], atol=1e-6)
    assert np.isnan(out["huale_lc"]).all()
    st = St.load_strategy("huale")
    assert [s.column for s in St.required_signals(st)] == ["entropy_max", "huale_sa", "huale_cd", "huale_or",
                                                          "huale_lc"]
    assert St.needs_boxes(St.load_strategy("cald")) and not St.needs_boxes(st)
    assert [s.column for s in St.required_signals(St.load_strategy("bald"))] == ["bald_max"]


def test_huale_pipeline_end_to_end():
    # 6 candidates; the gate (entropy:max, keep 2 x budget 2 = 4) drops the two most
    # confident, then weighted_l2 ranks the rest by the metrics
    table = {"image_id": np.arange(6),
             "entropy_max": np.array([0.1, 0.9, 0.8, 0.7, 0.6, 0.05]),
             "huale_sa": np.array([9, 0.0, 1.0, 0.5, 0.2, 9]),
             "huale_cd": np.array([9, 0.0, 1.0, 0.0, 0.0, 9]),
             "huale_or": np.array([9, 0.0, 0.0, 1.0, 0.0, 9]),
             "huale_lc": np.full(6, np.nan)}
    sel = St.select(St.load_strategy("huale"), table, 2, ctx=SelectContext())
    # candidates 1..4: sa -> (0, 1, .5, .2), cd -> (0, 1, 0, 0), or -> (0, 0, 1, 0)
    # l = (0, sqrt 2, sqrt 1.25, 0.2): picks 2 then 3
    assert sel.image_id.tolist() == [2, 3]
    assert "retrieve" in sel.rationale[0] and "weighted_l2" in sel.rationale[0]


def test_rare_class_direction_of_cald_and_ppal():
    """Issue 12's question: CALD and PPAL labeled the rare class below its prevalence on
    the rare-class pool; their class terms point the right way (these cases fail if a sign,
    a direction or the class index of the prior were wrong)."""
    from poolscout.engine.methods.cald import class_max_scores, class_prior_divergence
    from poolscout.engine.methods.ppal import dcus_class_weights, dcus_scores

    # CALD stage 2: labeled set 100/50/25/12/6/3 instances, rare class last. A confident
    # rare prediction diverges most from that prior; a confident common one least.
    g = np.array([100, 50, 25, 12, 6, 3])
    probs = np.zeros((3, 7))
    probs[0, 1], probs[1, 6], probs[2, 3] = 0.9, 0.9, 0.9  # column 0 is background
    r = class_max_scores(probs, np.array([0, 1, 2, 3]))
    js = class_prior_divergence(r, g)
    assert np.argmax(js) == 1 and np.argmin(js) == 0
    # ... and through the selector, with the labeled counts of the context
    table = {"image_id": np.array([10, 11, 12])}
    batch = {"image_id": table["image_id"], "offsets": np.array([0, 1, 2, 3]), "probs": probs}
    from poolscout.engine.methods.cald import cald_rerank

    sel = cald_rerank(table, 1, ctx=SelectContext(boxes=batch, labeled_class_counts=g))
    assert sel.image_id.tolist() == [11]
    # PPAL DCUS: a class the detector handles badly (low quality) weighs more, by label
    q = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.1])
    w = dcus_class_weights(q)
    assert w[5] > w[0]
    u = dcus_scores(np.array([0.5, 0.5]), np.array([1, 6]), np.array([0, 1, 2]), class_quality=q)
    assert u[1] > u[0]
