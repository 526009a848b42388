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
* Image references (COCO ``file_name``, VOC ``<filename>``, the path of a VOC/YOLO label
  file) follow one rule, `resolve_ref`: relative to the images root; an absolute path only
  when it lies inside the root; one that leaves the root (``..``, elsewhere, a drive letter)
  is rejected with a reason naming it. A backslash is a folder separator unless the name,
  taken literally, is an image file (POSIX names may hold one).
* A file name that is not valid UTF-8 (undecodable bytes) is rejected with that reason; it
  is stored with the bytes escaped as ``\\xNN`` (``utf8_safe``), so every table stays
  writable.
* Headers are probed, pixels are not decoded (a truncated JPEG/PNG is still caught from
  its missing end marker; other corrupt pixel data is caught at scoring by
  `engine.images.load_batch`).
* A bad image or bad annotation never stops the run: the image is rejected with a reason
  naming the file and the field. Structural problems that make a whole annotation file
  meaningless (not valid JSON/YAML/UTF-8, a COCO file without a ``categories`` list,
  duplicate or non-scalar COCO ids, annotations of unknown image ids, missing YOLO class
  names) raise ``ValueError`` with one line naming the file and the field.
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
import reprlib
import shutil
import stat
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Container, Iterable, Sequence

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
_ESCAPES = "path escapes images root"
_NOT_UTF8 = "file name is not valid UTF-8 (undecodable bytes shown as \\xNN)"
# C:\x, C:/x, \\server\share, //server/share: absolute paths of another machine
_FOREIGN_ABS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\|//)")


