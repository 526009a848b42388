"""Pool building: images + annotations (COCO / Pascal VOC / YOLO) -> the run's tables.

`build_pool` turns a folder of images (and optionally annotations) into the manifest,
annotations, categories and rejects tables of docs/design.md; `assign_states` makes the
ledger; `init_run` writes all of them into a run directory, idempotently.

Rules (they are tested):

* The manifest lists every image file found under the images root (recursive, extensions
  from ``DatasetConfig.extensions``, case-insensitive; hidden files and folders and
  directory symlinks are skipped), sorted by ``source_key`` (POSIX path relative to the
  root). Images that annotations reference but that are missing or that escape the root
  are listed too, as rejected rows with width/height 0, so that every rejects row has a
  manifest and ledger row.
* Headers are probed, pixels are not decoded (a truncated JPEG/PNG is still caught from
  its missing end marker; other corrupt pixel data is caught at scoring by
  `engine.images.load_batch`).
* A bad image or bad annotation never stops the run: the image is rejected with a reason
  naming the file and the field. Structural problems that make a whole annotation file
  meaningless (duplicate COCO image ids, annotations of unknown image ids, missing YOLO
  class names) raise ``ValueError`` naming the file.
* Boxes are pixel x1, y1, x2, y2 in the EXIF-displayed frame. VOC/COCO boxes are taken as
  given (already displayed) unless the file declares the stored (raw) size of a 90/270
  degree rotated image, then they are rotated with the image. YOLO boxes are normalised
  to the displayed size. VOC coordinates are used as written (no 1-based shift).
* COCO ``iscrowd`` annotations are skipped (they are regions, not instances).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import yaml

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, DatasetConfig, to_plain
from poolscout.engine.data.images import HeaderInfo, ImageError, header, orient_boxes
from poolscout.engine.core.run import RunDir, RunError, code_version, table_hash

FORMATS = ("coco", "voc", "yolo")
_MASK63 = (1 << 63) - 1
_MAX_REASONS = 5
_PROBE_CHUNK = 2048
_YOLO_NAME_FILES = ("classes.txt", "data.yaml", "data.yml")


# --------------------------------------------------------------------------- ids
def image_id_for(source_key: str) -> int:
    """Stable positive 63-bit image id of a source key.

    Args:
        source_key: POSIX path relative to the images root ("sub/a.jpg").

    Returns:
        blake2b-64 of the UTF-8 key, masked to 63 bits; never 0. The same key gives the
        same id on every machine and in every run.
    """
    d = hashlib.blake2b(source_key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(d, "big") & _MASK63) or 1


# --------------------------------------------------------------------------- tables
@dataclass
class PoolTables:
    """What `build_pool` found.

    Attributes:
        manifest: MANIFEST_SCHEMA rows, one per image (rejected ones too), sorted by
            source_key.
        annotations: ANNOTATIONS_SCHEMA rows of the non-rejected images.
        categories: [{"id": 1..C, "name", "supercategory"}].
        rejects: REJECTS_SCHEMA rows, one per rejected image.
        format: the annotation format used ("coco", "voc", "yolo"), None without
            annotations.
    """

    manifest: pa.Table
    annotations: pa.Table
    categories: list[dict]
    rejects: pa.Table
    format: str | None = None


@dataclass
class _Box:
    where: str          # "a.xml object 2 bndbox" - prefix of every message about the box
    cls_where: str      # "a.xml object 2 name"
    name: str | None    # class name (None: unknown category, already reported)
    xyxy: tuple[float, float, float, float]
    normalized: bool = False


@dataclass
class _Record:
    """Annotations of one image, as one annotation file describes them."""

    source: str                     # e.g. "a.xml", "instances.json image id 7"
    candidates: list[str]           # image references to match, best first
    ref_field: str                  # e.g. "a.xml filename 'a.jpg'" for "file not found"
    boxes: list[_Box] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # declared (width, height)
    escapes: bool = False
    raw_ref: str = ""                # the reference as written (for escaping paths)
    fuzzy: bool = True               # may match by unique file name / stem elsewhere in the tree


@dataclass
class _Image:
    key: str
    uri: str
    info: HeaderInfo | None = None
    reasons: list[str] = field(default_factory=list)
    stage: str | None = None
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)

    def reject(self, stage: str, reason: str) -> None:
        if self.stage is None:
            self.stage = stage
        self.reasons.append(reason)


def _num(v: float) -> str:
    """10.0 -> '10', 10.5 -> '10.5' (for messages)."""
    if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def out_of_bounds(x1: float, y1: float, x2: float, y2: float, width: float, height: float,
                  tol: float) -> list[str]:
    """What puts a pixel box outside a width x height image by more than `tol` (empty: fine)."""
    bad = []
    if x1 < -tol:
        bad.append(f"x1 {_num(x1)} < 0")
    if y1 < -tol:
        bad.append(f"y1 {_num(y1)} < 0")
    if x2 > width + tol:
        bad.append(f"x2 {_num(x2)} > image width {_num(width)}")
    if y2 > height + tol:
        bad.append(f"y2 {_num(y2)} > image height {_num(height)}")
    return bad


# --------------------------------------------------------------------------- scanning
def _scan_images(root: Path, extensions: Iterable[str]) -> list[tuple[str, str, str | None]]:
    """Image files under `root`.

    Returns:
        Sorted [(source_key, "size:mtime_ns", problem)] where problem is None or a reason
        (a symlink that leaves the root).
    """
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    out: list[tuple[str, str, str | None]] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                    continue
            except OSError:
                continue
            if not e.name.lower().endswith(exts):
                continue
            key = Path(e.path).relative_to(root).as_posix()
            problem = None
            if e.is_symlink():
                real = Path(os.path.realpath(e.path))
                if not real.is_relative_to(root):
                    problem = "path escapes images root (symlink)"
            try:
                st = e.stat() if problem is None else None
                stamp = f"{st.st_size}:{st.st_mtime_ns}" if st is not None else "-"
            except OSError:
                stamp = "-"
            out.append((key, stamp, problem))
    out.sort(key=lambda t: t[0])
    return out


def _probe_one(args: tuple[str, int]) -> HeaderInfo | str:
    uri, max_pixels = args
    try:
        return header(uri, max_pixels)
    except ImageError as e:
        return str(e)
    except Exception as e:  # hostile input must not stop the scan
        return f"cannot read header ({type(e).__name__}: {e})"


def _probe_all(uris: list[str], max_pixels: int, progress: bool) -> list[HeaderInfo | str]:
    from PIL import Image
    from tqdm import tqdm

    Image.init()  # load Pillow's plugins once, before threads race to do it
    out: list[HeaderInfo | str] = []
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))
    with tqdm(total=len(uris), desc="probing images", unit="img", file=sys.stderr,
              disable=not progress) as bar, ThreadPoolExecutor(max_workers=workers) as ex:
        for start in range(0, len(uris), _PROBE_CHUNK):
            chunk = uris[start: start + _PROBE_CHUNK]
            out.extend(ex.map(_probe_one, [(u, max_pixels) for u in chunk]))
            bar.update(len(chunk))
    return out


# --------------------------------------------------------------------------- matching
def _strip_ext(key: str) -> str:
    root, ext = posixpath.splitext(key)
    return root if ext else key


class _KeyIndex:
    """Find a manifest source_key from a reference (key, key without extension, name)."""

    def __init__(self, keys: Sequence[str]):
        self.keys = set(keys)
        self.noext: dict[str, list[str]] = defaultdict(list)
        self.name: dict[str, list[str]] = defaultdict(list)
        self.stem: dict[str, list[str]] = defaultdict(list)
        for k in keys:
            self.noext[_strip_ext(k)].append(k)
            base = posixpath.basename(k)
            self.name[base].append(k)
            self.stem[_strip_ext(base)].append(k)

    def match(self, candidates: Sequence[str], fuzzy: bool = True) -> tuple[str | None, str | None]:
        """Find the image a record refers to.

        Args:
            candidates: references, best first; each is tried as an exact key, then as a
                key without extension (also after dropping its own extension), then, when
                `fuzzy`, as a file name and a file stem that only one image has.

        Returns:
            (key, None), or (None, reason-or-None) when nothing or several images match.
        """
        for c in candidates:
            if c in self.keys:
                return c, None
        ambiguous: list[str] = []
        tiers = [lambda c: (self.noext.get(c, []), self.noext.get(_strip_ext(c), []))]
        if fuzzy:
            tiers += [lambda c: (self.name.get(posixpath.basename(c), []),),
                      lambda c: (self.stem.get(_strip_ext(posixpath.basename(c)), []),)]
        for tier in tiers:
            for c in candidates:
                for hits in tier(c):
                    if len(hits) == 1:
                        return hits[0], None
                    if len(hits) > 1 and not ambiguous:
                        ambiguous = hits
        if ambiguous:
            shown = ", ".join(sorted(ambiguous)[:5])
            return None, f"matches {len(ambiguous)} images ({shown}); cannot tell which"
        return None, None


def _normalise_ref(name: str) -> tuple[str | None, bool]:
    """A dataset-supplied relative path -> (posix key, escapes_root)."""
    s = name.replace("\\", "/").strip()
    if not s:
        return None, False
    if s.startswith("/") or re.match(r"^[A-Za-z]:/", s):
        return None, True
    n = posixpath.normpath(s)
    if n == ".." or n.startswith("../") or n.startswith("/"):
        return None, True
    return n, False


# --------------------------------------------------------------------------- parsers
def _hidden(rel: Path) -> bool:
    return any(p.startswith(".") for p in rel.parts)


def _files_with_suffix(folder: Path, suffix: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(suffix):
                out.append(Path(dirpath) / fn)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _float_field(text: str | None, where: str, fname: str, errors: list[str]) -> float | None:
    if text is None:
        errors.append(f"{where}: {fname} missing")
        return None
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        errors.append(f"{where}: {fname} {t!r} is not a number")
        return None
    if not math.isfinite(v):
        errors.append(f"{where}: {fname} is {t}")
        return None
    return v


def _parse_voc(folder: Path, cfg: DatasetConfig) -> tuple[list[_Record], list[str] | None, dict[str, str]]:
    records = []
    for f in _files_with_suffix(folder, ".xml"):
        rel = f.relative_to(folder).as_posix()
        rel_dir = posixpath.dirname(rel)
        xml_ref = _strip_ext(rel)
        rec = _Record(source=rel, candidates=[xml_ref], ref_field=f"{rel} (image {xml_ref}.*)")
        records.append(rec)
        data = f.read_bytes()
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            rec.errors.append(f"{rel}: DTD / entity declarations are not allowed")
            continue
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            rec.errors.append(f"{rel}: XML parse error ({e})")
            continue
        fn = (root.findtext("filename") or "").strip()
        if fn:
            key, escapes = _normalise_ref(fn)
            cands = []
            if key is not None and not escapes:
                if rel_dir:
                    cands.append(posixpath.normpath(posixpath.join(rel_dir, key)))
                cands.append(key)
            cands.append(posixpath.basename(fn.replace("\\", "/")))
            rec.candidates = list(dict.fromkeys(cands + [xml_ref]))
            rec.ref_field = f"{rel} filename {fn!r}"
        try:
            w = int(float(root.findtext("size/width") or 0))
            h = int(float(root.findtext("size/height") or 0))
            rec.size = (w, h) if w > 0 and h > 0 else None
        except ValueError:
            rec.size = None
        for i, obj in enumerate(root.findall("object"), 1):
            where = f"{rel} object {i}"
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not name:
                rec.errors.append(f"{where} name: missing or empty")
                continue
            if bb is None:
                rec.errors.append(f"{where} bndbox: missing")
                continue
            bwhere = f"{where} bndbox"
            errs: list[str] = []
            vals = [_float_field(bb.findtext(k), bwhere, k, errs) for k in ("xmin", "ymin", "xmax", "ymax")]
            if errs:
                rec.errors.extend(errs)
                continue
            x1, y1, x2, y2 = vals
            if x2 < x1:
                rec.errors.append(f"{bwhere}: xmax {_num(x2)} < xmin {_num(x1)}")
                continue
            if y2 < y1:
                rec.errors.append(f"{bwhere}: ymax {_num(y2)} < ymin {_num(y1)}")
                continue
            rec.boxes.append(_Box(bwhere, f"{where} name", name, (x1, y1, x2, y2)))
    return records, None, {}


def _parse_coco(path: Path, cfg: DatasetConfig) -> tuple[list[_Record], list[str] | None, dict[str, str]]:
    src = path.name
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO file (no 'images' list)")
    cats = data.get("categories") or []
    anns = data.get("annotations") or []
    if not isinstance(cats, list) or not isinstance(anns, list):
        raise ValueError(f"{path}: 'categories' and 'annotations' must be lists")
    cat_name: dict[Any, str] = {}
    names: list[str] = []
    supers: dict[str, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise ValueError(f"{path}: categories[{i}] needs an 'id' and a string 'name'")
        if c["id"] in cat_name:
            raise ValueError(f"{path}: duplicate category id {c['id']!r}")
        if c["name"] in supers:
            raise ValueError(f"{path}: duplicate category name {c['name']!r}")
        cat_name[c["id"]] = c["name"]
        names.append(c["name"])
        supers[c["name"]] = str(c.get("supercategory") or "")
    by_id: dict[Any, _Record] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: images[{i}] needs an 'id' and a string 'file_name'")
        iid, fn = im["id"], im["file_name"]
        if isinstance(iid, (bool, float)) or not isinstance(iid, (int, str)):
            raise ValueError(f"{path}: images[{i}] id {iid!r} must be an integer or a string")
        if iid in by_id:
            raise ValueError(f"{path}: duplicate image id {iid!r}")
        key, escapes = _normalise_ref(fn)
        # "train2017/x.jpg" may be listed while the root is train2017/ itself: try the
        # path's suffixes as exact keys; fuzzy name matching only for bare file names.
        parts = key.split("/") if key else []
        cands = ["/".join(parts[i:]) for i in range(len(parts))]
        rec = _Record(source=f"{src} image id {iid}", candidates=cands,
                      ref_field=f"{src} image id {iid} file_name {fn!r}", escapes=escapes, raw_ref=fn,
                      fuzzy=len(parts) == 1)
        if key is None and not escapes:
            rec.errors.append(f"{src} image id {iid} file_name: empty")
        w, h = im.get("width"), im.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            rec.size = (w, h)
        by_id[iid] = rec
    seen_ann: set = set()
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise ValueError(f"{path}: annotations[{i}] is not an object")
        aid = a.get("id", f"#{i}")
        if "id" in a:
            if aid in seen_ann:
                raise ValueError(f"{path}: duplicate annotation id {aid!r}")
            seen_ann.add(aid)
        iid = a.get("image_id")
        rec = by_id.get(iid) if isinstance(iid, (int, str)) and not isinstance(iid, bool) else None
        if rec is None:
            raise ValueError(f"{path}: annotation id {aid!r} refers to unknown image_id {iid!r}")
        if a.get("iscrowd"):
            continue
        where = f"{src} annotation id {aid}"
        cid = a.get("category_id")
        name = cat_name.get(cid) if isinstance(cid, (int, str)) and not isinstance(cid, bool) else None
        if name is None:
            rec.errors.append(f"{where} category_id: unknown category {cid!r}")
            continue
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox)):
            rec.errors.append(f"{where} bbox: expected [x, y, width, height] numbers, got {str(bbox)[:60]}")
            continue
        bad = [f"{n} is {v}" for n, v in zip(("x", "y", "width", "height"), bbox) if not math.isfinite(v)]
        if bad:
            rec.errors.append(f"{where} bbox: {', '.join(bad)}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            rec.errors.append(f"{where} bbox: {'width' if w < 0 else 'height'} {_num(w if w < 0 else h)} < 0")
            continue
        rec.boxes.append(_Box(f"{where} bbox", f"{where} category", name, (x, y, x + w, y + h)))
    return list(by_id.values()), names, supers


def _yolo_names(folder: Path) -> list[str] | None:
    ct = folder / "classes.txt"
    if ct.is_file():
        names = [ln.strip() for ln in ct.read_text(encoding="utf-8").splitlines()]
        return [n for n in names if n]
    for fn in ("data.yaml", "data.yml"):
        p = folder / fn
        if p.is_file():
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, list):
                return [str(n) for n in names]
            if isinstance(names, dict):
                try:
                    idx = sorted(int(k) for k in names)
                except (TypeError, ValueError):
                    raise ValueError(f"{p}: 'names' keys must be class indices") from None
                if idx != list(range(len(idx))):
                    raise ValueError(f"{p}: 'names' indices must be 0..{len(idx) - 1}, got {idx}")
                return [str(names[k] if k in names else names[str(k)]) for k in idx]
            raise ValueError(f"{p}: no 'names' list")
    return None


def _parse_yolo(folder: Path, cfg: DatasetConfig) -> tuple[list[_Record], list[str] | None, dict[str, str]]:
    names = _yolo_names(folder)
    if names is None:
        if not cfg.classes:
            raise ValueError(f"YOLO labels in {folder} need class names: add classes.txt (one name per line) "
                             f"or data.yaml with 'names', or set dataset.classes")
        names = list(cfg.classes)
    records = []
    for f in _files_with_suffix(folder, ".txt"):
        rel = f.relative_to(folder).as_posix()
        if rel.lower() in _YOLO_NAME_FILES:
            continue
        ref = _strip_ext(rel)
        rec = _Record(source=rel, candidates=[ref], ref_field=f"{rel} (image {ref}.*)")
        records.append(rec)
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            rec.errors.append(f"{rel}: not UTF-8 text")
            continue
        for ln, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            where = f"{rel} line {ln}"
            toks = s.split()
            if len(toks) != 5:
                rec.errors.append(f"{where}: expected 5 values 'class cx cy w h', got {len(toks)}")
                continue
            try:
                c = float(toks[0])
                if not c.is_integer():
                    raise ValueError
                c = int(c)
            except ValueError:
                rec.errors.append(f"{where} class: {toks[0]!r} is not an integer")
                continue
            if not 0 <= c < len(names):
                rec.errors.append(f"{where} class: index {c} out of range 0..{len(names) - 1}")
                continue
            errs: list[str] = []
            vals = [_float_field(t, where, n, errs) for t, n in zip(toks[1:], ("cx", "cy", "w", "h"))]
            if errs:
                rec.errors.extend(errs)
                continue
            cx, cy, w, h = vals
            if w < 0 or h < 0:
                rec.errors.append(f"{where}: {'w' if w < 0 else 'h'} {_num(w if w < 0 else h)} < 0")
                continue
            rec.boxes.append(_Box(where, f"{where} class", names[c],
                                  (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), normalized=True))
    return records, names, {}


def infer_format(annotations: str | Path) -> str:
    """"coco" for a .json file, "voc" for a folder of .xml, "yolo" for a folder of .txt.

    Raises:
        ValueError: the path does not say (a folder with both or neither kind of file).
    """
    p = Path(annotations)
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "coco"
        raise ValueError(f"cannot infer the annotation format of {p}; pass --format coco|voc|yolo")
    if not p.is_dir():
        raise FileNotFoundError(f"annotations {p} not found")
    n_xml = n_txt = 0
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            low = fn.lower()
            if low.endswith(".xml"):
                n_xml += 1
            elif low.endswith(".txt") and low != "classes.txt":
                n_txt += 1
    if n_xml and not n_txt:
        return "voc"
    if n_txt and not n_xml:
        return "yolo"
    if n_xml and n_txt:
        raise ValueError(f"{p} holds both .xml ({n_xml}) and .txt ({n_txt}) files; pass --format voc|yolo")
    raise ValueError(f"{p} holds no .xml or .txt annotation files; pass --format")


def _check_format(ann: Path, fmt: str | None) -> str:
    if fmt is None:
        return infer_format(ann)
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {', '.join(FORMATS)}")
    if not ann.exists():
        raise FileNotFoundError(f"annotations {ann} not found")
    if fmt == "coco" and not ann.is_file():
        raise ValueError(f"--format coco needs a JSON file, {ann} is a folder")
    if fmt in ("voc", "yolo") and not ann.is_dir():
        raise ValueError(f"--format {fmt} needs a folder of annotation files, {ann} is a file")
    return fmt


# --------------------------------------------------------------------------- validation
def _validate(rec: _Record, img: _Image, cfg: DatasetConfig, cat_id: dict[str, int]) -> None:
    """Boxes of `rec` -> img.boxes (clipped, displayed frame), or reject the image."""
    info = img.info
    assert info is not None
    W, H = info.oriented_size
    raw_frame = (rec.size is not None and info.orientation >= 5 and info.width != info.height
                 and rec.size == (info.width, info.height))
    tol = float(cfg.box_tolerance_px)
    out = []
    errors = list(rec.errors)
    for b in rec.boxes:
        cid = cat_id.get(b.name) if b.name is not None else None
        if cid is None:
            errors.append(f"{b.cls_where}: unknown class {b.name!r} (not in dataset.classes)")
            continue
        x1, y1, x2, y2 = b.xyxy
        if b.normalized:
            x1, x2, y1, y2 = x1 * W, x2 * W, y1 * H, y2 * H
        elif raw_frame:
            x1, y1, x2, y2 = orient_boxes(np.array([[x1, y1, x2, y2]]), info.orientation, info.width,
                                          info.height)[0].tolist()
        bad = out_of_bounds(x1, y1, x2, y2, W, H, tol)
        if bad:
            errors.append(f"{b.where}: {', '.join(bad)} (beyond the {_num(tol)} px tolerance)")
            continue
        x1, x2 = min(max(x1, 0.0), W), min(max(x2, 0.0), W)
        y1, y2 = min(max(y1, 0.0), H), min(max(y2, 0.0), H)
        if x2 - x1 < cfg.min_box_size or y2 - y1 < cfg.min_box_size:
            errors.append(f"{b.where}: box {_num(x2 - x1)}x{_num(y2 - y1)} px is smaller than "
                          f"dataset.min_box_size {_num(cfg.min_box_size)}")
            continue
        out.append((cid, x1, y1, x2, y2))
    if errors:
        for e in errors:
            img.reject("annotations", e)
    else:
        img.boxes = out


# --------------------------------------------------------------------------- build
def build_pool(images: str | Path, annotations: str | Path | None = None, fmt: str | None = None,
               cfg: DatasetConfig = DatasetConfig(), progress: bool = True) -> PoolTables:
    """Scan images (and parse annotations) into the pool tables.

    Args:
        images: folder of images, searched recursively.
        annotations: COCO JSON file, or folder of VOC XML / YOLO txt files; None for an
            unlabeled pool (every image is background-unknown, no boxes).
        fmt: "coco", "voc", "yolo" or None (inferred from `annotations`).
        cfg: dataset settings (extensions, classes, max_pixels, box tolerance).
        progress: show a tqdm bar on stderr while probing.

    Returns:
        PoolTables (manifest N rows, annotations B rows, categories C dicts, rejects R rows).

    Raises:
        ValueError / FileNotFoundError: unusable inputs (see the module docstring).
    """
    root = Path(images).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {images} not found")
    found = _scan_images(root, cfg.extensions)
    imgs: dict[str, _Image] = {}
    probe_keys = []
    for key, _, problem in found:
        img = _Image(key, str(root / key))
        imgs[key] = img
        if problem:
            img.reject("init", f"{key}: {problem}")
        else:
            probe_keys.append(key)
    for key, res in zip(probe_keys, _probe_all([imgs[k].uri for k in probe_keys], cfg.max_pixels, progress)):
        if isinstance(res, str):
            imgs[key].reject("init", f"{key}: {res}")
        else:
            imgs[key].info = res

    used_fmt = None
    names: list[str] = list(cfg.classes)
    supers: dict[str, str] = {}
    if annotations is not None:
        ann = Path(annotations).expanduser().resolve()
        used_fmt = _check_format(ann, fmt)
        parser = {"coco": _parse_coco, "voc": _parse_voc, "yolo": _parse_yolo}[used_fmt]
        records, ordered, supers = parser(ann, cfg)
        if not cfg.classes:
            if ordered is not None:
                names = list(ordered)
            else:
                names = sorted({b.name for r in records for b in r.boxes if b.name})
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        cat_id = {n: i + 1 for i, n in enumerate(names)}
        _attach(records, imgs, root, cfg, cat_id)
    categories = [{"id": i + 1, "name": n, "supercategory": supers.get(n, "")} for i, n in enumerate(names)]
    return _tables(imgs, categories, used_fmt)


def _attach(records: list[_Record], imgs: dict[str, _Image], root: Path, cfg: DatasetConfig,
            cat_id: dict[str, int]) -> None:
    index = _KeyIndex([k for k in imgs])
    claims: dict[str, list[_Record]] = defaultdict(list)
    for rec in records:
        if rec.escapes:
            _missing(imgs, rec.raw_ref, rec.raw_ref, "init", f"{rec.ref_field}: path escapes images root")
            continue
        key, why = index.match(rec.candidates, rec.fuzzy) if rec.candidates else (None, None)
        if key is not None:
            claims[key].append(rec)
            continue
        guess = rec.candidates[0] if rec.candidates else rec.source
        if why is None:
            p = root / guess
            why = ("file exists but its extension is not in dataset.extensions" if p.is_file()
                   else "file not found")
        reasons = [f"{rec.ref_field}: {why}"] + rec.errors
        _missing(imgs, guess, str(root / guess), "init", *reasons)
    for key, recs in claims.items():
        img = imgs[key]
        if len(recs) > 1:
            img.reject("annotations", f"{key}: annotated {len(recs)} times ({', '.join(r.source for r in recs[:5])})")
            continue
        if img.stage is not None or img.info is None:
            continue  # the image itself is bad; its annotations do not matter
        _validate(recs[0], img, cfg, cat_id)


def _missing(imgs: dict[str, _Image], key: str, uri: str, stage: str, *reasons: str) -> None:
    img = imgs.get(key)
    if img is None:
        img = imgs[key] = _Image(key, uri)
    for r in reasons:
        img.reject(stage, r)


def _tables(imgs: dict[str, _Image], categories: list[dict], fmt: str | None) -> PoolTables:
    keys = sorted(imgs)
    ids = [image_id_for(k) for k in keys]
    if len(set(ids)) != len(ids):
        seen: dict[int, str] = {}
        for k, i in zip(keys, ids):
            if i in seen:
                raise ValueError(f"image id collision between {seen[i]!r} and {k!r}; rename one of them")
            seen[i] = k
    width, height = [], []
    for k in keys:
        info = imgs[k].info
        w, h = info.oriented_size if info is not None else (0, 0)
        width.append(w)
        height.append(h)
    manifest = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array([imgs[k].uri for k in keys], pa.string()),
                         "width": pa.array(width, pa.int32()), "height": pa.array(height, pa.int32()),
                         "source_key": pa.array(keys, pa.string())}, schema=io.MANIFEST_SCHEMA)
    a_img, a_cat, coords = [], [], []
    r_id, r_uri, r_stage, r_reason = [], [], [], []
    for k, iid in zip(keys, ids):
        img = imgs[k]
        if img.stage is not None:
            extra = len(img.reasons) - _MAX_REASONS
            reason = "; ".join(img.reasons[:_MAX_REASONS]) + (f"; ... and {extra} more" if extra > 0 else "")
            r_id.append(iid)
            r_uri.append(img.uri)
            r_stage.append(img.stage)
            r_reason.append(reason)
            continue
        for cid, x1, y1, x2, y2 in img.boxes:
            a_img.append(iid)
            a_cat.append(cid)
            coords.append((x1, y1, x2, y2))
    c = np.asarray(coords, np.float32).reshape(-1, 4)
    annotations = pa.table({"image_id": pa.array(a_img, pa.int64()),
                            "ann_id": pa.array(np.arange(1, len(a_img) + 1, dtype=np.int64)),
                            "category_id": pa.array(a_cat, pa.int32()),
                            "x1": c[:, 0], "y1": c[:, 1], "x2": c[:, 2], "y2": c[:, 3]},
                           schema=io.ANNOTATIONS_SCHEMA)
    rejects = pa.table({"image_id": pa.array(r_id, pa.int64()), "uri": pa.array(r_uri, pa.string()),
                        "stage": pa.array(r_stage, pa.string()), "reason": pa.array(r_reason, pa.string())},
                       schema=io.REJECTS_SCHEMA)
    return PoolTables(manifest, annotations, categories, rejects, fmt)


# --------------------------------------------------------------------------- id files
class IdToken(str):
    """A token read from an id file; remembers its line number (``.line``)."""

    line: int

    def __new__(cls, value: str, line: int) -> "IdToken":
        obj = super().__new__(cls, value)
        obj.line = line
        return obj


def read_id_file(path: str | Path) -> list[str]:
    """Image references, one per line.

    Blank lines are skipped; '#' starts a comment (at the start of a line or after
    whitespace). Each returned string is an :class:`IdToken` carrying its line number.

    Args:
        path: text file.

    Returns:
        [token] in file order.
    """
    out: list[str] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        s = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if s:
            out.append(IdToken(s, n))
    return out


def resolve_ids(tokens: list[str], manifest: pa.Table, source: str) -> np.ndarray:
    """Image ids of image references.

    A token is tried, in order, as a source_key ("sub/a.jpg"), a source_key without its
    extension ("sub/a"), an integer image_id, and a bare file stem ("crazing_10") when
    exactly one image has it.

    Args:
        tokens: T references (e.g. from `read_id_file`).
        manifest: MANIFEST_SCHEMA table.
        source: where the tokens came from, for messages ("--test split_test.txt").

    Returns:
        (U,) int64 image ids in token order, duplicates removed.

    Raises:
        ValueError: naming `source`, line numbers and (at most 5) unknown or ambiguous tokens.
    """
    keys = manifest.column("source_key").to_pylist()
    ids = manifest.column("image_id").to_pylist()
    by_key = dict(zip(keys, ids))
    id_set = set(ids)
    noext: dict[str, list[int]] = defaultdict(list)
    stem: dict[str, list[int]] = defaultdict(list)
    for k, i in zip(keys, ids):
        noext[_strip_ext(k)].append(i)
        stem[_strip_ext(posixpath.basename(k))].append(i)
    out: list[int] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for n, tok in enumerate(tokens, 1):
        line = getattr(tok, "line", n)
        t = str(tok).strip().replace("\\", "/")
        while t.startswith("./"):
            t = t[2:]
        if t in by_key:
            out.append(by_key[t])
            continue
        hits = noext.get(t)
        if hits is None and re.fullmatch(r"\d+", t) and int(t) in id_set:
            out.append(int(t))
            continue
        if hits is None:
            hits = stem.get(t)
        if hits and len(hits) == 1:
            out.append(hits[0])
        elif hits:
            ambiguous.append(f"line {line} {t!r} ({len(hits)} images)")
        else:
            unknown.append(f"line {line} {t!r}")
    problems = []
    for what, lst in (("unknown", unknown), ("ambiguous (give the relative path)", ambiguous)):
        if lst:
            more = f" and {len(lst) - 5} more" if len(lst) > 5 else ""
            problems.append(f"{len(lst)} {what} image id(s): {', '.join(lst[:5])}{more}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return np.array(list(dict.fromkeys(out)), dtype=np.int64)


# --------------------------------------------------------------------------- ledger
def _mix64(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (x + seed * golden): a per-id pseudo-random key, order-independent."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((int(seed) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_states(manifest: pa.Table, rejected_ids: np.ndarray, *, labeled: list[str] | None = None,
                  seed_fraction: float | None = None, test: list[str] | None = None, seed: int = 0,
                  source_labeled: str = "--labeled", source_test: str = "--test") -> pa.Table:
    """The initial ledger.

    Args:
        manifest: N manifest rows.
        rejected_ids: (R,) ids that are rejected (they stay "rejected" whatever the lists say).
        labeled: references of images labeled from the start (cycle 0, selected_by "seed").
        seed_fraction: in [0, 1]; that fraction (rounded, at least 1 when > 0) of the
            remaining non-test, non-rejected, non-labeled images is labeled too, chosen by a
            seeded hash of the image id (the same whatever the row order).
        test: references of held-out test images.
        seed: the seed of the fraction draw.
        source_labeled, source_test: names of the lists, for messages.

    Returns:
        LEDGER_SCHEMA table, N rows in manifest order.

    Raises:
        ValueError: unknown references, an image both labeled and test, a bad fraction.
    """
    ids = manifest.column("image_id").to_numpy().astype(np.int64)
    n = len(ids)
    lab = resolve_ids(labeled, manifest, source_labeled) if labeled else np.zeros(0, np.int64)
    tst = resolve_ids(test, manifest, source_test) if test else np.zeros(0, np.int64)
    both = np.intersect1d(lab, tst)
    if len(both):
        keys = dict(zip(ids.tolist(), manifest.column("source_key").to_pylist()))
        shown = ", ".join(keys[i] for i in both[:5].tolist())
        raise ValueError(f"{len(both)} image(s) are both in {source_labeled} and {source_test}: {shown}"
                         + (" ..." if len(both) > 5 else ""))
    state = np.full(n, "pool", dtype=object)
    state[np.isin(ids, tst)] = "test"
    state[np.isin(ids, lab)] = "labeled"
    state[np.isin(ids, np.asarray(rejected_ids, dtype=np.int64))] = "rejected"
    if seed_fraction is not None:
        f = float(seed_fraction)
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise ValueError(f"seed_fraction must be in [0, 1], got {seed_fraction}")
        elig = np.flatnonzero(state == "pool")
        if f > 0 and len(elig):
            k = min(len(elig), max(1, int(round(f * len(elig)))))
            keys = _mix64(ids[elig], seed)
            order = np.lexsort((ids[elig], keys))
            state[elig[order[:k]]] = "labeled"
    is_lab = state == "labeled"
    return pa.table({"image_id": pa.array(ids, pa.int64()), "state": pa.array(state.tolist(), pa.string()),
                     "cycle": pa.array(np.where(is_lab, 0, -1).astype(np.int32)),
                     "selected_by": pa.array(np.where(is_lab, "seed", "").tolist(), pa.string())},
                    schema=io.LEDGER_SCHEMA)


# --------------------------------------------------------------------------- init
def _file_sha(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _listing_hash(root: Path, extensions: Iterable[str]) -> str:
    h = hashlib.sha256()
    for key, size, problem in _scan_images(root, extensions):
        h.update(f"{key}\0{size}\0{problem or ''}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def _annotations_hash(ann: Path | None) -> str | None:
    if ann is None:
        return None
    if ann.is_file():
        return _file_sha(ann)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(ann):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(ann).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def _inputs(images: Path, ann: Path | None, fmt: str | None, labeled, seed_fraction, test,
            cfg: Config) -> dict:
    """What decides the content of an initialised run (compared on re-init)."""
    return {
        "images_root": str(images),
        "annotations": str(ann) if ann is not None else None,
        "format": fmt,
        "images_listing": _listing_hash(images, cfg.dataset.extensions),
        "annotations_hash": _annotations_hash(ann),
        "labeled": {"path": str(Path(labeled).resolve()), "sha": _file_sha(labeled)} if labeled else None,
        "test": {"path": str(Path(test).resolve()), "sha": _file_sha(test)} if test else None,
        "seed_fraction": float(seed_fraction) if seed_fraction is not None else None,
    }


def _summary(run: RunDir) -> dict:
    man = io.read_table(run.manifest, columns=["image_id"])
    led = io.read_table(run.ledger, columns=["state"])["state"].to_pylist()
    ann = io.read_table(run.annotations, columns=["ann_id"]) if run.annotations.is_file() else []
    return {"images": len(man), "rejected": led.count("rejected"), "boxes": len(ann),
            "classes": len(run.read_categories()), "labeled": led.count("labeled"),
            "pool": led.count("pool"), "test": led.count("test"), "run": str(run.root)}


def _yaml_plain(obj: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(to_plain(obj), sort_keys=True))


def _check_pool_left(ledger: pa.Table, labeled, seed_fraction) -> None:
    """Refuse an initial labeled set that leaves no unlabeled image to select from."""
    state = np.asarray(ledger.column("state").to_pylist(), dtype=object)
    n_lab = int((state == "labeled").sum())
    if n_lab == 0 or (state == "pool").any():
        return
    if labeled:
        raise ValueError(f"--labeled {labeled} lists the whole pool (all {n_lab} non-test images): nothing would be "
                         f"left to select; list only the images already labeled")
    raise ValueError(f"--seed-fraction {seed_fraction} labels the whole pool (all {n_lab} non-test images): nothing "
                     f"would be left to select; use a smaller fraction")


def init_run(run: RunDir, *, images, annotations=None, fmt=None, labeled=None, seed_fraction=None, test=None,
             cfg: Config, force: bool = False, progress: bool = True) -> dict:
    """Create (or confirm) a run directory from a pool.

    Writes manifest.parquet, annotations.parquet, categories.json, rejects.parquet,
    ledger.parquet and, last, run.yaml (whose presence marks the run as initialised).

    Args:
        run: the run directory.
        images: folder of images.
        annotations: COCO file or VOC/YOLO folder, or None.
        fmt: annotation format or None (inferred).
        labeled: path of an id file of initially labeled images.
        seed_fraction: fraction of the pool to label at random (seeded by cfg.seed).
        test: path of an id file of held-out test images.
        cfg: the full configuration (stored in run.yaml).
        force: re-initialise an existing run whose inputs differ (its cycles/ folder is
            moved aside to cycles.stale-<time>).

    Returns:
        {"images", "rejected", "boxes", "classes", "labeled", "pool", "test", "run"}.

    Raises:
        ValueError: labeled images without annotations, bad id files, bad inputs, a
            --labeled list or seed fraction that labels every non-test image (nothing
            would be left to select).
        RunError: the run exists with different inputs and force is False.
    """
    if (labeled or (seed_fraction is not None and seed_fraction > 0)) and annotations is None:
        raise ValueError("labeled images need annotations; pass --annotations")
    root = Path(images).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {images} not found")
    ann = Path(annotations).expanduser().resolve() if annotations is not None else None
    used_fmt = _check_format(ann, fmt) if ann is not None else None
    inputs = _inputs(root, ann, used_fmt, labeled, seed_fraction, test, cfg)
    if run.exists():
        old = run.fingerprint()
        old_inputs = old.get("inputs") or {}
        old_cfg = {k: v for k, v in (yaml.safe_load(run.run_yaml.read_text()) or {}).items() if k != "fingerprint"}
        diffs = [k for k in inputs if old_inputs.get(k) != inputs[k]]
        if _yaml_plain(old_cfg) != _yaml_plain(cfg):
            diffs.append("config")
        if not diffs:
            return _summary(run)
        if not force:
            raise RunError(f"{run.root} was initialised with different inputs ({', '.join(diffs)}); "
                           f"pass --force to re-initialise it (its cycles are set aside)")
        run.run_yaml.unlink()  # a crash from here on leaves an uninitialised run, not a mixed one
        cycles = run.root / "cycles"
        if cycles.is_dir():
            shutil.move(str(cycles), str(run.root / f"cycles.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    tables = build_pool(root, ann, used_fmt, cfg.dataset, progress=progress)
    lab_tokens = read_id_file(labeled) if labeled else None
    test_tokens = read_id_file(test) if test else None
    ledger = assign_states(tables.manifest, tables.rejects.column("image_id").to_numpy(),
                           labeled=lab_tokens, seed_fraction=seed_fraction, test=test_tokens, seed=cfg.seed,
                           source_labeled=f"--labeled {labeled}", source_test=f"--test {test}")
    _check_pool_left(ledger, labeled, seed_fraction)
    run.root.mkdir(parents=True, exist_ok=True)
    io.write_table(tables.manifest, run.manifest, io.MANIFEST_SCHEMA)
    io.write_table(tables.annotations, run.annotations, io.ANNOTATIONS_SCHEMA)
    io.atomic_write_json(run.categories, tables.categories)
    io.write_table(tables.rejects, run.rejects, io.REJECTS_SCHEMA)
    io.write_table(ledger, run.ledger, io.LEDGER_SCHEMA)
    pool_hash = hashlib.sha256(
        (table_hash(tables.manifest, ["image_id", "width", "height"]) + "/"
         + table_hash(tables.annotations, ["image_id", "category_id", "x1", "y1", "x2", "y2"])).encode()
    ).hexdigest()[:16]
    fingerprint = {
        "pool_hash": pool_hash,
        "code_version": code_version(),
        "images_root": str(root),
        "annotations": str(ann) if ann is not None else None,
        "format": used_fmt,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
    }
    run.write_config(cfg, fingerprint)
    return _summary(run)


__all__ = ["FORMATS", "IdToken", "PoolTables", "assign_states", "build_pool", "image_id_for", "infer_format",
           "init_run", "read_id_file", "resolve_ids"]
