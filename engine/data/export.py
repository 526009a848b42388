"""Exports of a selection for annotators: COCO JSON, Label Studio tasks, CVAT XML, CSV.

Inputs are the run-directory tables: `selection` (engine.io.SELECTION_SCHEMA: image_id,
rank, score, rationale), `manifest` (engine.io.MANIFEST_SCHEMA: image_id, uri, width,
height, source_key) and optionally a canonical prediction batch (engine.predictions) that
covers the selected ids; its original-view boxes with score >= `min_score` become
pre-annotations. Detector labels are category ids (1..C, as in categories.json).

Images come out in rank order (CVAT: in frame order, see :func:`export_cvat`). Every file
is written atomically (temp file + os.replace) with mode 0666 & ~umask (0644 under the
usual umask), so an annotation tool running as another user can read it; each function
returns a summary {"format", "path", "images", "annotations"}. Everything put into XML goes
through xml.etree (escaped); text that XML 1.0 cannot hold at all is an error. CSV text cells
that a spreadsheet would evaluate as a formula get a leading single quote (:func:`csv_cell`).
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import numpy as np
import pyarrow as pa

from poolscout.engine.core import io

_NEEDED_MANIFEST = ("image_id", "uri", "width", "height", "source_key")


def _selected(selection: pa.Table, manifest: pa.Table) -> dict[str, np.ndarray]:
    """Selected rows joined with the manifest, in rank order (arrays of length B)."""
    for c in ("image_id", "rank", "score"):
        if c not in selection.column_names:
            raise ValueError(f"selection table has no column {c!r}")
    for c in _NEEDED_MANIFEST:
        if c not in manifest.column_names:
            raise ValueError(f"manifest table has no column {c!r}")
    ids = selection.column("image_id").to_numpy().astype(np.int64)
    rank = selection.column("rank").to_numpy().astype(np.int64)
    score = selection.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.lexsort((ids, rank))
    ids, rank, score = ids[order], rank[order], score[order]
    if "rationale" in selection.column_names:
        rationale = np.asarray(selection.column("rationale").to_pylist(), dtype=object)[order]
    else:
        rationale = np.full(len(ids), None, dtype=object)
    mids = manifest.column("image_id").to_numpy().astype(np.int64)
    rows = _lookup(mids, ids, "manifest")
    return {
        "image_id": ids,
        "rank": rank,
        "score": score,
        "rationale": rationale,
        "uri": np.asarray(manifest.column("uri").to_pylist(), dtype=object)[rows],
        "source_key": np.asarray(manifest.column("source_key").to_pylist(), dtype=object)[rows],
        "width": manifest.column("width").to_numpy().astype(np.int64)[rows],
        "height": manifest.column("height").to_numpy().astype(np.int64)[rows],
    }


def _lookup(haystack: np.ndarray, needles: np.ndarray, what: str) -> np.ndarray:
    """Rows of `haystack` holding each of `needles`; ValueError naming the missing ids."""
    if len(needles) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(haystack) == 0:
        raise ValueError(f"{what} lacks selected image ids {needles[:10].tolist()}")
    order = np.argsort(haystack, kind="stable")
    pos = np.minimum(np.searchsorted(haystack[order], needles), len(haystack) - 1)
    rows = order[pos]
    miss = haystack[rows] != needles
    if miss.any():
        raise ValueError(f"{what} lacks selected image ids {needles[miss][:10].tolist()}")
    return rows


def _boxes_for(preds: dict[str, np.ndarray] | None, ids: np.ndarray, min_score: float) -> dict[str, np.ndarray]:
    """Orig-view boxes of the selected images with score >= min_score, grouped by image in
    selection order (highest score first within an image, as stored).

    Returns:
        {"img": (K,) index into `ids`, "boxes": (K, 4) float64, "scores": (K,), "labels": (K,)}.
    """
    if preds is None:
        return {"img": np.zeros(0, np.int64), "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                "labels": np.zeros(0, np.int64)}
    rows = _lookup(np.asarray(preds["image_id"], dtype=np.int64), ids, "predictions")
    off = np.asarray(preds["offsets"], dtype=np.int64)
    cnt = off[rows + 1] - off[rows]
    img = np.repeat(np.arange(len(ids)), cnt)
    # gather index: start of each selected image's run plus the position inside it
    within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    box_rows = np.repeat(off[rows], cnt) + within
    scores = np.asarray(preds["scores"], dtype=np.float64)[box_rows]
    keep = scores >= min_score
    return {
        "img": img[keep],
        "boxes": np.asarray(preds["boxes"], dtype=np.float64).reshape(-1, 4)[box_rows][keep],
        "scores": scores[keep],
        "labels": np.asarray(preds["labels"], dtype=np.int64)[box_rows][keep],
    }


def _cat_names(categories: list[dict], labels: np.ndarray) -> dict[int, str]:
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    unknown = sorted(set(np.unique(labels).tolist()) - set(names))
    if unknown:
        raise ValueError(f"predicted labels {unknown} are not category ids of categories.json "
                         f"(known: {sorted(names)})")
    return names


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _rationale(text) -> object:
    """The selection's JSON rationale as an object (the raw string when it is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return str(text)


