"""The oracle: who turns a cycle's selection into labeled images.

At cycle k the selector writes ``cycles/<k>/selection.parquet`` (the picks stay in state
"pool") and ``cycles/<k>/select.json`` ({"strategy": name, ...}). The oracle then labels
the picks: they become state "labeled" with cycle k+1 and ``selected_by`` = the strategy.

Two oracles:

* :func:`simulated_label` (benchmarks): the ground truth is already in
  ``annotations.parquet``; it is revealed by moving the picks to "labeled". No annotation
  row changes. A pick without rows is a labeled image with no objects.
* a human, through :func:`read_answers` + :func:`import_answers`: annotators answer the
  export (``engine.export``) in COCO JSON or Label Studio JSON, and the answers replace the
  annotation rows of the answered images.

Rules of a human import (they are tested):

* Every answered image must be in cycle k's selection; an image of another cycle's
  selection, of the test split, of the unselected pool, ... is an error naming it. Without
  an explicit k (``poolscout import`` without --cycle), :func:`answers_cycle` finds it: the
  cycle whose selection holds the answered images, so a file imported again after the loop
  moved on is a no-op; answers in no selection or spanning several are an error.
* Partial batches are fine; :func:`batch_status` says what is still missing.
* The answer *replaces* the image's rows of ``annotations.parquet`` - also rows that were
  there before (ground truth known at init, or revealed by :func:`simulated_label`):
  the human answer wins. An image answered with zero boxes is a valid answer ("nothing
  there") and leaves the image with no rows.
* Each imported image gets a row in ``oracle.parquet`` at the run root (image_id, cycle,
  source, digest of its boxes and categories, boxes, imported_at). Importing the same
  answer again changes nothing; a *different* answer for an image imported before is an
  error naming the image and the earlier source (one image has one human answer).
* Writes go through engine.io (temp file + os.replace), in the order annotations ->
  ledger -> oracle.parquet, and only for the tables that actually change. The oracle row
  is written last, as the commit: after a crash, importing the same file again completes
  the import (every step compares the wanted state with the stored one).

Answer files (:func:`read_answers`):

* COCO: ``{"images", "annotations", "categories"}``. Every listed image is an answer
  (its annotations, possibly none). ``bbox`` is [x, y, w, h] in pixels. An image entry is
  matched to the manifest by ``file_name`` (the source_key that ``export_coco`` writes;
  also an absolute path or URI ending in a source_key, or a bare file name that only one
  image has), then ``poolscout_uri``, then a numeric ``id`` equal to an image_id (what
  ``export_coco`` writes). Category ids are mapped through the file's ``categories`` by
  name onto ``categories.json`` (by id when the file has no categories). ``iscrowd``
  annotations are skipped (regions, not instances), as at init.
* Label Studio JSON export: a list of tasks. A task is answered by its last annotation
  (``annotations``, or the legacy ``completions``) that is not ``was_cancelled``;
  ``predictions`` are model pre-annotations, never answers, and a task without an
  annotation is skipped (unanswered). The image is ``data.image_id`` (what
  ``export_label_studio`` writes), else ``data.image`` (a manifest uri, a
  ``/data/local-files/?d=`` path, a URL or path ending in a - possibly URL-quoted -
  source_key). ``rectanglelabels``
  results are boxes, in percent of the image size, with rotation 0 and exactly one label
  that names a category; non-geometric results (choices, text, ...) are ignored; other
  region types (polygons, brushes, ...) are errors.
* Boxes are checked against the manifest size: beyond ``tolerance_px`` outside the image
  is an error, within it they are clipped; NaN/inf, negative sizes and boxes smaller than
  ``min_box_size`` after clipping are errors. A size declared in the file that differs
  from the manifest is an error (the boxes would be in another frame).

Every problem raises :class:`OracleError` (a ValueError) naming the file and the image
or field; a file with several problems names the first few and counts the rest.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import reprlib
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io
from poolscout.engine.core.run import RunDir

ORACLE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("cycle", pa.int32()),         # the selection's cycle k (the image is labeled at k+1)
        ("source", pa.string()),       # the answer file (or whatever the caller named)
        ("digest", pa.string()),       # answer_digest of the boxes + categories
        ("boxes", pa.int32()),
        ("imported_at", pa.string()),  # UTC ISO time
    ]
)
FORMATS = ("coco", "label_studio")
_MAX_SHOWN = 5
# Label Studio result types without geometry: ignored when they sit next to the boxes.
_LS_NON_GEOMETRIC = frozenset({"choices", "textarea", "rating", "taxonomy", "relation", "number", "datetime",
                               "pairwise", "ranker"})


class OracleError(ValueError):
    """An answer file or an import is wrong; the message names the file and the image or field."""


# --------------------------------------------------------------------------- answers
def answer_digest(boxes: np.ndarray, category_ids: np.ndarray) -> str:
    """Order-independent digest of one image's answer.

    Args:
        boxes: (n, 4) xyxy, compared as float32.
        category_ids: (n,) compared as int32.

    Returns:
        32 hex characters; the same set of (category, box) rows gives the same digest in
        any order.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + np.float32(0.0)  # -0.0 -> 0.0
    c = np.asarray(category_ids, dtype=np.int32).reshape(-1)
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], c))
    h = hashlib.sha256(b"poolscout-answer-v1\0")
    h.update(np.int64(len(c)).tobytes())
    h.update(np.ascontiguousarray(c[order]).tobytes())
    h.update(np.ascontiguousarray(b[order]).tobytes())
    return h.hexdigest()[:32]


