"""engine.metrics: COCO evaluation (hand-checked cases and equality with torchmetrics'
pycocotools backend), evaluation of a tiny untrained detector on a synthetic pool, and
the acquisition diagnostics of a hand-made ledger. No Ray."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from poolscout.engine.core import io
from poolscout.engine.evaluation.metrics import acquisition_stats, coco_eval, evaluate_model, gt_arrays

CATS3 = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def ragged(per_image: dict[int, list[tuple]], order: list[int], scores: bool) -> dict[str, np.ndarray]:
    """{image_id: [(label, x1, y1, x2, y2[, score]), ...]} -> the ragged layout."""
    rows = [r for i in order for r in per_image.get(i, [])]
    counts = [len(per_image.get(i, [])) for i in order]
    out = {"image_id": np.array(order, np.int64),
           "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
           "boxes": np.array([r[1:5] for r in rows], np.float32).reshape(-1, 4),
           "labels": np.array([r[0] for r in rows], np.int64)}
    if scores:
        out["scores"] = np.array([r[5] for r in rows], np.float32)
    return out


def per_class(res: dict) -> dict[str, dict]:
    return {c["name"]: c for c in res["per_class"]}


# ---------------------------------------------------------------- hand-made cases
IDS = [10, 20]
SIZES = (np.array([100, 64]), np.array([80, 64]))
GT = {10: [(1, 10, 10, 50, 50), (2, 60, 20, 90, 70)], 20: [(1, 0, 0, 30, 30)]}


def test_perfect_detections():
    dets = {i: [(*b, 0.9 - 0.1 * j) for j, b in enumerate(bs)] for i, bs in GT.items()}
    res = coco_eval(ragged(GT, IDS, False), ragged(dets, IDS, True), CATS3[:2], image_sizes=SIZES)
    # pycocotools divides by tp + fp + eps, so "1" can be 1 - 2e-16: compare with a tolerance
    one = pytest.approx(1.0, abs=1e-12)
    assert res["map"] == one and res["map50"] == one and res["map75"] == one and res["mar100"] == one
    assert (res["test_images"], res["gt_boxes"], res["det_boxes"]) == (2, 3, 3)
    pc = per_class(res)
    assert pc["a"] == {"id": 1, "name": "a", "ap": one, "ap50": one, "recall": one, "recall50": one, "gt": 2}
    assert pc["b"]["ap"] == one and pc["b"]["gt"] == 1
    json.dumps(res)  # plain Python types only
    assert all(type(res[k]) is float for k in ("map", "map50", "map75", "mar100"))


def test_wrong_class_and_class_without_gt():
    # Class a: dets by score = FP (the b box called a, 0.95), TP (0.9), TP (0.8); 2 GT.
    #   precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> interpolated 2/3 everywhere: AP 2/3.
    # Class b: 1 GT, no detection of class b -> AP 0, recall 0.
    # Class c: no GT (one detection) -> None.
    dets = {10: [(1, 10, 10, 50, 50, 0.9), (1, 60, 20, 90, 70, 0.95), (3, 0, 0, 5, 5, 0.3)],
            20: [(1, 0, 0, 30, 30, 0.8)]}
    res = coco_eval(ragged(GT, IDS, False), ragged(dets, IDS, True), CATS3, image_sizes=SIZES)
    pc = per_class(res)
    assert pc["a"]["ap"] == pytest.approx(2 / 3) and pc["a"]["ap50"] == pytest.approx(2 / 3)
    assert pc["a"]["recall"] == pytest.approx(1.0) and pc["a"]["recall50"] == pytest.approx(1.0)
    assert pc["a"]["gt"] == 2
    assert pc["b"] == {"id": 2, "name": "b", "ap": 0.0, "ap50": 0.0, "recall": 0.0, "recall50": 0.0, "gt": 1}
    assert pc["c"] == {"id": 3, "name": "c", "ap": None, "ap50": None, "recall": None, "recall50": None, "gt": 0}
    assert res["map"] == pytest.approx(1 / 3) and res["map50"] == pytest.approx(1 / 3)
    assert res["mar100"] == pytest.approx(0.5)
    assert res["det_boxes"] == 4


def test_localisation_between_iou_thresholds():
    # IoU of [0,0,10,10] with [0,0,10,8] is 0.8: a TP at IoU .5 ... .8 (7 of 10 thresholds).
    gt = {1: [(1, 0, 0, 10, 10)]}
    dets = {1: [(1, 0, 0, 10, 8, 0.7)]}
    res = coco_eval(ragged(gt, [1], False), ragged(dets, [1], True), CATS3[:1],
                    image_sizes=(np.array([20]), np.array([20])))
    assert res["map50"] == pytest.approx(1.0) and res["map75"] == pytest.approx(1.0)
    assert res["map"] == pytest.approx(0.7) and res["mar100"] == pytest.approx(0.7)


def test_empty_detections():
    res = coco_eval(ragged(GT, IDS, False), ragged({}, IDS, True), CATS3, image_sizes=SIZES)
    assert res["map"] == 0.0 and res["map50"] == 0.0 and res["map75"] == 0.0 and res["mar100"] == 0.0
    assert res["det_boxes"] == 0
    pc = per_class(res)
    assert pc["a"]["ap"] == 0.0 and pc["b"]["recall50"] == 0.0 and pc["c"]["ap"] is None


def test_no_ground_truth_at_all():
    dets = {10: [(1, 0, 0, 5, 5, 0.5)]}
    res = coco_eval(ragged({}, IDS, False), ragged(dets, IDS, True), CATS3, image_sizes=SIZES)
    assert res["map"] is None and res["map50"] is None and res["mar100"] is None
    assert all(c["ap"] is None for c in res["per_class"])


def test_input_errors():
    gt = ragged(GT, IDS, False)
    dets = {**gt, "scores": np.ones(len(gt["labels"]), np.float32)}
    with pytest.raises(ValueError, match="image_id must equal"):
        coco_eval(gt, {**dets, "image_id": np.array([10, 21])}, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="image_id must equal"):  # same ids, other order
        coco_eval(gt, {**dets, "image_id": np.array([20, 10])}, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="image_id must equal"):
        coco_eval(gt, ragged({}, [10], True), CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="lacks scores"):
        coco_eval(gt, gt, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="not category ids"):
        coco_eval(gt, {**dets, "labels": np.array([1, 2, 7])}, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="offsets"):
        coco_eval({**gt, "offsets": np.array([0, 1, 2])}, dets, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="image_sizes"):
        coco_eval(gt, dets, CATS3, image_sizes=(np.array([10]), np.array([10])))
    with pytest.raises(ValueError, match="NaN"):
        bad = dets["boxes"].copy()
        bad[0, 0] = np.nan
        coco_eval(gt, {**dets, "boxes": bad}, CATS3, image_sizes=SIZES)
    with pytest.raises(ValueError, match="duplicate id"):
        coco_eval(gt, dets, CATS3 + [{"id": 1, "name": "z"}], image_sizes=SIZES)


# ---------------------------------------------------------------- torchmetrics equality
def random_fixture(seed: int = 0, n_images: int = 20, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    gt, dets, w, h = {}, {}, [], []
    for i in range(n_images):
        iw, ih = int(rng.integers(120, 320)), int(rng.integers(100, 240))
        w.append(iw)
        h.append(ih)
        g, d = [], []
        for _ in range(int(rng.integers(0, 6))):
            bw, bh = rng.uniform(8, iw / 2), rng.uniform(8, ih / 2)
            x1, y1 = rng.uniform(0, iw - bw), rng.uniform(0, ih - bh)
            c = int(rng.integers(1, n_classes + 1))
            g.append((c, x1, y1, x1 + bw, y1 + bh))
            if rng.random() < 0.85:  # detected, jittered; sometimes with the wrong class
                j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                lab = c if rng.random() < 0.85 else int(rng.integers(1, n_classes + 1))
                d.append((lab, x1 + j[0], y1 + j[1], x1 + bw + j[2], y1 + bh + j[3], float(rng.uniform(0.3, 1.0))))
        for _ in range(int(rng.integers(0, 4))):  # false positives
            bw, bh = rng.uniform(5, iw / 3), rng.uniform(5, ih / 3)
            x1, y1 = rng.uniform(0, iw - bw), rng.uniform(0, ih - bh)
            d.append((int(rng.integers(1, n_classes + 1)), x1, y1, x1 + bw, y1 + bh, float(rng.uniform(0.0, 0.8))))
        gt[i + 100] = g
        dets[i + 100] = d
    order = list(gt)
    return ragged(gt, order, False), ragged(dets, order, True), (np.array(w), np.array(h))


def test_equals_torchmetrics_pycocotools_backend():
    import torch
    from torchmetrics.detection import MeanAveragePrecision  # the `dev` extra pins torchmetrics

    cats = [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}, {"id": 3, "name": "z"}]
    gt, dets, sizes = random_fixture(seed=7)
    ours = coco_eval(gt, dets, cats, image_sizes=sizes)
    assert ours["gt_boxes"] > 20 and ours["det_boxes"] > 20

    tm = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True)
    preds, target = [], []
    for i in range(len(gt["image_id"])):
        g0, g1 = gt["offsets"][i], gt["offsets"][i + 1]
        d0, d1 = dets["offsets"][i], dets["offsets"][i + 1]
        target.append({"boxes": torch.from_numpy(gt["boxes"][g0:g1].copy()),
                       "labels": torch.from_numpy(gt["labels"][g0:g1].copy())})
        preds.append({"boxes": torch.from_numpy(dets["boxes"][d0:d1].copy()),
                      "scores": torch.from_numpy(dets["scores"][d0:d1].copy()),
                      "labels": torch.from_numpy(dets["labels"][d0:d1].copy())})
    tm.update(preds, target)
    ref = tm.compute()
    assert ours["map"] == pytest.approx(float(ref["map"]), abs=1e-3)
    assert ours["map50"] == pytest.approx(float(ref["map_50"]), abs=1e-3)
    assert ours["map75"] == pytest.approx(float(ref["map_75"]), abs=1e-3)
    assert ours["mar100"] == pytest.approx(float(ref["mar_100"]), abs=1e-3)
    assert 0.2 < ours["map"] < 0.95  # a non-trivial case
    pc = {c["id"]: c for c in ours["per_class"]}
    classes = ref["classes"].reshape(-1).tolist()
    assert sorted(classes) == [1, 2, 3]
    for c, ap, ar in zip(classes, ref["map_per_class"].reshape(-1).tolist(),
                         ref["mar_100_per_class"].reshape(-1).tolist()):
        assert pc[c]["ap"] == pytest.approx(ap, abs=1e-3)
        assert pc[c]["recall"] == pytest.approx(ar, abs=1e-3)


# ---------------------------------------------------------------- evaluate_model
def _synthetic_tables(tmp_path, n_images: int = 8):
    from poolscout.engine.data.synthetic import generate

    info = generate(tmp_path / "syn", n_images=n_images, size=64, seed=3)
    coco = json.loads(info["annotations"].read_text())
    imgs = sorted(coco["images"], key=lambda im: im["id"])
    manifest = pa.table({"image_id": pa.array([im["id"] for im in imgs], pa.int64()),
                         "uri": [str(info["images"] / im["file_name"]) for im in imgs],
                         "width": pa.array([im["width"] for im in imgs], pa.int32()),
                         "height": pa.array([im["height"] for im in imgs], pa.int32())})
    anns = coco["annotations"]
    bb = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    annotations = pa.table({"image_id": pa.array([a["image_id"] for a in anns], pa.int64()),
                            "ann_id": pa.array([a["id"] for a in anns], pa.int64()),
                            "category_id": pa.array([a["category_id"] for a in anns], pa.int32()),
                            "x1": pa.array(bb[:, 0], pa.float32()), "y1": pa.array(bb[:, 1], pa.float32()),
                            "x2": pa.array(bb[:, 0] + bb[:, 2], pa.float32()),
                            "y2": pa.array(bb[:, 1] + bb[:, 3], pa.float32())}, schema=io.ANNOTATIONS_SCHEMA)
    cats = [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    return manifest, annotations, cats


def _tiny_detector(num_classes: int):
    import torch

    from poolscout.engine.core.config import DetectorConfig
    from poolscout.engine.models.detectors import build_detector

    cfg = DetectorConfig(name="fasterrcnn_effnet_lite0_fpn", input_size=64, anchor_sizes=(8, 16, 32, 64),
                         fpn_channels=32, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                         score_thresh=0.0, max_boxes=20)
    torch.manual_seed(0)
    return build_detector(cfg, num_classes, load_pretrained=False)


def test_evaluate_model_on_synthetic_pool(tmp_path, torch_threads):
    manifest, annotations, cats = _synthetic_tables(tmp_path)
    model = _tiny_detector(len(cats))
    res = evaluate_model(model, manifest, annotations, cats, input_size=64, batch_size=3)
    for key in ("map", "map50", "map75", "mar100", "per_class", "test_images", "gt_boxes", "det_boxes", "seconds"):
        assert key in res
    assert res["test_images"] == 8
    assert res["gt_boxes"] == len(annotations)
    assert 0.0 <= res["map"] <= 1.0 and 0.0 <= res["map50"] <= 1.0
    assert res["det_boxes"] > 0 and res["seconds"] > 0
    assert [c["name"] for c in res["per_class"]] == [c["name"] for c in cats]
    assert sum(c["gt"] for c in res["per_class"]) == len(annotations)
    json.dumps(res)

    # a subset of the test images: annotations of other images are ignored
    sub = manifest.slice(0, 2)
    res2 = evaluate_model(model, sub, annotations, cats, input_size=64, batch_size=8, progress=True)
    n_gt = int(np.isin(annotations["image_id"].to_numpy(), sub["image_id"].to_numpy()).sum())
    assert res2["test_images"] == 2 and res2["gt_boxes"] == n_gt


def test_evaluate_model_names_an_unreadable_image(tmp_path, torch_threads):
    manifest, annotations, cats = _synthetic_tables(tmp_path, n_images=2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    manifest = manifest.set_column(1, "uri", pa.array([manifest["uri"][0].as_py(), str(bad)]))
    with pytest.raises(ValueError, match="broken.png"):
        evaluate_model(_tiny_detector(len(cats)), manifest, annotations, cats, input_size=64)


def test_gt_arrays_follows_the_given_order():
    ann = pa.table({"image_id": pa.array([5, 3, 5, 9], pa.int64()), "ann_id": pa.array([1, 2, 3, 4], pa.int64()),
                    "category_id": pa.array([1, 2, 3, 1], pa.int32()),
                    "x1": pa.array([0, 1, 2, 3], pa.float32()), "y1": pa.array([0, 0, 0, 0], pa.float32()),
                    "x2": pa.array([5, 6, 7, 8], pa.float32()), "y2": pa.array([5, 5, 5, 5], pa.float32())})
    g = gt_arrays(ann, np.array([5, 7, 3]))
    assert g["offsets"].tolist() == [0, 2, 2, 3]
    assert g["labels"].tolist() == [1, 3, 2]
    assert g["boxes"][:, 0].tolist() == [0, 2, 1]


# ---------------------------------------------------------------- acquisition_stats
CATS4 = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}, {"id": 4, "name": "d"}]
# image: (state, cycle, [category ids of its annotations])
LEDGER = {1: ("labeled", 0, [1, 1]), 2: ("labeled", 0, [2]), 3: ("labeled", 1, [1, 3]), 4: ("labeled", 1, [2, 2]),
          5: ("labeled", 2, [3]), 6: ("pool", 0, [1, 2]), 7: ("pool", 0, [1]), 8: ("test", 0, [3, 3, 3]),
          9: ("rejected", 0, [3]), 10: ("pool", 0, [])}


def _ledger_tables(ledger: dict = LEDGER) -> tuple[pa.Table, pa.Table]:
    ids = sorted(ledger)
    led = pa.table({"image_id": pa.array(ids, pa.int64()), "state": [ledger[i][0] for i in ids],
                    "cycle": pa.array([ledger[i][1] for i in ids], pa.int32()),
                    "selected_by": ["x"] * len(ids)}, schema=io.LEDGER_SCHEMA)
    rows = [(i, c) for i in ids for c in ledger[i][2]]
    n = len(rows)
    ann = pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()), "ann_id": pa.array(range(1, n + 1), pa.int64()),
                    "category_id": pa.array([r[1] for r in rows], pa.int32()),
                    **{k: pa.array(np.zeros(n), pa.float32()) for k in ("x1", "y1", "x2", "y2")}},
                   schema=io.ANNOTATIONS_SCHEMA)
    return ann, led


def test_acquisition_stats_counts():
    ann, led = _ledger_tables()
    s = acquisition_stats(ann, led, CATS4, 1)
    # new = images 3, 4; labeled (cycle <= 1) = 1..4; candidates = 1..7 and 10 (11 instances)
    assert s["new_images"] == 2 and s["new_boxes"] == 4
    assert s["labeled_images"] == 4 and s["labeled_boxes"] == 7
    assert s["new_class_hist"] == {"a": 1, "b": 2, "c": 1, "d": 0}
    assert s["labeled_class_hist"] == {"a": 3, "b": 3, "c": 1, "d": 0}
    assert s["pool_prevalence"] == pytest.approx({"a": 5 / 11, "b": 4 / 11, "c": 2 / 11, "d": 0.0})
    assert s["prevalence_from_images"] == 7
    assert s["new_share"] == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.25, "d": 0.0})
    r = s["new_over_prevalence"]
    assert r["d"] is None
    assert (r["a"], r["b"], r["c"]) == pytest.approx((0.25 * 11 / 5, 0.5 * 11 / 4, 0.25 * 11 / 2))
    assert s["rarest_class"] == "c"
    assert s["rarest_retrieval"] == pytest.approx(0.5)  # image 3's c of the c's in 3 and 5
    json.dumps(s)
    assert set(s) == {"new_images", "new_boxes", "labeled_images", "labeled_boxes", "new_class_hist",
                      "labeled_class_hist", "pool_prevalence", "prevalence_from_images", "new_share",
                      "new_over_prevalence", "rarest_class", "rarest_retrieval"}


def test_acquisition_stats_other_cycles():
    ann, led = _ledger_tables()
    s0 = acquisition_stats(ann, led, CATS4, 0)  # the seed set
    assert (s0["new_images"], s0["new_boxes"], s0["labeled_images"], s0["labeled_boxes"]) == (2, 3, 2, 3)
    assert s0["new_class_hist"] == s0["labeled_class_hist"] == {"a": 2, "b": 1, "c": 0, "d": 0}
    assert s0["rarest_retrieval"] == 0.0
    s2 = acquisition_stats(ann, led, CATS4, 2)
    assert s2["labeled_images"] == 5 and s2["rarest_retrieval"] == 1.0
    s5 = acquisition_stats(ann, led, CATS4, 5)  # nothing labeled at cycle 5
    assert s5["new_images"] == 0 and s5["new_boxes"] == 0
    assert s5["new_share"] == {n: None for n in "abcd"}
    assert s5["new_over_prevalence"] == {n: None for n in "abcd"}
    assert s5["labeled_images"] == 5


def test_acquisition_stats_ties_and_unknown_pool():
    tie = {1: ("labeled", 0, [2]), 2: ("pool", 0, [1, 3, 3])}  # a and b both once: a has the smaller id
    ann, led = _ledger_tables(tie)
    s = acquisition_stats(ann, led, CATS4, 0)
    assert s["rarest_class"] == "a" and s["rarest_retrieval"] == 0.0

    ann, led = _ledger_tables({1: ("labeled", 0, []), 2: ("pool", 0, []), 3: ("test", 0, [1])})
    s = acquisition_stats(ann, led, CATS4, 0)
    assert s["pool_prevalence"] == {n: None for n in "abcd"}
    assert s["prevalence_from_images"] == 0
    assert s["rarest_class"] is None and s["rarest_retrieval"] is None
    assert s["new_images"] == 1 and s["new_boxes"] == 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in s["new_share"].values() if v is not None)


def test_acquisition_stats_errors():
    ann, led = _ledger_tables()
    with pytest.raises(ValueError, match="ledger lacks column"):
        acquisition_stats(ann, led.drop(["state"]), CATS4, 0)
    with pytest.raises(ValueError, match="annotations lacks column"):
        acquisition_stats(ann.drop(["category_id"]), led, CATS4, 0)


def test_prediction_agreement_by_hand():
    from poolscout.engine.evaluation.metrics import prediction_agreement

    def dets(per_image):
        boxes, scores, labels, offsets = [], [], [], [0]
        for img in per_image:
            for b, sc, lab in img:
                boxes.append(b), scores.append(sc), labels.append(lab)
            offsets.append(len(boxes))
        return {"image_id": np.arange(len(per_image)), "offsets": np.array(offsets),
                "boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
                "labels": np.array(labels)}

    box = [0, 0, 10, 10]
    shifted = [1, 0, 11, 10]  # IoU 90/110 = 0.82 with box
    far = [50, 50, 60, 60]
    a = dets([[(box, 0.9, 1)], [(box, 0.9, 1), (far, 0.8, 2)], [], [(box, 0.9, 1)], [(box, 0.2, 1)]])
    b = dets([[(shifted, 0.7, 1)], [(box, 0.9, 1)], [], [(box, 0.9, 2)], []])
    r = prediction_agreement(a, b, iou=0.5, min_score=0.3)
    # image 0: 1 match of 2 boxes -> 1; image 1: 1 match of 3 -> 2/3; image 2: none on
    # either -> 1; image 3: other class -> 0; image 4: a's box is below min_score -> 1
    assert r["agreement"] == pytest.approx((1 + 2 / 3 + 1 + 0 + 1) / 5)
    assert r["identical_images"] == pytest.approx(3 / 5) and r["images"] == 5
    # a box is matched once: two boxes of a on one of b
    a2 = dets([[(box, 0.9, 1), (shifted, 0.8, 1)]])
    b2 = dets([[(box, 0.9, 1)]])
    assert prediction_agreement(a2, b2)["agreement"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same images"):
        prediction_agreement(a, dets([[]]))