def _picked_boxes(selection: pa.Table, manifest: pa.Table, preds, categories: list[dict], min_score: float):
    """Selected rows, their pre-annotation boxes (with names), and the boxes clipped to each
    box's image: (sel, bx, names, w, h, clipped boxes), w and h per box."""
    sel = _selected(selection, manifest)
    bx = _boxes_for(preds, sel["image_id"], min_score)
    names = _cat_names(categories, bx["labels"])
    w = sel["width"].astype(np.float64)[bx["img"]]
    h = sel["height"].astype(np.float64)[bx["img"]]
    return sel, bx, names, w, h, _clip_boxes(bx["boxes"], w, h)


def _clip_boxes(boxes: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """xyxy pixel boxes clipped into their W x H images (tools reject boxes outside)."""
    if not len(boxes):
        return np.zeros((0, 4))
    x = np.clip(boxes[:, [0, 2]], 0.0, w[:, None])
    y = np.clip(boxes[:, [1, 3]], 0.0, h[:, None])
    return np.column_stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]])


def _confidence(scores: np.ndarray) -> np.ndarray:
    """Detector box scores as confidences in [0, 1] (what Label Studio accepts)."""
    return np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)


# XML 1.0 forbids these code points in text and attribute values, escaped or not.
_XML_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(v: object, what: str) -> str:
    """`v` as XML-safe text (ElementTree escapes &, <, >, quotes; this rejects the rest)."""
    t = str(v)
    bad = _XML_BAD.search(t)
    if bad:
        raise ValueError(f"{what} {t!r} holds the character {bad.group()!r}, which XML cannot represent")
    return t


def _xml_bytes(root: ET.Element, declaration: bool = True) -> bytes:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=declaration) + b"\n"


# a fixed, distinguishable palette for label colors (Label Studio and CVAT)
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


def _label_names(categories: list[dict]) -> list[str]:
    """Category names in id order; duplicates are an error (the tools key labels by name)."""
    names = [str(c.get("name", c["id"])) for c in sorted(categories, key=lambda c: int(c["id"]))]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"category names {dup} occur more than once in categories.json; annotation tools "
                         f"identify labels by name")
    for n in names:
        _xml_text(n, "category name")
    return names


# --------------------------------------------------------------------------- image references
LOCAL_FILES_PREFIX = "/data/local-files/?d="


def _local_path(uri: str) -> str | None:
    """The local filesystem path of a manifest uri (plain path or file://); None for a URL."""
    u = str(uri)
    if u.startswith("file://"):
        return unquote(urlparse(u).path)
    scheme = urlparse(u).scheme
    if scheme and len(scheme) > 1:  # s3://, gs://, http(s)://, ... (a drive letter is no scheme)
        return None
    return u


