"""Exports of a selection for annotators: COCO JSON, Label Studio tasks, CSV.

Inputs are the run-directory tables: `selection` (engine.io.SELECTION_SCHEMA: image_id,
rank, score, rationale), `manifest` (engine.io.MANIFEST_SCHEMA: image_id, uri, width,
height, source_key) and optionally a canonical prediction batch (engine.predictions) that
covers the selected ids; its original-view boxes with score >= `min_score` become
pre-annotations. Detector labels are category ids (1..C, as in categories.json).

Images come out in rank order. Every file is written atomically (temp file + os.replace);
each function returns a summary {"format", "path", "images", "annotations"}.
"""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from poolscout.engine.core import io

_NEEDED_MANIFEST = ("image_id", "uri", "width", "height", "source_key")


def _selected(selection: pa.Table, manifest: pa.Table) -> dict[str, np.ndarray]:
    """Selected rows joined with the manifest, in rank order (arrays of length B)."""
    for c in ("image_id", "rank", "score"):
        if c not in selection.column_names:
            raise ValueError(f"selection table has no column {c!r}")
    for c in _NEEDED_MANIFEST:
        if c not in manifest.column_names:
            raise ValueError(f"manifest table has no column {c!r}")
    ids = selection.column("image_id").to_numpy().astype(np.int64)
    rank = selection.column("rank").to_numpy().astype(np.int64)
    score = selection.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.lexsort((ids, rank))
    ids, rank, score = ids[order], rank[order], score[order]
    mids = manifest.column("image_id").to_numpy().astype(np.int64)
    rows = _lookup(mids, ids, "manifest")
    return {
        "image_id": ids,
        "rank": rank,
        "score": score,
        "uri": np.asarray(manifest.column("uri").to_pylist(), dtype=object)[rows],
        "source_key": np.asarray(manifest.column("source_key").to_pylist(), dtype=object)[rows],
        "width": manifest.column("width").to_numpy().astype(np.int64)[rows],
        "height": manifest.column("height").to_numpy().astype(np.int64)[rows],
    }


def _lookup(haystack: np.ndarray, needles: np.ndarray, what: str) -> np.ndarray:
    """Rows of `haystack` holding each of `needles`; ValueError naming the missing ids."""
    if len(needles) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(haystack) == 0:
        raise ValueError(f"{what} lacks selected image ids {needles[:10].tolist()}")
    order = np.argsort(haystack, kind="stable")
    pos = np.minimum(np.searchsorted(haystack[order], needles), len(haystack) - 1)
    rows = order[pos]
    miss = haystack[rows] != needles
    if miss.any():
        raise ValueError(f"{what} lacks selected image ids {needles[miss][:10].tolist()}")
    return rows


def _boxes_for(preds: dict[str, np.ndarray] | None, ids: np.ndarray, min_score: float) -> dict[str, np.ndarray]:
    """Orig-view boxes of the selected images with score >= min_score, grouped by image in
    selection order (highest score first within an image, as stored).

    Returns:
        {"img": (K,) index into `ids`, "boxes": (K, 4) float64, "scores": (K,), "labels": (K,)}.
    """
    if preds is None:
        return {"img": np.zeros(0, np.int64), "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                "labels": np.zeros(0, np.int64)}
    rows = _lookup(np.asarray(preds["image_id"], dtype=np.int64), ids, "predictions")
    off = np.asarray(preds["offsets"], dtype=np.int64)
    cnt = off[rows + 1] - off[rows]
    img = np.repeat(np.arange(len(ids)), cnt)
    # gather index: start of each selected image's run plus the position inside it
    within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    box_rows = np.repeat(off[rows], cnt) + within
    scores = np.asarray(preds["scores"], dtype=np.float64)[box_rows]
    keep = scores >= min_score
    return {
        "img": img[keep],
        "boxes": np.asarray(preds["boxes"], dtype=np.float64).reshape(-1, 4)[box_rows][keep],
        "scores": scores[keep],
        "labels": np.asarray(preds["labels"], dtype=np.int64)[box_rows][keep],
    }


def _cat_names(categories: list[dict], labels: np.ndarray) -> dict[int, str]:
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    unknown = sorted(set(np.unique(labels).tolist()) - set(names))
    if unknown:
        raise ValueError(f"predicted labels {unknown} are not category ids of categories.json "
                         f"(known: {sorted(names)})")
    return names


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def export_coco(path: str | Path, selection: pa.Table, manifest: pa.Table, preds: dict[str, np.ndarray] | None,
                categories: list[dict], min_score: float = 0.3) -> dict:
    """Write a COCO detection JSON of the selected images with model pre-annotations.

    Images: id = image_id, file_name = source_key, width, height, poolscout_rank,
    poolscout_score, poolscout_uri. Annotations: the orig-view boxes with score >=
    min_score as bbox [x, y, w, h] (x = x1, w = x2 - x1), area = w * h, iscrowd 0,
    category_id = the detector label, score; ids 1..K.

    Args:
        path: output .json.
        selection: SELECTION_SCHEMA table.
        manifest: MANIFEST_SCHEMA table covering the selected ids.
        preds: canonical batch covering the selected ids, or None (no annotations).
        categories: [{"id", "name", ...}] as in categories.json.
        min_score: box score threshold.

    Returns:
        {"format": "coco", "path", "images", "annotations"}.
    """
    sel = _selected(selection, manifest)
    bx = _boxes_for(preds, sel["image_id"], min_score)
    _cat_names(categories, bx["labels"])
    images = [
        {"id": i, "file_name": k, "width": w, "height": h, "poolscout_rank": r, "poolscout_score": _num(s),
         "poolscout_uri": u}
        for i, k, w, h, r, s, u in zip(sel["image_id"].tolist(), sel["source_key"].tolist(), sel["width"].tolist(),
                                       sel["height"].tolist(), sel["rank"].tolist(), sel["score"].tolist(),
                                       sel["uri"].tolist())
    ]
    b = bx["boxes"]
    xywh = np.column_stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]]) if len(b) else np.zeros((0, 4))
    area = xywh[:, 2] * xywh[:, 3]
    img_ids = sel["image_id"][bx["img"]]
    anns = [
        {"id": j + 1, "image_id": i, "category_id": c, "bbox": box, "area": a, "iscrowd": 0, "score": s}
        for j, (i, c, box, a, s) in enumerate(zip(img_ids.tolist(), bx["labels"].tolist(), xywh.tolist(),
                                                  area.tolist(), bx["scores"].tolist()))
    ]
    doc = {
        "info": {"description": "poolscout selection with model pre-annotations", "min_score": min_score},
        "images": images,
        "annotations": anns,
        "categories": [dict(c) for c in categories],
    }
    io.atomic_write_json(path, doc)
    return {"format": "coco", "path": str(path), "images": len(images), "annotations": len(anns)}


