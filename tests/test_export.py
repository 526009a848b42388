"""Exports: COCO JSON (loaded back with pycocotools), Label Studio tasks, CSV."""
from __future__ import annotations

import csv
import json
import os
import stat
import xml.etree.ElementTree as ET

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
    # the image by Label Studio's local-files URL, relative to the images folder (uri minus source_key)
    assert t7["data"] == {"image": "/data/local-files/?d=a.jpg", "image_id": 7, "poolscout_rank": 1,
                          "poolscout_selection_score": 0.5}
    pred = t7["predictions"][0]
    # the prediction's score is the model's (mean box confidence), not the selection score
    assert pred["model_version"] == "m1" and pred["score"] == pytest.approx(0.9)
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


# --------------------------------------------------------------------------- Label Studio
def _sel_scores(scores) -> pa.Table:
    """The selection of images 9 (rank 0) and 7 (rank 1) with the given selection scores."""
    return pa.table({
        "image_id": pa.array([9, 7], pa.int64()),
        "rank": pa.array([0, 1], pa.int32()),
        "score": pa.array(scores, pa.float64()),
        "rationale": ['{"entropy_max": 0.61, "why": "top-k"}', "not json"],
    }, schema=io.SELECTION_SCHEMA)


def test_label_studio_scores_are_model_confidences(tmp_path):
    """Selection scores > 1 stay out of the prediction scores; they go to meta (and prefixed data)."""
    p = preds()
    p["scores"] = np.array([0.9, 0.5, 0.99, 1.3], np.float32)  # 1.3: an out-of-range detector score
    path = tmp_path / "ls.json"
    E.export_label_studio(path, _sel_scores([1.61, 1.14]), manifest(), p, CATS, min_score=0.3)
    t9, t7 = json.loads(path.read_text())
    (r9,) = t9["predictions"][0]["result"]
    assert r9["score"] == 1.0 and t9["predictions"][0]["score"] == 1.0  # clipped into [0, 1]
    scores7 = [r["score"] for r in t7["predictions"][0]["result"]]
    assert scores7 == pytest.approx([0.9, 0.5])  # each box's detector confidence
    assert t7["predictions"][0]["score"] == pytest.approx(0.7)  # their mean
    for t in (t9, t7):
        pr = t["predictions"][0]
        assert 0.0 <= pr["score"] <= 1.0 and all(0.0 <= r["score"] <= 1.0 for r in pr["result"])
    assert t9["meta"]["poolscout"] == {"rank": 0, "selection_score": 1.61, "source_key": "c.png",
                                       "rationale": {"entropy_max": 0.61, "why": "top-k"}}
    assert t7["meta"]["poolscout"]["rationale"] == "not json" and t7["meta"]["poolscout"]["selection_score"] == 1.14
    assert t9["data"]["poolscout_selection_score"] == 1.61 and t9["data"]["poolscout_rank"] == 0
    # an image without boxes: an empty prediction without a score
    E.export_label_studio(path, _sel_scores([1.61, 1.14]), manifest(), p, CATS, min_score=0.999)
    t9, t7 = json.loads(path.read_text())
    assert t7["predictions"] == [{"model_version": "poolscout", "result": []}]