def image_ref(uri: str, source_key: str, *, image_root_url: str = "", local_files_root: str = "") -> str:
    """How a Label Studio task names its image (``data.image``).

    * ``image_root_url`` given (``export.image_root_url`` / ``--image-root-url``, e.g.
      ``https://host/images/``): that URL joined with the URL-quoted source_key
      (``https://host/images/sub/a%20b.jpg``); a missing trailing "/" is added.
    * else, a manifest uri that is a URL (``s3://``, ``gs://``, ``http(s)://``) is kept as it
      is (Label Studio resolves it through a connected cloud storage, or loads it).
    * else, a local file: Label Studio's local-files form ``/data/local-files/?d=<path>``,
      where <path> (URL-quoted) is relative to Label Studio's document root
      (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``). That root is ``local_files_root``
      (``export.local_files_root``) when given - the image must then lie under it - and by
      default the run's pool root, i.e. the images folder given to ``poolscout init`` (the
      manifest uri minus its source_key), so <path> is the source_key itself. Label Studio
      also needs LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and a "Local files" storage
      of the project whose path is (under) that root.

    Raises:
        ValueError: the image is not under ``local_files_root``.
    """
    key = str(source_key).replace("\\", "/").lstrip("/")
    if image_root_url:
        base = image_root_url if image_root_url.endswith("/") else image_root_url + "/"
        return base + quote(key, safe="/")
    path = _local_path(uri)
    if path is None:
        return str(uri)
    if local_files_root:
        root = os.path.abspath(os.path.expanduser(local_files_root))
        full = os.path.abspath(path)
        rel = os.path.relpath(full, root) if os.path.splitdrive(full)[0] == os.path.splitdrive(root)[0] else ".."
        rel = rel.replace(os.sep, "/")
        if rel == ".." or rel.startswith("../") or rel == ".":
            raise ValueError(f"image {source_key!r} ({path}) is not under export.local_files_root {root}; "
                             f"set it to Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, which must "
                             f"contain the images")
        key = posixpath.normpath(rel)
    return LOCAL_FILES_PREFIX + quote(key, safe="/")


def export_coco(path: str | Path, selection: pa.Table, manifest: pa.Table, preds: dict[str, np.ndarray] | None,
                categories: list[dict], min_score: float = 0.3) -> dict:
    """Write a COCO detection JSON of the selected images with model pre-annotations.

    Images: id = image_id, file_name = source_key, width, height, poolscout_rank,
    poolscout_score, poolscout_uri. Annotations: the orig-view boxes with score >=
    min_score as bbox [x, y, w, h] (x = x1, w = x2 - x1), area = w * h, iscrowd 0,
    category_id = the detector label, score; ids 1..K.

    Args:
        path: output .json.
        selection: SELECTION_SCHEMA table.
        manifest: MANIFEST_SCHEMA table covering the selected ids.
        preds: canonical batch covering the selected ids, or None (no annotations).
        categories: [{"id", "name", ...}] as in categories.json.
        min_score: box score threshold.

    Returns:
        {"format": "coco", "path", "images", "annotations"}.
    """
    sel = _selected(selection, manifest)
    bx = _boxes_for(preds, sel["image_id"], min_score)
    _cat_names(categories, bx["labels"])
    images = [
        {"id": i, "file_name": k, "width": w, "height": h, "poolscout_rank": r, "poolscout_score": _num(s),
         "poolscout_uri": u}
        for i, k, w, h, r, s, u in zip(sel["image_id"].tolist(), sel["source_key"].tolist(), sel["width"].tolist(),
                                       sel["height"].tolist(), sel["rank"].tolist(), sel["score"].tolist(),
                                       sel["uri"].tolist())
    ]
    b = bx["boxes"]
    xywh = np.column_stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]]) if len(b) else np.zeros((0, 4))
    area = xywh[:, 2] * xywh[:, 3]
    img_ids = sel["image_id"][bx["img"]]
    anns = [
        {"id": j + 1, "image_id": i, "category_id": c, "bbox": box, "area": a, "iscrowd": 0, "score": s}
        for j, (i, c, box, a, s) in enumerate(zip(img_ids.tolist(), bx["labels"].tolist(), xywh.tolist(),
                                                  area.tolist(), bx["scores"].tolist()))
    ]
    doc = {
        "info": {"description": "poolscout selection with model pre-annotations", "min_score": min_score},
        "images": images,
        "annotations": anns,
        "categories": [dict(c) for c in categories],
    }
    io.atomic_write_json(path, doc)
    return {"format": "coco", "path": str(path), "images": len(images), "annotations": len(anns)}