def utf8_safe(s: str) -> str:
    """`s`, or when it cannot be encoded as UTF-8 (a file name with undecodable bytes, which
    Python holds as lone surrogates, or a JSON string with a lone ``\\udXXX``), an escaped
    form: undecodable bytes as ``\\xNN``, other lone surrogates as ``\\udXXX``."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(s).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _short(v: Any, n: int = 40) -> str:
    """A bounded repr of v (for messages about hostile values: huge integers, deep or
    self-referencing structures)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<{len(str(abs(v)))}-digit integer>"
    r = _REPR.repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _read_text(path: Path, what: str | None = None) -> str:
    """UTF-8 text of a file (BOM dropped); ValueError naming the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what or utf8_safe(str(path))}: not valid UTF-8 text "
                         f"(byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


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
    fallback: list[str]             # references tried after `ref` (the label file's own path)
    ref_field: str                  # e.g. "a.xml filename 'a.jpg'" for "file not found"
    boxes: list[_Box] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # declared (width, height)
    ref: str | None = None          # the image reference as written (COCO file_name, VOC filename)
    ref_base: str = ""              # folder (under the root) a relative `ref` is also tried in
    # may match by a unique file name / stem elsewhere in the tree; None: only when `ref` is a
    # bare file name
    fuzzy: bool | None = True


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
    escaped: list[str] = []
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
            if utf8_safe(key) != key:
                escaped.append(key)
                continue
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
    taken = {k for k, _, _ in out}
    for key in sorted(escaped):
        safe = utf8_safe(key)
        while safe in taken:  # a real file may be named like the escaped form
            safe += "~"
        taken.add(safe)
        out.append((safe, "-", _NOT_UTF8))
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


def _inside(path: str, roots: Sequence[str]) -> str | None:
    """The key of an absolute POSIX path inside one of `roots` (lexically, then with symlinks
    resolved); None when it is outside all of them."""
    def under(p: str) -> str | None:
        for r in roots:
            r = r.rstrip("/")
            if p.startswith(r + "/"):
                return p[len(r) + 1:]
        return None

    n = posixpath.normpath(path)
    key = under(n)
    if key is None:
        try:
            key = under(os.path.realpath(n))
        except (OSError, ValueError):
            key = None
    return key


def resolve_ref(ref: str, roots: Sequence[str], keys: Container[str] = frozenset()) -> tuple[list[str], str | None]:
    """Where a dataset's image reference points, as source keys (the rule of every format).

    * Relative references are relative to the images root.
    * An absolute reference is accepted when it lies inside the root (any of `roots`: the
      root as given and resolved) and taken relative to it.
    * A reference that leaves the root - ``..`` past its top, an absolute path elsewhere, a
      drive letter or a UNC path - is refused.
    * A backslash separates folders (datasets made on Windows) unless the reference, taken
      literally, is one of `keys` (a POSIX file name may contain a backslash); both readings
      must stay inside the root.
    * A reference that is not valid UTF-8 is escaped as `utf8_safe` escapes file names.

    Args:
        ref: the reference as written.
        roots: absolute POSIX paths of the images root.
        keys: the source keys found under the root.

    Returns:
        (candidate keys, best first, None), or ([], "path escapes images root"), or
        ([], "empty").
    """
    raw = ref.strip()
    s = utf8_safe(raw)
    if s in keys:
        return [s], None
    # (a backslash of the escaped form is no separator: replace before escaping)
    forms = [utf8_safe(raw.replace("\\", "/")), s] if "\\" in raw else [s]
    out = []
    for f in forms:
        if _FOREIGN_ABS.match(f):
            return [], _ESCAPES
        if f.startswith("/"):
            k = _inside(f, roots)
        else:
            k = posixpath.normpath(f) if f else "."
            if k == ".." or k.startswith("../"):
                k = None
        if k is None:
            return [], _ESCAPES
        if k != ".":
            out.append(k)
    return (list(dict.fromkeys(out)), None) if out else ([], "empty")


def _candidates(rec: "_Record", roots: Sequence[str], keys: Container[str]) -> tuple[list[str], bool, str | None]:
    """(keys to try, best first, fuzzy, problem) of a record, by `resolve_ref`.

    A relative reference of an annotation file in a subfolder is tried in that subfolder
    first; every reference is also tried by its path suffixes ("train2017/a.jpg" when the
    root is train2017/ itself); the record's fallbacks (its own file path) come last.
    """
    cands: list[str] = []
    fuzzy = bool(rec.fuzzy)
    if rec.ref is not None:
        ks, problem = resolve_ref(rec.ref, roots, keys)
        if problem == _ESCAPES:
            return [], False, problem
        relative = not rec.ref.strip().startswith(("/", "\\"))
        for k in ks:
            if rec.ref_base and relative:
                cands.append(posixpath.normpath(posixpath.join(rec.ref_base, k)))
            parts = k.split("/")
            cands.extend("/".join(parts[i:]) for i in range(len(parts)))
        if rec.fuzzy is None:
            fuzzy = len(ks) == 1 and "/" not in ks[0]
    for f in rec.fallback:
        cands.extend(resolve_ref(f, roots, keys)[0])
    return list(dict.fromkeys(cands)), fuzzy, None


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
    shown = t if len(t) <= 40 else t[:37] + "..."
    try:
        v = float(t)
    except ValueError:
        errors.append(f"{where}: {fname} {shown!r} is not a number")
        return None
    if not math.isfinite(v):
        errors.append(f"{where}: {fname} is {shown}")
        return None
    return v


def _label_file(folder: Path, f: Path, rec_of) -> tuple["_Record", bytes | None]:
    """The record of one VOC/YOLO label file and its bytes (None, with the record's error,
    when it is not a readable regular file). `rec_of(rel)` makes the record."""
    raw_rel = f.relative_to(folder).as_posix()
    rel = utf8_safe(raw_rel)
    rec = rec_of(rel)
    if rel != raw_rel:
        rec.errors.append(f"{rel}: {_NOT_UTF8}")
    try:
        st = f.stat()
        if not stat.S_ISREG(st.st_mode):
            rec.errors.append(f"{rel}: not a regular file")
            return rec, None
        return rec, f.read_bytes()
    except OSError as e:
        rec.errors.append(f"{rel}: cannot read ({e.strerror or type(e).__name__})")
        return rec, None


def _voc_size(root: ET.Element, rel: str, errors: list[str]) -> tuple[int, int] | None:
    """The declared <size> (None when absent, zero or negative); a bad value is an error."""
    vals = []
    for k in ("width", "height"):
        t = (root.findtext(f"size/{k}") or "").strip()
        if not t:
            return None
        v = _float_field(t, f"{rel} size", k, errors)
        if v is None:
            return None
        vals.append(int(v))
    w, h = vals
    return (w, h) if w > 0 and h > 0 else None


def _parse_voc(folder: Path, cfg: DatasetConfig) -> tuple[list[_Record], list[str] | None, dict[str, str]]:
    records = []
    for f in _files_with_suffix(folder, ".xml"):
        rec, data = _label_file(folder, f, lambda rel: _Record(source=rel, fallback=[_strip_ext(rel)],
                                                               ref_field=f"{rel} (image {_strip_ext(rel)}.*)"))
        records.append(rec)
        if data is None:
            continue
        rel = rec.source
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            rec.errors.append(f"{rel}: DTD / entity declarations are not allowed")
            continue
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            rec.errors.append(f"{rel}: XML parse error ({e})")
            continue
        except LookupError as e:  # encoding="bogus"
            rec.errors.append(f"{rel}: XML declares an unknown encoding ({e})")
            continue
        except (ValueError, RecursionError) as e:
            rec.errors.append(f"{rel}: XML parse error ({type(e).__name__}: {e})")
            continue
        fn = (root.findtext("filename") or "").strip()
        if fn:
            rec.ref = fn
            rec.ref_base = posixpath.dirname(rel)
            rec.ref_field = f"{rel} filename {fn!r}"
        rec.size = _voc_size(root, rel, rec.errors)
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


def _load_json(path: Path) -> Any:
    """A JSON file; ValueError naming it when it is not valid JSON (also when nested too deep
    for the parser or holding an integer too long to convert)."""
    try:
        return json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _scalar_id(v: Any) -> bool:
    """An id the file may use: an integer or a string (a float is tolerated); not a list,
    an object, null or a boolean."""
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _parse_coco(path: Path, cfg: DatasetConfig) -> tuple[list[_Record], list[str] | None, dict[str, str]]:
    src = path.name
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO file (no 'images' list)")
    cats = data.get("categories")
    if cats is None:
        raise ValueError(f"{path}: no 'categories' list (a COCO file names its categories there)")
    if not isinstance(cats, list):
        raise ValueError(f"{path}: 'categories' must be a list, got {type(cats).__name__}")
    anns = data.get("annotations")
    if anns is None:
        anns = []
    if not isinstance(anns, list):
        raise ValueError(f"{path}: 'annotations' must be a list, got {type(anns).__name__}")
    cat_name: dict[Any, str] = {}
    names: list[str] = []
    supers: dict[str, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise ValueError(f"{path}: categories[{i}] needs an 'id' and a string 'name'")
        if not _scalar_id(c["id"]):
            raise ValueError(f"{path}: categories[{i}] id: {_short(c['id'])} is not an integer")
        if c["id"] in cat_name:
            raise ValueError(f"{path}: duplicate category id {_short(c['id'])}")
        name = utf8_safe(c["name"])  # categories.json and the exports must stay encodable
        if name in supers:
            raise ValueError(f"{path}: duplicate category name {_short(c['name'])}")
        cat_name[c["id"]] = name
        names.append(name)
        supers[name] = utf8_safe(str(c.get("supercategory") or ""))
    by_id: dict[Any, _Record] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: images[{i}] needs an 'id' and a string 'file_name'")
        iid, fn = im["id"], im["file_name"]
        if isinstance(iid, (bool, float)) or not isinstance(iid, (int, str)):
            raise ValueError(f"{path}: images[{i}] id {_short(iid)} must be an integer or a string")
        if iid in by_id:
            raise ValueError(f"{path}: duplicate image id {_short(iid)}")
        # "train2017/x.jpg" may be listed while the root is train2017/ itself: the path's
        # suffixes are tried as exact keys; fuzzy name matching only for bare file names.
        rec = _Record(source=f"{src} image id {iid}", fallback=[], ref_field=f"{src} image id {iid} file_name {fn!r}",
                      fuzzy=None)
        if fn.strip():
            rec.ref = fn
            if utf8_safe(fn) != fn:
                rec.errors.append(f"{rec.ref_field}: {_NOT_UTF8}")
        else:
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
            if not _scalar_id(aid):
                raise ValueError(f"{path}: annotations[{i}] id: {_short(aid)} is not an integer")
            if aid in seen_ann:
                raise ValueError(f"{path}: duplicate annotation id {_short(aid)}")
            seen_ann.add(aid)
        iid = a.get("image_id")
        rec = by_id.get(iid) if isinstance(iid, (int, str)) and not isinstance(iid, bool) else None
        if rec is None:
            raise ValueError(f"{path}: annotation id {_short(aid)} refers to unknown image_id {_short(iid)}")
        if a.get("iscrowd"):
            continue
        where = f"{src} annotation id {aid}"
        cid = a.get("category_id")
        name = cat_name.get(cid) if _scalar_id(cid) else None
        if name is None:
            rec.errors.append(f"{where} category_id: unknown category {_short(cid)}")
            continue
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox)):
            rec.errors.append(f"{where} bbox: expected [x, y, width, height] numbers, got {_short(bbox, 60)}")
            continue
        bad, xywh = [], []
        for n, v in zip(("x", "y", "width", "height"), bbox):
            try:
                f = float(v)
            except OverflowError:  # an integer like 10**400
                bad.append(f"{n} {_short(v)} is too large")
                continue
            if not math.isfinite(f):
                bad.append(f"{n} is {v}")
            xywh.append(f)
        if bad:
            rec.errors.append(f"{where} bbox: {', '.join(bad)}")
            continue
        x, y, w, h = xywh
        if w < 0 or h < 0:
            rec.errors.append(f"{where} bbox: {'width' if w < 0 else 'height'} {_num(w if w < 0 else h)} < 0")
            continue
        rec.boxes.append(_Box(f"{where} bbox", f"{where} category", name, (x, y, x + w, y + h)))
    return list(by_id.values()), names, supers


def _yaml_problem(e: Exception) -> str:
    """One line about a YAML error: the problem and where."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


