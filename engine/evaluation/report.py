"""A self-contained HTML report over one or more finished (or running) run directories.

What it reads (written by jobs/loop.py and the stages it runs):

* ``loop.json`` (strategy, seed, status, and the config the loop ran with) and
  ``run.yaml`` (the run's settings), when present;
* ``cycles/<k>/metrics.json`` for every cycle: labeled counts, evaluation (with per-class
  test box counts), acquisition diagnostics and stage timings;
* ``cycles/<k>/selection.parquet`` (rank, score, JSON rationale), ``cycles/<k>/select.json``
  (the candidate count) and ``cycles/<k>/model.pt`` for the montages of picked images;
* ``manifest.parquet``, ``annotations.parquet``, ``categories.json`` and ``ledger.parquet``
  for file names, ground-truth boxes and (when metrics lack them) test-split class counts.

What it writes into ``out_dir``:

* ``curves.png``: mAP50 and mAP against labeled images and labeled boxes. Runs that share
  a strategy (several seeds) are drawn as one line, the mean over runs at each cycle index,
  with a shaded band of mean ± sample standard deviation;
* ``montages/<run>_cycle<k>.png``: the top picks of each cycle with ground truth (green,
  class name) and detections (red, class and confidence) drawn, labels kept in the tile;
* ``summary.json``: the verdict, the per-run and per-strategy summaries and the settings
  as data;
* ``index.html``: one page, read top-down: the verdict (best strategy by AULC, labels to
  reach random's final mAP50, spread over seeds, classes with too few test instances),
  the curves, the runs, their settings, then per run and cycle the tables, the montage and
  one sentence per pick (:func:`rationale_sentence`). Images are named by file (the
  manifest's source_key), every image is embedded as a base64 data URI, the CSS is inline
  and there are no scripts or external references, so the file can be mailed or archived
  on its own; all text is HTML-escaped.

The area under the learning curve (AULC) is normalised by the x range, so it reads as the
average mAP50 over the labeling budget spent between the first and the last cycle.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from poolscout.engine.core import io  # noqa: E402
from poolscout.engine.core.run import RunError  # noqa: E402

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 30, 30)
PRED_SCORE_THRESH = 0.3
MAX_PREDS_DRAWN = 10  # detections drawn per montage tile, most confident first
X_KEYS = (("labeled_images", "labeled images"), ("labeled_boxes", "labeled boxes"))
METRIC_LABELS = {"map50": "mAP50", "map": "mAP (50:95)", "map75": "mAP75", "mar100": "mAR100"}
TIMING_STAGES = ("train", "evaluate", "score", "select", "label")
MIN_TEST_INSTANCES = 10  # a class with fewer test boxes has an AP too noisy to read
RANDOM_STRATEGY = "random"  # the baseline the verdict compares against
_DEFAULT_MAX_PIXELS = 64_000_000
_CAPTION_H = 30


# --------------------------------------------------------------------------- reading runs
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _cycle_numbers(root: Path) -> list[int]:
    cyc = root / "cycles"
    if not cyc.is_dir():
        return []
    return sorted(int(p.name) for p in cyc.iterdir() if p.is_dir() and p.name.isdigit())


def load_run_metrics(run_dir: str | Path) -> dict:
    """Collect the per-cycle metrics of one run directory.

    Args:
        run_dir: a run directory with ``cycles/<k>/metrics.json`` files.

    Returns:
        {"name": directory name, "path": Path, "strategy": str, "seed": int | None,
        "status": str | None, "cycles": [metrics dicts sorted by cycle]}. The strategy comes
        from loop.json, else cycles/0/select.json, else the metrics, else "unknown"; the seed
        from loop.json, else run.yaml.

    Raises:
        RunError: the directory does not exist or holds no metrics.json.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"{root}: no such run directory")
    cycles = []
    for k in _cycle_numbers(root):
        p = root / "cycles" / str(k) / "metrics.json"
        if p.is_file():
            m = _read_json(p)
            m.setdefault("cycle", k)
            cycles.append(m)
    if not cycles:
        raise RunError(f"{root}: no cycles/<k>/metrics.json found; is this a run directory whose loop "
                       f"has evaluated at least one cycle?")
    cycles.sort(key=lambda m: int(m.get("cycle", 0)))
    loop = _read_json(root / "loop.json")
    strategy = loop.get("strategy") or _read_json(root / "cycles" / "0" / "select.json").get("strategy")
    if not strategy:
        strategy = next((m.get("strategy") for m in cycles if m.get("strategy")), None) or "unknown"
    seed = loop.get("seed")
    if seed is None and (root / "run.yaml").is_file():
        try:
            seed = (yaml.safe_load((root / "run.yaml").read_text()) or {}).get("seed")
        except yaml.YAMLError:
            seed = None
    return {"name": root.resolve().name, "path": root, "strategy": str(strategy), "seed": seed,
            "status": loop.get("status"), "cycles": cycles}


# --------------------------------------------------------------------------- curves
def _num(v: Any) -> float | None:
    """A finite float, or None for None / NaN / non-numbers."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _metric(m: dict, key: str) -> float | None:
    """A metric from the cycle dict (top level first, then its "eval")."""
    if key in m and not isinstance(m[key], dict):
        return _num(m[key])
    return _num((m.get("eval") or {}).get(key))


def aulc(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Normalised area under a learning curve.

    Args:
        x: budget points (e.g. labeled images), in cycle order.
        y: the metric at those points.

    Returns:
        Trapezoid area over x divided by (x[-1] - x[0]) after sorting by x, i.e. the mean
        height of the curve; None when fewer than 2 points or when x spans nothing.
    """
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(xs) != len(ys):
        raise ValueError(f"aulc: x has {len(xs)} points, y has {len(ys)}")
    if len(xs) < 2:
        return None
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    span = xs[-1] - xs[0]
    if not span > 0:
        return None
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
    return area / float(span)


