"""engine.synthetic: determinism, exact boxes, class weights, COCO validity."""
from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from poolscout.engine.data import synthetic
from poolscout.engine.core.config import DatasetConfig
from poolscout.engine.data.pool import build_pool
from poolscout.engine.data.synthetic import CLASSES, generate


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = generate(tmp_path / "a", n_images=12, size=48, seed=5)
    b = generate(tmp_path / "b", n_images=12, size=48, seed=5)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and len([k for k in fa if k.startswith("images/")]) == 12
    assert fa == fb
    assert a["n_boxes"] == b["n_boxes"] > 0
    c = generate(tmp_path / "c", n_images=12, size=48, seed=6)
    assert _files(tmp_path / "c")["images/syn_00000.png"] != fa["images/syn_00000.png"]
    assert c["n_images"] == 12 and c["classes"] == list(CLASSES)
    # image i does not depend on how many images are generated
    generate(tmp_path / "d", n_images=4, size=48, seed=5)
    fd = _files(tmp_path / "d")
    assert all(fd[f"images/syn_{i:05d}.png"] == fa[f"images/syn_{i:05d}.png"] for i in range(4))


def test_boxes_inside_tight_and_non_degenerate(tmp_path):
    s, seed = 64, 2
    r = generate(tmp_path, n_images=30, size=s, seed=seed, max_defects=3)
    coco = json.loads(r["annotations"].read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    by_img = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= s and y + h <= s
        assert w >= 2 and h >= 2 and a["area"] == w * h and a["iscrowd"] == 0
        assert 1 <= a["category_id"] <= 4
        by_img.setdefault(a["image_id"], []).append((x, y, w, h))
    assert max(len(v) for v in by_img.values()) <= 3
    assert len(by_img) >= 20  # most images have defects
    # every pixel a defect changed lies inside one of that image's boxes
    for im in coco["images"]:
        pix = np.asarray(Image.open(r["images"] / im["file_name"]))
        assert pix.shape == (s, s) and pix.dtype == np.uint8
        rng = np.random.default_rng([seed, im["id"] - 1])
        bg = np.clip(np.rint(synthetic._background(rng, s)), 0, 255).astype(np.uint8)
        inside = np.zeros((s, s), bool)
        for x, y, w, h in by_img.get(im["id"], []):
            inside[y:y + h, x:x + w] = True
        changed = pix != bg
        assert not (changed & ~inside).any(), im["file_name"]
        if im["id"] in by_img:
            assert changed.any()
        else:
            assert not changed.any()


def test_class_weights_shift_frequencies(tmp_path):
    def counts(weights, name):
        r = generate(tmp_path / name, n_images=80, size=32, seed=1, class_weights=weights)
        coco = json.loads(r["annotations"].read_text())
        c = Counter(CLASSES[a["category_id"] - 1] for a in coco["annotations"])
        return c, sum(c.values())

    base, n0 = counts(None, "base")
    rare, n1 = counts({"pit": 0.03}, "rare")
    none, _ = counts({"pit": 0.0, "scratch": 5.0}, "none")
    assert base["pit"] / n0 > 0.15
    assert rare["pit"] / n1 < 0.06
    assert none["pit"] == 0 and none["scratch"] > 3 * none["inclusion"]
    with pytest.raises(ValueError, match="unknown class 'rust'"):
        generate(tmp_path / "x", n_images=1, class_weights={"rust": 1.0})
    with pytest.raises(ValueError, match="positive weight"):
        generate(tmp_path / "x", n_images=1, class_weights={c: 0 for c in CLASSES})


def test_coco_file_loads_with_pycocotools_and_pool(tmp_path):
    from pycocotools.coco import COCO

    r = generate(tmp_path, n_images=10, size=48, seed=0, image_format="jpg")
    coco = COCO(str(r["annotations"]))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    assert [coco.loadCats(i)[0]["name"] for i in (1, 2, 3, 4)] == list(CLASSES)
    assert len(coco.getImgIds()) == 10 and len(coco.getAnnIds()) == r["n_boxes"]
    assert (r["images"] / "syn_00009.jpg").is_file()
    t = build_pool(r["images"], r["annotations"], cfg=DatasetConfig(), progress=False)
    assert len(t.manifest) == 10 and len(t.rejects) == 0 and len(t.annotations) == r["n_boxes"]
    assert [c["name"] for c in t.categories] == list(CLASSES)


def test_idempotent_and_regenerates_on_change(tmp_path):
    r1 = generate(tmp_path, n_images=6, size=32, seed=0)
    gen = tmp_path / "generation.json"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    time.sleep(0.01)
    assert generate(tmp_path, n_images=6, size=32, seed=0) == r1
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    assert json.loads(gen.read_text())["params"]["seed"] == 0
    r2 = generate(tmp_path, n_images=3, size=32, seed=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"syn_0000{i}.png" for i in range(3)]
    assert len(json.loads(r2["annotations"].read_text())["images"]) == 3
    (tmp_path / "images" / "syn_00001.png").unlink()  # damaged folder: regenerate
    generate(tmp_path, n_images=3, size=32, seed=0)
    assert (tmp_path / "images" / "syn_00001.png").is_file()


def test_default_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    r = generate(tmp_path, n_images=200, size=128, seed=0)
    dt = time.perf_counter() - t0
    assert r["n_images"] == 200 and r["n_boxes"] > 200
    assert dt < 20, f"200 images took {dt:.1f}s"
    sizes = {Image.open(p).size for p in list(r["images"].iterdir())[:5]}
    assert sizes == {(128, 128)}


def test_inspection_pool_knobs(tmp_path):
    """clean_fraction, contrast, defect_scale and texture: what the demo's inspection pool uses."""
    import json

    clean = generate(tmp_path / "clean", n_images=12, size=48, seed=1, clean_fraction=1.0)
    assert clean["n_boxes"] == 0
    half = generate(tmp_path / "half", n_images=60, size=48, seed=1, clean_fraction=0.5)
    coco = json.loads(half["annotations"].read_text())
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    assert 15 <= 60 - len(with_boxes) <= 45  # about half the images carry no defect
    base = generate(tmp_path / "base", n_images=6, size=48, seed=2)
    strong = generate(tmp_path / "strong", n_images=6, size=48, seed=2, contrast=2.0, texture=0.5, defect_scale=2.0)
    a = np.asarray(Image.open(base["images"] / "syn_00001.png"), np.float64)
    b = np.asarray(Image.open(strong["images"] / "syn_00001.png"), np.float64)
    assert not np.array_equal(a, b)
    for bad in ({"clean_fraction": 1.5}, {"contrast": 0}, {"defect_scale": float("nan")}, {"texture": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(tmp_path / "bad", n_images=2, size=32, **bad)


def test_optional_subtle_class(tmp_path):
    """hairline joins only with a positive weight: as category 5, supercategory "subtle", a
    thin low-contrast box; without it (or at weight 0) the pool is byte-identical to before."""
    import hashlib

    base = generate(tmp_path / "a", n_images=12, size=64, seed=4)
    zero = generate(tmp_path / "b", n_images=12, size=64, seed=4, class_weights={"hairline": 0})

    def digest(d):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((d / "images").iterdir())]

    assert digest(tmp_path / "a") == digest(tmp_path / "b") and base["classes"] == zero["classes"] == list(CLASSES)
    out = generate(tmp_path / "c", n_images=60, size=96, seed=4, class_weights={"hairline": 3.0})
    assert out["classes"] == [*CLASSES, "hairline"]
    coco = json.loads(out["annotations"].read_text())
    cat = {c["name"]: c for c in coco["categories"]}
    assert cat["hairline"]["id"] == 5 and cat["hairline"]["supercategory"] == "subtle"
    hair = [a for a in coco["annotations"] if a["category_id"] == 5]
    assert len(hair) >= 20
    # long (a border may clip one): the typical longer side is over a quarter of the image
    assert np.median([max(a["bbox"][2], a["bbox"][3]) for a in hair]) >= 0.25 * 96
    with pytest.raises(ValueError, match="hairline"):
        generate(tmp_path / "d", n_images=2, size=64, class_weights={"crack": 1.0})


def test_masks_add_segmentation_without_changing_the_pool(tmp_path):
    """masks=True writes class-id PNGs; images and annotations stay byte-identical; every
    mask pixel of class c lies in a box of class c, and nearly every box has mask pixels."""
    plain = generate(tmp_path / "a", n_images=30, size=64, seed=2, class_weights={"hairline": 1.0})
    seg = generate(tmp_path / "b", n_images=30, size=64, seed=2, class_weights={"hairline": 1.0}, masks=True)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k: v for k, v in fb.items() if k.startswith("images/")} == {k: v for k, v in fa.items()
                                                                      if k.startswith("images/")}
    assert fa["annotations.json"] == fb["annotations.json"] and "masks" not in plain
    coco = json.loads(seg["annotations"].read_text())
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    with_pixels, classes_seen = 0, set()
    for im in coco["images"]:
        m = np.asarray(Image.open(seg["masks"] / (im["file_name"].rsplit(".", 1)[0] + ".png")))
        assert m.shape == (64, 64) and m.dtype == np.uint8
        inside = np.zeros_like(m, dtype=bool)
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            box_of_class = np.zeros_like(inside)
            box_of_class[y:y + h, x:x + w] = True
            with_pixels += bool((m[box_of_class] == a["category_id"]).any())
            inside |= box_of_class & (m == a["category_id"])
        assert np.array_equal(inside, m > 0)  # no mask pixel outside a box of its class
        classes_seen |= set(np.unique(m).tolist())
    assert with_pixels >= 0.9 * len(coco["annotations"]) and classes_seen == {0, 1, 2, 3, 4, 5}
    again = generate(tmp_path / "b", n_images=30, size=64, seed=2, class_weights={"hairline": 1.0}, masks=True)
    assert again["masks"] == seg["masks"] and _files(tmp_path / "b") == fb  # a rerun rewrites nothing
