"""The report of a segmentation run (`poolscout segment report`): mIoU against labeled
pixels, the per-class IoU of each round, and each round's picked pixels drawn on the images
(a dot per pixel in the colour of the class the oracle or a person gave it).

Everything written into the HTML is escaped; images are PNG files beside it.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# background, then one colour per class (cycled)
PALETTE = [(160, 160, 160), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def color(c: int) -> tuple[int, int, int]:
    return PALETTE[0] if int(c) == 0 else PALETTE[1 + (int(c) - 1) % (len(PALETTE) - 1)]


def rounds(run_dir: str | Path) -> list[dict]:
    """metrics.json of every evaluated round, in order."""
    root = Path(run_dir) / "cycles"
    out = []
    for p in sorted((q for q in root.iterdir() if q.name.isdigit()), key=lambda q: int(q.name)) if root.is_dir() else []:
        m = p / "metrics.json"
        if m.is_file():
            out.append(json.loads(m.read_text()))
    return out


def curve_png(ms: list[dict], out_png: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = [m["labeled_pixels"] for m in ms]
    ax.plot(x, [m["eval"]["miou"] for m in ms], "-o", color="C0", lw=2, label="mIoU")
    names = list(ms[-1]["eval"]["per_class_iou"]) if ms else []
    for i, n in enumerate(names):
        ys = [m["eval"]["per_class_iou"].get(n) for m in ms]
        ax.plot(x, [np.nan if v is None else v for v in ys], "--", color=np.array(color(i)) / 255, lw=1, label=n)
    ax.set_xlabel("labeled pixels")
    ax.set_ylabel("IoU on the test masks")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def overlay(run_dir: str | Path, k: int, out_png: str | Path, *, max_images: int = 8, thumb: int = 192) -> dict:
    """Round k's picks on the images that got the most of them: a tile per image, a dot per
    picked pixel in its label's colour (unlabeled yet: white ring). Returns what was drawn."""
    import pyarrow.compute as pc

    from poolscout.engine.core import io
    from poolscout.engine.data.images import decode
    from poolscout.engine.data.segmentation import PixelLedger

    root = Path(run_dir)
    sel = io.read_table(root / "cycles" / str(int(k)) / "pixel_selection.parquet")
    if sel.num_rows == 0:
        return {"images": 0, "pixels": 0}
    led = PixelLedger(root).read(columns=["image_id", "x", "y", "class"])
    label = {(i, x, y): c for i, x, y, c in zip(*(led[n].to_pylist() for n in ("image_id", "x", "y", "class")))}
    ids = sel["image_id"].to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    show = uniq[np.lexsort((uniq, -counts))][:max_images]
    man = io.read_table(root / "manifest.parquet", columns=["image_id", "uri", "width", "height"])
    rows = {i: (u, w, h) for i, u, w, h in zip(*(man[c].to_pylist() for c in ("image_id", "uri", "width", "height")))}
    cols = min(4, len(show))
    nrow = (len(show) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * thumb, nrow * thumb), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    drawn, tiles = 0, []
    for t, iid in enumerate(show.tolist()):
        uri, w, h = rows[iid]
        try:
            img = Image.fromarray(decode(uri, 64_000_000))
        except Exception:
            continue
        s = thumb / max(w, h)
        tile = img.resize((max(1, int(w * s)), max(1, int(h * s))))
        ox, oy = (t % cols) * thumb, (t // cols) * thumb
        canvas.paste(tile, (ox, oy))
        tiles.append({"image_id": int(iid), "x0": ox, "y0": oy, "scale": s})
        mine = sel.filter(pc.equal(sel["image_id"], iid))
        for x, y in zip(mine["x"].to_pylist(), mine["y"].to_pylist()):
            cx, cy = ox + (x + 0.5) * s, oy + (y + 0.5) * s
            c = label.get((iid, x, y))
            if c is None:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=(255, 255, 255))
            else:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color(c), outline=(0, 0, 0))
            drawn += 1
    canvas.save(out_png)
    return {"images": int(len(show)), "pixels": drawn, "thumb": thumb, "cols": cols, "tiles": tiles}


def write_report(run_dir: str | Path, out_dir: str | Path, *, max_images: int = 8) -> Path:
    """index.html + curve.png + round_<k>.png in out_dir."""
    root, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ms = rounds(root)
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(root.name)}: pixel labels</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:24px auto}td,th{padding:2px 8px;"
             "text-align:right}th:first-child,td:first-child{text-align:left}</style>",
             f"<h1>{e(root.name)}</h1>"]
    if not ms:
        parts.append("<p>No evaluated round yet.</p>")
    else:
        last = ms[-1]
        first = ms[0]
        parts.append(f"<p>{e(str(last.get('strategy', '')))}: mIoU {last['eval']['miou']:.3f} with "
                     f"{last['labeled_pixels']} labeled pixels after round {last['round']} "
                     f"(round 0: {first['eval']['miou']:.3f} with {first['labeled_pixels']}).</p>")
        curve_png(ms, out / "curve.png", title=f"{root.name}: test IoU against labeled pixels")
        parts.append("<img src='curve.png' alt='IoU against labeled pixels'>")
        names = list(last["eval"]["per_class_iou"])
        parts.append("<table><tr><th>round</th><th>labeled pixels</th><th>mIoU</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for m in ms:
            iou = m["eval"]["per_class_iou"]
            parts.append(f"<tr><td>{m['round']}</td><td>{m['labeled_pixels']}</td><td>{m['eval']['miou']:.3f}</td>"
                         + "".join(f"<td>{'-' if iou.get(n) is None else f'{iou[n]:.3f}'}</td>" for n in names)
                         + "</tr>")
        parts.append("</table><h2>Picked pixels</h2><p>"
                     + " ".join(f"<span style='color:rgb{color(i)}'>&#9679;</span> {e(n)}" for i, n in enumerate(names))
                     + "</p>")
        for m in ms:
            k = int(m["round"])
            if (root / "cycles" / str(k) / "pixel_selection.parquet").is_file():
                info = overlay(root, k, out / f"round_{k}.png", max_images=max_images)
                parts.append(f"<h3>Round {k}</h3><p>{info['pixels']} of the round's picks on the "
                             f"{info['images']} images with the most of them.</p>"
                             f"<img src='round_{k}.png' alt='round {k} picks'>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


__all__ = ["PALETTE", "color", "curve_png", "overlay", "rounds", "write_report"]
