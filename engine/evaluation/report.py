"""A self-contained HTML report over one or more finished (or running) run directories.

What it reads (written by jobs/loop.py and the stages it runs):

* ``loop.json`` (strategy, seed, status) and ``run.yaml`` (seed), when present;
* ``cycles/<k>/metrics.json`` for every cycle: labeled counts, evaluation, acquisition
  diagnostics and stage timings;
* ``cycles/<k>/selection.parquet`` (rank, score, JSON rationale) and
  ``cycles/<k>/model.pt`` for the montages of picked images;
* ``manifest.parquet``, ``annotations.parquet`` and ``categories.json`` for file names and
  ground-truth boxes.

What it writes into ``out_dir``:

* ``curves.png``: mAP50 and mAP against labeled images and labeled boxes. Runs that share
  a strategy (several seeds) are drawn as one line, the mean over runs at each cycle index,
  with a shaded band of mean ± sample standard deviation;
* ``montages/<run>_cycle<k>.png``: the top picks of each cycle with boxes drawn;
* ``summary.json``: the summary table as data;
* ``index.html``: one page with every image embedded as a base64 data URI, inline CSS and
  no scripts or external references, so the file can be mailed or archived on its own.

The area under the learning curve (AULC) is normalised by the x range, so it reads as the
average mAP50 over the labeling budget spent between the first and the last cycle.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
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
X_KEYS = (("labeled_images", "labeled images"), ("labeled_boxes", "labeled boxes"))
METRIC_LABELS = {"map50": "mAP50", "map": "mAP (50:95)", "map75": "mAP75", "mar100": "mAR100"}
TIMING_STAGES = ("train", "evaluate", "score", "select", "label")
_DEFAULT_MAX_PIXELS = 64_000_000
_CAPTION_H = 26


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
                ax.set_xlabel(x_label)
                ax.set_ylabel(name)
                ax.set_title(f"{name} vs {x_label}")
                ax.grid(True, alpha=0.35)
                if drawn:
                    ax.legend(fontsize=8, loc="best")
                else:
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
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


def montage(run_dir: str | Path, k: int, out_png: str | Path, *, max_images: int = 12, thumb: int = 160,
            device: Any = "cpu", score_thresh: float = PRED_SCORE_THRESH) -> Path | None:
    """Thumbnails of the top picks of cycle k with ground truth and predictions drawn.

    Each tile is the picked image letterboxed to ``thumb`` pixels with its ground-truth
    boxes in green and the cycle-k model's detections with score >= ``score_thresh`` in red
    (with class names), and "#rank  score" written under it. Tiles follow rank order.

    Args:
        run_dir: the run directory.
        k: cycle whose ``selection.parquet`` (and ``model.pt``) is shown.
        out_png: destination file.
        max_images: at most this many picks.
        thumb: tile side in pixels.
        device: where the detector runs.
        score_thresh: smallest detection score drawn.

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
    cap_font = _font(12)
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
        d = ImageDraw.Draw(tile)
        if err is not None:
            d.text((4, 4), f"unreadable:\n{err}"[:80], fill=(255, 255, 255), font=font)
        else:
            sc = float(canv["scale"][t])
            for cat, box in gt.get(iid, []):
                x1, y1, x2, y2 = (float(v) * sc for v in box)
                d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=GT_COLOR, width=1)
            for lab, score, box in (preds[t] or []) if preds is not None else []:
                if score < score_thresh:
                    continue
                x1, y1, x2, y2 = (float(v) * sc for v in box)
                d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=PRED_COLOR, width=1)
                txt = f"{names.get(lab, str(lab))} {score:.2f}"
                ty = max(0.0, y1 - 11)
                tb = d.textbbox((x1, ty), txt, font=font)
                d.rectangle(tb, fill=PRED_COLOR)
                d.text((x1, ty), txt, fill=(255, 255, 255), font=font)
        cell = Image.new("RGB", (thumb, tile_h), (255, 255, 255))
        cell.paste(tile, (0, 0))
        cd = ImageDraw.Draw(cell)
        cd.text((2, thumb + 2), f"#{row.get('rank')}  score {_fmt_score(row.get('score'))}", fill=(0, 0, 0),
                font=cap_font)
        r_, c_ = divmod(t, cols)
        sheet.paste(cell, (4 + c_ * (thumb + 4), 4 + r_ * (tile_h + 4)))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, "PNG")
    return out_png


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
        rows.append([_e(name), _cell(c.get("gt")), _cell(_num(c.get("ap"))), _cell(_num(c.get("ap50"))),
                     _cell(_num(c.get("recall"))), _cell(_num(c.get("recall50"))), _cell(get(hist, name)),
                     _cell(_num(get(share, name))), _cell(_num(get(prev, name))), _cell(_num(get(ratio, name)), 2)])
    out = _table(["class", "GT (test)", "AP", "AP50", "recall", "recall50", "new instances", "share of new",
                  "pool prevalence", "share / prevalence"], rows)
    if acq.get("rarest_class") is not None:
        out += (f'<p class="note">Rarest class: {_e(acq.get("rarest_class"))}; retrieval of it this cycle: '
                f'{_cell(_num(acq.get("rarest_retrieval")), 2)}</p>')
    return out