class Answers(Mapping):
    """Per-image answers read from one file: image_id -> (boxes, category_ids).

    boxes are (n, 4) float32 xyxy pixels of the manifest (displayed) frame, category_ids
    (n,) int32 ids of categories.json; n may be 0 ("nothing there").

    Attributes:
        source: the file the answers came from.
        fmt: "coco" or "label_studio".
        refs: image_id -> how the file names that image (for messages).
        unanswered: Label Studio tasks without an annotation (skipped).
    """

    def __init__(self, items: dict[int, tuple[np.ndarray, np.ndarray]], *, source: str = "<answers>",
                 fmt: str = "", refs: dict[int, str] | None = None, unanswered: int = 0):
        self._items = {int(k): v for k, v in items.items()}
        self.source = str(source)
        self.fmt = fmt
        self.refs = dict(refs or {})
        self.unanswered = int(unanswered)

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self._items[int(image_id)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if set(self) != set(other):
            return False
        return all(answer_digest(*self[i]) == answer_digest(*other[i]) for i in self)

    __hash__ = None  # mutable-looking container, like dict

    def digests(self) -> dict[int, str]:
        return {i: answer_digest(*v) for i, v in self._items.items()}

    def n_boxes(self) -> int:
        return int(sum(len(v[1]) for v in self._items.values()))

    def __repr__(self) -> str:
        return (f"Answers({len(self)} images, {self.n_boxes()} boxes, fmt={self.fmt!r}, source={self.source!r}, "
                f"unanswered={self.unanswered})")


class _Problems:
    """Collects the problems of one file; raises them together."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        n = len(self.items)
        shown = "; ".join(self.items[:_MAX_SHOWN])
        more = f"; ... and {n - _MAX_SHOWN} more" if n > _MAX_SHOWN else ""
        head = f"{self.where}: " if n == 1 else f"{self.where}: {n} problems: "
        raise OracleError(head + shown + more)


def _num(v: float) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and abs(int(v)) >= 10**18:
        return f"<{len(str(abs(int(v))))}-digit integer>"
    return str(v)


def _float(v: Any) -> float | None:
    """float(v); None when it does not fit a float (a JSON integer like 10**400)."""
    try:
        return float(v)
    except OverflowError:
        return None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _short(v: Any, n: int = 40) -> str:
    """A bounded repr of v (for messages about hostile values: huge integers, deep structures)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**18:
        return _num(v)
    r = _REPR.repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _same_size(w: Any, h: Any, W: int, H: int) -> bool:
    fw, fh = _float(w), _float(h)
    return fw is not None and fh is not None and math.isfinite(fw) and math.isfinite(fh) and fw == W and fh == H


def _finite_xywh(vals, where: str, probs: "_Problems") -> tuple[float, float, float, float] | None:
    """x, y, width, height as floats when all are finite and the sizes non-negative; else a problem."""
    names = ("x", "y", "width", "height")
    conv = [_float(v) for v in vals]
    bad = [f"{n} {_num(v)} is too large" for n, v, f in zip(names, vals, conv) if f is None]
    bad += [f"{n} is {f}" for n, f in zip(names, conv) if f is not None and not math.isfinite(f)]
    if bad:
        probs.add(f"{where}: {', '.join(bad)}")
        return None
    x, y, w, h = conv
    if w < 0 or h < 0:
        probs.add(f"{where}: negative {'width' if w < 0 else 'height'} {_num(w if w < 0 else h)}")
        return None
    return x, y, w, h


def _check_box(x1: float, y1: float, x2: float, y2: float, W: int, H: int, where: str, probs: _Problems,
               tol: float, min_size: float) -> tuple[float, float, float, float] | None:
    """Validate one pixel box against a W x H image; clip within `tol`. None when bad."""
    from poolscout.engine.data.pool import out_of_bounds

    bad = out_of_bounds(x1, y1, x2, y2, W, H, tol)
    if bad:
        probs.add(f"{where}: {', '.join(bad)} (box outside the image beyond the {_num(float(tol))} px tolerance)")
        return None
    x1, x2 = min(max(x1, 0.0), float(W)), min(max(x2, 0.0), float(W))
    y1, y2 = min(max(y1, 0.0), float(H)), min(max(y2, 0.0), float(H))
    if x2 - x1 < min_size or y2 - y1 < min_size:
        probs.add(f"{where}: box {_num(x2 - x1)}x{_num(y2 - y1)} px (after clipping) is smaller than "
                  f"{_num(float(min_size))} px")
        return None
    return x1, y1, x2, y2


def _pack(rows: list[tuple[int, float, float, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int32)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, 1:5].astype(np.float32), a[:, 0].astype(np.int32)


# --------------------------------------------------------------------------- image matching
class _ImageIndex:
    """Find a manifest image from what an answer file calls it."""

    def __init__(self, manifest: pa.Table):
        for c in ("image_id", "uri", "width", "height", "source_key"):
            if c not in manifest.column_names:
                raise OracleError(f"manifest table has no column {c!r}")
        ids = manifest.column("image_id").to_pylist()
        keys = manifest.column("source_key").to_pylist()
        uris = manifest.column("uri").to_pylist()
        ws = manifest.column("width").to_pylist()
        hs = manifest.column("height").to_pylist()
        self.size = {i: (int(w or 0), int(h or 0)) for i, w, h in zip(ids, ws, hs)}
        self.key_of = dict(zip(ids, keys))
        self.by_key = {k: i for k, i in zip(keys, ids) if k is not None}
        self.by_uri: dict[str, int] = {}
        for u, i in zip(uris, ids):
            if u:
                self.by_uri[u] = i
                self.by_uri.setdefault(_uri_path(u), i)
        self.by_name: dict[str, list[int]] = defaultdict(list)
        for k, i in zip(keys, ids):
            if k is not None:
                self.by_name[posixpath.basename(k)].append(i)

    def has_id(self, i: int) -> bool:
        return i in self.size

    def name(self, i: int) -> str:
        k = self.key_of.get(i)
        return f"image {i} ({k})" if k else f"image {i}"

    def match_ref(self, ref: str) -> tuple[int | None, str | None]:
        """(image_id, None) or (None, why)."""
        r = ref.strip()
        if not r:
            return None, "empty"
        if r in self.by_uri:
            return self.by_uri[r], None
        path = _uri_path(r)
        if path in self.by_uri:
            return self.by_uri[path], None
        path = path.replace("\\", "/")
        parts = [p for p in posixpath.normpath(path).split("/") if p not in ("", ".")]
        if ".." in parts:
            return None, "path escapes the images root"
        for j in range(len(parts)):
            i = self.by_key.get("/".join(parts[j:]))
            if i is not None:
                return i, None
        if len(parts) == 1:
            hits = self.by_name.get(parts[0], [])
            if len(hits) == 1:
                return hits[0], None
            if len(hits) > 1:
                return None, f"{len(hits)} images are named {parts[0]!r}; give the relative path"
        return None, "no manifest image has this source_key or uri"


def _uri_path(u: str) -> str:
    """A local path from a file:// URI or a Label Studio local-files URL (its ``d=`` path,
    already unquoted by parse_qs), the unquoted path of an http(s) URL; else `u`."""
    s = u.strip()
    if s.startswith("file://"):
        return unquote(urlparse(s).path) or s
    if "local-files" in s and "d=" in s:
        d = parse_qs(urlparse(s).query).get("d")
        if d:
            return d[0]
    if s.startswith(("http://", "https://")):
        return unquote(urlparse(s).path) or s
    return s


def _id_of(v: Any) -> int | None:
    if _is_int(v):
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        return int(v)
    return None


# --------------------------------------------------------------------------- COCO
def _read_coco(doc: Any, path: str, index: _ImageIndex, cat_by_name: dict[str, int], cat_ids: set[int],
               tol: float, min_size: float) -> Answers:
    probs = _Problems(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise OracleError(f"{path}: not a COCO file (no 'images' list)")
    anns = doc.get("annotations", [])
    cats = doc.get("categories")
    if anns is None:
        anns = []
    if not isinstance(anns, list):
        raise OracleError(f"{path}: 'annotations' must be a list")
    if cats is not None and not isinstance(cats, list):
        raise OracleError(f"{path}: 'categories' must be a list")
    # file category id -> our category id (None: the name is not one of ours)
    file_cat: dict[Any, int | None] | None = None
    if cats:
        file_cat = {}
        for j, c in enumerate(cats):
            if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
                raise OracleError(f"{path}: categories[{j}] needs an 'id' and a string 'name'")
            if isinstance(c["id"], bool) or not isinstance(c["id"], (int, str)):
                raise OracleError(f"{path}: categories[{j}] id: {_short(c['id'])} is not an integer")
            if c["id"] in file_cat:
                raise OracleError(f"{path}: categories[{j}]: duplicate category id {c['id']!r}")
            file_cat[c["id"]] = cat_by_name.get(c["name"])
    cat_name = {c["id"]: c["name"] for c in cats or []}

    coco_to_ours: dict[Any, int] = {}
    refs: dict[int, str] = {}
    rows: dict[int, list] = {}
    for j, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise OracleError(f"{path}: images[{j}] is not an object with an 'id'")
        cid, fn = im["id"], im.get("file_name")
        if isinstance(cid, bool) or not isinstance(cid, (int, str)):
            raise OracleError(f"{path}: images[{j}] id {cid!r} must be an integer or a string")
        if cid in coco_to_ours:
            raise OracleError(f"{path}: images[{j}]: duplicate image id {cid!r}")
        if fn is not None and not isinstance(fn, str):
            raise OracleError(f"{path}: images[{j}] (id {cid!r}) file_name must be a string")
        ref = f"images[{j}] (id {cid!r}" + (f", file_name {fn!r})" if fn is not None else ")")
        found, why = (None, None)
        if fn:
            found, why = index.match_ref(fn)
        uri = im.get("poolscout_uri")
        if found is None and isinstance(uri, str) and uri:
            found, _ = index.match_ref(uri)
        by_id = _id_of(cid)
        if by_id is not None and not index.has_id(by_id):
            by_id = None
        if found is None:
            found = by_id
        elif by_id is not None and by_id != found:
            probs.add(f"{ref}: file_name is {index.name(found)} but the id is {index.name(by_id)}")
            continue
        if found is None:
            probs.add(f"{ref}: unknown image (" + (why or "no file_name and the id is no image_id of the run")
                      + ")")
            continue
        if found in rows:
            probs.add(f"{ref}: {index.name(found)} is answered twice (also {refs[found]})")
            continue
        W, H = index.size[found]
        fw, fh = im.get("width"), im.get("height")
        if _is_num(fw) and _is_num(fh) and (not _same_size(fw, fh, W, H)):
            probs.add(f"{ref}: width x height {_num(fw)}x{_num(fh)} differs from the image's {W}x{H}")
            continue
        coco_to_ours[cid] = found
        refs[found] = ref
        rows[found] = []
    seen_ann: set = set()
    for j, a in enumerate(anns):
        if not isinstance(a, dict):
            raise OracleError(f"{path}: annotations[{j}] is not an object")
        aid = a.get("id", f"#{j}")
        if "id" in a and (isinstance(aid, bool) or not isinstance(aid, (int, str))):
            probs.add(f"annotations[{j}] id: {_short(aid)} is not an integer")
            continue
        where = f"annotation id {_short(aid)}" if "id" in a else f"annotations[{j}]"
        if "id" in a:
            if aid in seen_ann:
                probs.add(f"{where}: duplicate annotation id")
                continue
            seen_ann.add(aid)
        iid = a.get("image_id")
        if isinstance(iid, bool) or not isinstance(iid, (int, str)):
            probs.add(f"{where} image_id: {iid!r} is not an image id of the file")
            continue
        if iid not in coco_to_ours:
            if not any(isinstance(im, dict) and im.get("id") == iid for im in doc["images"]):
                probs.add(f"{where} image_id: unknown image id {iid!r} (not in 'images')")
            continue  # else: its image already has a problem
        ours = coco_to_ours[iid]
        where = f"{where} ({index.name(ours)})"
        if a.get("iscrowd"):
            continue
        cat = a.get("category_id")
        if isinstance(cat, bool) or not isinstance(cat, (int, str)):
            probs.add(f"{where} category_id: {cat!r} is not a category id")
            continue
        if file_cat is not None:
            if cat not in file_cat:
                probs.add(f"{where} category_id: unknown category {cat!r} (not in the file's categories)")
                continue
            ours_cat = file_cat[cat]
            if ours_cat is None:
                probs.add(f"{where} category_id {cat!r}: unknown category {cat_name.get(cat)!r} "
                          f"(the run's categories are {sorted(cat_by_name)})")
                continue
        else:
            ours_cat = _id_of(cat)
            if ours_cat is None or ours_cat not in cat_ids:
                probs.add(f"{where} category_id: unknown category {cat!r} (the file has no categories; "
                          f"the run's category ids are {sorted(cat_ids)})")
                continue
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            probs.add(f"{where} bbox: expected [x, y, width, height] numbers, got {_short(bbox, 60)}")
            continue
        xywh = _finite_xywh(bbox, f"{where} bbox", probs)
        if xywh is None:
            continue
        x, y, w, h = xywh
        W, H = index.size[ours]
        box = _check_box(x, y, x + w, y + h, W, H, f"{where} bbox", probs, tol, min_size)
        if box is not None:
            rows[ours].append((ours_cat, *box))
    probs.raise_if_any()
    return Answers({i: _pack(r) for i, r in rows.items()}, source=path, fmt="coco", refs=refs)


# --------------------------------------------------------------------------- Label Studio
def _ls_answer(task: dict) -> dict | None:
    """The task's answering annotation: the last one not cancelled; None when unanswered."""
    for key in ("annotations", "completions"):
        anns = task.get(key)
        if anns is None:
            continue
        if not isinstance(anns, list):
            raise TypeError(f"'{key}' must be a list")
        live = [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]
        if any(not isinstance(a, dict) for a in anns):
            raise TypeError(f"'{key}' entries must be objects")
        if live:
            return live[-1]
    return None


def _read_label_studio(doc: Any, path: str, index: _ImageIndex, cat_by_name: dict[str, int], tol: float,
                       min_size: float) -> Answers:
    probs = _Problems(path)
    if not isinstance(doc, list):
        raise OracleError(f"{path}: not a Label Studio export (expected a list of tasks)")
    refs: dict[int, str] = {}
    rows: dict[int, list] = {}
    unanswered = 0
    for t, task in enumerate(doc):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise OracleError(f"{path}: tasks[{t}] is not a task object with a 'data' object")
        data = task["data"]
        try:
            ann = _ls_answer(task)
        except TypeError as e:
            raise OracleError(f"{path}: tasks[{t}] (id {task.get('id')!r}): {e}") from None
        if ann is None:
            unanswered += 1
            continue
        ref = f"tasks[{t}] (id {task.get('id')!r})"
        # the image: data.image_id, else data.image
        found = None
        why = None
        raw_id = data.get("image_id")
        if raw_id is not None:
            found = _id_of(raw_id)
            if found is None or not index.has_id(found):
                probs.add(f"{ref} data.image_id: unknown image {raw_id!r}")
                continue
        img = data.get("image")
        if img is not None and not isinstance(img, str):
            probs.add(f"{ref} data.image: expected a string, got {type(img).__name__}")
            continue
        if img:
            by_ref, why = index.match_ref(img)
            if found is None:
                found = by_ref
            elif by_ref is not None and by_ref != found:
                probs.add(f"{ref}: data.image_id is {index.name(found)} but data.image {img!r} is "
                          f"{index.name(by_ref)}")
                continue
            ref = f"{ref} image {img!r}"
        if found is None:
            probs.add(f"{ref}: unknown image (" + (why or "no data.image_id or data.image") + ")")
            continue
        if found in rows:
            probs.add(f"{ref}: {index.name(found)} is answered twice (also {refs[found]})")
            continue
        refs[found] = ref
        rows[found] = []
        W, H = index.size[found]
        result = ann.get("result", [])
        if not isinstance(result, list):
            probs.add(f"{ref} result: expected a list")
            continue
        for r, res in enumerate(result):
            where = f"{ref} result[{r}]" + (f" (id {res.get('id')!r})" if isinstance(res, dict) and "id" in res
                                            else "")
            if not isinstance(res, dict):
                probs.add(f"{where}: not an object")
                continue
            typ = res.get("type")
            if typ in _LS_NON_GEOMETRIC:
                continue
            if typ != "rectanglelabels":
                probs.add(f"{where} type: {typ!r} regions are not supported (only rectanglelabels)")
                continue
            ow, oh = res.get("original_width"), res.get("original_height")
            if ow is not None and oh is not None:
                if not (_is_num(ow) and _is_num(oh)):
                    probs.add(f"{where} original_width/original_height: not numbers ({ow!r}, {oh!r})")
                    continue
                if not _same_size(ow, oh, W, H):
                    probs.add(f"{where}: original size {_num(ow)}x{_num(oh)} differs from the image's {W}x{H}")
                    continue
            v = res.get("value")
            if not isinstance(v, dict):
                probs.add(f"{where} value: missing or not an object")
                continue
            rot = v.get("rotation", 0)
            if rot is None:
                rot = 0
            frot = _float(rot) if _is_num(rot) else None
            if frot is None or not math.isfinite(frot) or abs(frot) > 1e-6:
                probs.add(f"{where} value.rotation: {_short(rot)}; only unrotated boxes (rotation 0) are supported")
                continue
            labels = v.get("rectanglelabels")
            if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
                probs.add(f"{where} value.rectanglelabels: expected exactly one label name, got {labels!r}")
                continue
            cat = cat_by_name.get(labels[0])
            if cat is None:
                probs.add(f"{where} value.rectanglelabels: unknown category {labels[0]!r} "
                          f"(the run's categories are {sorted(cat_by_name)})")
                continue
            vals = [v.get(k) for k in ("x", "y", "width", "height")]
            if not all(_is_num(q) for q in vals):
                probs.add(f"{where} value: x, y, width, height must be numbers, got {vals}")
                continue
            xywh = _finite_xywh(vals, f"{where} value", probs)
            if xywh is None:
                continue
            x, y, w, h = xywh
            x1, y1 = x / 100.0 * W, y / 100.0 * H
            box = _check_box(x1, y1, (x + w) / 100.0 * W, (y + h) / 100.0 * H, W, H, f"{where} value", probs,
                             tol, min_size)
            if box is not None:
                rows[found].append((cat, *box))
    probs.raise_if_any()
    if not rows and unanswered:
        raise OracleError(f"{path}: none of its {unanswered} tasks has an annotation (model 'predictions' are "
                          f"not answers); label the tasks in Label Studio, then export and import them")
    return Answers({i: _pack(r) for i, r in rows.items()}, source=path, fmt="label_studio", refs=refs,
                   unanswered=unanswered)


# --------------------------------------------------------------------------- read
def detect_format(doc: Any) -> str | None:
    """"coco" for an object with "images"/"annotations", "label_studio" for a list of tasks."""
    if isinstance(doc, dict) and ("images" in doc or "annotations" in doc):
        return "coco"
    if isinstance(doc, list) and all(isinstance(t, dict) and "data" in t for t in doc):
        return "label_studio"
    return None


def read_answers(path: str | Path, fmt: str | None = None, *, manifest: pa.Table, categories: list[dict],
                 tolerance_px: float = 2.0, min_box_size: float = 1.0) -> Answers:
    """Read annotators' answers from a COCO JSON or Label Studio JSON export.

    Args:
        path: the answer file.
        fmt: "coco", "label_studio" or None (detected from the content).
        manifest: MANIFEST_SCHEMA table of the run (image ids, uris, sizes, source keys).
        categories: the run's categories.json ([{"id", "name", ...}]).
        tolerance_px: how far a box may stick out of the image (it is clipped back).
        min_box_size: smallest width and height of a box after clipping, pixels.

    Returns:
        Answers: image_id -> (boxes (n, 4) float32 xyxy, category_ids (n,) int32).

    Raises:
        OracleError: naming the file and the image or field (see the module docstring).
    """
    path = str(path)
    if fmt is not None and fmt not in FORMATS:
        raise OracleError(f"{path}: unknown answer format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise OracleError(f"{path}: file not found") from None
    except OSError as e:
        raise OracleError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise OracleError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise OracleError(f"{path}: not valid JSON ({e})") from None
    found = detect_format(doc)
    if fmt is None:
        if found is None:
            raise OracleError(f"{path}: neither a COCO file (an object with 'images'/'annotations') nor a "
                              f"Label Studio export (a list of tasks with 'data')")
        fmt = found
    cat_by_name: dict[str, int] = {}
    for c in categories:
        cat_by_name[str(c["name"])] = int(c["id"])
    cat_ids = {int(c["id"]) for c in categories}
    index = _ImageIndex(manifest)
    if fmt == "coco":
        return _read_coco(doc, path, index, cat_by_name, cat_ids, float(tolerance_px), float(min_box_size))
    return _read_label_studio(doc, path, index, cat_by_name, float(tolerance_px), float(min_box_size))


# --------------------------------------------------------------------------- run state
def _selection(run: RunDir, k: int) -> np.ndarray:
    """Cycle k's selected ids in rank order."""
    p = run.selection_path(k)
    if not p.is_file():
        raise OracleError(f"{p} is missing: cycle {k} has no selection (run `poolscout select {run.root}` first)")
    t = io.read_table(p, columns=["image_id", "rank"])
    ids = t["image_id"].to_numpy().astype(np.int64)
    rank = t["rank"].to_numpy().astype(np.int64)
    ids = ids[np.lexsort((ids, rank))]
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _strategy(run: RunDir, k: int) -> str:
    p = run.cycle_dir(k) / "select.json"
    if not p.is_file():
        raise OracleError(f"{p} is missing: cycle {k}'s selection is not finished (rerun the select stage)")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OracleError(f"{p}: not valid JSON ({e})") from None
    name = doc.get("strategy") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise OracleError(f"{p}: no 'strategy' name")
    return name


def _ledger_arrays(run: RunDir) -> dict[str, np.ndarray]:
    led = run.read_ledger()
    return {"image_id": led["image_id"].to_numpy().astype(np.int64),
            "state": np.array(led["state"].to_pylist(), dtype=object),
            "cycle": led["cycle"].to_numpy(zero_copy_only=False).astype(np.int32),
            "selected_by": np.array(led["selected_by"].to_pylist(), dtype=object)}


def _rows_of(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of `ids` holding each of `wanted`; OracleError naming the missing ones."""
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], wanted), max(len(ids) - 1, 0))
    rows = order[pos] if len(ids) else np.zeros(len(wanted), np.int64)
    miss = (ids[rows] != wanted) if len(ids) else np.ones(len(wanted), bool)
    if miss.any():
        raise OracleError(f"{what} lacks image ids {wanted[miss][:_MAX_SHOWN].tolist()}")
    return rows


def _describe(led: dict[str, np.ndarray], row: int) -> str:
    s, c, by = led["state"][row], int(led["cycle"][row]), led["selected_by"][row]
    if s == "labeled":
        return f"labeled at cycle {c}" + (f" by {by!r}" if by else "")
    if s == "test":
        return "in the test split"
    if s == "rejected":
        return "rejected (see rejects.parquet)"
    return "in the pool"


def _check_states(run: RunDir, led: dict[str, np.ndarray], rows: np.ndarray, ids: np.ndarray, k: int,
                  names) -> None:
    """Selected images must be in the pool, or labeled at cycle k+1 already."""
    bad = []
    for r, i in zip(rows.tolist(), ids.tolist()):
        s = led["state"][r]
        if s == "pool" or (s == "labeled" and int(led["cycle"][r]) == k + 1):
            continue
        bad.append(f"{names(i)} is {_describe(led, r)}")
    if bad:
        more = f" ... and {len(bad) - _MAX_SHOWN} more" if len(bad) > _MAX_SHOWN else ""
        raise OracleError(f"{run.ledger}: cycle {k}'s selection cannot be labeled: " + "; ".join(bad[:_MAX_SHOWN])
                          + more)


def _apply_labeled(run: RunDir, led: dict[str, np.ndarray], rows: np.ndarray, k: int, strategy: str) -> int:
    """Set ledger rows to labeled / k+1 / strategy; write only when something changes."""
    changed = ((led["state"][rows] != "labeled") | (led["cycle"][rows] != k + 1)
               | (led["selected_by"][rows] != strategy))
    n = int(changed.sum())
    if n == 0:
        return 0
    led["state"][rows] = "labeled"
    led["cycle"][rows] = k + 1
    led["selected_by"][rows] = strategy
    table = pa.table({"image_id": pa.array(led["image_id"], pa.int64()),
                      "state": pa.array(led["state"].tolist(), pa.string()),
                      "cycle": pa.array(led["cycle"], pa.int32()),
                      "selected_by": pa.array(led["selected_by"].tolist(), pa.string())})
    io.write_table(table, run.ledger, io.LEDGER_SCHEMA)
    return n


def _manifest_names(run: RunDir):
    man = io.read_table(run.manifest, columns=["image_id", "source_key"])
    keys = dict(zip(man["image_id"].to_pylist(), man["source_key"].to_pylist()))

    def name(i: int) -> str:
        k = keys.get(int(i))
        return f"image {int(i)} ({k})" if k else f"image {int(i)}"

    return name


def simulated_label(run: RunDir, k: int) -> dict:
    """The ground-truth oracle: label cycle k's selection with the boxes already stored.

    The selected images become state "labeled", cycle k+1, selected_by = the strategy of
    ``cycles/<k>/select.json``; annotations.parquet is not changed (a selected image
    without rows is labeled "no objects"). Calling it again changes nothing.

    Returns:
        {"images": selected images, "boxes": their annotation rows, "newly_labeled": ledger
        rows changed by this call}.

    Raises:
        OracleError: no selection / select.json for cycle k, or a selected image that is
            not in the pool (nor labeled at cycle k+1 already).
    """
    k = int(k)
    sel = _selection(run, k)
    strategy = _strategy(run, k)
    led = _ledger_arrays(run)
    rows = _rows_of(led["image_id"], sel, f"{run.ledger} (cycle {k}'s selection)")
    _check_states(run, led, rows, sel, k, _manifest_names(run))
    n_new = _apply_labeled(run, led, rows, k, strategy)
    boxes = 0
    if run.annotations.is_file() and len(sel):
        ann = io.read_table(run.annotations, columns=["image_id"])
        boxes = int(pc.sum(pc.is_in(ann["image_id"], pa.array(sel, pa.int64()))).as_py() or 0)
    return {"images": int(len(sel)), "boxes": boxes, "newly_labeled": n_new}


def _read_oracle(run: RunDir) -> pa.Table:
    p = run.root / "oracle.parquet"
    if p.is_file():
        return io.read_table(p).select(ORACLE_SCHEMA.names).cast(ORACLE_SCHEMA)
    return ORACLE_SCHEMA.empty_table()


def _ann_digests(ann: pa.Table, ids: np.ndarray) -> dict[int, str]:
    """Digest of the stored rows of each of `ids` (images without rows included)."""
    sub = ann.filter(pc.is_in(ann["image_id"], pa.array(ids, pa.int64())))
    img = sub["image_id"].to_numpy().astype(np.int64)
    cats = sub["category_id"].to_numpy().astype(np.int32)
    boxes = np.column_stack([sub[c].to_numpy().astype(np.float32) for c in ("x1", "y1", "x2", "y2")]) \
        if len(sub) else np.zeros((0, 4), np.float32)
    order = np.argsort(img, kind="stable")
    img, cats, boxes = img[order], cats[order], boxes[order]
    lo = np.searchsorted(img, ids, side="left")
    hi = np.searchsorted(img, ids, side="right")
    return {int(i): answer_digest(boxes[a:b], cats[a:b]) for i, a, b in zip(ids.tolist(), lo.tolist(), hi.tolist())}


def _validate_plain(answers: Mapping, run: RunDir, source: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Shapes, category ids and box bounds of answers that did not come from read_answers
    (the read_answers defaults: 2 px tolerance, clipped; at least 1 px wide and high)."""
    man = io.read_table(run.manifest, columns=["image_id", "width", "height", "source_key"])
    size = {i: (w, h) for i, w, h in zip(man["image_id"].to_pylist(), man["width"].to_pylist(),
                                         man["height"].to_pylist())}
    keys = dict(zip(man["image_id"].to_pylist(), man["source_key"].to_pylist()))
    cat_ids = {int(c["id"]) for c in run.read_categories()}
    probs = _Problems(source)
    out = {}
    for i, val in answers.items():
        i = int(i)
        name = f"image {i}" + (f" ({keys[i]})" if keys.get(i) else "")
        if i not in size:
            probs.add(f"{name}: unknown image (not in the manifest)")
            continue
        try:
            boxes, cats = val
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            c = np.asarray(cats).reshape(-1)
        except (TypeError, ValueError):
            probs.add(f"{name}: expected (boxes (n, 4), category_ids (n,))")
            continue
        if len(b) != len(c):
            probs.add(f"{name}: {len(b)} boxes but {len(c)} category ids")
            continue
        W, H = size[i]
        rows = []
        for j in range(len(b)):
            where = f"{name} box {j}"
            if not np.issubdtype(c.dtype, np.integer) or int(c[j]) not in cat_ids:
                probs.add(f"{where}: unknown category {c[j].item()!r}")
                continue
            x1, y1, x2, y2 = (float(v) for v in b[j])
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                probs.add(f"{where}: not finite {b[j].tolist()}")
                continue
            if x2 < x1 or y2 < y1:
                probs.add(f"{where}: negative size {b[j].tolist()}")
                continue
            box = _check_box(x1, y1, x2, y2, W, H, where, probs, 2.0, 1.0)
            if box is not None:
                rows.append((int(c[j]), *box))
        out[i] = _pack(rows)
    probs.raise_if_any()
    return out


def import_answers(run: RunDir, answers: Mapping, k: int, source: str) -> dict:
    """Apply human answers to cycle k's selection.

    Args:
        run: the run directory.
        answers: from :func:`read_answers` (or any mapping image_id -> (boxes (n, 4) xyxy,
            category_ids (n,)), which is validated against the manifest and categories).
        k: the cycle whose selection was answered.
        source: where the answers come from (stored in oracle.parquet, used in messages).

    Returns:
        {"imported": images newly imported, "unchanged": images imported before with this
        same answer, "selected": |selection|, "labeled_in_batch": selected images labeled
        at cycle k+1 after the import, "missing": selected - labeled_in_batch}.

    Raises:
        OracleError: an answered image outside cycle k's selection, a selected image that
            is not in the pool, or a different answer for an image imported before (the
            message names the image and the earlier source). Nothing is written then.
    """
    from poolscout.engine.data.pool import utf8_safe

    k = int(k)
    source = utf8_safe(str(source))  # stored in oracle.parquet: a non-UTF-8 file name is escaped
    where = getattr(answers, "source", None) or source
    names = _manifest_names(run)
    refs = getattr(answers, "refs", {}) or {}

    def name(i: int) -> str:
        r = refs.get(int(i))
        return f"{names(i)}, {r}" if r else names(i)

    sel = _selection(run, k)
    strategy = _strategy(run, k)
    items = dict(answers.items()) if isinstance(answers, Answers) else _validate_plain(answers, run, where)
    ids = np.array(sorted(int(i) for i in items), dtype=np.int64)

    # 1. every answered image is in cycle k's selection
    outside = ids[~np.isin(ids, sel)]
    if len(outside):
        led = _ledger_arrays(run)
        lrow = {int(i): r for r, i in enumerate(led["image_id"].tolist())}
        other = _selected_elsewhere(run, outside, k)
        msgs = []
        for i in outside[:_MAX_SHOWN].tolist():
            if i in other:
                why = f"it is in cycle {other[i]}'s selection"
            elif i in lrow:
                why = f"it is not in the current selection at all: {_describe(led, lrow[i])}"
            else:
                why = "it is not in the run"
            msgs.append(f"{name(i)} ({why})")
        more = f" ... and {len(outside) - _MAX_SHOWN} more" if len(outside) > _MAX_SHOWN else ""
        raise OracleError(f"{where}: {len(outside)} answered image(s) are not in cycle {k}'s selection: "
                          + "; ".join(msgs) + more)

    # 2. their ledger states allow labeling
    led = _ledger_arrays(run)
    rows = _rows_of(led["image_id"], ids, f"{run.ledger} (answered images)")
    _check_states(run, led, rows, ids, k, name)

    # 3. conflicts with earlier imports
    digests = {i: answer_digest(*items[i]) for i in ids.tolist()}
    oracle = _read_oracle(run)
    prev = {}
    if len(oracle):
        for i, d, s, c in zip(oracle["image_id"].to_pylist(), oracle["digest"].to_pylist(),
                              oracle["source"].to_pylist(), oracle["cycle"].to_pylist()):
            prev[int(i)] = (d, s, c)
    conflicts = [f"{name(i)} was imported before from {prev[i][1]} (cycle {prev[i][2]}) with another answer"
                 for i in ids.tolist() if i in prev and prev[i][0] != digests[i]]
    if conflicts:
        more = f" ... and {len(conflicts) - _MAX_SHOWN} more" if len(conflicts) > _MAX_SHOWN else ""
        raise OracleError(f"{where}: {len(conflicts)} image(s) already have a different answer: "
                          + "; ".join(conflicts[:_MAX_SHOWN]) + more
                          + " (an image takes one human answer; fix the earlier one in oracle.parquet's source)")
    new_ids = [i for i in ids.tolist() if i not in prev]
    unchanged = len(ids) - len(new_ids)

    # 4. annotations: replace the rows of every answered image whose rows differ
    ann = io.read_table(run.annotations) if run.annotations.is_file() else io.ANNOTATIONS_SCHEMA.empty_table()
    ann = ann.select(io.ANNOTATIONS_SCHEMA.names).cast(io.ANNOTATIONS_SCHEMA)
    stored = _ann_digests(ann, ids) if len(ids) else {}
    redo = np.array([i for i in ids.tolist() if stored[i] != digests[i]], dtype=np.int64)
    if len(redo):
        keep = ann.filter(pc.invert(pc.is_in(ann["image_id"], pa.array(redo, pa.int64()))))
        next_id = int(pc.max(ann["ann_id"]).as_py()) + 1 if len(ann) else 1
        img, cat, box = [], [], []
        for i in redo.tolist():
            b, c = items[i]
            img.append(np.full(len(c), i, np.int64))
            cat.append(np.asarray(c, np.int32))
            box.append(np.asarray(b, np.float32).reshape(-1, 4))
        img_a, cat_a, box_a = np.concatenate(img), np.concatenate(cat), np.concatenate(box)
        add = pa.table({"image_id": pa.array(img_a, pa.int64()),
                        "ann_id": pa.array(np.arange(next_id, next_id + len(img_a), dtype=np.int64)),
                        "category_id": pa.array(cat_a, pa.int32()),
                        "x1": box_a[:, 0], "y1": box_a[:, 1], "x2": box_a[:, 2], "y2": box_a[:, 3]},
                       schema=io.ANNOTATIONS_SCHEMA)
        io.write_table(pa.concat_tables([keep, add]), run.annotations, io.ANNOTATIONS_SCHEMA)

    # 5. ledger, then 6. the oracle records (the commit)
    _apply_labeled(run, led, rows, k, strategy)
    if new_ids:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        add = pa.table({"image_id": pa.array(new_ids, pa.int64()),
                        "cycle": pa.array([k] * len(new_ids), pa.int32()),
                        "source": pa.array([source] * len(new_ids), pa.string()),
                        "digest": pa.array([digests[i] for i in new_ids], pa.string()),
                        "boxes": pa.array([len(items[i][1]) for i in new_ids], pa.int32()),
                        "imported_at": pa.array([now] * len(new_ids), pa.string())}, schema=ORACLE_SCHEMA)
        io.write_table(pa.concat_tables([oracle, add]), run.root / "oracle.parquet", ORACLE_SCHEMA)

    st = batch_status(run, k)
    return {"imported": len(new_ids), "unchanged": unchanged, "selected": st["selected"],
            "labeled_in_batch": st["labeled"], "missing": st["selected"] - st["labeled"]}


def _selection_cycles(run: RunDir, ids: np.ndarray) -> dict[int, list[int]]:
    """image_id -> the cycles (ascending) whose selection.parquet holds it; ids in none are absent."""
    root = run.root / "cycles"
    out: dict[int, list[int]] = {}
    if not root.is_dir():
        return out
    for d in sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        j = int(d.name)
        if not run.selection_path(j).is_file():
            continue
        got = io.read_table(run.selection_path(j), columns=["image_id"])["image_id"].to_numpy()
        for i in np.intersect1d(ids, got).tolist():
            out.setdefault(int(i), []).append(j)
    return out


def _selected_elsewhere(run: RunDir, ids: np.ndarray, k: int) -> dict[int, int]:
    """image_id -> the cycle whose selection holds it (other than k)."""
    out: dict[int, int] = {}
    for i, cs in _selection_cycles(run, ids).items():
        other = [j for j in cs if j != k]
        if other:
            out[i] = other[0]
    return out


def answers_cycle(run: RunDir, answers: Mapping, source: str | None = None) -> int | None:
    """The cycle whose selection the answers belong to (``poolscout import`` without --cycle).

    It is the one cycle whose ``selection.parquet`` holds every answered image; when the
    images sit in several cycles' selections alike, the one whose ledger states still allow
    labeling them (pool, or labeled at that cycle + 1 by an earlier import). So importing a
    file again after the loop moved on finds its cycle and changes nothing.

    Args:
        run: the run directory.
        answers: from :func:`read_answers`, or any mapping keyed by image_id.
        source: the file, for messages (default: ``answers.source``).

    Returns:
        The cycle k, or None when nothing is answered.

    Raises:
        OracleError: (one line, naming the file and the images) answered images in no cycle's
            selection, answers that span the selections of several cycles, or a choice that
            stays ambiguous.
    """
    ids = np.array(sorted({int(i) for i in answers}), dtype=np.int64)
    if not len(ids):
        return None
    where = getattr(answers, "source", None) or source or "<answers>"
    names = _manifest_names(run)
    refs = getattr(answers, "refs", {}) or {}

    def name(i: int) -> str:
        r = refs.get(int(i))
        return f"{names(i)}, {r}" if r else names(i)

    def more(n: int) -> str:
        return f" ... and {n - _MAX_SHOWN} more" if n > _MAX_SHOWN else ""

    cyc = _selection_cycles(run, ids)
    none = [i for i in ids.tolist() if i not in cyc]
    if none:
        led = _ledger_arrays(run)
        lrow = {int(i): r for r, i in enumerate(led["image_id"].tolist())}
        msgs = [f"{name(i)} ({_describe(led, lrow[i]) if i in lrow else 'not in the run'})"
                for i in none[:_MAX_SHOWN]]
        raise OracleError(f"{where}: {len(none)} answered image(s) are in no cycle's selection: "
                          + "; ".join(msgs) + more(len(none)))
    common = sorted(set.intersection(*(set(cyc[i]) for i in ids.tolist())))
    if len(common) == 1:
        return common[0]
    if not common:
        spans = sorted({j for cs in cyc.values() for j in cs})
        msgs = [f"{name(i)} in cycle {', '.join(map(str, cyc[i]))}" for i in ids.tolist()[:_MAX_SHOWN]]
        raise OracleError(f"{where}: the answered images span the selections of cycles "
                          f"{', '.join(map(str, spans))}: " + "; ".join(msgs) + more(len(ids))
                          + " (import one file per cycle, or name it with --cycle)")
    led = _ledger_arrays(run)
    rows = _rows_of(led["image_id"], ids, f"{run.ledger} (answered images)")
    st, lc = led["state"][rows], led["cycle"][rows]
    ok = [k for k in common if bool(np.all((st == "pool") | ((st == "labeled") & (lc == k + 1))))]
    if len(ok) == 1:
        return ok[0]
    shown = "; ".join(name(i) for i in ids.tolist()[:_MAX_SHOWN]) + more(len(ids))
    raise OracleError(f"{where}: the answered images are in the selections of cycles "
                      f"{', '.join(map(str, ok or common))} alike ({shown}); name the cycle with --cycle")


def batch_status(run: RunDir, k: int) -> dict:
    """How much of cycle k's selection is labeled.

    Returns:
        {"selected": n, "labeled": m (state labeled at cycle k+1), "missing_ids": the
        others, in rank order}.
    """
    k = int(k)
    sel = _selection(run, k)
    led = io.read_table(run.ledger, columns=["image_id", "state", "cycle"])
    done = led.filter(pc.and_(pc.equal(led["state"], "labeled"), pc.equal(led["cycle"], k + 1)))
    ok = np.isin(sel, done["image_id"].to_numpy())
    return {"selected": int(len(sel)), "labeled": int(ok.sum()), "missing_ids": [int(i) for i in sel[~ok]]}


__all__ = ["Answers", "FORMATS", "ORACLE_SCHEMA", "OracleError", "answer_digest", "answers_cycle", "batch_status",
           "detect_format", "import_answers", "read_answers", "simulated_label"]
