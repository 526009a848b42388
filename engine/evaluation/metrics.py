"""Evaluation of a detector on the test split, and diagnostics of what labeling bought.

* :func:`coco_eval` runs the pycocotools ``COCOeval`` (bbox) protocol on ragged NumPy
  arrays (the layout of engine/predictions.py: ``image_id`` (N,), ``offsets`` (N+1,),
  then one row per box) and returns a JSON-able dict: mAP@[.5:.95], mAP50, mAP75, AR@100
  and per-class AP / recall.
* :func:`evaluate_model` decodes test images, runs :func:`engine.inference.predict` in
  batches and evaluates the detections against the run's annotations.
* :func:`acquisition_stats` summarises, for one loop cycle, which images and instances
  were labeled, how the new instances spread over the classes compared with the pool,
  and how much of the rarest class has been found so far.

Values are plain Python numbers (never NumPy scalars); nothing is rounded. A metric that
is undefined (a class without ground truth, a share of zero instances) is ``None``.
"""
from __future__ import annotations

import contextlib
import io as _stdio
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_CANDIDATE_STATES = ("pool", "labeled")


# --------------------------------------------------------------------------- helpers
def _float_or_none(x: Any) -> float | None:
    """pycocotools marks "undefined" with -1; that becomes None, everything else a float."""
    x = float(x)
    return None if x < 0 else x


def _mean_valid(a: np.ndarray) -> float | None:
    """Mean over the entries > -1 (pycocotools' convention), None when there are none."""
    a = np.asarray(a, np.float64)
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else None


def _category_list(categories: Sequence[dict]) -> list[dict]:
    """Validated copy of the categories: [{"id": int, "name": str}, ...] in the given order."""
    if not isinstance(categories, (list, tuple)) or not categories:
        raise ValueError("categories must be a non-empty list of {'id': int, 'name': str}")
    out, seen, seen_names = [], set(), set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"categories[{i}] must be a dict with 'id' and 'name', got {c!r}")
        cid, name = int(c["id"]), str(c["name"])
        if cid in seen:
            raise ValueError(f"categories: duplicate id {cid}")
        if name in seen_names:
            raise ValueError(f"categories: duplicate name {name!r}")
        seen.add(cid)
        seen_names.add(name)
        out.append({"id": cid, "name": name})
    return out


def _ragged(d: dict, what: str, with_scores: bool) -> dict[str, np.ndarray]:
    """Check one ragged box set (gt or dets) and return it with canonical dtypes."""
    if not isinstance(d, dict):
        raise TypeError(f"{what} must be a dict of arrays, got {type(d).__name__}")
    need = ["image_id", "offsets", "boxes", "labels"] + (["scores"] if with_scores else [])
    missing = [k for k in need if k not in d]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)} (needs {', '.join(need)})")
    image_id = np.asarray(d["image_id"]).reshape(-1).astype(np.int64)
    offsets = np.asarray(d["offsets"]).reshape(-1).astype(np.int64)
    boxes = np.asarray(d["boxes"], np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    labels = np.asarray(d["labels"]).reshape(-1)
    n, m = len(image_id), len(labels)
    if len(offsets) != n + 1:
        raise ValueError(f"{what}: offsets has {len(offsets)} entries for {n} images (needs {n + 1})")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != m:
        raise ValueError(f"{what}: offsets must start at 0, not decrease and end at the number of boxes ({m})")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != m:
        raise ValueError(f"{what}: boxes must be ({m}, 4) like labels, got shape {boxes.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{what}: labels must be integers")
    labels = labels.astype(np.int64)
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}: boxes contain NaN or infinite values")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(f"{what}: boxes must be x1 y1 x2 y2 with x2 >= x1 and y2 >= y1")
    out = {"image_id": image_id, "offsets": offsets, "boxes": boxes, "labels": labels}
    if with_scores:
        scores = np.asarray(d["scores"], np.float64).reshape(-1)
        if len(scores) != m:
            raise ValueError(f"{what}: scores has {len(scores)} entries for {m} boxes")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{what}: scores contain NaN or infinite values")
        out["scores"] = scores
    return out


