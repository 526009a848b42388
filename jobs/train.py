"""`poolscout train`: Ray Train's TorchTrainer around engine.training's plain loop.

Writes cycles/<k>/model.pt (state_dict + detector config), then cycles/<k>/train.json: the
stage's completion marker. A model.pt without train.json (a run killed between the two) is an
unfinished stage and is trained again; the seeds make the retrained model the same.
The workers read the run directory by path, so on a multi-node cluster the run directory
must live on shared storage (NFS, a mounted bucket) — as it must for scoring.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError


def _train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: engine.training.fit_detector, then a checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    from poolscout.engine.core.config import DetectorConfig, _merge_into
    from poolscout.engine.models.detectors import save_checkpoint
    from poolscout.engine.models.training import fit_detector

    torch.set_num_threads(config["train"].get("torch_threads") or (os.cpu_count() or 1))
    rank = ray.train.get_context().get_world_rank()
    # a restart after a lost worker (FailureConfig) goes on from the last epoch checkpoint
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / "resume.pt").is_file():
                resume = torch.load(Path(d) / "resume.pt", map_location="cpu", weights_only=True)
                resume["history"] = json.loads((Path(d) / "history.json").read_text())

    def on_epoch(rec, model, opt, history):
        if not config["train"].get("checkpoint_epochs", True):
            return
        state = None
        if rank == 0:
            raw = model.module if hasattr(model, "module") else model
            state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "epoch": rec["epoch"] + 1}
        with tempfile.TemporaryDirectory() as tmp:
            if state is not None:
                torch.save(state, Path(tmp) / "resume.pt")
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report({"loss": rec["loss"], "epoch": rec["epoch"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if state is not None else None)
        # a test's kill point: a worker lost after this epoch's checkpoint, on the first attempt
        # (after a few of the controller's polls, which is when a reported checkpoint counts)
        if resume is None and config.get("crash_at") == f"{config['cycle']}:train:epoch{rec['epoch']}":
            time.sleep(5.0)
            os.kill(os.getpid(), signal.SIGKILL)

    model, history = fit_detector(config, rank=rank, device=ray.train.torch.get_device(),
                                  prepare_loader=ray.train.torch.prepare_data_loader,
                                  prepare_model=ray.train.torch.prepare_model,
                                  progress=config["progress"] and rank == 0,
                                  log=(print if rank == 0 else (lambda *a, **k: None)), resume=resume,
                                  on_epoch=on_epoch)
    if resume is not None and history:
        history[-1]["resumed_at_epoch"] = int(resume["epoch"])
    loss = {"loss": history[-1]["loss"] if history else float("nan")}
    if rank == 0:
        raw = model.module if hasattr(model, "module") else model
        dcfg = _merge_into(DetectorConfig, DetectorConfig(), config["detector"], "detector.", "run.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "model.pt", raw.cpu(), dcfg, config["num_classes"],
                            extra=_extra(config, history))
            ray.train.report(loss, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(loss)


def _extra(config: dict, history: list[dict]) -> dict:
    return {"history": history, "labeled": int(len(config["labeled_ids"])), "cycle": config["cycle"],
            "warm_start": config.get("warm_start")}


def _train_local(config: dict, out: Path) -> None:
    """The local executor: the same training in this process, then an atomic model.pt."""
    import torch

    from poolscout.engine.core.config import DetectorConfig, _merge_into
    from poolscout.engine.models.detectors import save_checkpoint
    from poolscout.engine.models.training import fit_detector

    threads = config["train"].get("torch_threads") or 0
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = "cuda" if config["train"].get("use_gpu") and torch.cuda.is_available() else "cpu"
        # one progress bar on the console; the per-epoch records go to train.json's history
        model, history = fit_detector(config, device=dev, progress=config["progress"], log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(old)
    dcfg = _merge_into(DetectorConfig, DetectorConfig(), config["detector"], "detector.", "run.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_checkpoint(tmp, model.cpu(), dcfg, config["num_classes"], extra=_extra(config, history))
    io.commit_file(tmp, out)  # 0666 & ~umask, fsynced before and after the rename


PSEUDO_SCHEMA = pa.schema([*io.ANNOTATIONS_SCHEMA, pa.field("score", pa.float32())])


def pseudo_labels(run: RunDir, cfg: Config, k: int) -> dict | None:
    """Auto-labeling (train.pseudo_labels = t > 0): the previous cycle's detections with
    confidence >= t on the images still in the pool, written once to
    cycles/<k>/pseudo_labels.parquet (annotations' columns + score; apart from the ledger and
    the annotations, so nothing exports them). None when off, at cycle 0, or when cycle k-1
    scored nothing (a model-free strategy). Returns {"path", "images", "boxes", "threshold"}."""
    import pyarrow.dataset as pads

    t = float(cfg.train.pseudo_labels)
    if t <= 0 or k == 0:
        return None
    out = run.cycle_dir(k) / "pseudo_labels.parquet"
    if not out.is_file():
        pdir = run.predictions_dir(k - 1)
        if not pdir.is_dir():
            return None
        pred = pads.dataset(str(pdir), format="parquet").to_table(columns=["image_id", "boxes", "scores", "labels"])
        pool = set(run.ids_in_state("pool").tolist())
        rows: dict[str, list] = {n: [] for n in PSEUDO_SCHEMA.names}
        conf = []
        for iid, bx, sc, lb in zip(pred["image_id"].to_pylist(), pred["boxes"].to_pylist(), pred["scores"].to_pylist(),
                                   pred["labels"].to_pylist()):
            if int(iid) not in pool or not sc:
                continue
            keep = [j for j, v in enumerate(sc) if v >= t]
            if keep:
                conf.append((float(np.mean([sc[j] for j in keep])), int(iid), bx, sc, lb, keep))
        conf.sort(key=lambda c: (-c[0], c[1]))  # the most confident images first, then by id
        if cfg.train.pseudo_max_images:
            conf = conf[:int(cfg.train.pseudo_max_images)]
        ann_id = 0
        for _, iid, bx, sc, lb, keep in sorted(conf, key=lambda c: c[1]):
            for j in keep:
                ann_id += 1
                x1, y1, x2, y2 = bx[4 * j:4 * j + 4]
                for name, v in zip(PSEUDO_SCHEMA.names, (iid, ann_id, int(lb[j]), x1, y1, x2, y2, sc[j])):
                    rows[name].append(v)
        io.write_table(pa.table(rows, schema=PSEUDO_SCHEMA), out, PSEUDO_SCHEMA)
    tab = io.read_table(out, columns=["image_id"])
    return {"path": out, "images": int(len(np.unique(tab["image_id"].to_numpy()))), "boxes": int(tab.num_rows),
            "threshold": t}


def train(run: RunDir, cfg: Config, *, cycle: int | None = None, force: bool = False,
          progress: bool = True, executor: str | None = None) -> dict:
    """Train the detector of cycle k on the labeled images (cycle <= k); returns a summary.

    Skipped when cycles/<k>/train.json exists (unless `force`); a model.pt without it is
    the leftover of an interrupted stage and is trained again.

    executor: "ray" (Ray Train TorchTrainer) or "local" (this process); default cfg.loop.executor.
    """
    run.require()
    k = run.current_cycle() if cycle is None else cycle
    out = run.model_path(k)
    done = run.cycle_dir(k) / "train.json"  # written after model.pt: the stage's completion marker
    if out.is_file() and done.is_file() and not force:
        return {"cycle": k, "model": str(out), "skipped": "model exists (use --force to retrain)"}
    led = run.read_ledger()
    st = np.asarray(led["state"].to_pylist(), dtype=object)
    labeled = led["image_id"].to_numpy()[(st == "labeled") & (led["cycle"].to_numpy() <= k)]
    if cfg.train.max_images and len(labeled) > cfg.train.max_images:
        labeled = np.sort(np.random.default_rng(cfg.seed).choice(labeled, cfg.train.max_images, replace=False))
    if len(labeled) == 0:
        raise RunError(f"{run.ledger}: no labeled images to train on; init with --labeled or --seed-fraction, "
                       f"or import labels")
    if not run.annotations.is_file():
        raise RunError(f"{run.annotations} is missing: training needs annotations")
    pseudo = pseudo_labels(run, cfg, k)
    warm = None
    if cfg.train.warm_start:
        prev = run.latest_model(upto=k - 1)
        warm = str(prev[1]) if prev else None
    loop_cfg = {
        "train": cfg.to_dict()["train"], "detector": cfg.to_dict()["detector"], "seed": cfg.seed,
        "manifest": str(run.manifest), "annotations": str(run.annotations),
        "labeled_ids": labeled.tolist(), "num_classes": run.num_classes(), "max_pixels": cfg.dataset.max_pixels,
        "warm_start": warm, "progress": progress, "cycle": k, "desc": f"train cycle {k}",
        # files must lie inside the images root and keep the size init recorded
        "images_root": run.fingerprint().get("images_root"),
        "pseudo": str(pseudo["path"]) if pseudo and pseudo["images"] else None,
    }
    executor = executor or cfg.loop.executor
    t0 = time.time()
    if executor == "ray" and in_process(cfg):
        executor = "in_process"
    if executor in ("local", "in_process"):
        _train_local(loop_cfg, out)
    elif executor == "ray":
        _train_ray(run, cfg, k, loop_cfg, out)
    else:
        raise ValueError(f"loop.executor must be 'ray' or 'local', got {executor!r}")
    import torch

    meta = torch.load(out, map_location="cpu", weights_only=True)["extra"]
    history = meta.get("history", [])
    # Labeled images that failed to decode were left out of this training (a cycle's failure,
    # listed in cycles/<k>/rejects.parquet; they stay labeled and the next training retries).
    skipped = [r for rec in history for r in rec.get("skipped", [])]
    rows = None
    if skipped:
        import pyarrow as pa

        rows = pa.table({"image_id": pa.array([int(r["image_id"]) for r in skipped], pa.int64()),
                         "uri": [str(r["uri"]) for r in skipped], "stage": ["train"] * len(skipped),
                         "reason": [str(r["reason"]) for r in skipped]})
    run.write_cycle_rejects(k, "train", rows)
    summary = {"cycle": k, "model": str(out), "labeled": int(len(labeled)), "warm_start": warm,
               "executor": executor, "seconds": round(time.time() - t0, 2), "failed_images": len(skipped),
               "history": history}
    if pseudo is not None:
        summary["pseudo_labels"] = {k_: v for k_, v in pseudo.items() if k_ != "path"}
    io.atomic_write_json(done, summary)
    return summary


def in_process(cfg: Config) -> bool:
    """Whether the "ray" executor trains in this process instead of a Ray Train job.

    train.backend "auto" does so when one worker is all there is on an embedded local Ray:
    a Ray Train job would spend about a minute starting its controller and worker for the
    same single process, every cycle. "ray_train" always uses Ray Train, "in_process" never.
    """
    backend = cfg.train.backend
    if backend == "in_process":
        return True
    if backend == "ray_train":
        return False
    from poolscout.jobs.ray_env import is_local

    return cfg.train.num_workers == 1 and not cfg.ray.address and is_local()


def _train_ray(run: RunDir, cfg: Config, k: int, loop_cfg: dict, out: Path) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = run.root / "ray_train"
    crash = os.environ.get("POOLSCOUT_CRASH_AT")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={**loop_cfg, **({"crash_at": crash} if crash else {})},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(name=f"cycle_{k}_{int(time.time())}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=int(cfg.train.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training of cycle {k} reported no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "model.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(src, tmp)
        io.commit_file(tmp, out)
    shutil.rmtree(storage, ignore_errors=True)
