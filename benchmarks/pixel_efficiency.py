"""Pixel-level label efficiency on Magnetic Tile: two-stage eDALD against its parts and the
baselines (docs/methods.md section 5), and the cost of its global herding stage.

The authors' protocol scaled to 2 CPUs (every figure is a flag):

* pool: Magnetic Tile's split_pool.txt (478 images), test: split_test.txt (114), five defect
  classes and background (configs/magnetic_tile.yaml);
* features: the cpu-small diffusion model (64 px, 0.27 M parameters) trained on the pool for
  `--diffusion-steps` (2,500), timesteps 50 / 150 / 250, all three decoder blocks (240 dims);
* per round: 1,000 random candidate pixels per image, local herding keeps b = 20, global
  herding keeps half, K = 5 noises; B = 100 pixels per round, round 0 + 4 rounds (500
  labeled pixels at the end: about one per pool image);
* head: MLP 240-128-32-6, 50 epochs, Adam 1e-3, cross-entropy weighted by 1 / sqrt(class count)
  (`segment.head_class_weights`; inverse-count weights made the head paint a class it had seen
  once over much of the test set);
* evaluation: mIoU over the six classes on the test masks, 256 px on the longer side;
* strategies: random, entropy, herding (stage 1 only), edald (stage 2 only), two_stage;
  seeds 0 and 1; two loops at a time on the embedded Ray, one CPU and one thread each.

    python benchmarks/pixel_efficiency.py
    python benchmarks/pixel_efficiency.py --herding-cost   # after the loops: their round-0 candidates
    python benchmarks/pixel_efficiency.py --ceiling        # what the features allow with many labels

Results: benchmarks/results/pixel_efficiency_magnetic_tile.json and .png (mIoU against labeled
pixels, mean and range over seeds); `--herding-cost` adds the global stage's time and memory,
sparse (FAISS kNN graph) against a dense kernel, at the pool's real candidate count;
`--ceiling` adds the mIoU a head reaches on the same features with `--ceiling-labels` random
labeled pixels of half the test images (evaluated on the other half), per class weighting: the
top of the scale the strategies' curves live on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRATEGIES = ["random", "entropy", "herding", "edald", "two_stage"]
COPY = ("run.yaml", "manifest.parquet", "annotations.parquet", "categories.json", "ledger.parquet",
        "rejects.parquet", "masks.parquet", "segment.json")


def base_overrides(args) -> list[str]:
    return [f"segment.rounds={args.rounds}", f"segment.budget={args.budget}", f"segment.candidates={args.candidates}",
            f"segment.local_budget={args.local_budget}", f"segment.keep={args.keep}", f"segment.noises={args.noises}",
            f"segment.eval_max_side={args.eval_max_side}", "segment.threads=1", "loop.executor=local",
            f"gsal.resolution={args.resolution}"]


def prepare(args, workdir: Path) -> tuple[Path, list[str], list[str]]:
    """The shared base run (init with masks) and the pool's diffusion model."""
    from poolscout.engine.core.config import configs_dir, load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.jobs.diffusion import train_diffusion
    from poolscout.jobs.segment import init_segmentation

    data = Path(args.data_root) / "magnetic_tile"
    if not data.is_dir():
        raise SystemExit(f"error: Magnetic Tile not found at {data} (see --data-root)")
    files = [str(configs_dir() / "magnetic_tile.yaml")]
    ov = base_overrides(args)
    base = RunDir(workdir / "base")
    s = init_segmentation(base, images=data / "images", masks=data / "masks", test=data / "split_test.txt",
                          cfg=load_config(files, ov), progress=False)
    print(f"pool {s['pool']} images, test {s['test']}, masks {s['masks']}, rejected {s['rejected']}", flush=True)
    model = workdir / "diffusion" / "model"
    if not (workdir / "diffusion" / "train.json").is_file():
        print(f"training the pool's diffusion model ({args.diffusion_steps} steps) ...", flush=True)
        t = train_diffusion(base, base.config(files, [*ov, "gsal.train_threads=0"]), steps=args.diffusion_steps,
                            executor="local", out=model, progress=False, log=lambda m: None)
        print(f"diffusion model: {t['steps']} steps in {t['seconds']:.0f} s, loss {t['loss_last100']:.4f}", flush=True)
    return base.root, files, [*ov, f"gsal.model={model}"]