def _coco_annotations(r: dict[str, np.ndarray], with_scores: bool) -> list[dict]:
    """Ragged arrays -> COCO annotation dicts (xywh, area = w*h, iscrowd 0, ids from 1)."""
    counts = np.diff(r["offsets"])
    img = np.repeat(r["image_id"], counts).tolist()
    b = r["boxes"]
    x, y = b[:, 0].tolist(), b[:, 1].tolist()
    w, h = (b[:, 2] - b[:, 0]).tolist(), (b[:, 3] - b[:, 1]).tolist()
    labels = r["labels"].tolist()
    scores = r["scores"].tolist() if with_scores else None
    anns = []
    for j in range(len(labels)):
        # ids must be > 0: COCOeval treats a matched id of 0 as "unmatched"
        a = {"id": j + 1, "image_id": img[j], "category_id": labels[j], "bbox": [x[j], y[j], w[j], h[j]],
             "area": w[j] * h[j], "iscrowd": 0}
        if with_scores:
            a["score"] = scores[j]
        anns.append(a)
    return anns


def _coco_object(images: list[dict], categories: list[dict], annotations: list[dict]):
    """An in-memory pycocotools COCO object (no file, index built quietly)."""
    from pycocotools.coco import COCO

    obj = COCO()
    obj.dataset = {"images": images, "categories": [dict(c) for c in categories], "annotations": annotations}
    with contextlib.redirect_stdout(_stdio.StringIO()):
        obj.createIndex()
    return obj