def test_label_studio_image_references(tmp_path):
    man = pa.table({
        "image_id": pa.array([7, 9], pa.int64()),
        "uri": ["/srv/pool/sub dir/a&b#1.jpg", "s3://bucket/c.png"],
        "width": pa.array([200, 50], pa.int32()), "height": pa.array([100, 40], pa.int32()),
        "source_key": ["sub dir/a&b#1.jpg", "c.png"],
    }, schema=io.MANIFEST_SCHEMA)
    path = tmp_path / "ls.json"

    def refs(**kw) -> dict[int, str]:
        E.export_label_studio(path, selection(), man, None, CATS, **kw)
        return {t["id"]: t["data"]["image"] for t in json.loads(path.read_text())}

    # default: local files relative to the images folder (uri minus source_key), URL-quoted; URLs kept
    assert refs() == {7: "/data/local-files/?d=sub%20dir/a%26b%231.jpg", 9: "s3://bucket/c.png"}
    # relative to Label Studio's document root
    assert refs(local_files_root="/srv")[7] == "/data/local-files/?d=pool/sub%20dir/a%26b%231.jpg"
    with pytest.raises(ValueError, match=r"image 'sub dir/a&b#1.jpg' .* is not under export.local_files_root"):
        refs(local_files_root="/elsewhere")
    # an image server: the root URL joined with the quoted source_key (with or without the trailing /)
    for root in ("https://host/images/", "https://host/images"):
        assert refs(image_root_url=root) == {7: "https://host/images/sub%20dir/a%26b%231.jpg",
                                             9: "https://host/images/c.png"}
    assert E.image_ref("file:///d/x%20y.png", "x y.png") == "/data/local-files/?d=x%20y.png"


def test_label_studio_config_is_written_and_escaped(tmp_path):
    cats = [{"id": 1, "name": 'scratch <"deep"> & wide'}, {"id": 2, "name": "dent"}]
    path = tmp_path / "out" / "ls.json"
    s = E.export_label_studio(path, selection(), manifest(), preds(), cats, min_score=0.3)
    cfg_path = tmp_path / "out" / "label_studio_config.xml"
    assert s["config"] == str(cfg_path)
    root = ET.fromstring(cfg_path.read_text())
    img = root.find("Image")
    rl = root.find("RectangleLabels")
    assert root.tag == "View" and img.get("value") == "$image" and rl.get("toName") == img.get("name")
    assert rl.get("name") == "label"
    assert [lab.get("value") for lab in rl.findall("Label")] == ['scratch <"deep"> & wide', "dent"]
    tasks = json.loads(path.read_text())
    assert {r["value"]["rectanglelabels"][0] for t in tasks for r in t["predictions"][0]["result"]} == \
        {'scratch <"deep"> & wide', "dent"}
    with pytest.raises(ValueError, match=r"category name .* holds the character '\\x01'"):
        E.label_studio_config([{"id": 1, "name": "bad\x01name"}])
    with pytest.raises(ValueError, match=r"category names \['dent'\] occur more than once"):
        E.label_studio_config([{"id": 1, "name": "dent"}, {"id": 2, "name": "dent"}])


def test_label_studio_tasks_validate_with_the_sdk(tmp_path):
    """The labeling config and every exported task (predictions included) pass label-studio-sdk's
    offline validation (LabelInterface); the old selection-score semantics would not."""
    pytest.importorskip("label_studio_sdk")
    from label_studio_sdk.label_interface import LabelInterface

    cats = [{"id": 1, "name": 'scratch <"deep"> & wide'}, {"id": 2, "name": "dent"}]
    p = preds()
    p["boxes"][3] = [-3, -2, 60, 45]  # sticks out of the 50 x 40 image: clipped into it
    path = tmp_path / "ls.json"
    E.export_label_studio(path, _sel_scores([1.61, 1.14]), manifest(), p, cats, min_score=0.1)
    li = LabelInterface((tmp_path / "label_studio_config.xml").read_text())
    li.validate()  # raises on a bad config
    tasks = json.loads(path.read_text())
    assert len(tasks) == 2 and sum(len(t["predictions"][0]["result"]) for t in tasks) == 3
    for t in tasks:
        assert li.validate_task({k: v for k, v in t.items() if k != "predictions"}), t["id"]
        for pred in t["predictions"]:
            assert li.validate_prediction(pred, return_errors=True) == [], t["id"]
            for r in pred["result"]:
                v = r["value"]
                assert all(0.0 <= v[k] <= 100.0 for k in ("x", "y", "width", "height"))
                assert v["x"] + v["width"] <= 100.0 + 1e-9 and v["y"] + v["height"] <= 100.0 + 1e-9
    # the validator does catch what users hit: a selection score as prediction score, unknown labels
    bad = dict(tasks[0]["predictions"][0], score=1.61)
    assert any("Score must be between" in e for e in li.validate_prediction(bad, return_errors=True))
    res = [dict(tasks[0]["predictions"][0]["result"][0])]
    res[0]["value"] = dict(res[0]["value"], rectanglelabels=["rust"])
    assert li.validate_prediction({"result": res, "score": 0.5}, return_errors=True)
    assert not li.validate_task({"data": {"img": "x.png"}})  # the config's $image is missing


