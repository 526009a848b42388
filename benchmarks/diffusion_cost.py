"""GSAL's diffusion model on NEU-DET: what it costs and whether its signal can work.

One run, results in benchmarks/results/diffusion_cost.json:

* train: the CPU preset (gsal.preset cpu-small, 64 px grey) trained on the NEU-DET pool with
  `poolscout diffusion train`'s code (in-process): wall time, steps, loss. Resumable: rerun
  the same command after a kill.
* defect_vs_background: on test-split images, the per-pixel discrepancy D and variability V
  (K seeds, DDIM from t0) inside the ground-truth defect boxes against outside them. GSAL's
  signal works only if defects reconstruct worse than the steel around them.
* speed: images/s of the diffusion stage (DiffusionScorer) beside the detector stage
  (DetectorStage, the cpu-small Faster R-CNN, briefly trained) on the same decoded pool images.
  The GPU figures come from a session with an accelerator (`--device-json`).

    python benchmarks/diffusion_cost.py --workdir /tmp/diffcost            # ~35 min on 2 cores
    python benchmarks/diffusion_cost.py --workdir /tmp/diffcost --steps 200 --eval-images 20   # smoke
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
sys.path.insert(0, str(REPO / "benchmarks"))

from poolscout.engine.core import io  # noqa: E402
from poolscout.engine.core.config import load_config  # noqa: E402
from poolscout.engine.core.run import RunDir  # noqa: E402


def make_run(root: Path, neu: Path, overrides: list[str]) -> RunDir:
    from poolscout.engine.data.pool import init_run

    run = RunDir(root / "run")
    if not run.exists():
        cfg = load_config([REPO / "configs" / "cpu-small.yaml", REPO / "configs" / "neu_det.yaml"], overrides)
        init_run(run, images=neu / "images", annotations=neu / "annotations", fmt="voc",
                 test=str(neu / "split_test.txt"), seed_fraction=0.05, cfg=cfg, progress=False)
    return run


def decoded(run: RunDir, cfg, ids: np.ndarray, batch: int = 16):
    import pyarrow as pa
    import pyarrow.compute as pc

    from poolscout.jobs.stream import WORK_COLUMNS, decoded_batches

    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    man = man.filter(pc.is_in(man["image_id"], value_set=pa.array(ids)))
    work = man.append_column("state", pa.array(["pool"] * man.num_rows)).sort_by("image_id").select(WORK_COLUMNS)
    yield from decoded_batches(work, batch, WORK_COLUMNS, cfg.detector.input_size, cfg.dataset.max_pixels,
                               run.fingerprint().get("images_root"))


def defect_vs_background(run: RunDir, cfg, scorer, n_images: int, seed: int) -> dict:
    """D and V inside the GT boxes vs outside, on `n_images` test images with boxes."""
    from poolscout.engine.methods.gsal import _pixel_ranges
    from poolscout.engine.models.diffusion import canvas_to_model

    ann = io.read_table(run.annotations).to_pandas()
    test = run.ids_in_state("test")
    test = test[np.isin(test, ann["image_id"].to_numpy())]
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(test, size=min(n_images, len(test)), replace=False))
    cats = {c["id"]: c.get("name", str(c["id"])) for c in run.read_categories()}
    r = scorer.resolution
    per = {"d_in": [], "d_out": [], "v_in": [], "v_out": [], "cls": []}
    pix = {"d_in": 0.0, "d_out": 0.0, "v_in": 0.0, "v_out": 0.0, "n_in": 0, "n_out": 0}
    t0 = time.time()
    for dec in decoded(run, cfg, ids):
        ok = np.asarray(dec["error"], dtype=object) == ""
        x = canvas_to_model(dec["image"][ok], dec["content_w"][ok], dec["content_h"][ok], r, scorer.channels)
        maps = scorer.maps(x, dec["image_id"][ok])
        for j, i in enumerate(np.flatnonzero(ok)):
            iid = int(dec["image_id"][i])
            a = ann[ann["image_id"] == iid]
            boxes = a[["x1", "y1", "x2", "y2"]].to_numpy(dtype=float)
            mask = np.zeros((r, r), bool)
            for x0, y0, x1, y1 in _pixel_ranges(boxes, float(dec["width"][i]), float(dec["height"][i]), r, r):
                mask[y0:y1, x0:x1] = True
            if mask.all() or not mask.any():
                continue
            d, v = maps[j, 0], maps[j, 1]
            per["d_in"].append(float(d[mask].mean()))
            per["d_out"].append(float(d[~mask].mean()))
            per["v_in"].append(float(v[mask].mean()))
            per["v_out"].append(float(v[~mask].mean()))
            per["cls"].append(cats.get(int(a["category_id"].iloc[0]), "?"))
            pix["d_in"] += float(d[mask].sum())
            pix["d_out"] += float(d[~mask].sum())
            pix["v_in"] += float(v[mask].sum())
            pix["v_out"] += float(v[~mask].sum())
            pix["n_in"] += int(mask.sum())
            pix["n_out"] += int((~mask).sum())
    seconds = time.time() - t0
    a = {k: np.asarray(v) for k, v in per.items()}
    out = {"images": int(len(a["d_in"])), "seconds": round(seconds, 1),
           "d_defect_mean": pix["d_in"] / max(pix["n_in"], 1), "d_background_mean": pix["d_out"] / max(pix["n_out"], 1),
           "v_defect_mean": pix["v_in"] / max(pix["n_in"], 1), "v_background_mean": pix["v_out"] / max(pix["n_out"], 1),
           "share_images_d_defect_higher": float((a["d_in"] > a["d_out"]).mean()) if len(a["d_in"]) else None,
           "share_images_v_defect_higher": float((a["v_in"] > a["v_out"]).mean()) if len(a["d_in"]) else None,
           "per_class": {}}
    out["d_ratio"] = out["d_defect_mean"] / max(out["d_background_mean"], 1e-12)
    out["v_ratio"] = out["v_defect_mean"] / max(out["v_background_mean"], 1e-12)
    for c in sorted(set(per["cls"])):
        m = a["cls"] == c
        out["per_class"][c] = {"images": int(m.sum()),
                               "d_ratio_median": float(np.median(a["d_in"][m] / np.maximum(a["d_out"][m], 1e-12))),
                               "share_d_defect_higher": float((a["d_in"][m] > a["d_out"][m]).mean())}
    return out


def speed(run: RunDir, cfg, model_dir: Path, n_images: int, threads: int) -> dict:
    import torch

    from poolscout.engine.models.diffusion import DiffusionScorer
    from poolscout.jobs.score import DetectorStage, diffusion_stage_kwargs
    from score_throughput import write_model

    if not run.model_path(0).is_file():
        write_model(run, cfg, train_images=16)
    torch.set_num_threads(threads)
    ids = np.sort(run.ids_in_state("pool"))[:n_images]
    batches = list(decoded(run, cfg, ids, batch=8))
    det = DetectorStage(str(run.model_path(0)), ("orig",), cfg.detector.max_boxes, True, threads)
    dif = DiffusionScorer(**{**diffusion_stage_kwargs(cfg, model_dir), "threads": threads})
    det(batches[0])  # warm-up
    dif(batches[0])
    t0 = time.time()
    for b in batches:
        det(b)
    t_det = time.time() - t0
    t0 = time.time()
    for b in batches:
        dif(b)
    t_dif = time.time() - t0
    n = sum(len(b["image_id"]) for b in batches)
    return {"images": n, "threads": threads, "detector_images_per_s": round(n / t_det, 2),
            "diffusion_images_per_s": round(n / t_dif, 3), "diffusion_seeds": cfg.gsal.seeds,
            "diffusion_steps": cfg.gsal.steps, "resolution": dif.resolution,
            "unet_passes_per_image": cfg.gsal.seeds * cfg.gsal.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/poolscout_diffusion_cost"))
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--eval-images", type=int, default=120)
    ap.add_argument("--speed-images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "diffusion_cost.json")
    args = ap.parse_args()
    neu = args.shared / "data" / "neu_det"
    if not neu.is_dir():
        sys.exit(f"NEU-DET not found at {neu}")
    import torch

    from poolscout.engine.models.diffusion import DiffusionScorer
    from poolscout.jobs.diffusion import model_dir, train_diffusion
    from poolscout.jobs.score import diffusion_stage_kwargs

    torch.set_num_threads(args.threads)
    overrides = ["loop.executor=local", f"gsal.train_threads={args.threads}", *args.overrides]
    run = make_run(args.workdir, neu, overrides)
    cfg = run.config([REPO / "configs" / "cpu-small.yaml"], overrides)
    print(f"[diffusion_cost] training {args.steps} steps ({cfg.gsal.preset}) ...", flush=True)
    t0 = time.time()
    tr = train_diffusion(run, cfg, steps=args.steps, progress=True, executor="local")
    tr["wall_s_this_call"] = round(time.time() - t0, 1)
    print(f"[diffusion_cost] train: {tr['seconds']} s for {tr['trained_steps']} steps, loss {tr['loss_last100']}",
          flush=True)
    scorer = DiffusionScorer(**{**diffusion_stage_kwargs(cfg, model_dir(run)), "threads": args.threads})
    dvb = defect_vs_background(run, cfg, scorer, args.eval_images, cfg.seed)
    print(f"[diffusion_cost] defect vs background: D ratio {dvb['d_ratio']:.3f}, V ratio {dvb['v_ratio']:.3f}, "
          f"images with D higher on the defect {dvb['share_images_d_defect_higher']}", flush=True)
    sp = speed(run, cfg, model_dir(run), args.speed_images, args.threads)
    print(f"[diffusion_cost] speed: detector {sp['detector_images_per_s']} img/s, diffusion "
          f"{sp['diffusion_images_per_s']} img/s", flush=True)
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    res = {**prev, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} cores, no GPU", "dataset": "neu_det",
           "train": {k: v for k, v in tr.items() if k != "settings"}, "settings": tr.get("settings"),
           "gsal": {"seeds": cfg.gsal.seeds, "t0": cfg.gsal.t0, "steps": cfg.gsal.steps},
           "defect_vs_background": dvb, "speed_cpu": sp,
           "train_minutes": round(tr["seconds"] / 60.0, 1) if tr["trained_steps"] == tr["steps"] else None}
    res.setdefault("speed_gpu", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"[diffusion_cost] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
