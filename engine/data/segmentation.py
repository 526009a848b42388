"""Segmentation pools: ground-truth masks, the pixel ledger, the simulated pixel oracle and
human point labels (docs/design.md, "Tasks").

Masks (`masks.parquet`: image_id, mask_uri, mask_class). One PNG per image, found under the
masks root at the image's source key with the extension replaced (``MT_Crack/a.jpg`` ->
``MT_Crack/a.png``), and read at the image's displayed size. Two formats:

* ``ids``: the pixel value is the class id (0 background, 1..C the classes in the order of
  categories.json, 255 = ignore: never a candidate, never scored);
* ``folder``: a binary mask (value > `threshold` = defect) whose class is the image's top
  folder (Magnetic Tile: ``MT_Crack/a.png``); a folder that is not a class (``MT_Free``)
  holds defect-free parts, so its masks must be empty.

Checks at init, each failure a rejects row naming the file: a mask that is missing (test
images need one; pool images may go without: a human labels them), unreadable, of another
size than its image, with ids outside 0..C and 255, or with defect pixels in a folder that
is no class. Mask paths stay inside the masks root (symlinks included).

Pixel ledger (``RUN/pixels/part-<cycle>-<source>.parquet``): image_id int64, x int32,
y int32 (column and row of the displayed image), class int16 (0 background), cycle int32,
source string ("oracle", "human:<file name>"). A part is written once, atomically; a
rerun of the same (cycle, source) with the same pixels is a no-op (a killed labeling step
resumes) and with other pixels an error. A pixel is labeled at most once over all parts.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from poolscout.engine.core import io

MASK_FORMATS = ("ids", "folder")
IGNORE = 255

MASKS_SCHEMA = pa.schema([("image_id", pa.int64()), ("mask_uri", pa.string()), ("mask_class", pa.int16())])
PIXELS_SCHEMA = pa.schema([("image_id", pa.int64()), ("x", pa.int32()), ("y", pa.int32()), ("class", pa.int16()),
                           ("cycle", pa.int32()), ("source", pa.string())])


class MaskError(ValueError):
    """A mask that cannot be used (the message names the file and what is wrong)."""


# --------------------------------------------------------------------------- masks
def _inside(path: Path, root: Path) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def mask_path_for(source_key: str, masks_root: str | Path) -> Path:
    """The mask file of an image: its source key with the extension replaced by .png."""
    stem = re.sub(r"\.[^./]*$", "", source_key)
    return Path(masks_root) / (stem + ".png")


def read_mask(path: str | Path, *, fmt: str, num_classes: int, mask_class: int = 0, threshold: int = 127,
              size: tuple[int, int] | None = None, root: str | Path | None = None) -> np.ndarray:
    """One mask as (H, W) uint8 class ids (0 background, 1..C, IGNORE).

    Args:
        path: the PNG.
        fmt: "ids" or "folder" (see the module docstring).
        num_classes: C.
        mask_class: the class of a "folder" mask's defect pixels (0: a defect-free folder).
        threshold: a "folder" mask's pixels above it are defect.
        size: the image's displayed (width, height), which the mask must have.
        root: when given, the file must lie inside it (symlinks resolved).

    Raises:
        MaskError: naming the file: outside the root, unreadable, wrong size or values.
    """
    p = Path(path)
    if fmt not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {', '.join(MASK_FORMATS)}, got {fmt!r}")
    if root is not None and not _inside(p, Path(root)):
        raise MaskError(f"{p}: mask path leaves the masks root {root}")
    try:
        with Image.open(p) as im:
            im.load()
            if fmt == "ids" and im.mode not in ("L", "P", "I", "I;16"):
                raise MaskError(f"{p}: an ids mask must be a single-channel PNG (L, P or I), got mode {im.mode}")
            arr = np.asarray(im if im.mode in ("L", "P", "I", "I;16") else im.convert("L"))
    except MaskError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MaskError(f"{p}: unreadable mask ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise MaskError(f"{p}: mask must be 2-D, got shape {arr.shape}")
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise MaskError(f"{p}: mask is {arr.shape[1]}x{arr.shape[0]}, its image {size[0]}x{size[1]}")
    if fmt == "ids":
        bad = (arr > num_classes) & (arr != IGNORE)
        if bad.any():
            vals = sorted(set(np.unique(arr[bad]).tolist()))[:5]
            raise MaskError(f"{p}: class ids {vals} outside 0..{num_classes} (and {IGNORE} = ignore)")
        return arr.astype(np.uint8)
    defect = arr > threshold
    if mask_class == 0 and defect.any():
        raise MaskError(f"{p}: {int(defect.sum())} defect pixels in a folder that is not a class")
    return np.where(defect, np.uint8(mask_class), np.uint8(0))


def build_masks(manifest: pa.Table, masks_root: str | Path, *, fmt: str, classes: Sequence[str],
                required: np.ndarray | None = None, threshold: int = 127,
                progress: Callable[[Iterable], Iterable] | None = None) -> tuple[pa.Table, pa.Table]:
    """Match and check every image's mask.

    Args:
        manifest: MANIFEST_SCHEMA rows (rejected images included: they are skipped when
            their width is 0).
        masks_root: the folder of masks.
        fmt: "ids" or "folder".
        classes: the class names (ids 1..C); for "folder", the folder names.
        required: image ids that must have a mask (the test split).
        progress: wraps the row iterator (a tqdm), or None.

    Returns:
        (masks table MASKS_SCHEMA, rejects table REJECTS_SCHEMA rows for the bad ones).
    """
    root = Path(masks_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"masks folder {masks_root} not found")
    need = set(np.asarray(required if required is not None else [], np.int64).tolist())
    cls_of = {n: i + 1 for i, n in enumerate(classes)}
    rows = zip(manifest["image_id"].to_pylist(), manifest["uri"].to_pylist(), manifest["source_key"].to_pylist(),
               manifest["width"].to_pylist(), manifest["height"].to_pylist())
    out: dict[str, list] = {"image_id": [], "mask_uri": [], "mask_class": []}
    rej: dict[str, list] = {"image_id": [], "uri": [], "stage": [], "reason": []}
    for iid, uri, key, w, h in (progress(list(rows)) if progress else rows):
        if not w:
            continue  # already rejected at init
        p = mask_path_for(key, root)
        mclass = 0
        if fmt == "folder":
            top = key.split("/", 1)[0] if "/" in key else ""
            mclass = cls_of.get(top, 0)
        if not p.is_file():
            if iid in need:
                rej["image_id"].append(iid), rej["uri"].append(uri), rej["stage"].append("init")
                rej["reason"].append(f"{key}: no mask {p} (a test image needs one)")
            continue
        try:
            read_mask(p, fmt=fmt, num_classes=len(classes), mask_class=mclass, threshold=threshold,
                      size=(int(w), int(h)), root=root)
        except MaskError as e:
            rej["image_id"].append(iid), rej["uri"].append(uri), rej["stage"].append("init")
            rej["reason"].append(str(e))
            continue
        out["image_id"].append(iid), out["mask_uri"].append(str(p)), out["mask_class"].append(mclass)
    return pa.table(out, schema=MASKS_SCHEMA), pa.table(rej, schema=io.REJECTS_SCHEMA)


class MaskStore:
    """Masks by image id, read on demand and kept in a small LRU cache."""

    def __init__(self, masks: pa.Table, *, fmt: str, num_classes: int, threshold: int = 127, cache: int = 64):
        self._uri = dict(zip(masks["image_id"].to_pylist(), masks["mask_uri"].to_pylist()))
        self._cls = dict(zip(masks["image_id"].to_pylist(), masks["mask_class"].to_pylist()))
        self.fmt, self.num_classes, self.threshold = fmt, int(num_classes), int(threshold)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = int(cache)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._uri

    def ids(self) -> np.ndarray:
        return np.array(sorted(self._uri), np.int64)

    def get(self, image_id: int) -> np.ndarray:
        i = int(image_id)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        if i not in self._uri:
            raise KeyError(f"image {i} has no mask")
        m = read_mask(self._uri[i], fmt=self.fmt, num_classes=self.num_classes, mask_class=int(self._cls[i]),
                      threshold=self.threshold)
        self._cache[i] = m
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return m


def oracle_labels(store: MaskStore, image_id: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The simulated pixel oracle: the mask's class at each (image_id, x, y) -> (P,) int16.

    Raises:
        KeyError: an image without a mask; IndexError: a pixel outside its image.
    """
    image_id, x, y = (np.asarray(a, np.int64) for a in (image_id, x, y))
    out = np.empty(len(image_id), np.int16)
    order = np.argsort(image_id, kind="stable")
    bounds = np.flatnonzero(np.diff(image_id[order])) + 1
    for grp in np.split(order, bounds) if len(order) else []:
        m = store.get(int(image_id[grp[0]]))
        xs, ys = x[grp], y[grp]
        if (xs < 0).any() or (ys < 0).any() or (xs >= m.shape[1]).any() or (ys >= m.shape[0]).any():
            raise IndexError(f"image {int(image_id[grp[0]])}: pixel outside its {m.shape[1]}x{m.shape[0]} mask")
        out[grp] = m[ys, xs]
    return out


