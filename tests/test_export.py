"""Exports: COCO JSON (loaded back with pycocotools), Label Studio tasks, CSV."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pytest
from pycocotools.coco import COCO

from poolscout.engine.data import export as E
from poolscout.engine.core import io

CATS = [{"id": 1, "name": "crack", "supercategory": "defect"}, {"id": 2, "name": "dent", "supercategory": "defect"}]


def manifest() -> pa.Table:
    return pa.table({
        "image_id": pa.array([7, 8, 9], pa.int64()),
        "uri": ["file:///d/a.jpg", "file:///d/b.jpg", "s3://bucket/c.png"],
        "width": pa.array([200, 100, 50], pa.int32()),
        "height": pa.array([100, 100, 40], pa.int32()),
        "source_key": ["a.jpg", "b.jpg", "c.png"],
    }, schema=io.MANIFEST_SCHEMA)


def selection() -> pa.Table:
    # stored out of rank order on purpose; image 8 is not selected
    return pa.table({
        "image_id": pa.array([7, 9], pa.int64()),
        "rank": pa.array([1, 0], pa.int32()),
        "score": pa.array([0.5, 0.75], pa.float64()),
        "rationale": ['{"topk": {}}', '{"topk": {}}'],
    }, schema=io.SELECTION_SCHEMA)


def preds() -> dict[str, np.ndarray]:
    # images 7: two boxes (.9, .2), 8: one box, 9: one box (.4)
    return {
        "image_id": np.array([7, 8, 9], np.int64),
        "offsets": np.array([0, 2, 3, 4], np.int64),
        "boxes": np.array([[10, 20, 50, 80], [0, 0, 5, 5], [1, 1, 2, 2], [5, 4, 30, 24]], np.float32),
        "scores": np.array([0.9, 0.2, 0.99, 0.4], np.float32),
        "labels": np.array([2, 1, 1, 1], np.int64),
        "probs": np.full((4, 3), 1 / 3, np.float32),
    }


def test_coco_export_loads_and_has_boxes(tmp_path):
    path = tmp_path / "export" / "coco.json"
    summary = E.export_coco(path, selection(), manifest(), preds(), CATS, min_score=0.3)
    assert summary == {"format": "coco", "path": str(path), "images": 2, "annotations": 2}
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [7, 9]
    img7 = coco.loadImgs(7)[0]
    assert (img7["file_name"], img7["width"], img7["height"], img7["poolscout_rank"], img7["poolscout_score"]) == \
        ("a.jpg", 200, 100, 1, 0.5)
    doc = json.loads(path.read_text())
    assert [im["id"] for im in doc["images"]] == [9, 7]  # rank order
    a7 = coco.loadAnns(coco.getAnnIds(imgIds=7))
    assert len(a7) == 1  # the 0.2 box is filtered out
    # x1 y1 x2 y2 = 10 20 50 80 -> x y w h = 10 20 40 60, area 2400
    assert a7[0]["bbox"] == [10.0, 20.0, 40.0, 60.0]
    assert a7[0]["area"] == 2400.0 and a7[0]["iscrowd"] == 0 and a7[0]["category_id"] == 2
    assert a7[0]["score"] == pytest.approx(0.9)
    a9 = coco.loadAnns(coco.getAnnIds(imgIds=9))
    assert a9[0]["bbox"] == [5.0, 4.0, 25.0, 20.0] and a9[0]["area"] == 500.0
    assert len({a["id"] for a in doc["annotations"]}) == 2
    assert coco.loadCats(2)[0]["name"] == "dent"


def test_coco_min_score_and_no_predictions(tmp_path):
    s = E.export_coco(tmp_path / "c.json", selection(), manifest(), preds(), CATS, min_score=0.1)
    assert s["annotations"] == 3
    s = E.export_coco(tmp_path / "c.json", selection(), manifest(), preds(), CATS, min_score=0.95)
    assert s["annotations"] == 0
    s = E.export_coco(tmp_path / "n.json", selection(), manifest(), None, CATS)
    assert s["annotations"] == 0 and s["images"] == 2
    assert len(COCO(str(tmp_path / "n.json")).getImgIds()) == 2


def test_export_errors(tmp_path):
    p = preds()
    p["labels"] = np.array([5, 1, 1, 1])
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        E.export_coco(tmp_path / "c.json", selection(), manifest(), p, CATS, min_score=0.1)
    with pytest.raises(ValueError, match=r"manifest lacks selected image ids \[9\]"):
        E.export_csv(tmp_path / "x.csv", selection(), manifest().slice(0, 2))
    sub = {k: v for k, v in preds().items()}
    sub["image_id"] = np.array([7, 8, 10])
    with pytest.raises(ValueError, match=r"predictions lack"):
        E.export_coco(tmp_path / "c.json", selection(), manifest(), sub, CATS)


def test_label_studio_percent_coordinates(tmp_path):
    path = tmp_path / "ls.json"
    s = E.export_label_studio(path, selection(), manifest(), preds(), CATS, min_score=0.3, model_version="m1")
    assert s["images"] == 2 and s["annotations"] == 2
    tasks = json.loads(path.read_text())
    assert [t["id"] for t in tasks] == [9, 7]
    t7 = tasks[1]
    assert t7["data"] == {"image": "file:///d/a.jpg", "image_id": 7, "poolscout_rank": 1}
    pred = t7["predictions"][0]
    assert pred["model_version"] == "m1" and pred["score"] == 0.5
    (r,) = pred["result"]
    assert (r["type"], r["from_name"], r["to_name"]) == ("rectanglelabels", "label", "image")
    assert (r["original_width"], r["original_height"], r["image_rotation"]) == (200, 100, 0)
    # box 10 20 50 80 in a 200 x 100 image: x = 5 %, y = 20 %, w = 20 %, h = 60 %
    v = r["value"]
    assert [v["x"], v["y"], v["width"], v["height"]] == pytest.approx([5.0, 20.0, 20.0, 60.0])
    assert v["rotation"] == 0 and v["rectanglelabels"] == ["dent"]
    assert r["score"] == pytest.approx(0.9)
    # box 5 4 30 24 in 50 x 40: 10 %, 10 %, 50 %, 50 %
    v9 = tasks[0]["predictions"][0]["result"][0]["value"]
    assert [v9["x"], v9["y"], v9["width"], v9["height"]] == pytest.approx([10.0, 10.0, 50.0, 50.0])
    assert v9["rectanglelabels"] == ["crack"]


def test_csv_rows(tmp_path):
    path = tmp_path / "sel.csv"
    s = E.export_csv(path, selection(), manifest())
    assert s["images"] == 2
    rows = list(csv.reader(path.open()))
    assert rows == [
        ["image_id", "rank", "score", "uri", "source_key"],
        ["9", "0", "0.75", "s3://bucket/c.png", "c.png"],
        ["7", "1", "0.5", "file:///d/a.jpg", "a.jpg"],
    ]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