# --------------------------------------------------------------------------- CVAT
def test_cvat_xml(tmp_path):
    cats = [{"id": 1, "name": "crack & <pit>"}, {"id": 2, "name": "dent"}]
    man = manifest()
    man = man.set_column(4, "source_key", pa.array(["z/a&1.jpg", "b.jpg", "c.png"]))
    p = preds()
    p["boxes"][3] = [5, 4, 60, 24.126]  # x2 beyond the 50 px wide image: clipped
    path = tmp_path / "export" / "cvat.xml"
    s = E.export_cvat(path, selection(), man, p, cats, min_score=0.3, task_name="run <1>")
    assert s == {"format": "cvat", "path": str(path), "images": 2, "annotations": 2}
    assert path.read_bytes().startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.parse(path).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task.findtext("name") == "run <1>" and task.findtext("size") == "2"
    labels = task.findall("labels/label")
    assert [lab.findtext("name") for lab in labels] == ["crack & <pit>", "dent"]
    assert {lab.findtext("type") for lab in labels} == {"rectangle"}
    imgs = root.findall("image")
    # name order, frame ids 0..n-1 (CVAT's default lexicographical sorting)
    assert [(i.get("id"), i.get("name"), i.get("width"), i.get("height")) for i in imgs] == [
        ("0", "c.png", "50", "40"), ("1", "z/a&1.jpg", "200", "100")]
    (b9,) = imgs[0].findall("box")
    (b7,) = imgs[1].findall("box")
    assert b9.attrib == {"label": "crack & <pit>", "source": "auto", "occluded": "0", "xtl": "5.00", "ytl": "4.00",
                         "xbr": "50.00", "ybr": "24.13", "z_order": "0"}
    assert (b7.get("label"), b7.get("xtl"), b7.get("ytl"), b7.get("xbr"), b7.get("ybr")) == \
        ("dent", "10.00", "20.00", "50.00", "80.00")
    # no predictions: the images, no boxes
    E.export_cvat(path, selection(), man, None, cats)
    root = ET.parse(path).getroot()
    assert len(root.findall("image")) == 2 and not root.findall("image/box")
    man = man.set_column(4, "source_key", pa.array(["a\x0b.jpg", "b.jpg", "c.png"]))
    with pytest.raises(ValueError, match=r"source_key .* holds the character"):
        E.export_cvat(path, selection(), man, None, cats)


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_are_readable_by_others(tmp_path, umask, mode):
    """mkstemp makes 0600 files; the atomic writer gives the final file 0666 & ~umask."""
    old = os.umask(umask)
    try:
        out = tmp_path / "export"
        E.export_coco(out / "coco.json", selection(), manifest(), preds(), CATS)
        E.export_label_studio(out / "label_studio.json", selection(), manifest(), preds(), CATS)
        E.export_cvat(out / "cvat.xml", selection(), manifest(), preds(), CATS)
        E.export_csv(out / "selection.csv", selection(), manifest())
        io.write_table(selection(), out / "sel.parquet")
    finally:
        os.umask(old)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["coco.json", "cvat.xml", "label_studio.json", "label_studio_config.xml", "sel.parquet",
                     "selection.csv"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {f: mode for f in files}