_YAML_MAX_DEPTH = 64


def _yaml_depth(text: str) -> int:
    """A cheap upper estimate of how deeply a YAML text nests (flow brackets, indentation,
    leading '- ' items). PyYAML's pure-Python parser recurses per level and slows down
    quadratically, so data.yaml files nested deeper than any real one are refused unparsed."""
    depth = worst = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            worst = max(worst, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    for line in text.splitlines():
        body = line.lstrip(" ")
        items = re.match(r"(?:-[ \t]+)*", body).group(0).count("-")  # "- - - x": nested lists
        worst = max(worst, (len(line) - len(body)) // 2 + items)
    return worst


def _yolo_names(folder: Path) -> list[str] | None:
    ct = folder / "classes.txt"
    if ct.is_file():
        names = [ln.strip() for ln in _read_text(ct).splitlines()]
        names = [n for n in names if n]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise ValueError(f"{ct}: duplicate class name {_short(n)}")
            seen.add(n)
        return names
    for fn in ("data.yaml", "data.yml"):
        p = folder / fn
        if p.is_file():
            text = _read_text(p)
            if _yaml_depth(text) > _YAML_MAX_DEPTH:
                raise ValueError(f"{p}: not valid YAML (nested deeper than {_YAML_MAX_DEPTH} levels)")
            try:  # safe_load: tags such as !!python/object are refused, never run
                data = yaml.safe_load(text) or {}
            except (yaml.YAMLError, RecursionError) as e:
                raise ValueError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, list):
                items = list(enumerate(names))
            elif isinstance(names, dict):
                try:
                    idx = sorted(int(k) for k in names)
                except (TypeError, ValueError, OverflowError):
                    raise ValueError(f"{p}: 'names' keys must be class indices") from None
                if idx != list(range(len(idx))):
                    shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
                    raise ValueError(f"{p}: 'names' indices must be 0..{len(idx) - 1}, got {shown}")
                items = [(k, names[k] if k in names else names[str(k)]) for k in idx]
            else:
                raise ValueError(f"{p}: no 'names' list")
            out: list[str] = []
            for k, n in items:
                if not isinstance(n, (str, int, float)) or isinstance(n, bool) or not str(n).strip():
                    raise ValueError(f"{p}: names[{k}]: {_short(n)} is not a class name")
                if utf8_safe(str(n)) in out:
                    raise ValueError(f"{p}: names[{k}]: duplicate class name {_short(str(n))}")
                out.append(utf8_safe(str(n)))
            return out
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
        if f.relative_to(folder).as_posix().lower() in _YOLO_NAME_FILES:
            continue
        rec, data = _label_file(folder, f, lambda rel: _Record(source=rel, fallback=[_strip_ext(rel)],
                                                               ref_field=f"{rel} (image {_strip_ext(rel)}.*)"))
        records.append(rec)
        if data is None:
            continue
        rel = rec.source
        try:
            text = data.decode("utf-8-sig")
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
                rec.errors.append(f"{where} class: {_short(toks[0])} is not an integer")
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
        raise ValueError(f"--format coco needs a JSON file, {ann} is "
                         + ("a folder" if ann.is_dir() else "not a regular file"))
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
    _check_utf8_path(root, "images folder")
    roots = list(dict.fromkeys([str(root), str(Path(images).expanduser().absolute())]))
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
        _attach(records, imgs, root, roots, cfg, cat_id)
    categories = [{"id": i + 1, "name": n, "supercategory": supers.get(n, "")} for i, n in enumerate(names)]
    return _tables(imgs, categories, used_fmt)


def _check_utf8_path(p: Path, what: str) -> None:
    """Refuse an input path that is not valid UTF-8 (it would end up in run.yaml and the tables)."""
    if utf8_safe(str(p)) != str(p):
        raise ValueError(f"{what} {utf8_safe(str(p))}: the path is not valid UTF-8; rename it")


def _attach(records: list[_Record], imgs: dict[str, _Image], root: Path, roots: Sequence[str], cfg: DatasetConfig,
            cat_id: dict[str, int]) -> None:
    index = _KeyIndex([k for k in imgs])
    claims: dict[str, list[_Record]] = defaultdict(list)
    for rec in records:
        cands, fuzzy, problem = _candidates(rec, roots, index.keys)
        if problem is not None:  # the reference leaves the root: a rejected row of its own
            ref = utf8_safe(rec.ref or rec.source)
            _missing(imgs, ref, ref, "init", f"{rec.ref_field}: {problem}")
            continue
        key, why = index.match(cands, fuzzy) if cands else (None, None)
        if key is not None:
            claims[key].append(rec)
            continue
        guess = cands[0] if cands else rec.source
        if why is None:
            try:
                exists = (root / guess).is_file()
            except (OSError, ValueError):
                exists = False
            why = "file exists but its extension is not in dataset.extensions" if exists else "file not found"
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
    key, uri = utf8_safe(key), utf8_safe(uri)
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
    uris = [utf8_safe(imgs[k].uri) for k in keys]
    manifest = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string()),
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
            r_uri.append(utf8_safe(img.uri))
            r_stage.append(img.stage)
            r_reason.append(utf8_safe(reason))
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


def read_id_file(path: str | Path, source: str | None = None) -> list[str]:
    """Image references, one per line.

    Blank lines are skipped; '#' starts a comment (at the start of a line or after
    whitespace). Each returned string is an :class:`IdToken` carrying its line number.

    Args:
        path: text file.
        source: how to name it in messages (default: the path), e.g. "--labeled ids.txt".

    Returns:
        [token] in file order.

    Raises:
        ValueError: naming the file, when it is not UTF-8 text.
    """
    out: list[str] = []
    for n, line in enumerate(_read_text(Path(path), source).splitlines(), 1):
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
            h.update(f"{p.relative_to(ann).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))
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
    for what, path in (("images folder", Path(images)), ("images folder", root), ("annotations", ann),
                       ("--labeled", labeled), ("--test", test)):
        if path is not None:
            _check_utf8_path(Path(path), what)
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
    lab_tokens = read_id_file(labeled, f"--labeled {labeled}") if labeled else None
    test_tokens = read_id_file(test, f"--test {test}") if test else None
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
           "init_run", "read_id_file", "resolve_ids", "resolve_ref", "utf8_safe"]
