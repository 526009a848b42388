"""Cost of scoring with extra views and MC dropout, relative to one view, in one job.

Runs the scoring stages of jobs/score.py (decode + letterbox, DetectorStage, signals) in
this process over the same NEU-DET pool images for several settings, interleaved over
`--repeats` rounds so that machine noise hits all of them alike:

    orig                       views [orig], signals entropy:max
    orig+hflip                 views [orig, hflip], signals entropy:max + huale_*
    cald (5 views)             views [orig, hflip, cutout, resize, rotate], signal cald
    bald (T = 10)              views [orig], MC dropout over the box head, signal bald:max

Target (issue 4): orig+hflip <= 2.2 x orig. Writes benchmarks/results/view_cost.json.

    python benchmarks/view_cost.py --images 240 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    "orig": {"views": ("orig",), "mc": 0, "signals": ("entropy:max",)},
    "orig+hflip": {"views": ("orig", "hflip"), "mc": 0,
                   "signals": ("entropy:max", "huale_sa", "huale_cd", "huale_or")},
    "cald_5_views": {"views": ("orig", "hflip", "cutout", "resize", "rotate"), "mc": 0, "signals": ("cald",)},
    "bald_T10": {"views": ("orig",), "mc": 10, "signals": ("bald:max",)},
}


def build_model(path: Path | None, tmp: Path) -> Path:
    """A checkpoint to score with: `path`, or the cpu-small preset with dropout, untrained."""
    if path is not None:
        return path
    from poolscout.engine.core.config import load_config
    from poolscout.engine.models.detectors import build_detector, save_checkpoint

    cfg = load_config([REPO / "configs" / "neu_det.yaml", REPO / "configs" / "cpu-small.yaml"],
                      ["detector.dropout=0.2"])
    model = build_detector(cfg.detector, 6)
    out = tmp / "view_cost_model.pt"
    save_checkpoint(out, model, cfg.detector, 6)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default=None, help="Checkpoint (default: an untrained cpu-small preset).")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "view_cost.json"))
    args = ap.parse_args(argv)

    import pyarrow as pa
    import torch

    from poolscout.engine.data.images import probe
    from poolscout.jobs.score import DetectorStage, decode_batch, signal_batch

    torch.set_num_threads(args.threads)
    img_dir = Path(args.data_root) / "neu_det" / "images"
    if not img_dir.is_dir():
        print(f"error: {img_dir} not found", file=sys.stderr)
        return 2
    files = sorted(img_dir.glob("*.jpg"))[:: max(1, 1800 // args.images)][: args.images]
    work = []
    for i, f in enumerate(files):
        w, h = probe(str(f), 64_000_000)
        work.append({"image_id": i, "uri": str(f), "width": w, "height": h, "state": "pool"})
    tmp = REPO / "benchmarks" / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    model = build_model(Path(args.model) if args.model else None, tmp)
    ck = torch.load(model, map_location="cpu", weights_only=True)
    size = int(ck["detector"]["input_size"])
    params = {"resize": 0.8, "rotate": 5.0, "cutout_holes": 2, "cutout_size": 0.2, "cutout_seed": 0}
    settings = dict(SETTINGS)
    dropout = float(ck["detector"].get("dropout", 0.0))
    if dropout <= 0:
        print("note: the model has no box-head dropout; bald_T10 is skipped", file=sys.stderr)
        settings.pop("bald_T10")
    stages = {k: DetectorStage(str(model), s["views"], 100, True, args.threads, mc_passes=s["mc"],
                               view_params=params) for k, s in settings.items()}
    times: dict[str, list[float]] = {k: [] for k in settings}
    boxes: dict[str, int] = {}
    # warm-up (first calls allocate and compile the Numba kernels)
    for k, s in settings.items():
        b = {c: np.asarray([w[c] for w in work[:2]], dtype=object if c in ("uri", "state") else None)
             for c in work[0]}
        signal_batch(stages[k](decode_batch(b, size, 64_000_000)), s["signals"], 0, 0, 6)
    for _ in range(args.repeats):
        for k, s in settings.items():
            t0 = time.perf_counter()
            n_boxes = 0
            for j in range(0, len(work), args.batch_size):
                rows = work[j:j + args.batch_size]
                b = {c: np.asarray([w[c] for w in rows], dtype=object if c in ("uri", "state") else None)
                     for c in rows[0]}
                t = signal_batch(stages[k](decode_batch(b, size, 64_000_000)), s["signals"], 0, 0, 6)
                n_boxes += int(pa.compute.sum(t["num_boxes"]).as_py() or 0)
            times[k].append(time.perf_counter() - t0)
            boxes[k] = n_boxes
    base = float(np.median(times["orig"]))
    res = {k: {"seconds_median": round(float(np.median(v)), 3), "seconds": [round(x, 3) for x in v],
               "images_per_s": round(len(work) / float(np.median(v)), 2),
               "ratio_vs_orig": round(float(np.median(v)) / base, 3), "views": list(SETTINGS[k]["views"]),
               "mc_passes": SETTINGS[k]["mc"], "signals": list(SETTINGS[k]["signals"]),
               "orig_boxes": boxes[k]} for k, v in times.items()}
    doc = {"benchmark": "view_cost", "images": len(work), "threads": args.threads, "batch_size": args.batch_size,
           "input_size": size, "model": "given" if args.model else "untrained cpu-small preset (dropout 0.2)",
           "repeats": args.repeats, "target": {"orig+hflip": "<= 2.2 x orig"},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": res}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpf = out.with_name(f".{out.name}.tmp")
    tmpf.write_text(json.dumps(doc, indent=2))
    os.replace(tmpf, out)
    for k, r in res.items():
        print(f"{k:14s} {r['seconds_median']:7.2f} s  {r['images_per_s']:6.1f} img/s  x{r['ratio_vs_orig']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