LS_CONFIG_NAME = "label_studio_config.xml"
LS_IMAGE, LS_LABEL = "image", "label"  # the Image and RectangleLabels names tasks refer to


def label_studio_config(categories: list[dict]) -> str:
    """The Label Studio labeling config (XML) matching :func:`export_label_studio`'s tasks.

    ``<View><Image name="image" value="$image"/><RectangleLabels name="label"
    toName="image"><Label value=NAME background=COLOR/>...</RectangleLabels></View>``, one
    Label per category in id order. Paste it into the project's Settings -> Labeling
    Interface -> Code before importing the tasks.
    """
    names = _label_names(categories)
    view = ET.Element("View")
    ET.SubElement(view, "Image", {"name": LS_IMAGE, "value": "$" + LS_IMAGE, "zoom": "true"})
    rl = ET.SubElement(view, "RectangleLabels", {"name": LS_LABEL, "toName": LS_IMAGE})
    for j, n in enumerate(names):
        ET.SubElement(rl, "Label", {"value": n, "background": _COLORS[j % len(_COLORS)]})
    # no <?xml ... encoding=...?> declaration: Label Studio parses the pasted config as a string,
    # which lxml refuses when it declares an encoding
    return _xml_bytes(view, declaration=False).decode("utf-8")


def export_label_studio(path: str | Path, selection: pa.Table, manifest: pa.Table,
                        preds: dict[str, np.ndarray] | None, categories: list[dict], min_score: float = 0.3,
                        model_version: str = "poolscout", *, image_root_url: str = "",
                        local_files_root: str = "", config_path: str | Path | None = None) -> dict:
    """Write a Label Studio task list (JSON import format) with rectangle pre-annotations,
    and its labeling config beside it.

    One task per selected image::

        {"id": image_id,
         "data": {"image": image_ref(...), "image_id", "poolscout_rank", "poolscout_selection_score"},
         "meta": {"poolscout": {"rank", "selection_score", "rationale"}},
         "predictions": [{"model_version", "score": mean box confidence, "result": [...]}]}

    ``data.image`` follows :func:`image_ref` (``image_root_url``, else Label Studio's
    ``/data/local-files/?d=`` form relative to ``local_files_root`` or, by default, to the
    run's images folder). The selection's score, rank and rationale are not model scores:
    they sit in ``meta`` (and, to sort tasks by them in the data manager, in the
    ``poolscout_``-prefixed data fields). Each result is a "rectanglelabels" region of the
    config's ``RectangleLabels name="label" toName="image"``; its ``score`` is that box's
    detector confidence (clipped to [0, 1]) and its value is in percent of the original
    size, the box first clipped to the image: x = 100 x1 / W, y = 100 y1 / H,
    width = 100 (x2 - x1) / W, height = 100 (y2 - y1) / H. The prediction's ``score`` is
    the mean confidence of its boxes (no ``score`` when the model found none).

    The labeling config (:func:`label_studio_config`) is written to ``config_path``
    (default: ``label_studio_config.xml`` beside ``path``).

    Returns:
        {"format": "label_studio", "path", "images", "annotations", "config": config path}.
    """
    sel, bx, names, w, h, b = _picked_boxes(selection, manifest, preds, categories, min_score)
    config = label_studio_config(categories)
    pct = (np.column_stack([b[:, 0] / w, b[:, 1] / h, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h]) * 100.0
           if len(b) else np.zeros((0, 4)))
    conf = _confidence(bx["scores"])
    results: list[list[dict]] = [[] for _ in range(len(sel["image_id"]))]
    ids = sel["image_id"]
    for j, (i, p, lab, s) in enumerate(zip(bx["img"].tolist(), pct.tolist(), bx["labels"].tolist(),
                                           conf.tolist())):
        results[i].append({
            "id": f"{int(ids[i])}_{j}",
            "type": "rectanglelabels",
            "from_name": LS_LABEL,
            "to_name": LS_IMAGE,
            "original_width": int(sel["width"][i]),
            "original_height": int(sel["height"][i]),
            "image_rotation": 0,
            "value": {"x": p[0], "y": p[1], "width": p[2], "height": p[3], "rotation": 0,
                      "rectanglelabels": [names[lab]]},
            "score": s,
        })
    tasks = []
    for i, u, k, r, s, why, res in zip(ids.tolist(), sel["uri"].tolist(), sel["source_key"].tolist(),
                                       sel["rank"].tolist(), sel["score"].tolist(), sel["rationale"].tolist(),
                                       results):
        pred: dict = {"model_version": model_version}
        if res:
            pred["score"] = float(np.mean([x["score"] for x in res]))
        pred["result"] = res
        tasks.append({
            "id": i,
            "data": {LS_IMAGE: image_ref(u, k, image_root_url=image_root_url, local_files_root=local_files_root),
                     "image_id": i, "poolscout_rank": r, "poolscout_selection_score": _num(s)},
            "meta": {"poolscout": {"rank": r, "selection_score": _num(s), "rationale": _rationale(why),
                                   "source_key": k}},
            "predictions": [pred],
        })
    cfg_path = Path(config_path) if config_path is not None else Path(path).parent / LS_CONFIG_NAME
    io.atomic_write_json(path, tasks)
    io.atomic_write_text(cfg_path, config)
    return {"format": "label_studio", "path": str(path), "images": len(tasks), "annotations": int(len(b)),
            "config": str(cfg_path)}


