"""How strongly each class's ground-truth boxes stand out in GSAL's diffusion maps.

GSAL ranks proposals by a box's discrepancy D (and variability V) over its image's median
(methods.md section 4). This reads the D / V maps a label-efficiency run cached for its
pool (`RUN/diffusion/maps/<key>/`, written by `warm_maps` or the first scoring) and, per
class, reports the box-mean over the image median of D and V inside the true boxes, and
where the class's boxes fall in the ranking of all true boxes by that D ratio. A rare class
whose boxes rank low cannot be found by difficulty, whatever the coverage prior does.

    python benchmarks/gsal_box_contrast.py --workdir /work/bench/subtle \
        --out benchmarks/results/gsal_box_contrast_synthetic_subtle.json

--workdir is the label-efficiency harness's workdir (its `diffusion/maps/` and one loop's
run directory, for the manifest and the annotations of every image).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def box_ratios(maps: np.ndarray, boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    """(n, 2) box-mean over image median of D and V for boxes (n, 4) in image pixels; maps
    (2, R, R) cover the whole image (GSAL's maps are the content region resized to R x R).
    The values GSAL itself scores (`engine.methods.gsal.normalised_values`: the map cells whose
    centres lie in the box, at least the one under its centre)."""
    from poolscout.engine.methods.gsal import normalised_values

    nv = normalised_values(maps[0], maps[1], np.asarray(boxes, np.float64).reshape(-1, 4), w, h)
    return np.stack([nv["d_box"], nv["v_box"]], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import pyarrow as pa

    from poolscout.engine.core import io
    from poolscout.engine.models.diffusion import MapCache

    caches = sorted(p for p in (args.workdir / "diffusion" / "maps").glob("*") if p.is_dir())
    runs = sorted(p.parent for p in args.workdir.glob("*/manifest.parquet"))
    if not caches or not runs:
        raise SystemExit(f"error: no map cache or no run directory under {args.workdir}")
    run = runs[0]
    man = io.read_table(run / "manifest.parquet").to_pandas().set_index("image_id")
    ann = io.read_table(run / "annotations.parquet").to_pandas()
    cats = {c["id"]: c["name"] for c in json.loads((run / "categories.json").read_text())}
    # one cache per (model, settings, seed): the harness's seeds draw different noise
    out = {"workdir": str(args.workdir), "run": run.name, "caches": {}}
    ids = man.index.to_numpy(np.int64)
    boxes = {int(i): g for i, g in ann.groupby("image_id")}
    for cdir in caches:
        part = next(cdir.glob("part-*.arrow"))  # every part holds maps of one size: (2, r, r) flattened
        r = int(round(np.sqrt(pa.ipc.open_file(str(part)).schema.field("maps").type.list_size / 2)))
        found, maps = MapCache(cdir).get(ids, r)
        rows = []
        for iid, m in zip(ids[found].tolist(), maps):
            g = boxes.get(iid)
            if g is None:
                continue  # a defect-free image
            ratios = box_ratios(m, g[["x1", "y1", "x2", "y2"]].to_numpy(float),
                                float(man.loc[iid, "width"]), float(man.loc[iid, "height"]))
            rows += [(cats[int(c)], d, v) for c, (d, v) in zip(g["category_id"], ratios)]
        names = np.array([n for n, _, _ in rows])
        d = np.array([x for _, x, _ in rows])
        v = np.array([x for _, _, x in rows])
        pct = (np.argsort(np.argsort(d)) + 0.5) / len(d)  # percentile of each box's D ratio among all boxes
        res = {"images": int(found.sum()), "boxes": int(len(d)), "classes": {}}
        print(f"cache {cdir.name}: {int(found.sum())} images, {len(d)} true boxes", flush=True)
        for c in sorted(set(names), key=lambda c: -np.median(d[names == c])):
            m = names == c
            res["classes"][c] = {"boxes": int(m.sum()), "d_ratio_median": round(float(np.median(d[m])), 3),
                                 "d_ratio_mean": round(float(d[m].mean()), 3),
                                 "v_ratio_median": round(float(np.median(v[m])), 3),
                                 "d_rank_percentile_median": round(float(np.median(pct[m])), 3),
                                 "share_in_top_decile": round(float((pct[m] >= 0.9).mean()), 3)}
            print(f"  {c:12s} {m.sum():5d} boxes  D ratio {np.median(d[m]):6.2f}  V ratio {np.median(v[m]):5.2f}  "
                  f"median D percentile {np.median(pct[m]):.2f}  in the top decile {(pct[m] >= 0.9).mean():.2f}",
                  flush=True)
        out["caches"][cdir.name] = res
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