def _pretty(rationale: Any) -> str:
    if rationale is None:
        return ""
    if isinstance(rationale, str):
        try:
            return json.dumps(json.loads(rationale), indent=2, sort_keys=True)
        except json.JSONDecodeError:
            return rationale
    return json.dumps(rationale, indent=2, sort_keys=True, default=str)


def _picks_table(sel: list[dict], man: dict[int, dict], shown: int) -> str:
    rows = []
    for r in sel[:shown]:
        iid = int(r["image_id"])
        key = (man.get(iid) or {}).get("source_key") or (man.get(iid) or {}).get("uri") or ""
        rows.append([_cell(r.get("rank")), _e(key), _e(iid), _e(_fmt_score(r.get("score"))),
                     f"<pre>{_e(_pretty(r.get('rationale')))}</pre>"])
    out = _table(["rank", "image", "image id", "score", "rationale"], rows, left=(1, 4)) if rows else ""
    rest = len(sel) - min(shown, len(sel))
    if rest > 0:
        out += (f'<p class="note">… and {rest} more pick{"s" if rest != 1 else ""} '
                f'(not shown; see selection.parquet).</p>')
    return out


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, montage_images: int = 12,
                 progress: bool = True, device: Any = "cpu") -> Path:
    """Write curves, montages, summary.json and a self-contained index.html.

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
    io.atomic_write_json(out / "summary.json", {"runs": rows, "strategies": strategies})

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
             "<nav>" + "".join(f'<a href="#run-{_e(r["slug"])}">{_e(r["name"])}</a>' for r in runs) + "</nav>"]

    parts.append("<h2>Summary</h2>")
    parts.append(_table(
        ["run", "strategy", "seed", "status", "cycles", "labeled images", "labeled boxes", "mAP50", "mAP",
         "AULC mAP50"],
        [[f'<a href="#run-{_e(r["slug"])}">{_e(s["run"])}</a>', _e(s["strategy"]), _e(s["seed"]),
          _e(s["status"] or "–"), _cell(s["cycles"]), _cell(s["labeled_images"]), _cell(s["labeled_boxes"]),
          _cell(s["map50"]), _cell(s["map"]), _cell(s["aulc_map50"])] for r, s in zip(runs, rows)],
        left=(0, 1, 3)))
    parts.append('<p class="note">Final = the last cycle with metrics. AULC = trapezoid area under mAP50 vs '
                 'labeled images divided by the range of labeled images (the mean mAP50 over the budget).</p>')
    if any(s["runs"] > 1 for s in strategies):
        parts.append("<h4>By strategy (mean ± sample std over runs)</h4>")

        def pm(s: dict, key: str) -> str:
            m, sd = s[f"{key}_mean"], s[f"{key}_std"]
            return _cell(m) + ("" if sd is None else f" ± {_cell(sd)}")

        parts.append(_table(["strategy", "runs", "final mAP50", "final mAP", "AULC mAP50"],
                            [[_e(s["strategy"]), _cell(s["runs"]), pm(s, "map50"), pm(s, "map"),
                              pm(s, "aulc_map50")] for s in strategies]))

    parts.append("<h2>Learning curves</h2>")
    parts.append(_img(curves, "learning curves"))
    parts.append('<p class="note">Several runs of one strategy: the line is the mean at each cycle index '
                 '(x = mean labeled count), the band ± one sample standard deviation.</p>')

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
                parts.append(f"<h4>Selected for labeling ({len(sel)} images)</h4>")
                mp = montages.get((r["slug"], k))
                if mp is not None:
                    parts.append(_img(mp, f"cycle {k} picks"))
                    has_model = (root / "cycles" / str(k) / "model.pt").is_file()
                    parts.append('<p class="note">Top picks in rank order; green = ground truth'
                                 + (f", red = cycle {k} model detections with score ≥ {PRED_SCORE_THRESH}"
                                    if has_model else " (no model at this cycle: no detections drawn)")
                                 + ".</p>")
                parts.append(_picks_table(sel, man, max(0, int(montage_images))))
            parts.append("</div>")
    parts.append("</body></html>")
    index = out / "index.html"
    io.atomic_write_text(index, "\n".join(parts) + "\n")
    for p in (index, out / "summary.json"):
        os.chmod(p, 0o644)  # atomic writes create 0600 temp files; a report is meant to be shared
    return index


__all__ = ["aulc", "curve_series", "group_runs", "learning_curves", "load_run_metrics", "montage", "run_summary",
           "strategy_summary", "write_report"]