def group_runs(runs: Iterable[dict]) -> dict[str, list[dict]]:
    """Runs keyed by strategy, in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(str(r.get("strategy", "unknown")), []).append(r)
    return out


def curve_series(runs: Sequence[dict], metric: str = "map50", x_key: str = "labeled_images") -> list[dict]:
    """The lines of one learning-curve panel.

    Runs that share a strategy become one series: at each cycle index, x is the mean of the
    runs' x and y the mean of their y (runs lacking a value at that cycle are left out of
    that point), with a band of ± the sample standard deviation and the min / max.

    Args:
        runs: dicts from :func:`load_run_metrics`.
        metric: "map50", "map", ... (looked up in each cycle's "eval").
        x_key: "labeled_images" or "labeled_boxes".

    Returns:
        One dict per strategy: {"strategy", "label", "runs": [names], "n_runs", "cycle",
        "x", "y", "std", "lo", "hi", "ymin", "ymax", "n"} (lists, one entry per plotted
        point; "std" is 0 where only one run has the point).
    """
    series = []
    for strategy, group in group_runs(runs).items():
        by_cycle: dict[int, list[tuple[float, float]]] = {}
        for r in group:
            for m in r["cycles"]:
                xv, yv = _num(m.get(x_key)), _metric(m, metric)
                if xv is None or yv is None:
                    continue
                by_cycle.setdefault(int(m.get("cycle", 0)), []).append((xv, yv))
        s = {"strategy": strategy, "runs": [r["name"] for r in group], "n_runs": len(group),
             "cycle": [], "x": [], "y": [], "std": [], "lo": [], "hi": [], "ymin": [], "ymax": [], "n": []}
        if len(group) > 1:
            s["label"] = f"{strategy} (mean ± std of {len(group)} runs)"
        else:
            s["label"] = f"{strategy} ({group[0]['name']})"
        for k in sorted(by_cycle):
            pts = np.asarray(by_cycle[k], dtype=np.float64)
            ys = pts[:, 1]
            mean = float(ys.mean())
            std = float(ys.std(ddof=1)) if len(ys) > 1 else 0.0
            s["cycle"].append(k)
            s["x"].append(float(pts[:, 0].mean()))
            s["y"].append(mean)
            s["std"].append(std)
            s["lo"].append(mean - std)
            s["hi"].append(mean + std)
            s["ymin"].append(float(ys.min()))
            s["ymax"].append(float(ys.max()))
            s["n"].append(int(len(ys)))
        series.append(s)
    return series


def _literal(t: Any) -> Any:
    """Draw a text object as the characters it holds.

    Run and strategy names are user text: matplotlib would parse ``$...$`` in them as
    mathtext (``a$\\foo$b`` is an error, ``$a_b$`` a subscript) or hand them to LaTeX with
    ``text.usetex``; neither happens to a literal text.
    """
    t.set_parse_math(False)
    t.set_usetex(False)
    return t


def learning_curves(runs: Sequence[dict], out_png: str | Path, *,
                    metric_keys: Sequence[str] = ("map50", "map")) -> Path:
    """Plot the learning curves of some runs into one PNG.

    One row of panels per metric, columns = against labeled images and against labeled
    boxes. One line per strategy (see :func:`curve_series`): a single run is drawn as is,
    several runs of the same strategy as their mean with a shaded ± std band.

    Args:
        runs: dicts from :func:`load_run_metrics`.
        out_png: destination file (its folder is created).
        metric_keys: the metrics to plot, one row each.

    Returns:
        The PNG path.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(metric_keys))
    fig, axes = plt.subplots(rows, len(X_KEYS), figsize=(6.2 * len(X_KEYS), 4.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    try:
        for i, metric in enumerate(metric_keys):
            for j, (x_key, x_label) in enumerate(X_KEYS):
                ax = axes[i][j]
                drawn = 0
                for n, s in enumerate(curve_series(runs, metric, x_key)):
                    if not s["x"]:
                        continue
                    c = colors[n % len(colors)]
                    ax.plot(s["x"], s["y"], marker="o", ms=3.5, lw=1.6, color=c, label=s["label"])
                    if s["n_runs"] > 1:
                        ax.fill_between(s["x"], s["lo"], s["hi"], color=c, alpha=0.18, lw=0)
                    drawn += 1
                name = METRIC_LABELS.get(metric, metric)
                _literal(ax.set_xlabel(x_label))
                _literal(ax.set_ylabel(name))
                _literal(ax.set_title(f"{name} vs {x_label}"))
                ax.grid(True, alpha=0.35)
                if drawn:
                    leg = ax.legend(fontsize=8, loc="best")
                    for t in leg.get_texts():
                        _literal(t)
                else:
                    _literal(ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                                     color="0.5"))
        fig.tight_layout()
        fig.savefig(out_png, dpi=110)
    finally:
        plt.close(fig)
    return out_png


# --------------------------------------------------------------------------- montages
def _read_selection(root: Path, k: int) -> list[dict] | None:
    """Selection rows of cycle k sorted by rank, or None when the cycle has no selection."""
    p = root / "cycles" / str(int(k)) / "selection.parquet"
    if not p.is_file():
        return None
    t = io.read_table(p)
    rows = t.to_pylist()
    rows.sort(key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
    return rows


def _categories(root: Path) -> dict[int, str]:
    p = root / "categories.json"
    if not p.is_file():
        return {}
    data = json.loads(p.read_text())
    if isinstance(data, dict):  # tolerate {"id": "name"}
        return {int(k): str(v) for k, v in data.items()}
    return {int(c["id"]): str(c.get("name", c["id"])) for c in data}


def _manifest_rows(root: Path, ids: Sequence[int] | None = None) -> dict[int, dict]:
    p = root / "manifest.parquet"
    if not p.is_file():
        return {}
    t = io.read_table(p)
    if ids is not None:
        t = t.filter(pc.is_in(t["image_id"], pa.array(list(ids), pa.int64())))
    return {int(r["image_id"]): r for r in t.to_pylist()}


def _gt_boxes(root: Path, ids: Sequence[int]) -> dict[int, list[tuple[int, list[float]]]]:
    p = root / "annotations.parquet"
    out: dict[int, list[tuple[int, list[float]]]] = {int(i): [] for i in ids}
    if not p.is_file() or not ids:
        return out
    t = io.read_table(p)
    t = t.filter(pc.is_in(t["image_id"], pa.array(list(ids), pa.int64())))
    for r in t.to_pylist():
        out[int(r["image_id"])].append((int(r["category_id"]), [r["x1"], r["y1"], r["x2"], r["y2"]]))
    return out


def _max_pixels(root: Path) -> int:
    p = root / "run.yaml"
    if p.is_file():
        try:
            data = yaml.safe_load(p.read_text()) or {}
            v = (data.get("dataset") or {}).get("max_pixels")
            if v:
                return int(v)
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            pass
    return _DEFAULT_MAX_PIXELS


def _predictions(model_path: Path, uris: list[str], sizes: list[tuple[int, int]], max_pixels: int, device: Any,
                 batch_size: int = 8) -> list[list[tuple[int, float, list[float]]] | None]:
    """(label, score, box in original pixels) per image from a checkpoint; None per bad image."""
    from poolscout.engine.models.detectors import load_checkpoint
    from poolscout.engine.data.images import load_batch
    from poolscout.engine.models.inference import predict

    model, meta = load_checkpoint(model_path, map_location="cpu")
    size = int((meta.get("detector") or {}).get("input_size") or model.poolscout_input_size)
    out: list[list[tuple[int, float, list[float]]] | None] = []
    for s in range(0, len(uris), batch_size):
        chunk = uris[s:s + batch_size]
        known = sizes[s:s + batch_size]
        b = load_batch(chunk, size, max_pixels)
        ok = np.array([e is None for e in b["error"]], dtype=bool)
        per: list[list | None] = [None] * len(chunk)
        if ok.any():
            idx = np.nonzero(ok)[0]
            scale = b["scale"][idx].astype(np.float64)
            cw, ch = b["content_w"][idx], b["content_h"][idx]
            # the manifest's displayed size; else what the letterbox implies
            w = np.array([known[i][0] if known[i][0] > 0 else max(1, round(cw[j] / scale[j]))
                          for j, i in enumerate(idx)], np.int64)
            h = np.array([known[i][1] if known[i][1] > 0 else max(1, round(ch[j] / scale[j]))
                          for j, i in enumerate(idx)], np.int64)
            p = predict(model, b["image"][idx], image_id=np.arange(len(idx)), width=w, height=h, scale=scale,
                        content_w=cw, content_h=ch, views=("orig",), roi_embeddings=False, device=device)
            off = p["offsets"]
            for j, i in enumerate(idx):
                a, z = int(off[j]), int(off[j + 1])
                per[i] = [(int(p["labels"][t]), float(p["scores"][t]), p["boxes"][t].tolist()) for t in range(a, z)]
        out.extend(per)
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fmt_score(v: Any) -> str:
    f = _num(v)
    if f is None:
        return "–" if v is None else str(v)
    return f"{f:.4g}"


def _fit_text(d: ImageDraw.ImageDraw, text: str, font: Any, max_w: float, keep_end: bool = False) -> str:
    """The text, shortened with "…" (at the end, or at the start with keep_end) to fit max_w."""
    if d.textlength(text, font=font) <= max_w:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix / suffix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        cand = ("…" + text[len(text) - mid:]) if keep_end else (text[:mid] + "…")
        if d.textlength(cand, font=font) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return ("…" + text[len(text) - lo:]) if keep_end else (text[:lo] + "…")


def _label_box(d: ImageDraw.ImageDraw, x: float, y_top: float, y_bottom: float, text: str, fill: tuple,
               text_fill: tuple, font: Any, size: tuple[int, int], above: bool) -> dict:
    """Draw a filled text label at a box edge, kept inside a (W, H) image.

    The label sits above the box's top edge (above=True) or below its bottom edge, moves
    inside the box when there is no room outside, and is shifted (x and y) so that every
    pixel of it lies inside the image; a label wider than the image is shortened.

    Returns:
        {"text": the drawn text, "rect": (x0, y0, x1, y1) inclusive pixel bounds}.
    """
    w_img, h_img = size
    pad = 1
    text = _fit_text(d, text, font, max(1, w_img - 2 * pad))
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    w = int(math.ceil(right - left)) + 2 * pad
    h = int(math.ceil(bottom - top)) + 2 * pad
    if above:
        y0 = y_top - h if y_top - h >= 0 else y_top  # no room above: just inside the top edge
    else:
        y0 = y_bottom if y_bottom + h <= h_img else y_bottom - h  # no room below: inside the bottom edge
    x0 = int(round(min(max(0.0, x), max(0, w_img - w))))
    y0 = int(round(min(max(0.0, y0), max(0, h_img - h))))
    x1, y1 = min(w_img - 1, x0 + w - 1), min(h_img - 1, y0 + h - 1)
    d.rectangle([x0, y0, x1, y1], fill=fill)
    d.text((x0 + pad - left, y0 + pad - top), text, fill=text_fill, font=font)
    return {"text": text, "rect": (x0, y0, x1, y1)}


def annotate_tile(tile: Image.Image, gt: Sequence[tuple[str, Sequence[float]]],
                  preds: Sequence[tuple[str, float, Sequence[float]]] = (), *, font: Any = None) -> list[dict]:
    """Draw labeled boxes on one tile, in place.

    Ground truth is green with its class name above the box; predictions are red with
    "name 0.87" below the box (so a prediction matching a GT box does not hide its label).
    Boxes are clipped to the tile and every label is kept whole inside it (see
    :func:`_label_box`); labels are drawn after all boxes so no box line crosses a label.

    Args:
        tile: an RGB image (modified).
        gt: (class name, [x1, y1, x2, y2] in tile pixels) per ground-truth box.
        preds: (class name, confidence, box in tile pixels) per prediction to draw.
        font: a PIL font (default: the 10 px default font).

    Returns:
        One dict per label in drawing order: {"kind": "gt" | "pred", "text", "rect"}.
    """
    font = font or _font(10)
    d = ImageDraw.Draw(tile)
    w_img, h_img = tile.size

    def clip(box: Sequence[float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = min(max(x1, 0.0), w_img - 1.0), min(max(x2 - 1, 0.0), w_img - 1.0)
        y1, y2 = min(max(y1, 0.0), h_img - 1.0), min(max(y2 - 1, 0.0), h_img - 1.0)
        return x1, y1, max(x1, x2), max(y1, y2)

    items = [("gt", str(name), None, clip(box)) for name, box in gt]
    items += [("pred", str(name), float(score), clip(box)) for name, score, box in preds]
    for kind, _, _, b in items:
        d.rectangle(list(b), outline=GT_COLOR if kind == "gt" else PRED_COLOR, width=1)
    out = []
    for kind, name, score, (x1, y1, x2, y2) in items:
        if kind == "gt":
            lab = _label_box(d, x1, y1, y2 + 1, name, GT_COLOR, (0, 0, 0), font, (w_img, h_img), above=True)
        else:
            lab = _label_box(d, x1, y1, y2 + 1, f"{name} {score:.2f}", PRED_COLOR, (255, 255, 255), font,
                             (w_img, h_img), above=False)
        out.append({"kind": kind, **lab})
    return out


def _display_name(row: dict | None, image_id: Any) -> str:
    """The manifest's source_key (the path under the pool root), else the URI's file name."""
    row = row or {}
    key = row.get("source_key")
    if key:
        return str(key)
    uri = row.get("uri")
    if uri:
        return str(uri).rstrip("/").rsplit("/", 1)[-1]
    return f"image {image_id}"


def montage(run_dir: str | Path, k: int, out_png: str | Path, *, max_images: int = 12, thumb: int = 160,
            device: Any = "cpu", score_thresh: float = PRED_SCORE_THRESH,
            labels_out: list[str] | None = None, max_preds: int = MAX_PREDS_DRAWN) -> Path | None:
    """Thumbnails of the top picks of cycle k with ground truth and predictions drawn.

    Each tile is the picked image letterboxed to ``thumb`` pixels with its ground-truth
    boxes in green labeled with their class names and the cycle-k model's detections with
    score >= ``score_thresh`` in red labeled "name confidence" (labels kept inside the tile,
    see :func:`annotate_tile`); "#rank  score" and the file name (the manifest's
    source_key) are written under it. Tiles follow rank order.

    Args:
        run_dir: the run directory.
        k: cycle whose ``selection.parquet`` (and ``model.pt``) is shown.
        out_png: destination file.
        max_images: at most this many picks.
        thumb: tile side in pixels.
        device: where the detector runs.
        score_thresh: smallest detection score drawn.
        labels_out: when given, the text of every box label drawn is appended to it.
        max_preds: at most this many detections per tile (the most confident).

    Returns:
        The PNG path, or None when cycle k has no (or an empty) selection.
    """
    root = Path(run_dir)
    sel = _read_selection(root, k)
    if not sel or max_images <= 0:
        return None
    sel = sel[:int(max_images)]
    ids = [int(r["image_id"]) for r in sel]
    man = _manifest_rows(root, ids)
    gt = _gt_boxes(root, ids)
    names = _categories(root)
    max_pixels = _max_pixels(root)
    uris = [str((man.get(i) or {}).get("uri") or "") for i in ids]
    sizes = [(int((man.get(i) or {}).get("width") or 0), int((man.get(i) or {}).get("height") or 0)) for i in ids]

    model_path = root / "cycles" / str(int(k)) / "model.pt"
    preds: list | None = None
    if model_path.is_file():
        try:
            preds = _predictions(model_path, uris, sizes, max_pixels, device)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            warnings.warn(f"{model_path}: cannot run the model for the montage ({e}); drawing ground truth only",
                          stacklevel=2)

    from poolscout.engine.data.images import load_batch

    canv = load_batch(uris, int(thumb), max_pixels)
    font = _font(10)
    cap_font = _font(11)
    n = len(ids)
    cols = min(n, 6)
    rows_n = (n + cols - 1) // cols
    tile_h = thumb + _CAPTION_H
    sheet = Image.new("RGB", (cols * thumb + (cols + 1) * 4, rows_n * tile_h + (rows_n + 1) * 4), (255, 255, 255))
    for t, (iid, row) in enumerate(zip(ids, sel)):
        err = canv["error"][t]
        if err is None:
            tile = Image.fromarray(canv["image"][t])
        else:
            tile = Image.new("RGB", (thumb, thumb), (90, 90, 90))
        if err is not None:
            ImageDraw.Draw(tile).text((4, 4), f"unreadable:\n{err}"[:80], fill=(255, 255, 255), font=font)
        else:
            sc = float(canv["scale"][t])
            g = [(names.get(cat, str(cat)), [float(v) * sc for v in box]) for cat, box in gt.get(iid, [])]
            kept = sorted((x for x in ((preds[t] or []) if preds is not None else []) if x[1] >= score_thresh),
                          key=lambda x: -x[1])[:max(0, int(max_preds))]
            p = [(names.get(lab, str(lab)), score, [float(v) * sc for v in box]) for lab, score, box in kept]
            drawn = annotate_tile(tile, g, p, font=font)
            if labels_out is not None:
                labels_out.extend(x["text"] for x in drawn)
        cell = Image.new("RGB", (thumb, tile_h), (255, 255, 255))
        cell.paste(tile, (0, 0))
        cd = ImageDraw.Draw(cell)
        cd.text((2, thumb + 1), _fit_text(cd, f"#{row.get('rank')}  score {_fmt_score(row.get('score'))}", cap_font,
                                          thumb - 4), fill=(0, 0, 0), font=cap_font)
        cd.text((2, thumb + 15), _fit_text(cd, _display_name(man.get(iid), iid), cap_font, thumb - 4, keep_end=True),
                fill=(60, 60, 60), font=cap_font)
        r_, c_ = divmod(t, cols)
        sheet.paste(cell, (4 + c_ * (thumb + 4), 4 + r_ * (tile_h + 4)))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, "PNG")
    return out_png


# --------------------------------------------------------------------------- rationale sentences
_SIGNAL_WORDS = {
    "entropy": "box entropy", "margin": "box margin", "least_confidence": "box least-confidence",
    "bald": "BALD disagreement", "cald": "CALD consistency", "dcus": "DCUS uncertainty",
    "huale_sa": "HUALE semantic affinity", "huale_cd": "HUALE category diversity", "huale_or": "HUALE overlap",
    "huale_lc": "HUALE localization uncertainty", "random": "random draw",
}
_VIEW_WORDS = {"hflip": "flipped view", "cutout": "cutout view", "resize": "resized view", "rotate": "rotated view"}
_RESERVED_KEYS = ("warning", "note")


def _num_text(v: Any) -> str:
    """A number as a short readable string (3 significant digits, integers as integers)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    f = _num(v)
    if f is None:
        if isinstance(v, float):  # NaN / inf
            return "n/a" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
        return "n/a" if v is None else str(v)
    a = abs(f)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{f:.2e}"
    return f"{f:.3g}" if a < 1 else f"{f:.{max(0, 3 - len(str(int(a))))}f}"


def _count_text(v: Any) -> str:
    """A count (possibly a mean over seeds): an integer when whole, else one decimal."""
    f = _num(v)
    if f is None:
        return "–"
    return str(int(round(f))) if abs(f - round(f)) < 1e-9 else f"{f:.1f}"


def _ordinal(n: Any) -> str:
    try:
        k = int(n)
    except (TypeError, ValueError):
        return str(n)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def signal_words(column: Any, direction: Any = None) -> str:
    """A signal column ("entropy_max", "hflip_margin_topk_mean_3") in words ("max box entropy").

    Unknown columns come back unchanged, so a custom column still reads as its own name.
    """
    col = str(column)
    view = ""
    for v, words in _VIEW_WORDS.items():
        if col.startswith(v + "_"):
            view, col = words, col[len(v) + 1:]
            break
    name = next((n for n in sorted(_SIGNAL_WORDS, key=len, reverse=True) if col == n or col.startswith(n + "_")),
                None)
    if name is None:
        return str(column)
    tail = col[len(name) + 1:] if col != name else ""
    words = _SIGNAL_WORDS[name]
    low = direction == "low" or (direction is None and name in ("margin", "cald"))
    if tail == "":
        phrase = words
    elif tail == "max":  # oriented: the most informative box (the smallest margin)
        phrase = f"{'min' if low else 'max'} {words}"
    elif tail == "mean":
        phrase = f"mean {words}"
    elif tail == "sum":
        phrase = f"total {words}"
    elif tail.startswith("topk_mean_") and tail[len("topk_mean_"):].isdigit():
        phrase = f"{words} averaged over the {tail[len('topk_mean_'):]} most informative boxes"
    else:
        return str(column)
    return f"{phrase} ({view})" if view else phrase


def _plain(v: Any) -> str:
    """Any JSON-like value as one line without braces: dicts as "key value" pairs."""
    if isinstance(v, dict):
        return ", ".join(f"{k} {_plain(x)}" if not isinstance(x, dict) else f"{k} ({_plain(x)})"
                         for k, x in v.items()) or "nothing"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_plain(x) for x in v) + ")" if v else "none"
    if v is None or isinstance(v, (bool, int, float)):
        return _num_text(v)
    return str(v)


def _share_of_pool(rank: Any, pool_size: int | None) -> str:
    """ "top 2% of the pool" for a 1-based rank, or "" when the pool size is unknown."""
    r, n = _num(rank), _num(pool_size)
    if r is None or n is None or n <= 0 or r < 0:
        return ""
    pct = 100.0 * max(r, 1.0) / n
    if pct >= 100:
        return "the whole pool"
    text = f"{pct:.1f}".rstrip("0").rstrip(".") if pct < 1 else str(min(100, math.ceil(pct)))
    return f"top {text}% of the pool"


def _value_phrase(d: dict) -> str:
    by = d.get("by")
    words = signal_words(by, d.get("direction")) if by is not None else "score"
    if by == "random":
        return "random pick"
    if "value" in d:
        return f"{words} {_num_text(d.get('value'))}" if d.get("value") is not None else f"{words}: no value"
    return f"picked by {words}"


def _ranked_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    """topk / retrieve: the column, its value and where the image ranked by it."""
    vp = _value_phrase(d)
    where = []
    if not alone and d.get("rank") is not None:
        where.append(f"ranked {_ordinal(d.get('rank'))}" + ("" if first else " of the kept"))
    share = _share_of_pool(d.get("rank"), pool_size) if first and d.get("by") != "random" else ""
    if share:
        where.append(share)
    if alone:
        return vp + (f" ({', '.join(where)})" if where else "")
    inner = ", ".join([vp] + where)
    return f"{name} {'picked' if last else 'kept'} it ({inner})"


def _coreset_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    verb = "picked" if last else "kept"
    init = d.get("init")
    if init == "farthest_from_mean":
        extra = (f" (distance {_num_text(d['distance_to_mean'])})" if d.get("distance_to_mean") is not None else "")
        return f"{name} {verb} it first, as the candidate farthest from the pool mean{extra}"
    if init == "random":
        return f"{name} {verb} it first, at random (no labeled images to measure distances from)"
    if d.get("distance") is None:
        return f"{name} {verb} it (no labeled images to measure distances from)"
    return (f"{name} {verb} it at distance {_num_text(d.get('distance'))} from its nearest labeled or "
            f"earlier-picked image")


def _cald_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    verb = "picked" if last else "kept"
    js = f" (JS divergence {_num_text(d.get('js'))})" if "js" in d else ""
    return f"{name} {verb} it: its predicted class mix differs from the labeled set's{js}"


def _weighted_l2_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    verb = "picked" if last else "kept"
    out = f"{name} {verb} it with combined score {_num_text(d.get('l'))}"
    terms = d.get("terms")
    if isinstance(terms, dict) and terms:
        top = sorted(terms.items(), key=lambda kv: -(_num(kv[1]) or 0.0))[:2]
        out += ", mostly from " + " and ".join(f"{signal_words(k)} {_num_text(v)}" for k, v in top)
    dropped = d.get("dropped")
    if isinstance(dropped, (list, tuple)) and dropped:
        out += f" ({', '.join(signal_words(c) for c in dropped)} ignored: no spread)"
    return out


def _ccms_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    verb = "picked" if last else "kept"
    n = _num(d.get("cluster_size"))
    if n is not None and n <= 1:
        return f"{name} {verb} it as a cluster of its own (no similar candidate)"
    size = _num_text(d.get("cluster_size")) if d.get("cluster_size") is not None else "?"
    md = d.get("mean_distance_in_cluster")
    dist = f", mean distance {_num_text(md)} to the others" if md is not None else ""
    return f"{name} {verb} it as the medoid of a cluster of {size} similar candidates{dist}"


def _gsal_phrase(d: dict, name: str, first: bool, alone: bool, last: bool, pool_size: int | None) -> str:
    """GSAL: the box's concept-graph node path with its labeled masses, and the dominant term."""
    verb = "picked" if last else "kept"
    path = d.get("path")
    if not isinstance(path, (list, tuple)) or len(path) != 3:
        return f"{name} {verb} it last, as an image without predicted boxes"
    mass = d.get("mass") if isinstance(d.get("mass"), (list, tuple)) else [None] * 3
    nodes = [f"{_plain(path[0])} ({_count_text(mass[0])} labeled)", f"class {_plain(path[1])} "
             f"({_count_text(mass[1])})", f"cluster {_plain(path[2])} ({_count_text(mass[2])})"]
    terms = []
    if d.get("g") is not None:
        terms.append(f"difficulty {_num_text(d.get('g'))}")
    if d.get("prior") is not None:
        terms.append(f"coverage prior {_num_text(d.get('prior'))}")
    dom = d.get("dominant")
    why = {"difficulty": "mostly for how hard the diffusion model found the box",
           "coverage": "mostly because few labels cover its concepts"}.get(dom, "")
    out = f"{name} {verb} it for its box {_plain(d.get('box'))} in " + " > ".join(nodes)
    if terms:
        out += " (" + " x ".join(terms) + f" = {_num_text(d.get('score'))})"
    return out + (f", {why}" if why else "")


_STAGE_PHRASES = {"topk": _ranked_phrase, "retrieve": _ranked_phrase, "coreset": _coreset_phrase,
                  "cald_rerank": _cald_phrase, "weighted_l2": _weighted_l2_phrase, "ccms": _ccms_phrase,
                  "gsal": _gsal_phrase}


def _generic_phrase(key: str, v: Any, last: bool) -> str:
    if isinstance(v, dict):
        body = {k: x for k, x in v.items() if k != "rank"}
        rank = f", ranked {_ordinal(v['rank'])}" if v.get("rank") is not None else ""
        return f"{key}: {_plain(body)}{rank}" if body else f"{key}{rank}"
    return f"{key} {_plain(v)}"


def rationale_sentence(rationale: Any, rank: Any, score: Any, *, pool_size: int | None = None) -> str:
    """One readable line saying why a pick was made.

    Args:
        rationale: a selection.parquet rationale: a dict keyed by stage (selector) name in
            pipeline order, each value a dict such as {"by": "entropy_max", "value": 0.93,
            "rank": 3}; repeated selectors are keyed "<selector>_<i>". Top-level "warning"
            and "note" strings are appended verbatim. A JSON string is parsed first.
        rank: the pick's rank (the sentence starts "rank <rank>: ").
        score: the pick's score, shown when the rationale says nothing usable.
        pool_size: candidates at selection time (select.json "candidates"); adds "top x% of
            the pool" to the first ranking stage.

    Returns:
        e.g. "rank 3: max box entropy 1.21 (top 2% of the pool)" or "rank 1: retrieve kept it
        (max box entropy 0.93, ranked 7th), then coreset picked it at distance 0.41 ...".
        Unknown stages read as "name: key value, key value"; never JSON braces.
    """
    if isinstance(rationale, str):
        try:
            rationale = json.loads(rationale)
        except json.JSONDecodeError:
            rationale = {"note": rationale}
    head = f"rank {_plain(rank)}: " if rank is not None else ""
    if not isinstance(rationale, dict):
        rationale = {} if rationale is None else {"note": _plain(rationale)}
    stages = [(str(k), v) for k, v in rationale.items() if k not in _RESERVED_KEYS]
    phrases = []
    for i, (key, val) in enumerate(stages):
        base = re.sub(r"_\d+$", "", key) if re.sub(r"_\d+$", "", key) in _STAGE_PHRASES else key
        fn = _STAGE_PHRASES.get(base)
        last = i == len(stages) - 1
        if fn is not None and isinstance(val, dict):
            phrases.append(fn(val, key, i == 0, len(stages) == 1, last, pool_size))
        elif fn is not None and val is None:
            phrases.append(f"{key} {'picked' if last else 'kept'} it")
        else:
            phrases.append(_generic_phrase(key, val, last))
    text = ", then ".join(phrases) if phrases else f"score {_fmt_score(score)}"
    for k in _RESERVED_KEYS:
        if rationale.get(k) not in (None, ""):
            text += f"; {k}: {_plain(rationale[k])}"
    return head + text


# --------------------------------------------------------------------------- summary
def _final(run: dict) -> dict:
    return run["cycles"][-1] if run["cycles"] else {}


def run_summary(run: dict) -> dict:
    """One summary row: final counts and metrics plus the normalised mAP50 AULC."""
    last = _final(run)
    pts = [(_num(m.get("labeled_images")), _metric(m, "map50")) for m in run["cycles"]]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    return {
        "run": run["name"], "path": str(run.get("path", "")), "strategy": run["strategy"], "seed": run.get("seed"),
        "status": run.get("status"), "cycles": len(run["cycles"]), "last_cycle": last.get("cycle"),
        "labeled_images": last.get("labeled_images"), "labeled_boxes": last.get("labeled_boxes"),
        "map50": _metric(last, "map50"), "map": _metric(last, "map"),
        "aulc_map50": aulc([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None,
        "stop_agreement": (last.get("stop") or {}).get("agreement"),
        "labels_buy_little": bool((last.get("stop") or {}).get("labels_buy_little")),
    }


def strategy_summary(rows: Sequence[dict]) -> list[dict]:
    """Per strategy: runs, and mean / sample std over runs of final mAP50, mAP and AULC."""
    out = []
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    for strategy, rs in by.items():
        row: dict[str, Any] = {"strategy": strategy, "runs": len(rs)}
        for key in ("map50", "map", "aulc_map50"):
            vals = np.array([v for v in (_num(r[key]) for r in rs) if v is not None], np.float64)
            row[f"{key}_mean"] = float(vals.mean()) if len(vals) else None
            row[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
        out.append(row)
    return out


# --------------------------------------------------------------------------- verdict
def class_test_instances(run_dir: str | Path, cycles: Sequence[dict] | None = None) -> dict[str, int]:
    """Ground-truth boxes per class in a run's test split.

    Args:
        run_dir: the run directory.
        cycles: its metrics dicts (default: read from cycles/<k>/metrics.json).

    Returns:
        {class name: test boxes}: from the latest metrics.json whose eval.per_class entries
        carry "gt", else counted from annotations.parquet over the ledger's "test" images
        (every class of categories.json listed, 0 when absent); {} when neither is there.
    """
    root = Path(run_dir)
    if cycles is None:
        cycles = [_read_json(root / "cycles" / str(k) / "metrics.json") for k in _cycle_numbers(root)]
    for m in reversed(list(cycles)):
        per = (m.get("eval") or {}).get("per_class") if isinstance(m, dict) else None
        if isinstance(per, list) and per and all(isinstance(c, dict) and _num(c.get("gt")) is not None for c in per):
            return {str(c.get("name", c.get("id"))): int(_num(c["gt"])) for c in per}
    led_p, ann_p = root / "ledger.parquet", root / "annotations.parquet"
    if not (led_p.is_file() and ann_p.is_file()):
        return {}
    led = io.read_table(led_p, columns=["image_id", "state"])
    test_ids = led.filter(pc.equal(led["state"], "test"))["image_id"].to_numpy()
    if len(test_ids) == 0:
        return {}
    ann = io.read_table(ann_p, columns=["image_id", "category_id"])
    ann = ann.filter(pc.is_in(ann["image_id"], pa.array(test_ids, pa.int64())))
    names = _categories(root)
    out = {names[c]: 0 for c in sorted(names)}
    for c in ann["category_id"].to_numpy().astype(np.int64).tolist():
        key = names.get(int(c), str(int(c)))
        out[key] = out.get(key, 0) + 1
    return out


def _pm(mean: Any, std: Any, n: int) -> str:
    if mean is None:
        return "–"
    if n <= 1 or std is None:
        return f"{mean:.3f} (1 seed)" if n <= 1 else f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def rare_share_ratio(run: dict, cls: str) -> float | None:
    """Share of `cls` among the instances labeled after the seed set (cycles >= 1), divided
    by its share of the pool's instances at the start: 1 is what random picks give on
    average, above 1 the strategy seeks the class out. None when undefined.

    Args:
        run: a dict from :func:`load_run_metrics`.
    """
    cycles = run.get("cycles") or []
    hists = [(c.get("acquisition") or {}).get("new_class_hist") for c in cycles[1:]]
    hists = [h for h in hists if h]
    prev = ((cycles[0].get("acquisition") or {}).get("pool_prevalence") or {}).get(cls) if cycles else None
    total = sum(sum(h.values()) for h in hists)
    if not hists or not prev or total == 0:
        return None
    return sum(h.get(cls, 0) for h in hists) / total / prev


def _is_random(strategy: str) -> bool:
    return strategy.strip().lower() == RANDOM_STRATEGY


def verdict(runs: Sequence[dict], *, class_counts: dict[str, dict[str, int]] | None = None) -> dict:
    """What the report concludes, as data and plain sentences.

    Runs that share a strategy are seeds of it. Strategies are ranked by the mean over
    seeds of the normalised mAP50 AULC; "labels to reach random's final mAP50" is the
    mean labeled-image count of the first cycle at which the strategy's mean mAP50 curve
    reaches the mean final mAP50 of the random runs.

    Args:
        runs: dicts from :func:`load_run_metrics`.
        class_counts: {run name: {class: test boxes}} (default: :func:`class_test_instances`).

    Returns:
        {"headline": str, "lines": [str], "best": strategy | None, "random_final_map50",
        "random_final_images", "strategies": [per strategy, best AULC first: {"strategy",
        "seeds", "map50_mean", "map50_std", "aulc_mean", "aulc_std", "labeled_images_mean",
        "reach_images", "reach_cycle", "reach"}], "few_test_instances": {class: boxes}}.
    """
    rows = [run_summary(r) for r in runs]
    by = strategy_summary(rows)
    imgs: dict[str, list[float]] = {}
    for r in rows:
        v = _num(r.get("labeled_images"))
        if v is not None:
            imgs.setdefault(r["strategy"], []).append(v)
    rand = next((s for s in by if _is_random(s["strategy"])), None)
    target = rand["map50_mean"] if rand else None
    rand_imgs = float(np.mean(imgs[rand["strategy"]])) if rand and imgs.get(rand["strategy"]) else None
    curves = {s["strategy"]: s for s in curve_series(runs, "map50", "labeled_images")}
    out_rows = []
    for s in by:
        name = s["strategy"]
        row = {"strategy": name, "seeds": s["runs"], "map50_mean": s["map50_mean"], "map50_std": s["map50_std"],
               "aulc_mean": s["aulc_map50_mean"], "aulc_std": s["aulc_map50_std"],
               "labeled_images_mean": float(np.mean(imgs[name])) if imgs.get(name) else None,
               "reach_images": None, "reach_cycle": None}
        c = curves.get(name) or {"x": [], "y": [], "cycle": []}
        if rand is None:
            row["reach"] = "random not in the report"
        elif target is None:
            row["reach"] = "random has no final mAP50"
        elif _is_random(name):
            row["reach"] = (f"reference: {_count_text(rand_imgs)} labels" if rand_imgs is not None else "reference")
            row["reach_images"] = rand_imgs
        else:
            hit = next((i for i, y in enumerate(c["y"]) if y >= target - 1e-12), None)
            if hit is None:
                best = max(c["y"]) if c["y"] else None
                row["reach"] = "never" + (f" (best mAP50 {best:.3f})" if best is not None else "")
            else:
                row["reach_images"], row["reach_cycle"] = c["x"][hit], c["cycle"][hit]
                row["reach"] = f"{_count_text(c['x'][hit])} labels (cycle {c['cycle'][hit]})"
        out_rows.append(row)
    out_rows.sort(key=lambda r: (r["aulc_mean"] is None, -(r["aulc_mean"] or 0.0)))

    ranked = [r for r in out_rows if r["aulc_mean"] is not None]
    rand_row = next((r for r in out_rows if _is_random(r["strategy"])), None)
    best = ranked[0] if ranked else None
    lines: list[str] = []
    if best is None:
        headline = "No strategy has an AULC yet: that needs mAP50 at two or more cycles."
    elif len(out_rows) == 1:
        headline = (f"Only one strategy in the report ({best['strategy']}, AULC "
                    f"{_pm(best['aulc_mean'], best['aulc_std'], best['seeds'])}): nothing to compare it with.")
    elif rand_row is None or rand_row["aulc_mean"] is None:
        headline = (f"Best strategy by AULC: {best['strategy']} "
                    f"({_pm(best['aulc_mean'], best['aulc_std'], best['seeds'])}). "
                    + ("random is not in the report, so there is no baseline to beat." if rand_row is None
                       else "random has no AULC, so there is no baseline to beat."))
    else:
        ra = rand_row["aulc_mean"]
        beats = [r for r in ranked if not _is_random(r["strategy"]) and r["aulc_mean"] > ra]
        if not beats:
            top_other = next((r for r in ranked if not _is_random(r["strategy"])), None)
            headline = (f"No strategy beats random: random's AULC "
                        f"{_pm(ra, rand_row['aulc_std'], rand_row['seeds'])} is "
                        + ("the highest" if best is rand_row else "tied for the highest")
                        + (f" (best other: {top_other['strategy']} {top_other['aulc_mean']:.3f})."
                           if top_other else "."))
        else:
            lead = best["aulc_mean"] - ra
            headline = (f"Best strategy by AULC: {best['strategy']} "
                        f"({_pm(best['aulc_mean'], best['aulc_std'], best['seeds'])}), "
                        f"{lead:+.3f} over random ({_pm(ra, rand_row['aulc_std'], rand_row['seeds'])}).")
            spread = [v for v in (best["aulc_std"], rand_row["aulc_std"]) if v is not None]
            if not spread:
                lines.append("Each of the two has a single seed, so there is no spread to judge that lead by; "
                             "run more seeds before trusting it.")
            elif lead <= max(spread):
                lines.append(f"That lead is within the spread across seeds (std up to {max(spread):.3f}): "
                             f"not a clear win.")
            if len(beats) > 1:
                lines.append("Also above random: " + ", ".join(f"{r['strategy']} ({r['aulc_mean']:.3f})"
                                                              for r in beats[1:]) + ".")
    if rand_row is not None and target is not None:
        others = [r for r in out_rows if not _is_random(r["strategy"])]
        if others:
            lines.append(f"Labels to reach random's final mAP50 ({target:.3f}"
                         + (f" at {_count_text(rand_imgs)} labeled images" if rand_imgs is not None else "") + "): "
                         + "; ".join(f"{r['strategy']} {r['reach']}" for r in others) + ".")
    spans = {}
    for r in runs:
        xs = [x for x in (_num(m.get("labeled_images")) for m in r["cycles"]) if x is not None]
        if len(xs) >= 2:
            spans[(min(xs), max(xs))] = spans.get((min(xs), max(xs)), 0) + 1
    if len(spans) > 1:
        lines.append("Runs cover different labeled-image ranges ("
                     + ", ".join(f"{_count_text(a)}–{_count_text(b)}" for a, b in sorted(spans))
                     + "): their AULCs average mAP50 over different budgets; compare with care.")
    if class_counts is None:
        class_counts = {r["name"]: class_test_instances(r["path"], r["cycles"]) for r in runs}
    few: dict[str, int] = {}
    for counts in class_counts.values():
        for name, n in (counts or {}).items():
            if n < MIN_TEST_INSTANCES:
                few[name] = min(n, few.get(name, n))
    if few:
        lines.append(f"Warning: {len(few)} class{'es' if len(few) != 1 else ''} ha{'ve' if len(few) != 1 else 's'} "
                     f"fewer than {MIN_TEST_INSTANCES} test instances, so "
                     f"{'their' if len(few) != 1 else 'its'} per-class AP is noise: "
                     + ", ".join(f"{k} ({n}{': AP undefined' if n == 0 else ''})" for k, n in few.items()) + ".")
    return {"headline": headline, "lines": lines, "best": best["strategy"] if best else None,
            "random_final_map50": target, "random_final_images": rand_imgs, "strategies": out_rows,
            "few_test_instances": few}


# --------------------------------------------------------------------------- settings
SETTING_COLUMNS = (("detector", "detector.name"), ("input size", "detector.input_size"), ("epochs", "train.epochs"),
                   ("lr", "train.lr"), ("strategy", "select.strategy"), ("budget", "select.budget"),
                   ("cycles", "loop.cycles"), ("seed size", "loop.seed_size"), ("seed", "seed"))


def _dotted(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def run_settings(run: dict | str | Path) -> dict:
    """The settings a run used.

    Args:
        run: a dict from :func:`load_run_metrics` or a run directory.

    Returns:
        {"source": where the config came from, "config": the resolved config (nested dict:
        loop.json's pinned "config" when the loop wrote one, else run.yaml layered over the
        defaults), "table": {column of SETTING_COLUMNS: value}}. loop.json's own strategy,
        budget, cycles and seed (what the loop ran with) win over the config's.
    """
    from poolscout.engine.core.config import ConfigError, build_config

    info = run if isinstance(run, dict) else {"path": Path(run)}
    root = Path(info["path"])
    loop = _read_json(root / "loop.json")
    layer, source = None, "none (no loop.json config, no run.yaml): defaults"
    if isinstance(loop.get("config"), dict):
        layer, source = ("loop.json", loop["config"]), "loop.json (the config the loop ran with)"
    elif (root / "run.yaml").is_file():
        try:
            data = yaml.safe_load((root / "run.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            data, source = {}, f"run.yaml (not valid YAML: {e}); defaults"
        if isinstance(data, dict):
            layer, source = ("run.yaml", data), "run.yaml over the defaults"
    try:
        config = build_config([layer] if layer else []).to_dict()
    except ConfigError as e:  # a key this version does not know: show it as written
        config = dict(layer[1]) if layer else {}
        source += f" (not resolvable: {e}; shown as written)"
    table = {label: _dotted(config, key) for label, key in SETTING_COLUMNS}
    for label, key in (("strategy", "strategy"), ("budget", "budget"), ("cycles", "cycles"), ("seed", "seed")):
        if loop.get(key) is not None:
            table[label] = loop[key]
    if info.get("strategy") and info.get("strategy") != "unknown":
        table["strategy"] = info["strategy"]
    return {"source": source, "config": config, "table": table}


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.6em;color:#333}h4{margin:1em 0 .3em 0;color:#555}
table{border-collapse:collapse;margin:6px 0 12px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.l,th.l{text-align:left}
pre{margin:0;font-size:11px;text-align:left;white-space:pre-wrap;max-width:700px}
img{max-width:100%;border:1px solid #ddd}
.note{color:#666;font-size:12px}.cycle{margin-left:12px}
nav a{margin-right:10px}
.headline{font-size:1.2em;font-weight:600;margin:.6em 0}
.warn{color:#8a4b00;background:#fff4e0;border-left:4px solid #e0a040;padding:4px 8px}
span.warn{padding:0 4px;border:0;font-size:11px}
.diff{background:#fff3b0;padding:0 2px}
details{margin:4px 0}summary{cursor:pointer}details pre{margin:4px 0 8px 16px}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _cell(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    f = _num(v)
    if f is None:
        return _e(v)
    if float(f).is_integer() and abs(f) >= 1000:
        return str(int(f))
    return f"{f:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    """Rows of already-escaped cell HTML (strings) under an escaped header."""
    ths = "".join(f'<th class="l">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r in rows:
        tds = "".join(f'<td class="l">{c}</td>' if i in left else f"<td>{c}</td>" for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return f"<table><tr>{ths}</tr>{''.join(body)}</table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    s, i = base, 2
    while s in taken:
        s, i = f"{base}_{i}", i + 1
    taken.add(s)
    return s


def _cycle_table(m: dict) -> str:
    ev = m.get("eval") or {}
    t = m.get("timings_s") or {}
    header = ["labeled images", "labeled boxes", "new images", "new boxes", "mAP50", "mAP", "mAP75", "mAR100",
              "test images"]
    row = [_cell(m.get("labeled_images")), _cell(m.get("labeled_boxes")), _cell(m.get("new_images")),
           _cell(m.get("new_boxes")), _cell(_num(ev.get("map50"))), _cell(_num(ev.get("map"))),
           _cell(_num(ev.get("map75"))), _cell(_num(ev.get("mar100"))), _cell(ev.get("test_images"))]
    stages = list(TIMING_STAGES) + [s for s in t if s not in TIMING_STAGES]
    header += [f"{s} (s)" for s in stages] + ["total (s)"]
    vals = [_num(t.get(s)) for s in stages]
    row += [_cell(v, 1) for v in vals]
    known = [v for v in vals if v is not None]
    row.append(_cell(sum(known), 1) if known else "–")
    return _table(header, [row], left=())


def _class_table(m: dict, names: dict[int, str]) -> str:
    ev = m.get("eval") or {}
    acq = m.get("acquisition") or {}
    per = {str(c.get("name", c.get("id"))): c for c in (ev.get("per_class") or []) if isinstance(c, dict)}
    hist = acq.get("new_class_hist") or {}
    prev = acq.get("pool_prevalence") or {}
    share = acq.get("new_share") or {}
    ratio = acq.get("new_over_prevalence") or {}
    order = list(per)
    for d in (hist, prev, share, ratio):
        if isinstance(d, dict):
            order += [str(k) for k in d if str(k) not in order]
    if not order:
        order = [names[k] for k in sorted(names)]
    if not order:
        return '<p class="note">No per-class data.</p>'

    def get(d: Any, key: str) -> Any:
        return d.get(key) if isinstance(d, dict) else None

    rows = []
    for name in order:
        c = per.get(name, {})
        gt_n = _num(c.get("gt"))
        gt_cell = _cell(c.get("gt"))
        if gt_n is not None and gt_n < MIN_TEST_INSTANCES:
            gt_cell += (f' <span class="warn" title="fewer than {MIN_TEST_INSTANCES} test instances: '
                        f'its AP is noise">few</span>')
        rows.append([_e(name), gt_cell, _cell(_num(c.get("ap"))), _cell(_num(c.get("ap50"))),
                     _cell(_num(c.get("recall"))), _cell(_num(c.get("recall50"))), _cell(get(hist, name)),
                     _cell(_num(get(share, name))), _cell(_num(get(prev, name))), _cell(_num(get(ratio, name)), 2)])
    out = _table(["class", "GT (test)", "AP", "AP50", "recall", "recall50", "new instances", "share of new",
                  "pool prevalence", "share / prevalence"], rows)
    if acq.get("rarest_class") is not None:
        out += (f'<p class="note">Rarest class: {_e(acq.get("rarest_class"))}; retrieval of it this cycle: '
                f'{_cell(_num(acq.get("rarest_retrieval")), 2)}</p>')
    return out


def concept_tree(sel: list[dict]) -> dict:
    """GSAL picks counted along their node paths: {L1: {class: {cluster: picks}}}, plus which
    term dominated ({"difficulty": n, "coverage": n, "none": n}); empty without gsal picks."""
    tree: dict = {}
    dominant: dict[str, int] = {}
    for r in sel:
        rat = r.get("rationale")
        if isinstance(rat, str):
            try:
                rat = json.loads(rat)
            except json.JSONDecodeError:
                continue
        g = rat.get("gsal") if isinstance(rat, dict) else None
        if not isinstance(g, dict):
            continue
        dom = str(g.get("dominant"))
        dominant[dom] = dominant.get(dom, 0) + 1
        path = g.get("path")
        if isinstance(path, (list, tuple)) and len(path) == 3:
            a, b, c = (str(x) for x in path)
            node = tree.setdefault(a, {}).setdefault(b, {})
            node[c] = node.get(c, 0) + 1
    return {"tree": tree, "dominant": dominant} if dominant else {}


def _concept_tree_html(sel: list[dict]) -> str:
    ct = concept_tree(sel)
    if not ct:
        return ""

    def total(v: Any) -> int:
        return v if isinstance(v, int) else sum(total(x) for x in v.values())

    def ul(d: dict, level: int) -> str:
        label = ("", "class ", "cluster ")[level]
        items = []
        for k, v in sorted(d.items(), key=lambda kv: (-total(kv[1]), kv[0])):
            n = total(v)
            sub = ul(v, level + 1) if isinstance(v, dict) else ""
            items.append(f"<li>{_e(label + k)}: {n} pick{'s' if n != 1 else ''}{sub}</li>")
        return "<ul>" + "".join(items) + "</ul>"

    dom = ", ".join(f"{_e(k)} {v}" for k, v in sorted(ct["dominant"].items()))
    return (f'<div class="concept-tree"><p class="note">GSAL picks over the concept graph (super-category &gt; '
            f'class &gt; visual cluster); dominant term: {dom}</p>{ul(ct["tree"], 0)}</div>')


def _picks_table(sel: list[dict], man: dict[int, dict], shown: int, pool_size: int | None = None) -> str:
    rows = []
    for r in sel[:shown]:
        iid = int(r["image_id"])
        rows.append([_e(_display_name(man.get(iid), iid)),
                     _e(rationale_sentence(r.get("rationale"), r.get("rank"), r.get("score"), pool_size=pool_size))])
    out = _table(["image", "why it was picked"], rows, left=(0, 1)) if rows else ""
    out += _concept_tree_html(sel)
    rest = len(sel) - min(shown, len(sel))
    if rest > 0:
        out += (f'<p class="note">… and {rest} more pick{"s" if rest != 1 else ""} '
                f'(not shown; see selection.parquet).</p>')
    return out


def _verdict_html(v: dict) -> str:
    parts = [f'<p class="headline">{_e(v["headline"])}</p>']
    plain = [x for x in v["lines"] if not x.startswith("Warning:")]
    warns = [x for x in v["lines"] if x.startswith("Warning:")]
    if plain:
        parts.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in plain) + "</ul>")
    for w in warns:
        parts.append(f'<p class="warn">{_e(w)}</p>')
    target = v.get("random_final_map50")
    reach_h = (f"labels to reach random's final mAP50 ({target:.3f})" if target is not None
               else "labels to reach random's final mAP50")
    rows = []
    for s in v["strategies"]:
        name = _e(s["strategy"])
        rows.append([f"<strong>{name}</strong>" if s["strategy"] == v.get("best") else name, _cell(s["seeds"]),
                     _e(_pm(s["map50_mean"], s["map50_std"], s["seeds"])),
                     _e(_pm(s["aulc_mean"], s["aulc_std"], s["seeds"])), _e(_count_text(s["labeled_images_mean"])),
                     _e(s["reach"])])
    parts.append(_table(["strategy", "seeds", "final mAP50", "AULC mAP50", "labeled images (final)", reach_h],
                        rows, left=(0, 5)))
    parts.append('<p class="note">Best AULC first. Runs that share a strategy are its seeds: mean ± sample std over '
                 'them. AULC = area under mAP50 vs labeled images divided by the labeled-image range (the mean '
                 'mAP50 over the budget). "Labels to reach" = labeled images at the first cycle where the '
                 "strategy's mean curve reaches random's mean final mAP50.</p>")
    return "\n".join(parts)


def _settings_html(runs: Sequence[dict], settings: Sequence[dict]) -> str:
    labels = [label for label, _ in SETTING_COLUMNS]
    differs = {lab for lab in labels if lab != "seed"
               and len({json.dumps(s["table"].get(lab), sort_keys=True, default=str) for s in settings}) > 1}
    header = ["run"] + labels
    rows = []
    for r, s in zip(runs, settings):
        cells = [f'<a href="#run-{_e(r["slug"])}">{_e(r["name"])}</a>']
        for lab in labels:
            v = s["table"].get(lab)
            txt = _e(_plain(v)) if v is not None else "–"
            cells.append(f'<span class="diff">{txt}</span>' if lab in differs else txt)
        rows.append(cells)
    out = [_table(header, rows, left=(0, 1, 5))]
    if differs:
        out.append(f'<p class="note">Highlighted: settings that differ between runs ({_e(", ".join(sorted(differs)))}).'
                   f'</p>')
    for r, s in zip(runs, settings):
        text = yaml.safe_dump(s["config"], sort_keys=False, default_flow_style=False, allow_unicode=True)
        out.append(f'<details><summary>Full config of {_e(r["name"])} <span class="note">from {_e(s["source"])}'
                   f'</span></summary><pre>{_e(text)}</pre></details>')
    return "\n".join(out)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, montage_images: int = 12,
                 progress: bool = True, device: Any = "cpu") -> Path:
    """Write curves, montages, summary.json and a self-contained index.html.

    The page reads top-down: the verdict (best strategy by AULC, labels each strategy
    needed to reach random's final mAP50, the spread over seeds, classes with too few test
    instances), the learning curves, a per-run summary, each run's settings, then per run
    and cycle the metrics, the per-class table, a montage of the picks and one sentence per
    pick saying why it was picked. Images are named by their file (the manifest's
    source_key) everywhere.

    Args:
        run_dirs: run directories (each with cycles/<k>/metrics.json).
        out_dir: destination folder (created).
        montage_images: picks per montage and per rationale table.
        progress: show a tqdm bar over the montages.
        device: where the detectors run for the montages.

    Returns:
        Path of index.html.

    Raises:
        RunError: a directory without metrics (named in the message).
    """
    from tqdm.auto import tqdm

    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run_metrics(d) for d in run_dirs]
    taken: set[str] = set()
    for r in runs:
        r["slug"] = _slug(r["name"], taken)

    curves = learning_curves(runs, out / "curves.png")
    rows = [run_summary(r) for r in runs]
    strategies = strategy_summary(rows)
    counts = {r["name"]: class_test_instances(r["path"], r["cycles"]) for r in runs}
    verdict_ = verdict(runs, class_counts=counts)
    settings = [run_settings(r) for r in runs]
    io.atomic_write_json(out / "summary.json", {
        "verdict": verdict_, "runs": rows, "strategies": strategies,
        "settings": [{"run": r["name"], "source": s["source"], **s["table"]} for r, s in zip(runs, settings)],
        "class_test_instances": counts})

    jobs = [(r, m) for r in runs for m in r["cycles"]]
    montages: dict[tuple[str, int], Path | None] = {}
    for r, m in tqdm(jobs, desc="montages", disable=not progress):
        k = int(m["cycle"])
        montages[(r["slug"], k)] = montage(r["path"], k, out / "montages" / f"{r['slug']}_cycle{k}.png",
                                           max_images=montage_images, device=device)

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>poolscout report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>poolscout report</h1>",
             f'<p class="note">{len(runs)} run(s), strategies: {_e(", ".join(group_runs(runs)))}</p>',
             '<nav><a href="#verdict">verdict</a><a href="#curves">curves</a><a href="#runs">runs</a>'
             '<a href="#settings">settings</a> · '
             + "".join(f'<a href="#run-{_e(r["slug"])}">{_e(r["name"])}</a>' for r in runs) + "</nav>"]

    parts.append('<h2 id="verdict">Verdict</h2>')
    parts.append(_verdict_html(verdict_))

    parts.append('<h2 id="curves">Learning curves</h2>')
    parts.append(_img(curves, "learning curves"))
    parts.append('<p class="note">Several runs of one strategy: the line is the mean at each cycle index '
                 '(x = mean labeled count), the band ± one sample standard deviation.</p>')

    parts.append('<h2 id="runs">Runs</h2>')
    parts.append(_table(
        ["run", "strategy", "seed", "status", "cycles", "labeled images", "labeled boxes", "mAP50", "mAP",
         "AULC mAP50", "agreement"],
        [[f'<a href="#run-{_e(r["slug"])}">{_e(s["run"])}</a>', _e(s["strategy"]), _e(s["seed"]),
          _e(s["status"] or "–"), _cell(s["cycles"]), _cell(s["labeled_images"]), _cell(s["labeled_boxes"]),
          _cell(s["map50"]), _cell(s["map"]), _cell(s["aulc_map50"]),
          _cell(s["stop_agreement"]) + (" (labels now buy little)" if s["labels_buy_little"] else "")]
         for r, s in zip(runs, rows)],
        left=(0, 1, 3)))
    parts.append('<p class="note">Final = the last cycle with metrics. Agreement: the stopping signal, how much '
                 'the last two models\' boxes agree on a fixed unlabeled sample of the pool (loop.stop_set); at or '
                 'above loop.stop_agreement, new labels now change the model little.</p>')

    parts.append('<h2 id="settings">Settings</h2>')
    parts.append(_settings_html(runs, settings))

    for r in runs:
        root = Path(r["path"])
        names = _categories(root)
        man = _manifest_rows(root)
        parts.append(f'<h2 id="run-{_e(r["slug"])}">Run {_e(r["name"])}</h2>')
        parts.append(f'<p class="note">strategy {_e(r["strategy"])} · seed {_e(r.get("seed"))} · '
                     f'status {_e(r.get("status") or "–")} · {_e(root)}</p>')
        for m in r["cycles"]:
            k = int(m["cycle"])
            parts.append(f'<div class="cycle"><h3 id="run-{_e(r["slug"])}-cycle-{k}">Cycle {k}</h3>')
            parts.append(_cycle_table(m))
            parts.append("<h4>Per class</h4>")
            parts.append(_class_table(m, names))
            sel = _read_selection(root, k)
            if sel is None:
                parts.append('<p class="note">No selection at this cycle (the final cycle only trains and '
                             'evaluates).</p>')
            else:
                sel_info = _read_json(root / "cycles" / str(k) / "select.json")
                pool_size = _num(sel_info.get("candidates"))
                parts.append(f"<h4>Selected for labeling ({len(sel)} images"
                             + (f" of {int(pool_size)} candidates" if pool_size else "") + ")</h4>")
                for w in sel_info.get("warnings") or []:  # ties, a budget above the pool
                    parts.append(f'<p class="warn">Warning: {_e(str(w))}</p>')
                if sel_info.get("no_detections"):
                    parts.append(f'<p class="warn">{int(sel_info["no_detections"])} of these picks had no '
                                 f'detections: their score is the empty-image rule\'s (score.empty_value), '
                                 f'not the model\'s.</p>')
                mp = montages.get((r["slug"], k))
                if mp is not None:
                    parts.append(_img(mp, f"cycle {k} picks"))
                    has_model = (root / "cycles" / str(k) / "model.pt").is_file()
                    parts.append('<p class="note">Top picks in rank order; green = ground truth with its class'
                                 + (f", red = cycle {k} model detections with score ≥ {PRED_SCORE_THRESH} "
                                    f"(class and confidence; at most {MAX_PREDS_DRAWN} per image)" if has_model
                                    else " (no model at this cycle: no detections drawn)")
                                 + ".</p>")
                parts.append(_picks_table(sel, man, max(0, int(montage_images)),
                                          int(pool_size) if pool_size else None))
            parts.append("</div>")
    parts.append("</body></html>")
    index = out / "index.html"
    io.atomic_write_text(index, "\n".join(parts) + "\n")  # 0666 & ~umask, like the PNGs beside it
    return index


__all__ = ["MIN_TEST_INSTANCES", "annotate_tile", "aulc", "class_test_instances", "curve_series", "group_runs",
           "concept_tree", "learning_curves", "load_run_metrics", "montage", "rare_share_ratio", "rationale_sentence", "run_settings", "run_summary",
           "signal_words", "strategy_summary", "verdict", "write_report"]