def _loop(base: str, run_dir: str, files: list[str], ov: list[str]) -> dict:
    from poolscout.engine.core.run import RunDir
    from poolscout.jobs.segment import run_segmentation

    run = RunDir(Path(run_dir))
    if not run.exists():
        run.root.mkdir(parents=True, exist_ok=True)
        for f in COPY:
            if (Path(base) / f).is_file():
                shutil.copy2(Path(base) / f, run.root / f)
    t0 = time.time()
    log = open(run.root / "loop.log", "a")
    res = run_segmentation(run, run.config(files, ov), executor="local", progress=False, overrides=ov,
                           log=lambda m: (log.write(m + "\n"), log.flush()))
    return {"rounds": res["rounds"], "seconds": round(time.time() - t0, 1)}


def aulc(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.trapezoid(y, x) / (x[-1] - x[0])) if len(x) > 1 and x[-1] > x[0] else float(y[-1])


def defect_pixels(m: dict) -> int:
    """Labeled pixels of a defect class (not background) after a round."""
    return int(sum(v for k, v in m["labeled_per_class"].items() if k != "background"))


def summarise(results: dict) -> dict:
    out = {}
    for strat, per_seed in results.items():
        x = np.mean([[m["labeled_pixels"] for m in r["rounds"]] for r in per_seed.values()], 0)
        dp = np.mean([[defect_pixels(m) for m in r["rounds"]] for r in per_seed.values()], 0)
        last = [r["rounds"][-1]["labeled_per_class"] for r in per_seed.values()]
        y = np.array([[m["eval"]["miou"] for m in r["rounds"]] for r in per_seed.values()])
        out[strat] = {"labeled_pixels": x.tolist(), "miou_mean": y.mean(0).tolist(), "miou_std": y.std(0).tolist(),
                      "final_miou": float(y.mean(0)[-1]), "aulc": aulc(x, y.mean(0)),
                      "defect_pixels_mean": dp.tolist(),
                      "final_labeled_per_class": {c: float(np.mean([v[c] for v in last])) for c in last[0]},
                      "final_pixel_accuracy": float(np.mean([r["rounds"][-1]["eval"]["pixel_accuracy"]
                                                             for r in per_seed.values()])),
                      "final_per_class_iou": {c: float(np.mean([r["rounds"][-1]["eval"]["per_class_iou"][c] or 0.0
                                                                for r in per_seed.values()]))
                                              for c in next(iter(per_seed.values()))["rounds"][-1]["eval"]
                                              ["per_class_iou"]}}
    return out