# --------------------------------------------------------------------------- pixel ledger
def pixel_keys(image_id: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One comparable key per pixel: a (P,) structured array (image_id, y, x)."""
    k = np.empty(len(image_id), dtype=[("image_id", "<i8"), ("y", "<i4"), ("x", "<i4")])
    k["image_id"], k["y"], k["x"] = image_id, y, x
    return k


class PixelLedger:
    """Which pixels of which image are labeled, with which class, when and by whom."""

    def __init__(self, run_root: str | Path):
        self.dir = Path(run_root) / "pixels"

    def part_path(self, cycle: int, source: str) -> Path:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source))[:80]
        return self.dir / f"part-{int(cycle):05d}-{tag}.parquet"

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def read(self, columns: list[str] | None = None) -> pa.Table:
        parts = self.parts()
        if not parts:
            t = io.empty_table(PIXELS_SCHEMA)
            return t.select(columns) if columns else t
        return pa.concat_tables([io.read_table(p, columns=columns) for p in parts])

    def labeled(self, image_id: int | None = None) -> pa.Table:
        t = self.read()
        return t if image_id is None else t.filter(pc.equal(t["image_id"], int(image_id)))

    def count(self) -> int:
        return sum(io.read_table(p, columns=["image_id"]).num_rows for p in self.parts())

    def add(self, image_id, x, y, cls, *, cycle: int, source: str, on_duplicate: str = "error") -> dict:
        """Append one labeling step's pixels as part (cycle, source).

        Args:
            on_duplicate: a pixel already labeled (in another part, or twice in this call):
                "error" raises, "skip" leaves it out and counts it.

        Returns:
            {"added", "skipped", "part", "resumed"}; resumed: the part existed with exactly
            these pixels (a rerun after a kill), nothing was written.

        Raises:
            ValueError: duplicates under "error", or the part exists with other pixels.
        """
        if on_duplicate not in ("error", "skip"):
            raise ValueError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        image_id, x, y = (np.asarray(a, np.int64).reshape(-1) for a in (image_id, x, y))
        cls = np.asarray(cls, np.int64).reshape(-1)
        if not (len(image_id) == len(x) == len(y) == len(cls)):
            raise ValueError("image_id, x, y and class need one value per pixel")
        if (x < 0).any() or (y < 0).any() or (x >= 2**31).any() or (y >= 2**31).any():
            raise ValueError("pixel coordinates must be >= 0")
        part = self.part_path(cycle, source)
        new = pixel_keys(image_id, x, y)
        if part.is_file():
            old = io.read_table(part)
            same = (old.num_rows == len(new) and np.array_equal(
                np.sort(pixel_keys(old["image_id"].to_numpy(), old["x"].to_numpy(), old["y"].to_numpy())),
                np.sort(new)))
            if not same:
                raise ValueError(f"{part} exists with other pixels: cycle {cycle} was labeled by {source} already")
            return {"added": 0, "skipped": 0, "part": str(part), "resumed": True}
        uniq, first = np.unique(new, return_index=True)
        dup_within = np.ones(len(new), bool)
        dup_within[first] = False
        prev = self.read(columns=["image_id", "x", "y"])
        seen = np.isin(new, pixel_keys(prev["image_id"].to_numpy(), prev["x"].to_numpy(), prev["y"].to_numpy())) \
            if prev.num_rows else np.zeros(len(new), bool)
        dup = dup_within | seen
        if dup.any() and on_duplicate == "error":
            j = int(np.flatnonzero(dup)[0])
            raise ValueError(f"{int(dup.sum())} pixel(s) labeled already, e.g. image {int(image_id[j])} "
                             f"x {int(x[j])} y {int(y[j])}: a pixel is labeled once")
        keep = ~dup
        t = pa.table({"image_id": pa.array(image_id[keep], pa.int64()), "x": pa.array(x[keep], pa.int32()),
                      "y": pa.array(y[keep], pa.int32()), "class": pa.array(cls[keep], pa.int16()),
                      "cycle": pa.array(np.full(int(keep.sum()), int(cycle)), pa.int32()),
                      "source": pa.array([str(source)] * int(keep.sum()), pa.string())}, schema=PIXELS_SCHEMA)
        self.dir.mkdir(parents=True, exist_ok=True)
        io.write_table(t, part, PIXELS_SCHEMA)
        return {"added": int(keep.sum()), "skipped": int(dup.sum()), "part": str(part), "resumed": False}


# --------------------------------------------------------------------------- human points
def _class_id(v: str, names: Sequence[str], where: str) -> int:
    t = str(v).strip()
    if t in names:
        return names.index(t) + 1
    if t in ("background", "bg"):
        return 0
    if re.fullmatch(r"\d+", t) and int(t) <= len(names):
        return int(t)
    raise ValueError(f"{where}: class {t!r} is neither a class name ({', '.join(names)}, background) "
                     f"nor an id 0..{len(names)}")


def read_point_labels(path: str | Path, manifest: pa.Table, classes: Sequence[str]) -> pa.Table:
    """Human point labels -> (image_id, x, y, class) rows (x, y pixel indices).

    Formats (by extension):
    * ``.csv`` with a header holding ``image``, ``x``, ``y``, ``class`` (image: a source key,
      a key without extension, an image id or a unique file stem; class: a name, an id or
      "background");
    * ``.json`` COCO keypoints style: ``images`` (id, file_name), ``annotations`` with
      ``image_id``, ``category_id`` and ``keypoints`` [x, y, v, ...]; every keypoint with
      v > 0 is a labeled pixel of that category (category ids are looked up by name in
      ``categories`` when present).
    Coordinates are floored to the pixel they fall in.

    Raises:
        ValueError: naming the file, the line (CSV) or annotation, and the field.
    """
    from poolscout.engine.data.pool import IdToken, resolve_ids

    p = Path(path)
    names = list(classes)
    size = dict(zip(manifest["image_id"].to_pylist(), zip(manifest["width"].to_pylist(),
                                                         manifest["height"].to_pylist())))
    rows: list[tuple[int, float, float, int, str]] = []  # image id, x, y, class, where
    if p.suffix.lower() == ".csv":
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: unreadable ({e})") from None
        reader = csv.DictReader(_io.StringIO(text))
        missing = {"image", "x", "y", "class"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{p}: header lacks column(s) {', '.join(sorted(missing))} (need image, x, y, class)")
        toks, raw = [], []
        for n, r in enumerate(reader, 2):
            toks.append(IdToken(r["image"] or "", n))
            raw.append((n, r))
        ids = _resolve_each(toks, manifest, str(p), resolve_ids)
        for (n, r), iid in zip(raw, ids):
            where = f"{p}: line {n}"
            rows.append((iid, _coord(r["x"], f"{where} field x"), _coord(r["y"], f"{where} field y"),
                         _class_id(r["class"], names, f"{where} field class"), where))
    elif p.suffix.lower() == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not readable JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise ValueError(f"{p}: a COCO keypoints file needs an 'annotations' list")
        files = {im.get("id"): im.get("file_name") for im in doc.get("images") or [] if isinstance(im, dict)}
        cat_name = {c.get("id"): c.get("name") for c in doc.get("categories") or [] if isinstance(c, dict)}
        for j, a in enumerate(doc["annotations"]):
            where = f"{p}: annotations[{j}]"
            if not isinstance(a, dict):
                raise ValueError(f"{where}: not an object")
            if a.get("image_id") not in files:
                raise ValueError(f"{where} field image_id: {a.get('image_id')!r} is not in 'images'")
            iid = _resolve_each([IdToken(str(files[a["image_id"]]), j)], manifest, f"{where} field image_id",
                                resolve_ids)[0]
            cid = a.get("category_id")
            label = cat_name.get(cid, cid)
            c = _class_id(str(label), names, f"{where} field category_id")
            kp = a.get("keypoints")
            if not isinstance(kp, list) or len(kp) % 3:
                raise ValueError(f"{where} field keypoints: need a list of x, y, v triples")
            for t in range(0, len(kp), 3):
                if _coord(kp[t + 2], f"{where} field keypoints[{t + 2}]") > 0:
                    rows.append((iid, _coord(kp[t], f"{where} field keypoints[{t}]"),
                                 _coord(kp[t + 1], f"{where} field keypoints[{t + 1}]"), c, where))
    else:
        raise ValueError(f"{p}: point labels must be a .csv (image, x, y, class) or a COCO keypoints .json")
    out = {"image_id": [], "x": [], "y": [], "class": []}
    for iid, x, y, c, where in rows:
        w, h = size[iid]
        xi, yi = int(np.floor(x)), int(np.floor(y))
        if not (0 <= xi < w and 0 <= yi < h):
            raise ValueError(f"{where}: point ({x:g}, {y:g}) lies outside its {w}x{h} image")
        out["image_id"].append(iid), out["x"].append(xi), out["y"].append(yi), out["class"].append(c)
    return pa.table({"image_id": pa.array(out["image_id"], pa.int64()), "x": pa.array(out["x"], pa.int32()),
                     "y": pa.array(out["y"], pa.int32()), "class": pa.array(out["class"], pa.int16())})


def _coord(v, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {v!r} is not a number") from None
    if not np.isfinite(f):
        raise ValueError(f"{where}: {v!r} is not a finite number")
    return f


def _resolve_each(tokens, manifest: pa.Table, source: str, resolve_ids) -> list[int]:
    """resolve_ids keeps one id per distinct token; here every token maps to its id."""
    uniq = list(dict.fromkeys(str(t) for t in tokens))
    first = {str(t): t for t in reversed(tokens)}
    ids = resolve_ids([first[u] for u in uniq], manifest, source).tolist()
    if len(ids) != len(uniq):  # two spellings of one image: resolve them one by one
        ids = [int(resolve_ids([first[u]], manifest, source)[0]) for u in uniq]
    by_tok = dict(zip(uniq, ids))
    return [by_tok[str(t)] for t in tokens]


__all__ = ["IGNORE", "MASKS_SCHEMA", "MASK_FORMATS", "MaskError", "MaskStore", "PIXELS_SCHEMA", "PixelLedger",
           "build_masks", "mask_path_for", "oracle_labels", "pixel_keys", "read_mask", "read_point_labels"]
