"""Scoring throughput: the Ray Data stream versus a plain single-process PyTorch loop.

Both score the same NEU-DET pool images with the same detector checkpoint, batch size,
views and signals, in the same run. Then the driver's peak RSS is measured when scoring
2,000 versus 20,000 images (the pool replicated under new ids), each in a fresh process.

    python benchmarks/score_throughput.py                 # writes benchmarks/results/score_throughput.json
    python benchmarks/score_throughput.py --images 240 --rss-sizes 2000 20000

Needs ../shared/data/neu_det (or --neu PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from poolscout.engine.core import io  # noqa: E402
from poolscout.engine.core.config import load_config  # noqa: E402
from poolscout.engine.data.pool import image_id_for, init_run  # noqa: E402
from poolscout.engine.core.run import RunDir  # noqa: E402


def make_run(root: Path, neu: Path, overrides: list[str]) -> RunDir:
    run = RunDir(root / "run")
    cfg = load_config([REPO / "configs" / "neu_det.yaml"], overrides)
    init_run(run, images=neu / "images", annotations=neu / "annotations", fmt="voc",
             test=str(neu / "split_test.txt"), seed_fraction=0.05, cfg=cfg)
    return run


def write_model(run: RunDir, cfg, train_images: int = 48) -> None:
    """A briefly trained checkpoint (so the heads produce realistic detections)."""
    import torch

    from poolscout.engine.models.detectors import build_detector, save_checkpoint
    from poolscout.engine.models.training import DetectionDataset, collate, labeled_items, train_epochs

    torch.set_num_threads(os.cpu_count() or 1)
    ids = run.ids_in_state("labeled")[:train_images]
    items, boxes, labels = labeled_items(io.read_table(run.manifest), io.read_table(run.annotations), ids)
    ds = DetectionDataset(items, boxes, labels, cfg.detector.input_size, cfg.dataset.max_pixels, hflip_prob=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate)
    model = build_detector(cfg.detector, run.num_classes())
    train_epochs(model, loader, cfg.train, "cpu", progress=False, log=lambda *a, **k: None)
    save_checkpoint(run.model_path(0), model, cfg.detector, run.num_classes())


def limit_pool(run: RunDir, n: int) -> None:
    pool = np.sort(run.ids_in_state("pool"))
    drop = pool[n:]
    if len(drop):
        run.set_state(drop, "test")  # out of the pool for this benchmark only


def plain_loop(run: RunDir, cfg) -> dict:
    """A single-process DataLoader loop doing exactly the stream's work.

    Returns the seconds from the start of model loading to the end ("warm": the process
    has already imported torch); the parent also times the whole process ("cold").
    """
    import torch

    from poolscout.engine.models import predictions as P
    from poolscout.engine.acquisition import signals as S
    from poolscout.engine.models.detectors import load_checkpoint
    from poolscout.engine.data.images import load_batch
    from poolscout.engine.models.inference import predict

    torch.set_num_threads(os.cpu_count() or 1)
    man = io.read_table(run.manifest)
    pool = set(run.ids_in_state("pool").tolist())
    rows = [r for r in man.to_pylist() if r["image_id"] in pool]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    specs = [S.parse_spec(s) for s in cfg.score.signals]
    t0 = time.time()
    model, meta = load_checkpoint(run.model_path(0))
    loader = torch.utils.data.DataLoader(DS(), batch_size=cfg.score.batch_size, collate_fn=lambda b: b)
    n = 0
    for batch in loader:
        dec = load_batch([r["uri"] for r in batch], cfg.detector.input_size, cfg.dataset.max_pixels)
        pred = predict(model, dec["image"], image_id=np.array([r["image_id"] for r in batch]),
                       width=np.array([r["width"] for r in batch]), height=np.array([r["height"] for r in batch]),
                       scale=dec["scale"], content_w=dec["content_w"], content_h=dec["content_h"],
                       views=cfg.score.views, max_boxes=cfg.detector.max_boxes, roi_embeddings=True)
        S.compute(pred, specs, seed=cfg.seed)
        P.to_arrow(pred)
        n += len(batch)
    return {"n": n, "warm_s": time.time() - t0}


def plain_child(run_root: str) -> None:
    run = RunDir(Path(run_root))
    print(json.dumps(plain_loop(run, run.config(overrides=["score.embed_labeled=false"]))))


def plain_cold(run: RunDir) -> dict:
    """Run the plain loop in a fresh process: start-up (imports, model load) is timed, as
    it is for the Ray job, whose actors start new processes that import torch."""
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--plain-child", str(run.root)], capture_output=True,
                         text=True, check=True)
    cold = time.time() - t0
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"images_per_s": round(r["n"] / cold, 3), "warm_images_per_s": round(r["n"] / r["warm_s"], 3),
            "seconds": round(cold, 2), "warm_seconds": round(r["warm_s"], 2), "n": r["n"]}


RAY_LAYOUTS = {
    # one detector actor using every core through torch's intra-op threads
    "1_actor_x_2_threads": ["score.concurrency=1", "score.num_cpus=1", "score.torch_threads=0"],
    # one single-threaded actor per core (data parallel); fractional CPUs leave room for decode
    "2_actors_x_1_thread": ["score.concurrency=2", "score.num_cpus=0.75", "score.torch_threads=1"],
}


def ray_stream(run: RunDir, overrides: list[str]) -> dict:
    """Wall time of the whole Ray Data job (actor start-up included, ray.init excluded)."""
    from poolscout.jobs.ray_env import connect
    from poolscout.jobs.score import score

    connect(quiet=True)
    s = score(run, run.config(overrides=overrides), cycle=0, progress=False)
    return {"images_per_s": round(s["scored"] / s["seconds"], 3), "seconds": s["seconds"], "scored": s["scored"]}


def rss_child(neu: Path, n: int, overrides: list[str], model_src: str) -> None:
    """Runs in a fresh process: score n replicated images, print peak driver RSS (MB)."""
    import shutil

    from poolscout.jobs.ray_env import connect
    from poolscout.jobs.score import score

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "rep")
        run.root.mkdir(parents=True)
        src = RunDir(Path(model_src))
        man = io.read_table(src.manifest).to_pylist()
        base = [r for r in man if r["width"] > 0]
        rows = []
        for i in range(n):
            r = dict(base[i % len(base)])
            key = f"rep{i // len(base)}/{r['source_key']}"
            r.update(image_id=image_id_for(key), source_key=key)
            rows.append(r)
        io.write_table(pa.Table.from_pylist(rows, io.MANIFEST_SCHEMA), run.manifest, io.MANIFEST_SCHEMA)
        led = {"image_id": [r["image_id"] for r in rows], "state": ["pool"] * n, "cycle": [-1] * n,
               "selected_by": [""] * n}
        led["state"][0] = "labeled"
        io.write_table(pa.table(led), run.ledger, io.LEDGER_SCHEMA)
        shutil.copy(src.categories, run.categories)
        cfg = src.config(overrides=overrides)
        run.write_config(cfg, {"benchmark": "rss"})
        from poolscout.engine.models.detectors import build_detector, save_checkpoint

        save_checkpoint(run.model_path(0), build_detector(cfg.detector, src.num_classes()), cfg.detector,
                        src.num_classes())
        del rows, man, base, led
        connect(quiet=True)
        t0 = time.time()
        s = score(run, cfg, cycle=0, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"n": n, "rss_mb": peak, "scored": s["scored"], "seconds": time.time() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neu", type=Path, default=REPO.parent / "shared" / "data" / "neu_det")
    ap.add_argument("--images", type=int, default=1440, help="pool images for the throughput comparison")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=[2000, 20000])
    ap.add_argument("--rss-set", nargs="*", default=["detector.input_size=64", "score.views=[orig]",
                                                      "score.store_roi_embeddings=false"],
                    help="overrides for the RSS runs (smaller inputs keep 20k images affordable)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "score_throughput.json")
    ap.add_argument("--rss-child", nargs=2, metavar=("N", "RUN"), help=argparse.SUPPRESS)
    ap.add_argument("--plain-child", metavar="RUN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        plain_child(args.plain_child)
        return
    if args.rss_child:
        rss_child(args.neu, int(args.rss_child[0]), args.rss_set, args.rss_child[1])
        return
    if not args.neu.is_dir():
        sys.exit(f"NEU-DET not found at {args.neu}")
    overrides: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.neu, overrides)
        cfg = run.config()
        write_model(run, cfg)
        limit_pool(run, args.images)
        cfg = run.config(overrides=["score.embed_labeled=false"])
        plain_info = plain_cold(run)
        plain = plain_info["images_per_s"]
        layouts = {name: ray_stream(run, ["score.embed_labeled=false", *ov]) for name, ov in RAY_LAYOUTS.items()}
        best = max(layouts, key=lambda n: layouts[n]["images_per_s"])
        ray_ips = layouts[best]["images_per_s"]
        print(f"plain {plain:.2f} img/s, ray {layouts}", flush=True)
        rss = {}
        for n in args.rss_sizes:
            out = subprocess.run([sys.executable, __file__, "--neu", str(args.neu), "--rss-child", str(n), str(run.root),
                                  "--rss-set", *args.rss_set], capture_output=True, text=True, check=True)
            rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
            print(rss[n], flush=True)
    small, big = args.rss_sizes
    result = {
        "ray_images_per_s": round(ray_ips, 3),
        "plain_images_per_s": round(plain, 3),
        "ratio": round(ray_ips / plain, 3),
        "plain": plain_info,
        "ratio_vs_warm_plain": round(ray_ips / plain_info["warm_images_per_s"], 3),
        f"driver_rss_mb_{small // 1000}k": round(rss[small]["rss_mb"], 1),
        f"driver_rss_mb_{big // 1000}k": round(rss[big]["rss_mb"], 1),
        "rss_growth": round(rss[big]["rss_mb"] / rss[small]["rss_mb"] - 1, 3),
        "ray_layout": best,
        "ray_layouts": layouts,
        "rss_runs": rss,
        "settings": {"images": args.images, "detector": cfg.detector.name, "input_size": cfg.detector.input_size,
                     "batch_size": cfg.score.batch_size, "views": list(cfg.score.views), "rss_overrides": args.rss_set},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }
    io.atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