def export_label_studio(path: str | Path, selection: pa.Table, manifest: pa.Table,
                        preds: dict[str, np.ndarray] | None, categories: list[dict], min_score: float = 0.3,
                        model_version: str = "poolscout") -> dict:
    """Write a Label Studio task list (JSON import format) with rectangle pre-annotations.

    One task per selected image: {"id": image_id, "data": {"image": uri, "image_id",
    "poolscout_rank"}, "predictions": [{"model_version", "score": selection score,
    "result": [...]}]}. Each result is a "rectanglelabels" region for a labeling config with
    `<Image name="image">` and `<RectangleLabels name="label" toName="image">`; its value
    is in percent of the original size: x = 100 x1 / W, y = 100 y1 / H,
    width = 100 (x2 - x1) / W, height = 100 (y2 - y1) / H.

    Returns:
        {"format": "label_studio", "path", "images", "annotations"}.
    """
    sel = _selected(selection, manifest)
    bx = _boxes_for(preds, sel["image_id"], min_score)
    names = _cat_names(categories, bx["labels"])
    w = sel["width"].astype(np.float64)[bx["img"]]
    h = sel["height"].astype(np.float64)[bx["img"]]
    b = bx["boxes"]
    pct = (np.column_stack([b[:, 0] / w, b[:, 1] / h, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h]) * 100.0
           if len(b) else np.zeros((0, 4)))
    results: list[list[dict]] = [[] for _ in range(len(sel["image_id"]))]
    ids = sel["image_id"]
    for j, (i, p, lab, s) in enumerate(zip(bx["img"].tolist(), pct.tolist(), bx["labels"].tolist(),
                                           bx["scores"].tolist())):
        results[i].append({
            "id": f"{int(ids[i])}_{j}",
            "type": "rectanglelabels",
            "from_name": "label",
            "to_name": "image",
            "original_width": int(sel["width"][i]),
            "original_height": int(sel["height"][i]),
            "image_rotation": 0,
            "value": {"x": p[0], "y": p[1], "width": p[2], "height": p[3], "rotation": 0,
                      "rectanglelabels": [names[lab]]},
            "score": s,
        })
    tasks = [
        {"id": i, "data": {"image": u, "image_id": i, "poolscout_rank": r},
         "predictions": [{"model_version": model_version, "score": _num(s), "result": res}]}
        for i, u, r, s, res in zip(ids.tolist(), sel["uri"].tolist(), sel["rank"].tolist(), sel["score"].tolist(),
                                   results)
    ]
    io.atomic_write_json(path, tasks)
    return {"format": "label_studio", "path": str(path), "images": len(tasks), "annotations": int(len(b))}


def export_csv(path: str | Path, selection: pa.Table, manifest: pa.Table) -> dict:
    """Write image_id, rank, score, uri, source_key (header + one row per pick, rank order).

    Returns:
        {"format": "csv", "path", "images", "annotations": 0}.
    """
    sel = _selected(selection, manifest)
    buf = _io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["image_id", "rank", "score", "uri", "source_key"])
    wr.writerows(zip(sel["image_id"].tolist(), sel["rank"].tolist(), [repr(float(s)) for s in sel["score"]],
                     sel["uri"].tolist(), sel["source_key"].tolist()))
    io.atomic_write_text(path, buf.getvalue())
    return {"format": "csv", "path": str(path), "images": len(sel["image_id"]), "annotations": 0}


EXPORTERS = {"coco": export_coco, "label_studio": export_label_studio, "csv": export_csv}

__all__ = ["export_coco", "export_label_studio", "export_csv", "EXPORTERS"]