def export_cvat(path: str | Path, selection: pa.Table, manifest: pa.Table, preds: dict[str, np.ndarray] | None,
                categories: list[dict], min_score: float = 0.3, task_name: str = "poolscout") -> dict:
    """Write the pre-annotations as "CVAT for images 1.1" XML.

    ``<annotations><version>1.1</version><meta><task>... <labels><label><name>NAME</name>
    <color/><type>rectangle</type><attributes/></label>...</labels></task></meta>`` then one
    ``<image id name width height>`` per selected image holding ``<box label xtl ytl xbr ybr
    occluded="0" source="auto" z_order="0"/>`` per box (score >= min_score, pixels, clipped
    to the image, 2 decimals). ``name`` is the source_key (the path under the images folder);
    the images come in name order with ``id`` = 0, 1, ... - the frame numbers of a CVAT task
    created from exactly these files with CVAT's default (lexicographical) sorting; CVAT
    matches the images by name where it can. Load it into such a task with Actions ->
    Upload annotations -> "CVAT 1.1". Names and labels are XML-escaped.

    Returns:
        {"format": "cvat", "path", "images", "annotations"}.
    """
    sel, bx, names, w, h, b = _picked_boxes(selection, manifest, preds, categories, min_score)
    label_names = _label_names(categories)
    keys = [str(k) for k in sel["source_key"].tolist()]
    order = sorted(range(len(keys)), key=lambda j: keys[j])

    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = _xml_text(task_name, "task name")
    ET.SubElement(task, "size").text = str(len(keys))
    ET.SubElement(task, "mode").text = "annotation"
    ET.SubElement(task, "overlap").text = "0"
    labels = ET.SubElement(task, "labels")
    for j, n in enumerate(label_names):
        lab = ET.SubElement(labels, "label")
        ET.SubElement(lab, "name").text = n
        ET.SubElement(lab, "color").text = _COLORS[j % len(_COLORS)]
        ET.SubElement(lab, "type").text = "rectangle"
        ET.SubElement(lab, "attributes")
    per_img: list[list[int]] = [[] for _ in keys]
    for r, i in enumerate(bx["img"].tolist()):
        per_img[i].append(r)
    for frame, i in enumerate(order):
        img = ET.SubElement(root, "image", {"id": str(frame), "name": _xml_text(keys[i], "source_key"),
                                            "width": str(int(sel["width"][i])),
                                            "height": str(int(sel["height"][i]))})
        for r in per_img[i]:
            x1, y1, x2, y2 = b[r].tolist()
            ET.SubElement(img, "box", {"label": names[int(bx["labels"][r])], "source": "auto", "occluded": "0",
                                       "xtl": f"{x1:.2f}", "ytl": f"{y1:.2f}", "xbr": f"{x2:.2f}",
                                       "ybr": f"{y2:.2f}", "z_order": "0"})
    io.atomic_write_bytes(path, _xml_bytes(root))
    return {"format": "cvat", "path": str(path), "images": len(keys), "annotations": int(len(b))}