def plot(summary: dict, results: dict, path: Path, title: str, ceiling: dict | None = None) -> None:
    """Left: test mIoU against labeled pixels (mean, range over seeds; the all-background
    head's mIoU and the --ceiling heads' as dashed lines when known). Right: defect pixels
    among the labeled ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (s, v) in enumerate(sorted(summary.items(), key=lambda kv: -kv[1]["aulc"])):
        ys = np.array([[m["eval"]["miou"] for m in r["rounds"]] for r in results[s].values()])
        ds = np.array([[defect_pixels(m) for m in r["rounds"]] for r in results[s].values()])
        c = "k" if s == "random" else f"C{i}"
        lw = 2.2 if s in ("random", "two_stage") else 1.4
        ax.plot(v["labeled_pixels"], ys.mean(0), "-o", color=c, ms=4, label=f"{s} (AULC {v['aulc']:.3f})", lw=lw)
        ax2.plot(v["labeled_pixels"], ds.mean(0), "-o", color=c, ms=4, label=s, lw=lw)
        if len(ys) > 1:
            ax.fill_between(v["labeled_pixels"], ys.min(0), ys.max(0), color=c, alpha=0.12)
            ax2.fill_between(v["labeled_pixels"], ds.min(0), ds.max(0), color=c, alpha=0.12)
    if ceiling:
        ax.axhline(ceiling["all_background_miou"], color="grey", ls=":", lw=1, label="all background")
        for j, (mode, m) in enumerate(ceiling["miou"].items()):
            ax.axhline(m, color=f"C{6 + j}", ls="--", lw=1,
                       label=f"{ceiling['labels']:,} random labels, {mode} weights ({m:.3f})")
    ax.set_xlabel("labeled pixels")
    ax.set_ylabel("test mIoU (6 classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax2.set_xlabel("labeled pixels")
    ax2.set_ylabel("labeled pixels of a defect class")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    ax2.set_title("defect pixels found (mean, range over seeds)", fontsize=9)
    fig.tight_layout()
    from poolscout.engine.core.io import atomic_savefig

    atomic_savefig(fig, path)


def herding_cost(workdir: Path, args) -> dict:
    """The global stage on the real local picks of round 0 (two_stage, seed 0): sparse kNN
    graph (full budget, keep x picks) against the dense kernel's plain greedy (its first
    `--dense-picks` timed, the rest extrapolated), time, memory and coverage objective."""
    import resource
    import tracemalloc

    import pyarrow as pa

    from poolscout.engine.core import io
    from poolscout.engine.methods import edald as E
    from poolscout.engine.methods.herding import herding_dense
    from poolscout.jobs.segment import _flat_candidates, _local_picks

    d = workdir / "two_stage_s0" / "cycles" / "0" / "candidates"
    if not (d / "_done").is_file():
        raise SystemExit(f"error: {d} is not finished; run the loops first")
    cand = pa.concat_tables([io.read_table(p) for p in sorted(d.glob("part-*.parquet"))])
    _, feats = _local_picks(_flat_candidates(cand))
    m = len(feats)
    b = E.keep_count(m, args.keep)
    h = E.bandwidth(feats, seed=0)
    out = {"points": int(m), "dims": int(feats.shape[1]), "budget": int(b), "h": h}
    tracemalloc.start()
    t0 = time.perf_counter()
    sparse, _ = E.global_herding(feats, None, b, h=h, k=args.knn_k, dense_below=0)
    out["sparse_s"] = round(time.perf_counter() - t0, 2)
    out["sparse_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    print(f"sparse: {out['sparse_s']} s, peak {out['sparse_peak_mb']} MB", flush=True)
    # the dense reference: the (m, m) kernel, then plain greedy (every step a pass over it);
    # its first --dense-picks picks are timed and the rest extrapolated (each step costs the same)
    tracemalloc.start()
    t0 = time.perf_counter()
    kmat = E.kernel(E.sq_dists(feats, feats), h)
    out["dense_kernel_s"] = round(time.perf_counter() - t0, 2)
    nd = min(b, args.dense_picks)
    t0 = time.perf_counter()
    dense = herding_dense(kmat, nd).rows
    step = (time.perf_counter() - t0) / max(nd, 1)
    out["dense_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    out.update({"dense_picks_timed": int(nd), "dense_s_per_pick": round(step, 4),
                "dense_s_extrapolated": round(out["dense_kernel_s"] + step * b, 1)})
    print(f"dense: kernel {out['dense_kernel_s']} s, {step:.3f} s a pick -> {out['dense_s_extrapolated']} s for "
          f"{b} picks, peak {out['dense_peak_mb']} MB", flush=True)

    def objective(rows):
        return float(kmat[:, rows].max(axis=1).mean()) if len(rows) else 0.0

    # greedy picks are prefix-consistent: the sparse run's first nd picks are its budget-nd answer
    out["objective_sparse_over_dense_at_timed_picks"] = objective(sparse[:nd]) / max(objective(dense), 1e-12)
    out["same_picks_share_at_timed_picks"] = len(set(sparse[:nd].tolist()) & set(dense.tolist())) / max(nd, 1)
    out["objective_sparse_full"] = objective(sparse)
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def feature_ceiling(workdir: Path, args) -> dict:
    """A head trained on `args.ceiling_labels` random pixels of the even-id test images (their
    masks as labels) and scored on the odd-id ones, on the loops' features (grid of
    `args.ceiling_side` px on the longer side), once per class weighting."""
    import torch

    from poolscout.engine.core import io
    from poolscout.engine.core.config import configs_dir
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.segmentation import read_mask
    from poolscout.engine.models import pixel_features as F
    from poolscout.engine.models.pixel_stage import PixelStage, eval_grid
    from poolscout.jobs.segment import _image_rows, _stage_kwargs, masks_path

    base = RunDir(workdir / "base")
    if not base.exists():
        raise SystemExit(f"error: {base.root} does not exist; run the loops first")
    ov = [*base_overrides(args), f"gsal.model={workdir / 'diffusion' / 'model'}"]
    cfg = base.config([str(configs_dir() / "magnetic_tile.yaml")], ov)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = _image_rows(base, base.ids_in_state("test"))
    rows = rows.join(io.read_table(masks_path(base)), keys="image_id", join_type="inner").sort_by("image_id")
    kw = {k: v for k, v in _stage_kwargs(base, cfg, "pixels", 0, None).items() if k != "reads"}
    stage = PixelStage(**kw)
    c = len(cfg.dataset.classes) + 1
    feats, labels, part = [], [], []
    t0 = time.time()
    for r in rows.to_pylist():
        w, h = int(r["width"]), int(r["height"])
        px, py = eval_grid(w, h, args.ceiling_side)  # the loops' evaluation grid, coarser
        mask = read_mask(r["mask_uri"], fmt=cfg.segment.mask_format, num_classes=c - 1,
                         mask_class=int(r["mask_class"] or 0), threshold=cfg.segment.mask_threshold, size=(w, h))
        batch = {"image_id": np.array([r["image_id"]]), "uri": np.array([r["uri"]]), "width": np.array([w]),
                 "height": np.array([h]), "req_x": np.array([px], dtype=object), "req_y": np.array([py], dtype=object)}
        out = stage(batch)
        if out["error"][0].as_py():
            raise SystemExit(f"error: test image {r['image_id']}: {out['error'][0].as_py()}")
        feats.append(out["feat"][0].values.to_numpy(zero_copy_only=False).astype(np.float16).reshape(len(px), -1))
        labels.append(mask[py, px].astype(np.int64))
        part.append(np.full(len(px), int(r["image_id"]) % 2))
    x, y, part = np.concatenate(feats), np.concatenate(labels), np.concatenate(part)
    ok = y != 255
    train_rows, eval_rows = np.flatnonzero(ok & (part == 0)), np.flatnonzero(ok & (part == 1))
    rng = np.random.default_rng(0)
    pick = rng.choice(train_rows, min(args.ceiling_labels, len(train_rows)), replace=False)
    res = {"labels": int(len(pick)), "labels_per_class": np.bincount(y[pick], minlength=c).tolist(),
           "eval_pixels": int(len(eval_rows)), "grid_side": args.ceiling_side, "epochs": args.ceiling_epochs,
           "features_s": round(time.time() - t0, 1), "miou": {}, "per_class_iou": {}}
    for mode in F.CLASS_WEIGHTS:
        head, _ = F.train_head(x[pick].astype(np.float32), y[pick], c, epochs=args.ceiling_epochs,
                               class_weights=mode)
        pred = F.predict_proba(head, x[eval_rows].astype(np.float32)).argmax(1)
        miou, per = F.iou_from_confusion(F.confusion(pred, y[eval_rows], c))
        res["miou"][mode], res["per_class_iou"][mode] = miou, per
        print(f"ceiling, {mode} weights: mIoU {miou:.3f}", flush=True)
    res["all_background_miou"] = F.iou_from_confusion(F.confusion(np.zeros(len(eval_rows), np.int64),
                                                                  y[eval_rows], c))[0]
    return res


def replot(doc: dict, out: Path) -> None:
    st = doc["settings"]
    plot(doc["summary"], doc["runs"], out.with_suffix(".png"),
         f"Magnetic Tile pixels: {st['budget']} per round, {st['rounds'] + 1} rounds, seeds {st['seeds']}",
         doc.get("feature_ceiling"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "runs" / "pixel_efficiency_magnetic_tile"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pixel_efficiency_magnetic_tile.json"))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget", type=int, default=100, help="Pixels labeled per round.")
    ap.add_argument("--candidates", type=int, default=1000, help="Random candidate pixels per image and round.")
    ap.add_argument("--local-budget", type=int, default=20, help="Stage 1a's picks per image.")
    ap.add_argument("--keep", type=float, default=0.5, help="Stage 1b keeps this share of the local picks.")
    ap.add_argument("--noises", type=int, default=5)
    ap.add_argument("--knn-k", type=int, default=64)
    ap.add_argument("--eval-max-side", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=64, help="The diffusion model's resolution.")
    ap.add_argument("--diffusion-steps", type=int, default=2500)
    ap.add_argument("--parallel", type=int, default=2, help="Loops at a time (one CPU each).")
    ap.add_argument("--herding-cost", action="store_true")
    ap.add_argument("--dense-picks", type=int, default=200, help="--herding-cost: dense greedy picks timed.")
    ap.add_argument("--ceiling", action="store_true")
    ap.add_argument("--ceiling-labels", type=int, default=50_000)
    ap.add_argument("--ceiling-side", type=int, default=96, help="Test grid's longer side for --ceiling.")
    ap.add_argument("--ceiling-epochs", type=int, default=20)
    args = ap.parse_args(argv)
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.herding_cost or args.ceiling:
        key, cost = (("herding_cost", herding_cost(workdir, args)) if args.herding_cost
                     else ("feature_ceiling", feature_ceiling(workdir, args)))
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc[key] = cost
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        if doc.get("summary") and doc.get("runs"):
            replot(doc, out)
        print(json.dumps(cost, indent=2))
        return 0
    base, files, ov = prepare(args, workdir)
    import ray

    from poolscout.jobs.ray_env import connect

    info = connect(num_cpus=args.parallel, log_dir=workdir / "logs")
    task = ray.remote(num_cpus=1, max_retries=2)(_loop)
    strategies, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    refs = {(s, seed): task.remote(str(base), str(workdir / f"{s}_s{seed}"), files,
                                   [*ov, f"seed={seed}", f"segment.strategy={s}"])
            for seed in seeds for s in strategies}
    results: dict = {}
    pending = dict(refs)
    while pending:
        done, _ = ray.wait(list(pending.values()), num_returns=1)
        key = next(k for k, r in pending.items() if r == done[0])
        res = ray.get(done[0])
        del pending[key]
        results.setdefault(key[0], {})[str(key[1])] = res
        print(f"[pixel] {key[0]} seed {key[1]}: mIoU " + " ".join(f"{m['eval']['miou']:.3f}" for m in res["rounds"])
              + f" ({res['seconds']:.0f} s; {time.time() - t0:.0f} s elapsed)", flush=True)
    summary = summarise(results)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    loop_args = {k: v for k, v in vars(args).items() if not k.startswith(("herding_cost", "ceiling", "dense_picks"))}
    doc.update({"benchmark": "pixel_efficiency", "dataset": "magnetic_tile",
                "settings": {**loop_args,
                             "overrides": ov, "configs": [Path(f).name for f in files]},
                "machine": {"cpus": info["cpus"], "gpus": info["gpus"], "platform": platform.platform()},
                "wall_seconds": round(time.time() - t0, 1), "summary": summary, "runs": results})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    replot(doc, out)
    for s, v in sorted(summary.items(), key=lambda kv: -kv[1]["aulc"]):
        print(f"  {s:10s} final mIoU {v['final_miou']:.3f}  AULC {v['aulc']:.3f}  "
              f"defect pixels labeled {v['defect_pixels_mean'][-1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
