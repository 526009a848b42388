"""Seeded synthetic steel-surface defect images with exact COCO boxes.

Each image is a grey steel-like texture (a base level, low-frequency shading, horizontal
rolling streaks and fine grain) with 0..max_defects defects drawn on it:

* ``scratch``: thin long bright or dark lines at any angle;
* ``inclusion``: small dark elongated blobs, roughly along the rolling direction;
* ``patch``: larger irregular darker or lighter regions with soft edges;
* ``pit``: clusters of small dark dots.

A defect changes pixels only inside its mask, and its box is the tight pixel box of that
mask (COCO ``[x, y, w, h]`` with pixel-edge coordinates: a mask spanning columns 3..7 gives
x=3, w=5). Image i is drawn from ``np.random.default_rng([seed, i])``, so the same seed
gives byte-identical files, and the first k images do not depend on ``n_images``.
"""
from __future__ import annotations

import io as _io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from poolscout.engine.core import io

CLASSES = ("scratch", "inclusion", "patch", "pit")
_VERSION = 1
_PLACEMENT_TRIES = 8
_MAX_IOU = 0.3


# --------------------------------------------------------------------------- texture
def _upsample(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a (g1, g2) grid to (h, w)."""
    g1, g2 = coarse.shape

    def axis(g: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = np.linspace(0.0, g - 1.0, n)
        i0 = np.floor(p).astype(np.int64)
        i1 = np.minimum(i0 + 1, g - 1)
        return i0, i1, p - i0

    r0, r1, fr = axis(g1, h)
    c0, c1, fc = axis(g2, w)
    rows = coarse[r0] * (1 - fr)[:, None] + coarse[r1] * fr[:, None]  # (h, g2)
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def _smooth1d(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return np.convolve(np.pad(x, r, mode="reflect"), k / k.sum(), mode="valid")


def _background(rng: np.random.Generator, s: int, texture: float = 1.0) -> np.ndarray:
    """(s, s) float64 steel-like texture around a random grey level; `texture` scales the
    shading, streaks and grain around the base level."""
    base = rng.uniform(95, 150)
    g = int(rng.integers(4, 8))
    low = _upsample(rng.normal(0, 1, (g, g)), s, s) * rng.uniform(5, 14)
    rows = _smooth1d(rng.normal(0, 1, s), rng.uniform(0.6, 2.0))
    xmod = 1.0 + 0.4 * _upsample(rng.normal(0, 1, (1, 5)), 1, s)[0]
    streaks = rng.uniform(3, 9) * rows[:, None] * xmod[None, :]
    grain = rng.normal(0, rng.uniform(2, 5), (s, s))
    if texture != 1.0:
        return base + texture * low + texture * streaks + texture * grain
    return base + low + streaks + grain


# --------------------------------------------------------------------------- defects
def _grid(cx: float, cy: float, rx: float, ry: float, s: int):
    """Pixel window around (cx, cy) clipped to the image: (y0, x0, yy, xx) or None."""
    x0, x1 = max(0, int(math.floor(cx - rx))), min(s, int(math.ceil(cx + rx)) + 1)
    y0, y1 = max(0, int(math.floor(cy - ry))), min(s, int(math.ceil(cy + ry)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return y0, x0, yy, xx


def _line(rng, s, k, length, width, wobble, freq, amp):
    """A straight crack of random length, angle and position: (y0, x0, weight, delta) or None.

    length, width, freq and amp are (low, high) ranges (length in image sides, width in
    pixels before the scale k, amp in grey levels); the weight is 1 on the centre line,
    falls off over half the width and is modulated by (1 - wobble) + wobble * sin(...)."""
    L = rng.uniform(*length) * s
    th = rng.uniform(0, math.pi)
    w = rng.uniform(*width) * k
    cx, cy = rng.uniform(0, s), rng.uniform(0, s)
    dx, dy = math.cos(th) * L, math.sin(th) * L
    g = _grid(cx, cy, abs(dx) / 2 + w + 1, abs(dy) / 2 + w + 1, s)
    if g is None:
        return None
    y0, x0, yy, xx = g
    px, py = xx - (cx - dx / 2), yy - (cy - dy / 2)
    t = np.clip((px * dx + py * dy) / (L * L), 0, 1)
    dist = np.hypot(px - t * dx, py - t * dy)
    wgt = np.clip(1 - dist / (w / 2 + 0.5), 0, 1)
    wgt *= (1 - wobble) + wobble * np.sin(t * rng.uniform(*freq) + rng.uniform(0, 6.3))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return y0, x0, wgt, sign * rng.uniform(*amp)


def _scratch(rng, s, k=1.0):
    return _line(rng, s, k, length=(0.25, 0.8), width=(0.8, 2.4), wobble=0.25, freq=(3, 12), amp=(25, 70))


def _inclusion(rng, s, k=1.0):
    a = max(2.0, rng.uniform(0.03, 0.09) * s * k)
    b = max(1.0, a * rng.uniform(0.2, 0.45))
    th = rng.uniform(-0.5, 0.5)
    cx, cy = rng.uniform(0, s), rng.uniform(0, s)
    g = _grid(cx, cy, a + 1, a + 1, s)
    if g is None:
        return None
    y0, x0, yy, xx = g
    u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
    v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
    phi = np.arctan2(v, u)
    r = np.hypot(u / a, v / b) * (1 + 0.15 * np.sin(3 * phi + rng.uniform(0, 6.3)))
    wgt = np.clip(1.3 * (1 - r), 0, 1)
    return y0, x0, wgt, -rng.uniform(35, 85)


def _patch(rng, s, k=1.0):  # already large: `k` does not apply
    R = rng.uniform(0.1, 0.28) * s
    cx, cy = rng.uniform(0, s), rng.uniform(0, s)
    amps = rng.uniform(0, 0.15, 3)
    phases = rng.uniform(0, 6.3, 3)
    g = _grid(cx, cy, R * 1.5 + 1, R * 1.5 + 1, s)
    if g is None:
        return None
    y0, x0, yy, xx = g
    phi = np.arctan2(yy - cy, xx - cx)
    edge = R * (1 + sum(amps[k] * np.sin((k + 2) * phi + phases[k]) for k in range(3)))
    dist = np.hypot(xx - cx, yy - cy)
    wgt = np.clip((edge - dist) / (0.35 * R), 0, 1)
    wgt *= 0.8 + 0.2 * rng.random(wgt.shape)
    wgt[dist >= edge] = 0
    sign = 1.0 if rng.random() < 0.35 else -1.0
    return y0, x0, wgt, sign * rng.uniform(15, 45)


def _pit(rng, s, k=1.0):
    Rc = max(2.0, rng.uniform(0.04, 0.12) * s * k)
    n = int(rng.integers(4, 16))
    cx, cy = rng.uniform(0, s), rng.uniform(0, s)
    off = np.clip(rng.normal(0, Rc / 2, (n, 2)), -Rc, Rc)
    radii = rng.uniform(0.6, 1.8, n) * k
    g = _grid(cx, cy, Rc + 3 * k, Rc + 3 * k, s)
    if g is None:
        return None
    y0, x0, yy, xx = g
    d = np.hypot(xx[None] - (cx + off[:, 0, None, None]), yy[None] - (cy + off[:, 1, None, None]))
    wgt = np.clip(1 - d / (radii[:, None, None] + 0.5), 0, 1).max(axis=0)
    return y0, x0, wgt, -rng.uniform(40, 90)


def _hairline(rng, s, k=1.0):
    """A subtle defect: a long, sub-pixel-thin, low-contrast crack (8-18 grey levels), the
    kind that uncertainty-only acquisition tends to miss."""
    return _line(rng, s, k, length=(0.3, 0.9), width=(0.5, 0.9), wobble=0.15, freq=(2, 6), amp=(8, 18))


_DRAW = {"scratch": _scratch, "inclusion": _inclusion, "patch": _patch, "pit": _pit, "hairline": _hairline}
# classes drawn only when class_weights gives them a positive weight (earlier pools unchanged)
OPTIONAL_CLASSES = ("hairline",)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# a pixel belongs to a defect's mask where the defect changes it by at least this share of
# its full intensity (the box keeps every touched pixel, weight > 0.02)
MASK_WEIGHT = 0.25


def _render(rng: np.random.Generator, s: int, probs: np.ndarray, max_defects: int, clean_fraction: float = 0.05,
            contrast: float = 1.0, defect_scale: float = 1.0, texture: float = 1.0, classes=CLASSES,
            mask: np.ndarray | None = None):
    """One image: (s, s) uint8 and [(class_index, x1, y1, x2, y2)] with exclusive x2, y2.
    `mask` ((s, s) uint8, zeros): filled with class_index + 1 where a defect's weight is at
    least MASK_WEIGHT (a later defect overwrites an earlier one); no random draw depends on it."""
    img = _background(rng, s, texture)
    if max_defects <= 0 or rng.random() < clean_fraction:
        k = 0
    else:
        k = int(rng.integers(1, max_defects + 1))
    boxes: list[tuple[int, int, int, int, int]] = []
    for _ in range(k):
        c = int(rng.choice(len(classes), p=probs))
        for _try in range(_PLACEMENT_TRIES):
            d = _DRAW[classes[c]](rng, s, defect_scale)
            if d is None:
                continue
            y0, x0, wgt, delta = d
            ys, xs = np.nonzero(wgt > 0.02)
            if len(ys) == 0:
                continue
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            if any(_iou(box, b[1:]) > _MAX_IOU for b in boxes):
                continue
            wgt = np.where(wgt > 0.02, wgt, 0.0)
            img[y0:y0 + wgt.shape[0], x0:x0 + wgt.shape[1]] += (delta * contrast) * wgt
            if mask is not None:
                mask[y0:y0 + wgt.shape[0], x0:x0 + wgt.shape[1]][wgt >= MASK_WEIGHT] = c + 1
            boxes.append((c, *box))
            break
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), boxes


# --------------------------------------------------------------------------- files
def _probs(class_weights: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    """(the pool's classes: CLASSES plus the optional ones given a positive weight, their
    probabilities)."""
    w = {c: 1.0 for c in CLASSES}
    known = (*CLASSES, *OPTIONAL_CLASSES)
    for name, v in (class_weights or {}).items():
        if name not in known:
            raise ValueError(f"class_weights: unknown class {name!r}; known: {', '.join(known)}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"class_weights[{name!r}] must be a finite number >= 0, got {v}")
        if name in CLASSES or v > 0:
            w[name] = v
    classes = [c for c in known if c in w]
    p = np.array([w[c] for c in classes], np.float64)
    if p.sum() <= 0:
        raise ValueError("class_weights: at least one class needs a positive weight")
    return classes, p / p.sum()


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = _io.BytesIO()
    im = Image.fromarray(pixels)
    if fmt == "png":
        im.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def generate(out_dir: str | Path, n_images: int = 200, size: int = 128, seed: int = 0,
             class_weights: dict[str, float] | None = None, max_defects: int = 3,
             image_format: str = "png", clean_fraction: float = 0.05, contrast: float = 1.0,
             defect_scale: float = 1.0, texture: float = 1.0, masks: bool = False) -> dict:
    """Write a synthetic defect pool: images + COCO annotations (+ segmentation masks).

    Args:
        out_dir: destination; gets ``images/syn_00000.png ...``, ``annotations.json``
            (COCO, category ids 1..4 in CLASSES order) and ``generation.json``.
        n_images: number of images N.
        size: side S of the square grey images.
        seed: the seed; the same seed gives byte-identical files.
        class_weights: relative frequency per class name (unlisted classes of CLASSES weigh
            1); an OPTIONAL_CLASSES name with a positive weight adds that class (category id
            5, supercategory "subtle"): "hairline", a long sub-pixel crack of 8-18 grey
            levels, GSAL's rare subtle class.
        max_defects: at most this many defects per image.
        image_format: "png" or "jpg".
        clean_fraction: probability that an image has no defect at all (an inspection line
            sees mostly clean parts; the default 0.05 keeps earlier generations unchanged).
        contrast: multiplies every defect's intensity change (1.0: the original look).
        defect_scale: multiplies the size of the small defects: scratch width, inclusion
            length and width, pit cluster radius and dot radii (patches are large already and
            keep their size; 1.0: the original look).
        texture: multiplies the background's shading, rolling streaks and grain around its
            base grey level (1.0: the original look; smaller is a calmer surface).
        masks: also write ``masks/<image stem>.png``: uint8 class ids (0 background, c for
            the c-th class) where a defect changes the pixel by at least MASK_WEIGHT of its
            intensity; the images and annotations do not change.

    Returns:
        {"images": Path, "annotations": Path, "classes": list[str], "n_images": N,
        "n_boxes": B} (+ "masks": Path). If ``out_dir`` already holds this exact generation, nothing is
        rewritten.

    Raises:
        ValueError: bad sizes, format or class weights.
    """
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if n_images < 0 or size < 16 or max_defects < 0:
        raise ValueError(f"need n_images >= 0, size >= 16, max_defects >= 0 (got {n_images}, {size}, {max_defects})")
    if not (0.0 <= float(clean_fraction) <= 1.0):
        raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
    if not (math.isfinite(float(contrast)) and float(contrast) > 0):
        raise ValueError(f"contrast must be a finite number > 0, got {contrast}")
    if not (math.isfinite(float(defect_scale)) and float(defect_scale) > 0):
        raise ValueError(f"defect_scale must be a finite number > 0, got {defect_scale}")
    if not (math.isfinite(float(texture)) and float(texture) >= 0):
        raise ValueError(f"texture must be a finite number >= 0, got {texture}")
    classes, probs = _probs(class_weights)
    out = Path(out_dir)
    img_dir, ann_path, gen_path = out / "images", out / "annotations.json", out / "generation.json"
    params = {"version": _VERSION, "n_images": int(n_images), "size": int(size), "seed": int(seed),
              "class_weights": {c: float(p) for c, p in zip(classes, probs)}, "max_defects": int(max_defects),
              "image_format": fmt, "clean_fraction": float(clean_fraction),
              "contrast": float(contrast)}
    # Only non-default values are recorded, so earlier generations still match their record.
    if float(defect_scale) != 1.0:
        params["defect_scale"] = float(defect_scale)
    if float(texture) != 1.0:
        params["texture"] = float(texture)
    if masks:
        params["masks"] = True
    names = [f"syn_{i:05d}.{fmt}" for i in range(n_images)]
    mask_dir = out / "masks"
    mask_names = [f"syn_{i:05d}.png" for i in range(n_images)] if masks else []
    result = {"images": img_dir, "annotations": ann_path, "classes": list(classes), "n_images": int(n_images)}
    if masks:
        result["masks"] = mask_dir
    if gen_path.is_file() and ann_path.is_file():
        try:
            old = json.loads(gen_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if (old.get("params") == params and all((img_dir / n).is_file() for n in names)
                and all((mask_dir / n).is_file() for n in mask_names)):
            return {**result, "n_boxes": int(old.get("n_boxes", 0))}
    if gen_path.exists():
        gen_path.unlink()  # the folder is being rewritten: no longer a finished generation
    img_dir.mkdir(parents=True, exist_ok=True)
    if masks:
        mask_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, name in enumerate(names):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, i])
        mask = np.zeros((size, size), np.uint8) if masks else None
        pixels, boxes = _render(rng, size, probs, max_defects, float(clean_fraction), float(contrast),
                                float(defect_scale), float(texture), classes, mask=mask)
        io.atomic_write_bytes(img_dir / name, _encode(pixels, fmt))
        if mask is not None:
            io.atomic_write_bytes(mask_dir / mask_names[i], _encode(mask, "png"))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for c, x1, y1, x2, y2 in boxes:
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1,
                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    keep = set(names)
    for p in img_dir.glob("syn_*.*"):  # images of an earlier, larger generation
        if p.name not in keep and p.suffix in (".png", ".jpg"):
            p.unlink()
    coco = {
        "info": {"description": "poolscout synthetic steel surface defects", "version": str(_VERSION),
                 "seed": int(seed)},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": c, "supercategory": "subtle" if c in OPTIONAL_CLASSES else "defect"}
                       for i, c in enumerate(classes)],
    }
    io.atomic_write_json(ann_path, coco)
    io.atomic_write_json(gen_path, {"params": params, "n_boxes": len(anns)})
    return {**result, "n_boxes": len(anns)}


__all__ = ["CLASSES", "OPTIONAL_CLASSES", "generate"]