# --------------------------------------------------------------------------- COCO evaluation
def coco_eval(gt: dict, dets: dict, categories: Sequence[dict], *,
              image_sizes: tuple[np.ndarray, np.ndarray]) -> dict:
    """pycocotools COCOeval (bbox) of detections against ground truth.

    Both inputs use the ragged layout of engine/predictions.py; boxes are x1 y1 x2 y2 in
    original image pixels. The COCO objects are built in memory (boxes become xywh, area =
    w * h, iscrowd = 0), and pycocotools' printing is silenced.

    Args:
        gt: {"image_id" (N,) int, "offsets" (N+1,) int, "boxes" (M, 4) float, "labels"
            (M,) int in the category ids}.
        dets: the same keys plus "scores" (K,) float; its image_id must equal gt's,
            in the same order.
        categories: [{"id": int, "name": str}, ...] (the run's categories.json).
        image_sizes: (width (N,), height (N,)) of the images in pixels.

    Returns:
        {"map": AP@[.5:.95], "map50": AP@.5, "map75": AP@.75, "mar100": AR@100 (all at
        area "all", 100 detections per image), "per_class": [{"id", "name", "ap", "ap50",
        "recall" (AR@100 over IoU .5:.95), "recall50" (recall at IoU .5, 100 detections),
        "gt" (number of GT boxes)} in category order], "test_images": N, "gt_boxes": M,
        "det_boxes": K}. Classes without GT boxes have ap / ap50 / recall / recall50 None;
        the overall metrics are None only when there is no GT box at all. With no
        detections every metric of a class with GT is 0.0.

    Raises:
        ValueError: malformed arrays, mismatched image ids, duplicate image ids, labels
            outside the categories, bad image sizes, or no images.
    """
    from pycocotools.cocoeval import COCOeval

    cats = _category_list(categories)
    g = _ragged(gt, "gt", with_scores=False)
    d = _ragged(dets, "dets", with_scores=True)
    n = len(g["image_id"])
    if n == 0:
        raise ValueError("coco_eval needs at least one image")
    if len(d["image_id"]) != n or not np.array_equal(g["image_id"], d["image_id"]):
        raise ValueError(f"dets.image_id must equal gt.image_id in the same order "
                         f"(gt has {n} images, dets {len(d['image_id'])})")
    if len(np.unique(g["image_id"])) != n:
        raise ValueError("gt.image_id has duplicate ids")
    if not isinstance(image_sizes, (tuple, list)) or len(image_sizes) != 2:
        raise ValueError("image_sizes must be (width (N,), height (N,))")
    width = np.asarray(image_sizes[0]).reshape(-1)
    height = np.asarray(image_sizes[1]).reshape(-1)
    if len(width) != n or len(height) != n:
        raise ValueError(f"image_sizes has {len(width)} widths and {len(height)} heights for {n} images")
    if np.any(width <= 0) or np.any(height <= 0):
        raise ValueError("image_sizes must be positive")
    ids = np.array([c["id"] for c in cats], np.int64)
    for what, r in (("gt", g), ("dets", d)):
        bad = np.setdiff1d(np.unique(r["labels"]), ids)
        if bad.size:
            raise ValueError(f"{what}: labels {bad.tolist()[:10]} are not category ids "
                             f"(categories have {sorted(ids.tolist())})")

    images = [{"id": int(i), "width": int(w), "height": int(h)}
              for i, w, h in zip(g["image_id"].tolist(), width.tolist(), height.tolist())]
    coco_gt = _coco_object(images, cats, _coco_annotations(g, with_scores=False))
    coco_dt = _coco_object(images, cats, _coco_annotations(d, with_scores=True))
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = [im["id"] for im in images]
    with contextlib.redirect_stdout(_stdio.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    p = ev.params
    a_all = list(p.areaRngLbl).index("all")
    m100 = list(p.maxDets).index(100)
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    recall = ev.eval["recall"]  # (T, K, A, M)
    cat_index = {int(c): k for k, c in enumerate(p.catIds)}
    gt_counts = {int(c): int(v) for c, v in zip(*np.unique(g["labels"], return_counts=True))}

    per_class = []
    for c in cats:
        k = cat_index[c["id"]]
        has_gt = gt_counts.get(c["id"], 0) > 0
        per_class.append({
            "id": c["id"], "name": c["name"],
            "ap": _mean_valid(precision[:, :, k, a_all, m100]) if has_gt else None,
            "ap50": _mean_valid(precision[t50, :, k, a_all, m100]) if has_gt else None,
            "recall": _mean_valid(recall[:, k, a_all, m100]) if has_gt else None,
            "recall50": _float_or_none(recall[t50, k, a_all, m100]) if has_gt else None,
            "gt": gt_counts.get(c["id"], 0),
        })
    # stats: 0 AP, 1 AP50, 2 AP75, 8 AR@100 (area all); -1 when no class has GT
    return {"map": _float_or_none(ev.stats[0]), "map50": _float_or_none(ev.stats[1]),
            "map75": _float_or_none(ev.stats[2]), "mar100": _float_or_none(ev.stats[8]),
            "per_class": per_class, "test_images": int(n), "gt_boxes": int(len(g["labels"])),
            "det_boxes": int(len(d["labels"]))}


# --------------------------------------------------------------------------- model evaluation
def _require_columns(table: pa.Table, what: str, names: Sequence[str]) -> None:
    if not isinstance(table, pa.Table):
        raise TypeError(f"{what} must be a pyarrow Table, got {type(table).__name__}")
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")


def gt_arrays(annotations: pa.Table, image_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Ground truth of the given images in the ragged layout, in the order of `image_ids`.

    Args:
        annotations: table with image_id, category_id, x1, y1, x2, y2 (ANNOTATIONS_SCHEMA);
            rows of other images are ignored.
        image_ids: (N,) distinct image ids.

    Returns:
        {"image_id" (N,) int64, "offsets" (N+1,) int64, "boxes" (M, 4) float64,
        "labels" (M,) int64}; within an image, boxes keep their table order.
    """
    _require_columns(annotations, "annotations", ["image_id", "category_id", "x1", "y1", "x2", "y2"])
    ids = np.asarray(image_ids, np.int64).reshape(-1)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids must be distinct")
    ann = annotations.filter(pc.is_in(annotations["image_id"], pa.array(ids, pa.int64())))
    a_img = ann["image_id"].to_numpy()
    sorter = np.argsort(ids, kind="stable")
    pos = sorter[np.searchsorted(ids, a_img, sorter=sorter)] if len(a_img) else np.zeros(0, np.int64)
    order = np.argsort(pos, kind="stable")
    counts = np.bincount(pos, minlength=len(ids)) if len(pos) else np.zeros(len(ids), np.int64)
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    boxes = np.stack([ann[c].to_numpy().astype(np.float64) for c in ("x1", "y1", "x2", "y2")], 1)
    return {"image_id": ids, "offsets": offsets, "boxes": boxes.reshape(-1, 4)[order],
            "labels": ann["category_id"].to_numpy().astype(np.int64)[order]}


def evaluate_model(model: Any, manifest_rows: pa.Table, annotations: pa.Table, categories: Sequence[dict], *,
                   input_size: int, batch_size: int = 8, device: Any = "cpu", max_pixels: int = 64_000_000,
                   progress: bool = False) -> dict:
    """Predict on the given images and evaluate with :func:`coco_eval`.

    Images are decoded and letterboxed to `input_size` with
    :func:`engine.images.load_batch` and run through :func:`engine.inference.predict`
    (view "orig", at most 100 boxes per image as COCO counts, no ROI embeddings). The
    model is put in eval mode by `predict`.

    Args:
        model: a detector from `engine.detectors.build_detector` / `load_checkpoint`.
        manifest_rows: the test images: pyarrow Table with image_id, uri, width, height.
        annotations: ANNOTATIONS_SCHEMA table (may hold other images too; they are ignored).
        categories: [{"id", "name"}, ...] as in categories.json.
        input_size: canvas side S the detector was built for.
        batch_size: images per forward pass.
        device: where to run the model.
        max_pixels: decompression-bomb limit per image.
        progress: show a tqdm bar on stderr.

    Returns:
        :func:`coco_eval`'s dict plus "seconds" (wall time of decoding, inference and
        evaluation).

    Raises:
        ValueError: missing columns, duplicate ids, batch_size < 1, or an image that cannot
            be decoded (the message names its uri and the reason).
    """
    t0 = time.perf_counter()
    cats = _category_list(categories)
    dets = predict_images(model, manifest_rows, input_size=input_size, batch_size=batch_size, device=device,
                          max_pixels=max_pixels, progress=progress, what="test image")
    ids = dets["image_id"]
    width = manifest_rows["width"].to_numpy().astype(np.int64)
    height = manifest_rows["height"].to_numpy().astype(np.int64)
    gt = gt_arrays(annotations, ids)
    res = coco_eval(gt, dets, cats, image_sizes=(width, height))
    res["seconds"] = time.perf_counter() - t0
    return res


def predict_images(model: Any, manifest_rows: pa.Table, *, input_size: int, batch_size: int = 8, device: Any = "cpu",
                   max_pixels: int = 64_000_000, progress: bool = False, what: str = "image") -> dict[str, np.ndarray]:
    """The detector's boxes on the given images (view "orig"): {"image_id", "offsets",
    "boxes" (n, 4) in image pixels, "scores", "labels"}, images in the rows' order.

    Raises:
        ValueError: missing columns, duplicate ids, batch_size < 1, no images, or an image
            that cannot be decoded (the message names `what`, its uri and the reason).
    """
    from tqdm import tqdm

    from poolscout.engine.data.images import load_batch
    from poolscout.engine.models.inference import predict

    _require_columns(manifest_rows, "manifest_rows", ["image_id", "uri", "width", "height"])
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = manifest_rows["image_id"].to_numpy().astype(np.int64)
    if len(ids) == 0:
        raise ValueError(f"no {what} to predict on")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("manifest_rows has duplicate image ids")
    uris = [str(u) for u in manifest_rows["uri"].to_pylist()]
    width = manifest_rows["width"].to_numpy().astype(np.int64)
    height = manifest_rows["height"].to_numpy().astype(np.int64)
    counts, boxes, scores, labels = [], [], [], []
    bs = int(batch_size)
    with tqdm(total=len(ids), desc="evaluate", unit="img", leave=False, disable=not progress) as bar:
        for i in range(0, len(ids), bs):
            sl = slice(i, i + bs)
            b = load_batch(uris[sl], int(input_size), int(max_pixels))
            for uri, err in zip(uris[sl], b["error"]):
                if err:
                    raise ValueError(f"{what} {uri} cannot be decoded: {err}")
            pred = predict(model, b["image"], image_id=ids[sl], width=width[sl], height=height[sl],
                           scale=b["scale"], content_w=b["content_w"], content_h=b["content_h"],
                           views=("orig",), roi_embeddings=False, device=device)
            counts.append(np.diff(pred["offsets"]))
            boxes.append(pred["boxes"])
            scores.append(pred["scores"])
            labels.append(pred["labels"])
            bar.update(len(b["image"]))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(np.concatenate(counts), out=offsets[1:])
    return {"image_id": ids, "offsets": offsets, "boxes": np.concatenate(boxes).reshape(-1, 4),
            "scores": np.concatenate(scores), "labels": np.concatenate(labels)}


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def prediction_agreement(a: dict, b: dict, *, iou: float = 0.5, min_score: float = 0.3) -> dict:
    """How much two models' detections on the same images agree (the stopping signal: once
    consecutive models agree on a fixed unlabeled sample, new labels change little).

    Per image, the boxes with score >= `min_score` of each model are matched greedily (the
    higher-scored first) to an unmatched box of the same class with IoU >= `iou`; the
    image's agreement is 2 * matches / (boxes of a + boxes of b), 1 when neither has a box
    (the detection analogue of the percent agreement of a stop set). Returns the mean over
    images, and the share of images whose agreement is 1.
    """
    ids_a, ids_b = np.asarray(a["image_id"]), np.asarray(b["image_id"])
    if not np.array_equal(ids_a, ids_b):
        raise ValueError("prediction_agreement: both predictions must cover the same images in the same order")
    per = np.ones(len(ids_a))
    for i in range(len(ids_a)):
        sa, sb = slice(a["offsets"][i], a["offsets"][i + 1]), slice(b["offsets"][i], b["offsets"][i + 1])
        ka, kb = np.asarray(a["scores"][sa]) >= min_score, np.asarray(b["scores"][sb]) >= min_score
        ba, la, pa_ = np.asarray(a["boxes"][sa])[ka], np.asarray(a["labels"][sa])[ka], np.asarray(a["scores"][sa])[ka]
        bb, lb = np.asarray(b["boxes"][sb])[kb], np.asarray(b["labels"][sb])[kb]
        n = len(ba) + len(bb)
        if n == 0:
            continue
        m = _iou_matrix(ba, bb)
        used = np.zeros(len(bb), bool)
        matches = 0
        for j in np.argsort(-pa_, kind="stable"):
            ok = (~used) & (lb == la[j]) & (m[j] >= iou)
            if ok.any():
                used[int(np.argmax(np.where(ok, m[j], -1.0)))] = True
                matches += 1
        per[i] = 2 * matches / n
    return {"agreement": float(per.mean()) if len(per) else 1.0, "identical_images": float((per == 1).mean())
            if len(per) else 1.0, "images": int(len(per))}


# --------------------------------------------------------------------------- acquisition
def acquisition_stats(annotations: pa.Table, ledger: pa.Table, categories: Sequence[dict], cycle: int) -> dict:
    """What the labeling of one loop cycle bought, class by class.

    "Candidate" images are those in state pool or labeled (test and rejected images are
    never candidates). Labeled images carry the cycle at which they became labeled (0 =
    the seed set). Prevalences come from whatever annotations exist for candidate images,
    so they are the true pool prevalences only when the pool's GT is known (simulation).

    Args:
        annotations: table with image_id and category_id (ANNOTATIONS_SCHEMA).
        ledger: table with image_id, state, cycle (LEDGER_SCHEMA).
        categories: [{"id", "name"}, ...]; every dict below has one key per name, in
            this order.
        cycle: the loop cycle k.

    Returns:
        {"new_images": labeled images with cycle == k, "new_boxes": their instances,
        "labeled_images": labeled images with cycle <= k, "labeled_boxes": their
        instances, "new_class_hist" {name: count}, "labeled_class_hist" {name: count},
        "pool_prevalence" {name: share of the candidate images' instances, None when they
        have none}, "prevalence_from_images": candidate images with at least one
        instance, "new_share" {name: share of the new instances, None when there are
        none}, "new_over_prevalence" {name: new_share / pool_prevalence, None when either
        is None or the prevalence is 0}, "rarest_class": the name with the smallest
        nonzero prevalence (ties: smallest id; None when no class occurs),
        "rarest_retrieval": labeled (cycle <= k) instances of the rarest class / all its
        candidate instances (None without a rarest class)}.

    Raises:
        ValueError: missing columns or bad categories.
    """
    cats = _category_list(categories)
    _require_columns(annotations, "annotations", ["image_id", "category_id"])
    _require_columns(ledger, "ledger", ["image_id", "state", "cycle"])
    k = int(cycle)
    names = [c["name"] for c in cats]
    cat_ids = np.array([c["id"] for c in cats], np.int64)

    led_id = ledger["image_id"].to_numpy().astype(np.int64)
    state = np.asarray(ledger["state"].to_pylist(), dtype=object)
    led_cycle = ledger["cycle"].to_numpy(zero_copy_only=False)
    is_labeled = state == "labeled"
    lab_cycle = np.where(is_labeled, np.nan_to_num(led_cycle.astype(np.float64), nan=np.inf), np.inf)
    new_ids = led_id[is_labeled & (lab_cycle == k)]
    labeled_ids = led_id[is_labeled & (lab_cycle <= k)]
    cand_ids = led_id[np.isin(state, _CANDIDATE_STATES)]

    a_img = annotations["image_id"].to_numpy().astype(np.int64)
    a_cat = annotations["category_id"].to_numpy().astype(np.int64)

    def hist(ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Instances per category (in `cats` order) among images `ids`, and their total."""
        mask = np.isin(a_img, ids)
        cnt = np.array([(a_cat[mask] == c).sum() for c in cat_ids], np.int64)
        return cnt, int(mask.sum())

    new_cnt, new_boxes = hist(new_ids)
    lab_cnt, labeled_boxes = hist(labeled_ids)
    cand_cnt, cand_boxes = hist(cand_ids)

    prevalence = [float(c) / cand_boxes if cand_boxes else None for c in cand_cnt]
    share = [float(c) / new_boxes if new_boxes else None for c in new_cnt]
    ratio = [s / p if (s is not None and p) else None for s, p in zip(share, prevalence)]

    rarest = rarest_retrieval = None
    nz = [j for j, c in enumerate(cand_cnt) if c > 0]
    if nz:
        j = min(nz, key=lambda j: (int(cand_cnt[j]), int(cat_ids[j])))
        rarest = names[j]
        rarest_retrieval = float(lab_cnt[j]) / float(cand_cnt[j])
        # labeled images are candidates, so lab_cnt[j] <= cand_cnt[j]
    return {
        "new_images": int(len(new_ids)),
        "new_boxes": new_boxes,
        "labeled_images": int(len(labeled_ids)),
        "labeled_boxes": labeled_boxes,
        "new_class_hist": {n: int(c) for n, c in zip(names, new_cnt)},
        "labeled_class_hist": {n: int(c) for n, c in zip(names, lab_cnt)},
        "pool_prevalence": dict(zip(names, prevalence)),
        "prevalence_from_images": int(len(np.intersect1d(np.unique(a_img), cand_ids))),
        "new_share": dict(zip(names, share)),
        "new_over_prevalence": dict(zip(names, ratio)),
        "rarest_class": rarest,
        "rarest_retrieval": rarest_retrieval,
    }


__all__ = ["acquisition_stats", "coco_eval", "evaluate_model", "gt_arrays"]
