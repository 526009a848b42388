"""engine.pool: formats, bad inputs, ids, states, init_run."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, DatasetConfig
from poolscout.engine.data.pool import (
    assign_states,
    build_pool,
    image_id_for,
    infer_format,
    init_run,
    read_id_file,
    resolve_ids,
)
from poolscout.engine.core.run import RunDir, RunError
from tests.conftest_data import (
    write_bomb_png,
    write_cmyk_jpeg,
    write_empty,
    write_jpeg,
    write_png,
    write_png16,
    write_text_as_image,
    write_truncated_jpeg,
)

DS = DatasetConfig()


def _rows(t: pa.Table) -> list[dict]:
    return t.to_pylist()


def _boxes(tables, key: str) -> list[tuple]:
    """[(category name, x1, y1, x2, y2)] of one image, in ann_id order."""
    man = dict(zip(tables.manifest["source_key"].to_pylist(), tables.manifest["image_id"].to_pylist()))
    names = {c["id"]: c["name"] for c in tables.categories}
    iid = man[key]
    return [(names[r["category_id"]], r["x1"], r["y1"], r["x2"], r["y2"])
            for r in _rows(tables.annotations) if r["image_id"] == iid]


def _reasons(tables) -> dict[str, tuple[str, str]]:
    """source_key -> (stage, reason) of the rejected images."""
    keys = dict(zip(tables.manifest["image_id"].to_pylist(), tables.manifest["source_key"].to_pylist()))
    return {keys[r["image_id"]]: (r["stage"], r["reason"]) for r in _rows(tables.rejects)}


def _check_invariants(tables) -> None:
    ids = tables.manifest["image_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert set(tables.rejects["image_id"].to_pylist()) <= set(ids)
    assert set(tables.annotations["image_id"].to_pylist()).isdisjoint(tables.rejects["image_id"].to_pylist())
    assert tables.annotations["ann_id"].to_pylist() == list(range(1, len(tables.annotations) + 1))
    keys = tables.manifest["source_key"].to_pylist()
    assert keys == sorted(keys)
    assert tables.manifest.schema == io.MANIFEST_SCHEMA
    assert tables.annotations.schema == io.ANNOTATIONS_SCHEMA
    assert tables.rejects.schema == io.REJECTS_SCHEMA


# --------------------------------------------------------------------------- ids
def test_image_id_is_stable_and_positive():
    a = image_id_for("crazing_10.jpg")
    assert a == image_id_for("crazing_10.jpg")
    assert a == 2670907529680918317  # pinned: ids must not change between versions
    d = int.from_bytes(hashlib.blake2b(b"sub/a.jpg", digest_size=8).digest(), "big") & ((1 << 63) - 1)
    assert image_id_for("sub/a.jpg") == d
    ids = {image_id_for(f"dir/{i}.jpg") for i in range(2000)}
    assert len(ids) == 2000 and all(0 < i < 2**63 for i in ids)
    assert image_id_for("a.jpg") != image_id_for("A.jpg")


# --------------------------------------------------------------------------- folder only
def test_folder_only_recursive_and_sorted(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "b.jpg", 16, 12)
    write_png(root / "sub" / "a.png", 10, 8)
    write_jpeg(root / "sub" / "deep" / "C.JPG", 12, 9)
    (root / "notes.txt").write_text("not an image")
    write_jpeg(root / ".hidden" / "x.jpg")
    write_jpeg(root / "._y.jpg")
    t = build_pool(root, cfg=DS, progress=False)
    _check_invariants(t)
    rows = _rows(t.manifest)
    assert [r["source_key"] for r in rows] == ["b.jpg", "sub/a.png", "sub/deep/C.JPG"]
    assert [(r["width"], r["height"]) for r in rows] == [(16, 12), (10, 8), (12, 9)]
    assert rows[1]["uri"] == str((root / "sub" / "a.png").resolve())
    assert all(Path(r["uri"]).is_absolute() for r in rows)
    assert rows[0]["image_id"] == image_id_for("b.jpg")
    assert len(t.annotations) == 0 and t.categories == [] and len(t.rejects) == 0 and t.format is None
    t2 = build_pool(root, cfg=DatasetConfig(classes=("x", "y")), progress=False)
    assert [c["name"] for c in t2.categories] == ["x", "y"] and [c["id"] for c in t2.categories] == [1, 2]


def test_bad_images_are_rejected_good_odd_ones_accepted(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "good.jpg", 16, 12)
    write_empty(root / "empty.jpg")
    write_text_as_image(root / "text.jpg")
    write_truncated_jpeg(root / "trunc.jpg")
    write_bomb_png(root / "bomb.png")
    write_png16(root / "p16.png", np.full((6, 9), 30000, np.uint16))
    write_cmyk_jpeg(root / "cmyk.jpg", 20, 10)
    write_jpeg(root / "rot.jpg", 30, 10, exif_orientation=6)
    t = build_pool(root, cfg=DS, progress=False)
    _check_invariants(t)
    rej = _reasons(t)
    assert set(rej) == {"empty.jpg", "text.jpg", "trunc.jpg", "bomb.png"}
    assert rej["empty.jpg"] == ("init", "empty.jpg: 0-byte file")
    assert "text.jpg" in rej["text.jpg"][1] and "not an image" in rej["text.jpg"][1]
    assert "trunc.jpg: truncated JPEG" in rej["trunc.jpg"][1]
    assert rej["bomb.png"][1] == "bomb.png: decompression bomb: 30000x30000 = 900000000 px > max_pixels 64000000"
    sizes = {r["source_key"]: (r["width"], r["height"]) for r in _rows(t.manifest)}
    assert sizes["bomb.png"] == (0, 0) and sizes["empty.jpg"] == (0, 0)
    assert sizes["p16.png"] == (9, 6) and sizes["cmyk.jpg"] == (20, 10)
    assert sizes["rot.jpg"] == (10, 30)  # EXIF orientation 6 swaps width and height


def test_symlink_escaping_root_is_rejected(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg")
    outside = write_jpeg(tmp_path / "secret.jpg")
    os.symlink(outside, root / "link.jpg")
    os.symlink(root / "a.jpg", root / "inside.jpg")
    t = build_pool(root, cfg=DS, progress=False)
    rej = _reasons(t)
    assert list(rej) == ["link.jpg"] and "escapes images root" in rej["link.jpg"][1]


# --------------------------------------------------------------------------- COCO
def _coco(path: Path, images, annotations, categories=None) -> Path:
    cats = categories if categories is not None else [{"id": 7, "name": "dent", "supercategory": "surface"},
                                                       {"id": 3, "name": "crack", "supercategory": "surface"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def test_coco_parser_known_boxes(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg", 40, 30)
    write_jpeg(root / "sub" / "b.jpg", 40, 30)
    write_jpeg(root / "bg.jpg", 40, 30)
    write_jpeg(root / "unlisted.jpg", 40, 30)
    ann = _coco(tmp_path / "inst.json",
                [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                 {"id": 2, "file_name": "sub/b.jpg"}, {"id": 5, "file_name": "bg.jpg"}],
                [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5]},
                 {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30]},
                 {"id": 12, "image_id": 2, "category_id": 7, "bbox": [5.5, 6, 2, 3]},
                 {"id": 13, "image_id": 2, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1}])
    t = build_pool(root, ann, cfg=DS, progress=False)
    _check_invariants(t)
    assert t.format == "coco" and len(t.rejects) == 0
    assert t.categories == [{"id": 1, "name": "dent", "supercategory": "surface"},
                            {"id": 2, "name": "crack", "supercategory": "surface"}]
    assert _boxes(t, "a.jpg") == [("crack", 1, 2, 11, 7), ("dent", 0, 0, 40, 30)]
    assert _boxes(t, "sub/b.jpg") == [("dent", 5.5, 6, 7.5, 9)]  # crowd annotation skipped
    assert _boxes(t, "bg.jpg") == [] and _boxes(t, "unlisted.jpg") == []
    assert len(t.manifest) == 4


def test_coco_cfg_classes_order_and_unknown(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg", 20, 20)
    write_jpeg(root / "b.jpg", 20, 20)
    ann = _coco(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
                 {"id": 2, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    t = build_pool(root, ann, cfg=DatasetConfig(classes=("scratch", "crack")), progress=False)
    assert [c["name"] for c in t.categories] == ["scratch", "crack"]
    assert _boxes(t, "a.jpg") == [("crack", 1, 1, 6, 6)]
    rej = _reasons(t)
    assert list(rej) == ["b.jpg"]
    assert rej["b.jpg"][0] == "annotations"
    assert "c.json annotation id 2 category: unknown class 'dent'" in rej["b.jpg"][1]


def test_coco_duplicate_image_id_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg")
    ann = _coco(tmp_path / "dup.json", [{"id": 4, "file_name": "a.jpg"}, {"id": 4, "file_name": "b.jpg"}], [])
    with pytest.raises(ValueError, match=r"dup\.json.*duplicate image id 4"):
        build_pool(root, ann, cfg=DS, progress=False)


def test_coco_annotation_of_unknown_image_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg")
    ann = _coco(tmp_path / "u.json", [{"id": 1, "file_name": "a.jpg"}],
                [{"id": 99, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"u\.json: annotation id 99 refers to unknown image_id 2"):
        build_pool(root, ann, cfg=DS, progress=False)


def test_coco_missing_and_escaping_files_become_rejects(tmp_path):
    root = tmp_path / "data" / "imgs"
    write_jpeg(root / "a.jpg", 20, 20)
    write_jpeg(tmp_path / "data" / "x.jpg")  # exists, but outside the root
    ann = _coco(tmp_path / "m.json",
                [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"},
                 {"id": 3, "file_name": "../x.jpg"}, {"id": 4, "file_name": "/etc/passwd"},
                 {"id": 5, "file_name": "sub/../../x.jpg"}],
                [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5]},
                 {"id": 2, "image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5]}])
    t = build_pool(root, ann, cfg=DS, progress=False)
    _check_invariants(t)
    rej = _reasons(t)
    assert set(rej) == {"gone.jpg", "../x.jpg", "/etc/passwd", "sub/../../x.jpg"}
    assert rej["gone.jpg"] == ("init", "m.json image id 2 file_name 'gone.jpg': file not found")
    for k in ("../x.jpg", "/etc/passwd", "sub/../../x.jpg"):
        assert "path escapes images root" in rej[k][1] and k in rej[k][1]
    # escaping rows never point at the outside file
    uris = [r["uri"] for r in _rows(t.manifest)]
    assert str((tmp_path / "data" / "x.jpg").resolve()) not in uris
    assert len(t.annotations) == 0


def test_coco_path_suffix_match_but_no_fuzzy_match_across_folders(tmp_path):
    root = tmp_path / "train2017"
    write_jpeg(root / "a.jpg", 20, 20)
    write_jpeg(root / "val" / "x.jpg", 20, 20)
    write_jpeg(root / "deep" / "bare.jpg", 20, 20)
    ann = _coco(tmp_path / "s.json",
                [{"id": 1, "file_name": "train2017/a.jpg"}, {"id": 2, "file_name": "train/x.jpg"},
                 {"id": 3, "file_name": "bare.jpg"}],
                [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
                 {"id": 2, "image_id": 3, "category_id": 7, "bbox": [2, 2, 5, 5]}])
    t = build_pool(root, ann, cfg=DS, progress=False)
    _check_invariants(t)
    assert _boxes(t, "a.jpg") == [("crack", 1, 1, 6, 6)]           # listed as train2017/a.jpg
    assert _boxes(t, "deep/bare.jpg") == [("dent", 2, 2, 7, 7)]     # bare name found deeper
    rej = _reasons(t)
    assert list(rej) == ["train/x.jpg"] and "file not found" in rej["train/x.jpg"][1]
    assert _boxes(t, "val/x.jpg") == []  # not taken for train/x.jpg


@pytest.mark.parametrize("bbox,reason", [
    ([0, 0, -3, 4], "bbox: width -3 < 0"),
    ([float("nan"), 0, 3, 4], "bbox: x is nan"),
    ([0, 0, 3], "bbox: expected [x, y, width, height]"),
    ([15, 0, 10, 5], "bbox: x2 25 > image width 20"),
])
def test_coco_bad_boxes_reject_the_image(tmp_path, bbox, reason):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg", 20, 20)
    write_jpeg(root / "b.jpg", 20, 20)
    ann = _coco(tmp_path / "b.json", [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                [{"id": 8, "image_id": 1, "category_id": 3, "bbox": bbox},
                 {"id": 9, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},
                 {"id": 10, "image_id": 2, "category_id": 55, "bbox": [1, 1, 2, 2]}])
    t = build_pool(root, ann, cfg=DS, progress=False)
    rej = _reasons(t)
    assert rej["a.jpg"][0] == "annotations"
    assert rej["a.jpg"][1].startswith("b.json annotation id 8 bbox") and reason in rej["a.jpg"][1]
    assert "annotation id 10 category_id: unknown category 55" in rej["b.jpg"][1]
    assert len(t.annotations) == 0


# --------------------------------------------------------------------------- VOC
def _voc(path: Path, filename: str | None, objects, size=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<annotation>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box in objects:
        b = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>{b}</bndbox></object>")
    parts.append("</annotation>")
    path.write_text("\n".join(parts))
    return path


def test_voc_parser_matching_and_boxes(tmp_path):
    root, ann = tmp_path / "imgs", tmp_path / "xml"
    write_jpeg(root / "crazing_1.jpg", 50, 40)
    write_jpeg(root / "sub" / "scr_2.jpg", 50, 40)
    write_jpeg(root / "patches_3.jpg", 50, 40)
    write_jpeg(root / "odd.jpg", 50, 40)
    write_jpeg(root / "background.jpg", 50, 40)
    _voc(ann / "crazing_1.xml", "crazing_1.jpg", [("crazing", (2, 3, 20, 30)), ("scratch", (0, 0, 50, 40))])
    _voc(ann / "sub" / "scr_2.xml", "scr_2.jpg", [("scratch", (10.5, 1, 11.5, 39))])
    _voc(ann / "patches_3.xml", "patches_3", [("patches", (5, 5, 9, 9))])  # no extension (NEU quirk)
    _voc(ann / "odd.xml", "renamed_elsewhere.png", [("crazing", (1, 1, 4, 4))])  # falls back to the XML stem
    t = build_pool(root, ann, cfg=DS, progress=False)
    _check_invariants(t)
    assert t.format == "voc" and len(t.rejects) == 0
    assert [c["name"] for c in t.categories] == ["crazing", "patches", "scratch"]
    assert _boxes(t, "crazing_1.jpg") == [("crazing", 2, 3, 20, 30), ("scratch", 0, 0, 50, 40)]
    assert _boxes(t, "sub/scr_2.jpg") == [("scratch", 10.5, 1, 11.5, 39)]
    assert _boxes(t, "patches_3.jpg") == [("patches", 5, 5, 9, 9)]
    assert _boxes(t, "odd.jpg") == [("crazing", 1, 1, 4, 4)]
    assert _boxes(t, "background.jpg") == []
    # ann_id order: by image source_key, then file order
    keys = dict(zip(t.manifest["image_id"].to_pylist(), t.manifest["source_key"].to_pylist()))
    assert [keys[i] for i in t.annotations["image_id"].to_pylist()] == [
        "crazing_1.jpg", "crazing_1.jpg", "odd.jpg", "patches_3.jpg", "sub/scr_2.jpg"]


@pytest.mark.parametrize("objects,classes,reason", [
    ([("crazing", (1, 1, 5, 5)), ("crazing", (20, 1, 10, 5))], (),
     "crazing_1.xml object 2 bndbox: xmax 10 < xmin 20"),
    ([("crazing", (1, 9, 5, 4))], (), "crazing_1.xml object 1 bndbox: ymax 4 < ymin 9"),
    ([("crazing", (1, 1, 45, 5))], (), "crazing_1.xml object 1 bndbox: x2 45 > image width 40"),
    ([("crazing", (-5, 1, 4, 5))], (), "crazing_1.xml object 1 bndbox: x1 -5 < 0"),
    ([("crazing", (1, 1, "nan", 5))], (), "crazing_1.xml object 1 bndbox: xmax is nan"),
    ([("crazing", (1, 1, "abc", 5))], (), "crazing_1.xml object 1 bndbox: xmax 'abc' is not a number"),
    ([("rust", (1, 1, 4, 5))], ("crazing",), "crazing_1.xml object 1 name: unknown class 'rust'"),
    ([("crazing", (3, 3, 3.5, 9))], (), "smaller than dataset.min_box_size"),
])
def test_voc_malformed_boxes_reject_the_image(tmp_path, objects, classes, reason):
    root, ann = tmp_path / "imgs", tmp_path / "xml"
    write_jpeg(root / "crazing_1.jpg", 40, 30)
    write_jpeg(root / "crazing_2.jpg", 40, 30)
    _voc(ann / "crazing_1.xml", "crazing_1.jpg", objects)
    _voc(ann / "crazing_2.xml", "crazing_2.jpg", [("crazing", (1, 1, 4, 4))])
    t = build_pool(root, ann, cfg=DatasetConfig(classes=classes), progress=False)
    _check_invariants(t)
    rej = _reasons(t)
    assert list(rej) == ["crazing_1.jpg"]
    assert rej["crazing_1.jpg"][0] == "annotations"
    assert reason in rej["crazing_1.jpg"][1]
    assert _boxes(t, "crazing_2.jpg") == [("crazing", 1, 1, 4, 4)]


def test_voc_box_within_tolerance_is_clipped(tmp_path):
    root, ann = tmp_path / "imgs", tmp_path / "xml"
    write_jpeg(root / "a.jpg", 40, 30)
    _voc(ann / "a.xml", "a.jpg", [("c", (-1.5, -2, 41, 31.5))])
    t = build_pool(root, ann, cfg=DS, progress=False)
    assert len(t.rejects) == 0
    assert _boxes(t, "a.jpg") == [("c", 0, 0, 40, 30)]
    t = build_pool(root, ann, cfg=DatasetConfig(box_tolerance_px=1.0), progress=False)
    assert "y2 31.5 > image height 30" in _reasons(t)["a.jpg"][1]


def test_voc_broken_xml_dtd_orphan_and_duplicate(tmp_path):
    root, ann = tmp_path / "imgs", tmp_path / "xml"
    for n in ("broken", "dtd", "twice"):
        write_jpeg(root / f"{n}.jpg", 20, 20)
    (ann).mkdir()
    (ann / "broken.xml").write_text("<annotation><filename>broken.jpg</filename><object>")
    (ann / "dtd.xml").write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><annotation/>')
    _voc(ann / "orphan.xml", "orphan.jpg", [("c", (1, 1, 4, 4))])
    _voc(ann / "twice.xml", "twice.jpg", [("c", (1, 1, 4, 4))])
    _voc(ann / "twice_again.xml", "twice.jpg", [("c", (1, 1, 4, 4))])
    t = build_pool(root, ann, cfg=DS, progress=False)
    _check_invariants(t)
    rej = _reasons(t)
    assert "broken.xml: XML parse error" in rej["broken.jpg"][1]
    assert "dtd.xml: DTD / entity declarations are not allowed" in rej["dtd.jpg"][1]
    assert rej["orphan.jpg"] == ("init", "orphan.xml filename 'orphan.jpg': file not found")
    assert "annotated 2 times (twice.xml, twice_again.xml)" in rej["twice.jpg"][1]


def test_voc_raw_frame_boxes_follow_exif_rotation(tmp_path):
    root, ann = tmp_path / "imgs", tmp_path / "xml"
    write_jpeg(root / "raw.jpg", 40, 20, exif_orientation=6)   # shown 20 wide, 40 tall
    write_jpeg(root / "shown.jpg", 40, 20, exif_orientation=6)
    _voc(ann / "raw.xml", "raw.jpg", [("c", (2, 3, 12, 8))], size=(40, 20))     # stored frame
    _voc(ann / "shown.xml", "shown.jpg", [("c", (2, 3, 12, 8))], size=(20, 40))  # displayed frame
    t = build_pool(root, ann, cfg=DS, progress=False)
    assert len(t.rejects) == 0
    # orientation 6 (90 deg clockwise): (x, y) -> (H - y, x) with raw H = 20
    assert _boxes(t, "raw.jpg") == [("c", 12, 2, 17, 12)]
    assert _boxes(t, "shown.jpg") == [("c", 2, 3, 12, 8)]


# --------------------------------------------------------------------------- YOLO
def test_yolo_parser_with_classes_txt(tmp_path):
    root, lab = tmp_path / "imgs", tmp_path / "labels"
    write_jpeg(root / "train" / "a.jpg", 100, 50)
    write_jpeg(root / "train" / "b.jpg", 100, 50)
    write_jpeg(root / "c.jpg", 100, 50)
    (lab / "train").mkdir(parents=True)
    (lab / "classes.txt").write_text("zeta\nalpha\n")
    (lab / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.2 0.2\n\n")
    (lab / "train" / "b.txt").write_text("")
    t = build_pool(root, lab, cfg=DS, progress=False)
    _check_invariants(t)
    assert t.format == "yolo" and len(t.rejects) == 0
    assert [c["name"] for c in t.categories] == ["zeta", "alpha"]  # classes.txt order = YOLO index order
    assert _boxes(t, "train/a.jpg") == [("zeta", 40, 15, 60, 35), ("alpha", 0, 0, 20, 10)]
    assert _boxes(t, "train/b.jpg") == [] and _boxes(t, "c.jpg") == []


def test_yolo_names_from_data_yaml_and_cfg(tmp_path):
    root, lab = tmp_path / "imgs", tmp_path / "labels"
    write_jpeg(root / "a.jpg", 10, 10)
    lab.mkdir()
    (lab / "a.txt").write_text("1 0.5 0.5 0.4 0.4\n")
    (lab / "data.yaml").write_text("names: {0: cat, 1: dog}\n")
    t = build_pool(root, lab, fmt="yolo", cfg=DS, progress=False)
    assert _boxes(t, "a.jpg") == [("dog", 3, 3, 7, 7)]
    (lab / "data.yaml").unlink()
    t = build_pool(root, lab, fmt="yolo", cfg=DatasetConfig(classes=("x", "y")), progress=False)
    assert _boxes(t, "a.jpg") == [("y", 3, 3, 7, 7)]
    with pytest.raises(ValueError, match="need class names.*classes.txt.*data.yaml"):
        build_pool(root, lab, fmt="yolo", cfg=DS, progress=False)


@pytest.mark.parametrize("line,reason", [
    ("5 0.5 0.5 0.1 0.1", "a.txt line 1 class: index 5 out of range 0..1"),
    ("0 0.5 0.5 0.1", "a.txt line 1: expected 5 values"),
    ("x 0.5 0.5 0.1 0.1", "a.txt line 1 class: 'x' is not an integer"),
    ("0 nan 0.5 0.1 0.1", "a.txt line 1: cx is nan"),
    ("0 0.5 0.5 -0.1 0.1", "a.txt line 1: w -0.1 < 0"),
    ("0 0.95 0.5 0.5 0.1", "x2 120 > image width 100"),
])
def test_yolo_malformed_lines_reject_the_image(tmp_path, line, reason):
    root, lab = tmp_path / "imgs", tmp_path / "labels"
    write_jpeg(root / "a.jpg", 100, 50)
    lab.mkdir()
    (lab / "classes.txt").write_text("p\nq\n")
    (lab / "a.txt").write_text(line + "\n")
    t = build_pool(root, lab, cfg=DS, progress=False)
    rej = _reasons(t)
    assert rej["a.jpg"][0] == "annotations" and reason in rej["a.jpg"][1]


def test_format_inference(tmp_path):
    (tmp_path / "c.json").write_text("{}")
    assert infer_format(tmp_path / "c.json") == "coco"
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.xml").write_text("<annotation/>")
    assert infer_format(tmp_path / "v") == "voc"
    (tmp_path / "y" / "s").mkdir(parents=True)
    (tmp_path / "y" / "classes.txt").write_text("a\n")
    (tmp_path / "y" / "s" / "a.txt").write_text("")
    assert infer_format(tmp_path / "y") == "yolo"
    (tmp_path / "v" / "b.txt").write_text("")
    with pytest.raises(ValueError, match="both .xml"):
        infer_format(tmp_path / "v")
    with pytest.raises(ValueError, match="unknown annotation format"):
        build_pool(tmp_path, tmp_path / "c.json", fmt="kitti", cfg=DS, progress=False)


# --------------------------------------------------------------------------- id files and states
def _manifest(keys: list[str]) -> pa.Table:
    keys = sorted(keys)
    return pa.table({"image_id": pa.array([image_id_for(k) for k in keys], pa.int64()),
                     "uri": pa.array([f"/r/{k}" for k in keys]), "width": pa.array([8] * len(keys), pa.int32()),
                     "height": pa.array([8] * len(keys), pa.int32()), "source_key": pa.array(keys)},
                    schema=io.MANIFEST_SCHEMA)


def test_read_id_file_comments_and_lines(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("# header\n\ncrazing_10\n  sub/a.jpg   # inline\nx#y\n\n  \n42\n")
    toks = read_id_file(p)
    assert toks == ["crazing_10", "sub/a.jpg", "x#y", "42"]
    assert [t.line for t in toks] == [3, 4, 5, 8]


def test_resolve_ids_token_kinds(tmp_path):
    m = _manifest(["crazing_10.jpg", "sub/a.jpg", "sub/b.png", "other/b.jpg", "7.jpg"])
    iid = image_id_for
    got = resolve_ids(["crazing_10", "sub/a.jpg", "sub/b", str(iid("7.jpg")), "7", "crazing_10.jpg"], m, "t")
    assert got.dtype == np.int64
    assert got.tolist() == [iid("crazing_10.jpg"), iid("sub/a.jpg"), iid("sub/b.png"), iid("7.jpg")]


def test_resolve_ids_unknown_and_ambiguous(tmp_path):
    m = _manifest(["sub/b.png", "other/b.jpg", "a.jpg"])
    p = tmp_path / "labeled.txt"
    p.write_text("a\n# comment\nnope\n")
    with pytest.raises(ValueError, match=r"labeled\.txt: 1 unknown image id\(s\): line 3 'nope'"):
        resolve_ids(read_id_file(p), m, str(p))
    with pytest.raises(ValueError, match=r"ambiguous.*line 1 'b' \(2 images\)"):
        resolve_ids(["b"], m, "src")
    many = [f"zz{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"8 unknown image id\(s\): line 1 'zz0'.*line 5 'zz4' and 3 more") as e:
        resolve_ids(many, m, "src")
    assert "zz5" not in str(e.value)


def test_assign_states_fraction_determinism_and_order_independence():
    keys = [f"img_{i:03d}.jpg" for i in range(200)]
    m = _manifest(keys)
    rejected = np.array([image_id_for("img_000.jpg")])
    test = ["img_001", "img_002.jpg"]
    led = assign_states(m, rejected, seed_fraction=0.1, test=test, seed=3)
    assert led.schema == io.LEDGER_SCHEMA and len(led) == 200
    assert led["image_id"].to_pylist() == m["image_id"].to_pylist()
    d = led.to_pydict()
    st = dict(zip(d["image_id"], d["state"]))
    assert st[image_id_for("img_000.jpg")] == "rejected"
    assert st[image_id_for("img_001.jpg")] == "test" and st[image_id_for("img_002.jpg")] == "test"
    assert d["state"].count("labeled") == round(0.1 * 197)
    for s, c, by in zip(d["state"], d["cycle"], d["selected_by"]):
        assert (c, by) == ((0, "seed") if s == "labeled" else (-1, ""))
    lab = {i for i, s in st.items() if s == "labeled"}
    again = assign_states(m, rejected, seed_fraction=0.1, test=test, seed=3).to_pydict()
    assert again == d
    shuffled = m.take(pa.array(np.random.default_rng(0).permutation(200)))
    sd = assign_states(shuffled, rejected, seed_fraction=0.1, test=test, seed=3).to_pydict()
    assert {i for i, s in zip(sd["image_id"], sd["state"]) if s == "labeled"} == lab
    other = assign_states(m, rejected, seed_fraction=0.1, test=test, seed=4).to_pydict()
    assert {i for i, s in zip(other["image_id"], other["state"]) if s == "labeled"} != lab
    tiny = assign_states(m, rejected, seed_fraction=0.0001).to_pydict()
    assert tiny["state"].count("labeled") == 1
    none = assign_states(m, rejected).to_pydict()
    assert none["state"].count("pool") == 199 and none["state"].count("rejected") == 1
    with pytest.raises(ValueError, match="seed_fraction"):
        assign_states(m, rejected, seed_fraction=1.5)


def test_assign_states_labeled_list_and_conflicts():
    m = _manifest(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    led = assign_states(m, np.array([image_id_for("d.jpg")]), labeled=["a", "d"], test=["b.jpg"]).to_pydict()
    st = {k: s for k, s in zip(sorted(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]), led["state"])}
    assert st == {"a.jpg": "labeled", "b.jpg": "test", "c.jpg": "pool", "d.jpg": "rejected"}
    with pytest.raises(ValueError, match=r"both in --labeled and --test: a\.jpg"):
        assign_states(m, np.zeros(0, np.int64), labeled=["a"], test=["a.jpg"])
    with pytest.raises(ValueError, match=r"my_test\.txt: 1 unknown.*'zzz'"):
        assign_states(m, np.zeros(0, np.int64), test=["zzz"], source_test="--test my_test.txt")


# --------------------------------------------------------------------------- init_run
def _pool_with_problems(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    for i in range(10):
        write_jpeg(root / f"img_{i}.jpg", 24, 16, seed=i)
    write_empty(root / "empty.jpg")
    write_truncated_jpeg(root / "trunc.jpg")
    images = [{"id": i + 1, "file_name": f"img_{i}.jpg"} for i in range(10)]
    images += [{"id": 20, "file_name": "missing.jpg"}, {"id": 21, "file_name": "../up.jpg"}]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [1, 1, 5, 5]} for i in range(10)]
    anns.append({"id": 50, "image_id": 3, "category_id": 3, "bbox": [1, 1, -5, 5]})
    return root, _coco(tmp_path / "ann.json", images, anns)


def test_init_run_writes_consistent_tables_and_is_idempotent(tmp_path):
    root, ann = _pool_with_problems(tmp_path)
    ids = tmp_path / "test.txt"
    ids.write_text("# held out\nimg_0\nimg_1.jpg\n")
    run = RunDir(tmp_path / "run")
    cfg = Config()
    s = init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.25, cfg=cfg)
    assert s == {"images": 14, "rejected": 5, "boxes": 9, "classes": 2, "labeled": 2, "pool": 5, "test": 2,
                 "run": str(run.root)}
    for p in (run.manifest, run.annotations, run.categories, run.ledger, run.rejects, run.run_yaml):
        assert p.is_file()
    man, led, rej = io.read_table(run.manifest), io.read_table(run.ledger), io.read_table(run.rejects)
    assert man["image_id"].to_pylist() == led["image_id"].to_pylist()
    rejected = {i for i, s in zip(led["image_id"].to_pylist(), led["state"].to_pylist()) if s == "rejected"}
    assert rejected == set(rej["image_id"].to_pylist())
    reasons = " | ".join(rej["reason"].to_pylist())
    for frag in ("empty.jpg: 0-byte file", "trunc.jpg: truncated JPEG", "missing.jpg", "file not found",
                 "'../up.jpg': path escapes images root", "annotation id 50 bbox: width -5 < 0"):
        assert frag in reasons
    fp = run.fingerprint()
    for k in ("pool_hash", "code_version", "images_root", "annotations", "format", "created"):
        assert k in fp
    assert fp["format"] == "coco" and fp["images_root"] == str(root.resolve())
    assert run.config().seed == 0
    # same inputs: a no-op that touches nothing
    stamps = {p: p.stat().st_mtime_ns for p in run.root.iterdir()}
    time.sleep(0.01)
    assert init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.25, cfg=cfg) == s
    assert {p: p.stat().st_mtime_ns for p in run.root.iterdir()} == stamps
    # different inputs: refused, then forced
    with pytest.raises(RunError, match="different inputs.*seed_fraction.*--force"):
        init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.5, cfg=cfg)
    with pytest.raises(RunError, match="config"):
        init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.25, cfg=Config(seed=1))
    (run.root / "cycles" / "0").mkdir(parents=True)
    s2 = init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.5, cfg=cfg, force=True)
    assert s2["labeled"] == round(0.5 * 7) == 4 and s2["test"] == 2
    assert not (run.root / "cycles").exists() and list(run.root.glob("cycles.stale-*"))
    # a new image in the folder is a different input too
    write_jpeg(root / "img_new.jpg")
    with pytest.raises(RunError, match="images_listing"):
        init_run(run, images=root, annotations=ann, test=ids, seed_fraction=0.5, cfg=cfg)


def test_init_run_without_annotations(tmp_path):
    root = tmp_path / "imgs"
    write_jpeg(root / "a.jpg")
    write_jpeg(root / "b.jpg")
    run = RunDir(tmp_path / "run")
    s = init_run(run, images=root, cfg=Config())
    assert s["images"] == 2 and s["pool"] == 2 and s["boxes"] == 0 and s["rejected"] == 0
    rej = io.read_table(run.rejects)
    assert len(rej) == 0 and rej.schema == io.REJECTS_SCHEMA
    assert json.loads(run.categories.read_text()) == []
    with pytest.raises(ValueError, match="labeled images need annotations; pass --annotations"):
        init_run(RunDir(tmp_path / "r2"), images=root, seed_fraction=0.5, cfg=Config())
    ids = tmp_path / "l.txt"
    ids.write_text("a\n")
    with pytest.raises(ValueError, match="labeled images need annotations"):
        init_run(RunDir(tmp_path / "r3"), images=root, labeled=ids, cfg=Config())
    assert not (tmp_path / "r2" / "run.yaml").exists()


def test_init_run_labeled_file_and_conflict(tmp_path):
    root, ann = _pool_with_problems(tmp_path)
    lab, tst = tmp_path / "lab.txt", tmp_path / "tst.txt"
    lab.write_text("img_3\nimg_4\n")
    tst.write_text("img_4\n")
    with pytest.raises(ValueError, match="both in --labeled .*lab.txt and --test .*tst.txt: img_4.jpg"):
        init_run(RunDir(tmp_path / "run"), images=root, annotations=ann, labeled=lab, test=tst, cfg=Config())
    assert not RunDir(tmp_path / "run").exists()
    tst.write_text("img_5\n")
    s = init_run(RunDir(tmp_path / "run"), images=root, annotations=ann, labeled=lab, test=tst, cfg=Config())
    assert (s["labeled"], s["test"]) == (2, 1)
    led = io.read_table(RunDir(tmp_path / "run").ledger).to_pydict()
    assert sorted(c for c, st in zip(led["cycle"], led["state"]) if st == "labeled") == [0, 0]


def test_init_run_refuses_a_labeled_list_covering_the_whole_pool(tmp_path):
    root, ann = _pool_with_problems(tmp_path)
    tst, lab = tmp_path / "split_test.txt", tmp_path / "split_pool.txt"
    tst.write_text("img_0\n")
    # every non-test image (img_2 is rejected for its bad box, it stays rejected)
    lab.write_text("".join(f"img_{i}\n" for i in range(1, 10)))
    with pytest.raises(ValueError) as e:
        init_run(RunDir(tmp_path / "run"), images=root, annotations=ann, labeled=lab, test=tst, cfg=Config())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--labeled {lab} lists the whole pool (all 8 non-test images)")
    assert "nothing would be left to select" in msg
    assert not RunDir(tmp_path / "run").exists()
    # one image left over is a pool
    lab.write_text("".join(f"img_{i}\n" for i in range(1, 9)))
    s = init_run(RunDir(tmp_path / "run"), images=root, annotations=ann, labeled=lab, test=tst, cfg=Config())
    assert (s["labeled"], s["pool"], s["test"]) == (7, 1, 1)


@pytest.mark.parametrize("fraction", [1.0, 0.95])
def test_init_run_refuses_a_seed_fraction_leaving_no_pool(tmp_path, fraction):
    root, ann = _pool_with_problems(tmp_path)
    tst = tmp_path / "test.txt"
    tst.write_text("img_0\n")
    with pytest.raises(ValueError, match=rf"^--seed-fraction {fraction} labels the whole pool \(all 8 non-test "
                                         r"images\): nothing would be left to select"):
        init_run(RunDir(tmp_path / "run"), images=root, annotations=ann, seed_fraction=fraction, test=tst,
                 cfg=Config())
    assert not RunDir(tmp_path / "run").exists()


def test_cli_init_whole_pool_labeled_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from poolscout.jobs.cli import cli

    root, ann = _pool_with_problems(tmp_path)
    lab = tmp_path / "split_pool.txt"
    lab.write_text("".join(f"img_{i}\n" for i in range(10)))
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "run"), "--images", str(root), "--annotations", str(ann),
                                   "--labeled", str(lab)])
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # (the scan's progress bar aside)
    assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output
    assert errors[0].startswith(f"error: --labeled {lab} lists the whole pool (all 9 non-test images)")
    assert "nothing would be left to select" in errors[0]
    assert not (tmp_path / "run" / "run.yaml").exists()


# --------------------------------------------------------------------------- NEU-DET
def _neu() -> Path:
    env = os.environ.get("POOLSCOUT_SHARED")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "neu_det"


@pytest.mark.slow
def test_init_neu_det(tmp_path):
    neu = _neu()
    if not (neu / "annotations").is_dir():
        pytest.skip(f"NEU-DET not found at {neu}")
    run = RunDir(tmp_path / "neu")
    s = init_run(run, images=neu / "images", annotations=neu / "annotations", fmt="voc",
                 test=neu / "split_test.txt", cfg=Config())
    assert (s["images"], s["boxes"], s["classes"], s["test"], s["rejected"]) == (1800, 4189, 6, 360, 0)
    assert s["pool"] == 1440
    cats = [c["name"] for c in run.read_categories()]
    assert cats == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    man = io.read_table(run.manifest)
    assert set(man["width"].to_pylist()) == {200} and set(man["height"].to_pylist()) == {200}
