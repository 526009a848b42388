"""engine.data.segmentation: masks, the pixel ledger, the simulated pixel oracle, point labels."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from poolscout.engine.core import io
from poolscout.engine.data import segmentation as S
from poolscout.engine.data.pool import build_pool
from poolscout.engine.data.synthetic import generate
from tests.conftest import SHARED

CLASSES = ["scratch", "inclusion", "patch", "pit"]


@pytest.fixture(scope="module")
def seg_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_pool")
    pool = generate(out, n_images=12, size=48, seed=1, masks=True)
    manifest = build_pool(pool["images"], progress=False).manifest
    return pool, manifest


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_read_mask_formats_and_errors(tmp_path):
    ids = np.zeros((4, 6), np.uint8)
    ids[1, 2], ids[2, 3], ids[3, 5] = 2, S.IGNORE, 4
    _png(tmp_path / "ids.png", ids)
    assert np.array_equal(S.read_mask(tmp_path / "ids.png", fmt="ids", num_classes=4, size=(6, 4)), ids)
    with pytest.raises(S.MaskError, match=r"ids.png: class ids \[4\] outside 0..3"):
        S.read_mask(tmp_path / "ids.png", fmt="ids", num_classes=3)
    with pytest.raises(S.MaskError, match="mask is 6x4, its image 4x6"):
        S.read_mask(tmp_path / "ids.png", fmt="ids", num_classes=4, size=(4, 6))
    binary = np.zeros((3, 3), np.uint8)
    binary[0, 0], binary[1, 1] = 255, 100  # 100 is under the threshold (soft edge)
    _png(tmp_path / "MT_Crack" / "a.png", binary)
    m = S.read_mask(tmp_path / "MT_Crack" / "a.png", fmt="folder", num_classes=5, mask_class=3)
    assert m.tolist() == [[3, 0, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(S.MaskError, match="1 defect pixels in a folder that is not a class"):
        S.read_mask(tmp_path / "MT_Crack" / "a.png", fmt="folder", num_classes=5, mask_class=0)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(S.MaskError, match="junk.png: unreadable mask"):
        S.read_mask(tmp_path / "junk.png", fmt="ids", num_classes=4)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "ids.png", root / "link.png")
    with pytest.raises(S.MaskError, match="leaves the masks root"):
        S.read_mask(root / "link.png", fmt="ids", num_classes=4, root=root)
    with pytest.raises(ValueError, match="mask format"):
        S.read_mask(tmp_path / "ids.png", fmt="rle", num_classes=4)


def test_build_masks_matches_checks_and_rejects(seg_pool, tmp_path):
    pool, manifest = seg_pool
    masks, rejects = S.build_masks(manifest, pool["masks"], fmt="ids", classes=CLASSES)
    assert masks.num_rows == manifest.num_rows and rejects.num_rows == 0
    assert all(u.endswith(".png") for u in masks["mask_uri"].to_pylist())
    # a copy of the masks with one missing, one of the wrong size, one with a bad id
    bad_root = tmp_path / "masks"
    keys = manifest["source_key"].to_pylist()
    ids = manifest["image_id"].to_pylist()
    for k in keys[3:]:
        src = S.mask_path_for(k, pool["masks"])
        _png(S.mask_path_for(k, bad_root), np.asarray(Image.open(src)))
    _png(S.mask_path_for(keys[1], bad_root), np.zeros((10, 10)))
    _png(S.mask_path_for(keys[2], bad_root), np.full((48, 48), 9))
    masks, rejects = S.build_masks(manifest, bad_root, fmt="ids", classes=CLASSES, required=np.array([ids[0]]))
    assert masks.num_rows == manifest.num_rows - 3
    reasons = dict(zip(rejects["image_id"].to_pylist(), rejects["reason"].to_pylist()))
    assert "no mask" in reasons[ids[0]] and "a test image needs one" in reasons[ids[0]]
    assert "mask is 10x10, its image 48x48" in reasons[ids[1]] and "[9] outside 0..4" in reasons[ids[2]]
    # a pool image without a mask is no reject (a human labels it)
    masks, rejects = S.build_masks(manifest, bad_root, fmt="ids", classes=CLASSES)
    assert ids[0] not in rejects["image_id"].to_pylist() and ids[0] not in masks["image_id"].to_pylist()


def test_oracle_reveals_the_mask(seg_pool):
    pool, manifest = seg_pool
    masks, _ = S.build_masks(manifest, pool["masks"], fmt="ids", classes=CLASSES)
    store = S.MaskStore(masks, fmt="ids", num_classes=4, cache=2)
    rng = np.random.default_rng(0)
    iid = np.repeat(masks["image_id"].to_numpy()[:5], 20)
    x, y = rng.integers(0, 48, len(iid)), rng.integers(0, 48, len(iid))
    got = S.oracle_labels(store, iid, x, y)
    for uri, i in zip(masks["mask_uri"].to_pylist()[:5], masks["image_id"].to_pylist()[:5]):
        m = np.asarray(Image.open(uri))
        sel = iid == i
        assert np.array_equal(got[sel], m[y[sel], x[sel]])
    with pytest.raises(IndexError, match="outside its 48x48"):
        S.oracle_labels(store, iid[:1], np.array([48]), np.array([0]))
    with pytest.raises(KeyError):
        store.get(-1)


def test_pixel_ledger_labels_a_pixel_once_and_resumes(tmp_path):
    led = S.PixelLedger(tmp_path)
    assert led.count() == 0 and led.read().num_rows == 0
    r = led.add([1, 1, 2], [3, 4, 3], [5, 5, 5], [1, 0, 2], cycle=0, source="oracle")
    assert r == {"added": 3, "skipped": 0, "part": str(led.part_path(0, "oracle")), "resumed": False}
    # a killed step rerun with the same pixels: nothing written twice
    again = led.add([2, 1, 1], [3, 4, 3], [5, 5, 5], [2, 0, 1], cycle=0, source="oracle")
    assert again["resumed"] and led.count() == 3
    with pytest.raises(ValueError, match="exists with other pixels"):
        led.add([1], [9], [9], [1], cycle=0, source="oracle")
    with pytest.raises(ValueError, match="1 pixel.*image 1 x 3 y 5.*labeled once"):
        led.add([1, 7], [3, 0], [5, 0], [1, 1], cycle=1, source="oracle")
    with pytest.raises(ValueError, match="labeled once"):  # twice within one call
        led.add([7, 7], [0, 0], [0, 0], [1, 1], cycle=1, source="oracle")
    r = led.add([1, 7, 7], [3, 0, 0], [5, 0, 0], [1, 1, 1], cycle=1, source="human:a.csv", on_duplicate="skip")
    assert r["added"] == 1 and r["skipped"] == 2
    t = led.read()
    keys = S.pixel_keys(t["image_id"].to_numpy(), t["x"].to_numpy(), t["y"].to_numpy())
    assert len(np.unique(keys)) == len(keys) == 4
    assert sorted(set(t["source"].to_pylist())) == ["human:a.csv", "oracle"]
    assert led.labeled(7)["cycle"].to_pylist() == [1]
    # a temp file left by a kill mid-write is not a part
    (led.dir / ".part-00002-oracle.parquet.123.tmp").write_bytes(b"half")
    assert led.count() == 4


def test_point_labels_csv_and_coco_keypoints(seg_pool, tmp_path):
    _, manifest = seg_pool
    keys = manifest["source_key"].to_pylist()
    ids = manifest["image_id"].to_pylist()
    f = tmp_path / "points.csv"
    f.write_text(f"image,x,y,class\n{keys[0]},3.7,4.2,scratch\n{keys[1].rsplit('.', 1)[0]},0,0,background\n"
                 f"{keys[0]},10,11,3\n")
    t = S.read_point_labels(f, manifest, CLASSES)
    assert t.to_pydict() == {"image_id": [ids[0], ids[1], ids[0]], "x": [3, 0, 10], "y": [4, 0, 11],
                             "class": [1, 0, 3]}
    f.write_text(f"image,x,y,class\n{keys[0]},1,1,rust\n")
    with pytest.raises(ValueError, match=r"points.csv: line 2 field class: class 'rust'"):
        S.read_point_labels(f, manifest, CLASSES)
    f.write_text(f"image,x,y,class\n{keys[0]},1,1,pit\n{keys[0]},48,1,pit\n")
    with pytest.raises(ValueError, match=r"line 3: point \(48, 1\) lies outside its 48x48 image"):
        S.read_point_labels(f, manifest, CLASSES)
    f.write_text("image,x,class\nsyn_00000.png,1,pit\n")
    with pytest.raises(ValueError, match="header lacks column.*y"):
        S.read_point_labels(f, manifest, CLASSES)
    f.write_text("image,x,y,class\nnope.png,1,1,pit\n")
    with pytest.raises(ValueError, match="unknown image"):
        S.read_point_labels(f, manifest, CLASSES)
    j = tmp_path / "kp.json"
    j.write_text(json.dumps({"images": [{"id": 7, "file_name": keys[2]}], "categories": [{"id": 1, "name": "pit"}],
                             "annotations": [{"image_id": 7, "category_id": 1, "keypoints": [5, 6, 2, 1, 1, 0]}]}))
    t = S.read_point_labels(j, manifest, CLASSES)
    assert t.to_pydict() == {"image_id": [ids[2]], "x": [5], "y": [6], "class": [4]}  # v = 0: not labeled
    j.write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "category_id": 1, "keypoints": []}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] field image_id"):
        S.read_point_labels(j, manifest, CLASSES)


@pytest.mark.slow
def test_magnetic_tile_masks_are_all_valid():
    root = SHARED / "data" / "magnetic_tile"
    if not root.is_dir():
        pytest.skip(f"Magnetic Tile not found at {root}")
    classes = ["MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"]
    manifest = build_pool(root / "images", progress=False).manifest
    masks, rejects = S.build_masks(manifest, root / "masks", fmt="folder", classes=classes,
                                   required=manifest["image_id"].to_numpy())
    assert rejects.num_rows == 0 and masks.num_rows == manifest.num_rows == 592
    store = S.MaskStore(masks, fmt="folder", num_classes=5)
    free = [i for i, k in zip(manifest["image_id"].to_pylist(), manifest["source_key"].to_pylist())
            if k.startswith("MT_Free/")]
    crack = [i for i, k in zip(manifest["image_id"].to_pylist(), manifest["source_key"].to_pylist())
             if k.startswith("MT_Crack/")]
    assert all(store.get(i).max() == 0 for i in free[:20])
    assert all(set(np.unique(store.get(i)).tolist()) == {0, 3} for i in crack[:20])


def test_masks_table_round_trips(seg_pool, tmp_path):
    pool, manifest = seg_pool
    masks, _ = S.build_masks(manifest, pool["masks"], fmt="ids", classes=CLASSES)
    io.write_table(masks, tmp_path / "masks.parquet", S.MASKS_SCHEMA)
    back = io.read_table(tmp_path / "masks.parquet")
    assert back.equals(masks) and back.schema.field("mask_class").type == pa.int16()
