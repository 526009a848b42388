"""`poolscout train`: Ray Train's TorchTrainer around engine.training's plain loop.

Writes cycles/<k>/model.pt (state_dict + detector config) and cycles/<k>/train.json.
The workers read the run directory by path, so on a multi-node cluster the run directory
must live on shared storage (NFS, a mounted bucket) — as it must for scoring.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from engine import io
from engine.config import Config
from engine.run import RunDir, RunError


def _train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build data + model, train, report a checkpoint."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.train
    import ray.train.torch
    import torch

    from engine.config import DetectorConfig, TrainConfig, _merge_into
    from engine.detectors import build_detector, load_checkpoint, save_checkpoint
    from engine.training import DetectionDataset, collate, labeled_items, seed_everything, train_epochs

    tcfg = _merge_into(TrainConfig, TrainConfig(), config["train"], "train.", "run.yaml")
    dcfg = _merge_into(DetectorConfig, DetectorConfig(), config["detector"], "detector.", "run.yaml")
    threads = tcfg.torch_threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seed_everything(config["seed"] + rank)

    manifest = pa.parquet.read_table(config["manifest"])
    annotations = pa.parquet.read_table(config["annotations"])
    ids = np.asarray(config["labeled_ids"], dtype=np.int64)
    items, boxes, labels = labeled_items(manifest, annotations, ids)
    ds = DetectionDataset(items, boxes, labels, dcfg.input_size, config["max_pixels"],
                          hflip_prob=tcfg.hflip_prob, seed=config["seed"])
    loader = torch.utils.data.DataLoader(ds, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=0, generator=torch.Generator().manual_seed(config["seed"]))
    loader = ray.train.torch.prepare_data_loader(loader)

    if config.get("warm_start"):
        model, _ = load_checkpoint(config["warm_start"])
        model.train()
    else:
        model = build_detector(dcfg, config["num_classes"], load_pretrained=True)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    history = train_epochs(model, loader, tcfg, device, progress=config["progress"] and rank == 0,
                           log=(print if rank == 0 else (lambda *a, **k: None)))

    if rank == 0:
        raw = model.module if hasattr(model, "module") else model
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "model.pt", raw.cpu(), dcfg, config["num_classes"],
                            extra={"history": history, "labeled": int(len(ids)), "cycle": config["cycle"],
                                   "warm_start": config.get("warm_start")})
            ray.train.report({"loss": history[-1]["loss"] if history else float("nan")},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({"loss": history[-1]["loss"] if history else float("nan")})


def train(run: RunDir, cfg: Config, *, cycle: int | None = None, force: bool = False,
          progress: bool = True) -> dict:
    """Train the detector of cycle k on the labeled images; returns a summary."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run.require()
    k = run.current_cycle() if cycle is None else cycle
    out = run.model_path(k)
    if out.is_file() and not force:
        return {"cycle": k, "model": str(out), "skipped": "model exists (use --force to retrain)"}
    labeled = run.ids_in_state("labeled")
    if cfg.train.max_images and len(labeled) > cfg.train.max_images:
        labeled = np.sort(np.random.default_rng(cfg.seed).choice(labeled, cfg.train.max_images, replace=False))
    if len(labeled) == 0:
        raise RunError(f"{run.ledger}: no labeled images to train on; init with --labeled or --seed-fraction, "
                       f"or import labels")
    if not run.annotations.is_file():
        raise RunError(f"{run.annotations} is missing: training needs annotations")
    warm = None
    if cfg.train.warm_start:
        prev = run.latest_model(upto=k - 1)
        warm = str(prev[1]) if prev else None
    loop_cfg = {
        "train": cfg.to_dict()["train"], "detector": cfg.to_dict()["detector"], "seed": cfg.seed,
        "manifest": str(run.manifest), "annotations": str(run.annotations),
        "labeled_ids": labeled.tolist(), "num_classes": run.num_classes(), "max_pixels": cfg.dataset.max_pixels,
        "warm_start": warm, "progress": progress, "cycle": k,
    }
    storage = run.root / "ray_train"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(name=f"cycle_{k}_{int(time.time())}", storage_path=str(storage)),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training of cycle {k} reported no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "model.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)
    shutil.rmtree(storage, ignore_errors=True)
    import torch

    meta = torch.load(out, map_location="cpu", weights_only=True)["extra"]
    summary = {"cycle": k, "model": str(out), "labeled": int(len(labeled)), "warm_start": warm,
               "seconds": round(time.time() - t0, 2), "history": meta.get("history", [])}
    io.atomic_write_json(run.cycle_dir(k) / "train.json", summary)
    return summary


if __name__ == "__main__":  # python -m jobs.train RUN_DIR [options] (also under `ray job submit`)
    import sys

    from jobs.cli import main

    main(["train", *sys.argv[1:]])