# A spreadsheet reads a cell starting with one of these as a formula (or strips the
# whitespace and then does): OWASP's CSV injection rule escapes such text cells.
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: object) -> object:
    """One CSV cell made safe to open in a spreadsheet.

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a
    leading single quote (``'=1+1``), so Excel / LibreOffice / Sheets show it as text
    instead of evaluating it. Numbers (a negative score included) are left as numbers.
    """
    if isinstance(v, str) and v.startswith(_CSV_FORMULA_START):
        return "'" + v
    return v


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """CSV text of `rows` ("\n" line ends) with every cell through :func:`csv_cell`.

    Text cells are quoted where CSV needs it; a row holding a carriage return in a text cell
    has all its text cells quoted (the csv module would otherwise leave a bare "\r" that
    readers take for a line break). Numbers are never quoted.
    """
    buf = _io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    for row in rows:
        cells = [csv_cell(v) for v in row]
        cr = any(isinstance(v, str) and "\r" in v for v in cells)
        (quoted if cr else plain).writerow(cells)
    return buf.getvalue()


def export_csv(path: str | Path, selection: pa.Table, manifest: pa.Table) -> dict:
    """Write image_id, rank, score, uri, source_key (header + one row per pick, rank order).

    Text cells that a spreadsheet would evaluate (starting with =, +, -, @, tab or CR) are
    escaped with a leading single quote (:func:`csv_cell`).

    Returns:
        {"format": "csv", "path", "images", "annotations": 0}.
    """
    sel = _selected(selection, manifest)
    rows = [["image_id", "rank", "score", "uri", "source_key"]]
    # scores as Python floats: the csv module writes them with repr (shortest round trip)
    rows += zip(sel["image_id"].tolist(), sel["rank"].tolist(), [float(s) for s in sel["score"]],
                [str(u) for u in sel["uri"].tolist()], [str(k) for k in sel["source_key"].tolist()])
    io.atomic_write_text(path, csv_text(rows))
    return {"format": "csv", "path": str(path), "images": len(sel["image_id"]), "annotations": 0}


EXPORTERS = {"coco": export_coco, "label_studio": export_label_studio, "cvat": export_cvat, "csv": export_csv}

__all__ = ["export_coco", "export_label_studio", "export_cvat", "export_csv", "csv_cell", "csv_text", "image_ref",
           "label_studio_config", "EXPORTERS"]
