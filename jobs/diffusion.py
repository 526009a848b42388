"""`poolscout diffusion train`: GSAL's in-domain diffusion model, trained on the unlabeled pool.

The pool images (a seeded sample of at most gsal.train_images) are decoded as scoring
decodes them (the detector's letterboxed canvas, its content resized to the model's
resolution: `engine.models.diffusion.canvas_to_model`), then `train_steps` runs the DDPM loop
with EMA weights. Every gsal.checkpoint_every steps the EMA model is saved as a diffusers
directory in RUN/diffusion/model (atomically, with the raw weights and the optimizer for a
resume); a killed run resumes from its last checkpoint and ends with the same weights as an
uninterrupted one. The "ray" executor runs the loop as a Ray Train TorchTrainer job (one
worker, GPU if gsal.num_gpus > 0), "local" in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError


def model_dir(run: RunDir) -> Path:
    return run.root / "diffusion" / "model"


def _settings(cfg: Config, input_size: int) -> dict:
    from poolscout.engine.models.diffusion import PRESETS

    g = cfg.gsal
    return {"preset": g.preset, "resolution": int(g.resolution or PRESETS[g.preset]["resolution"]),
            "channels": 1 if g.channels == "grey" else 3, "input_size": int(input_size), "seed": int(cfg.seed),
            "lr": float(g.lr), "batch_size": int(g.train_batch_size), "ema_decay": float(g.ema_decay),
            "train_images": int(g.train_images)}


def load_pool_tensor(run: RunDir, cfg: Config, settings: dict, progress: bool = False):
    """(images (n, C, R, R) float32 in [-1, 1], their ids): a seeded sample of the decodable pool."""
    import torch

    from poolscout.engine.models.diffusion import canvas_to_model
    from poolscout.jobs.score import worklist
    from poolscout.jobs.stream import WORK_COLUMNS, decoded_batches

    work = worklist(run, include_labeled=False)
    n = work.num_rows
    if n == 0:
        raise RunError(f"{run.ledger}: the pool is empty; nothing to train the diffusion model on")
    cap = settings["train_images"]
    if cap and n > cap:
        keep = np.sort(np.random.default_rng(settings["seed"]).choice(n, cap, replace=False))
        work = work.take(keep)
    ids = work["image_id"].to_numpy()
    out, got = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="diffusion: decode pool", unit="img", leave=False, dynamic_ncols=True)
    for dec in decoded_batches(work, 32, WORK_COLUMNS, settings["input_size"], cfg.dataset.max_pixels,
                               run.fingerprint().get("images_root")):
        ok = np.asarray(dec["error"], dtype=object) == ""
        if ok.any():
            out.append(canvas_to_model(dec["image"][ok], dec["content_w"][ok], dec["content_h"][ok],
                                       settings["resolution"], settings["channels"]))
            got.append(np.asarray(dec["image_id"])[ok])
        if bar is not None:
            bar.update(len(ok))
    if bar is not None:
        bar.close()
    if not out:
        raise RunError(f"none of the {len(ids)} pool images decoded; nothing to train the diffusion model on")
    return torch.cat(out), np.concatenate(got)


class StepBatches:
    """Batch of step s: a seeded random draw (with horizontal flips) from the images, so that
    a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, images, batch_size: int, seed: int, steps: int):
        self.images, self.batch_size, self.seed, self.steps = images, int(batch_size), int(seed), int(steps)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, s: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 7919 + int(s))
        idx = torch.randint(0, len(self.images), (min(self.batch_size, len(self.images)),), generator=g)
        x = self.images[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        return x


def fit(images, settings: dict, steps: int, out: Path, *, checkpoint_every: int, device: str = "cpu",
        threads: int = 0, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Train (or resume) the diffusion model in `out`; returns the training summary."""
    import torch

    from poolscout.engine.models import diffusion as Df

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(settings["seed"])
    model = Df.build_unet(settings["preset"], channels=settings["channels"], resolution=settings["resolution"])
    ema = Df.build_unet(settings["preset"], channels=settings["channels"], resolution=settings["resolution"])
    ema.load_state_dict(model.state_dict())
    model.to(device)
    ema.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"])
    state = Df.TrainState()
    meta_path = out / "poolscout.json"
    if (out / "training.pt").is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            state = Df.load_training(out, model, opt)
            ema = Df.load_model(out).to(device)
            log(f"diffusion: resuming at step {state.step} of {steps}")
        else:
            log("diffusion: the saved model was trained with other settings; training from scratch")
    batches = StepBatches(images, settings["batch_size"], settings["seed"], steps)
    bar = None
    if progress and state.step < steps:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state.step, desc="diffusion train", unit="step", leave=False,
                   dynamic_ncols=True)
    t0 = time.time()
    start = state.step
    while state.step < steps:
        stop = min(steps, (state.step // checkpoint_every + 1) * checkpoint_every)
        Df.train_steps(model, ema, opt, batches, state=state, steps=stop, ema_decay=settings["ema_decay"],
                       seed=settings["seed"], device=device,
                       log=(lambda s, loss: bar.set_postfix(loss=f"{loss:.4f}", refresh=False) or bar.update(1))
                       if bar is not None else None)
        _save(out, ema, model, opt, state, settings, steps)
    if bar is not None:
        bar.close()
    if state.step == start and not (out / "config.json").is_file():
        _save(out, ema, model, opt, state, settings, steps)
    losses = state.losses or []
    tail = losses[-min(len(losses), 100):]
    return {"steps": state.step, "trained_steps": state.step - start, "seconds": round(time.time() - t0, 2),
            "loss_last100": float(np.mean(tail)) if tail else None, "parameters": Df.parameter_count(model)}


def _save(out: Path, ema, model, opt, state, settings: dict, steps: int) -> None:
    """Checkpoint into a fresh folder, then swap it in (a kill leaves the old or the new)."""
    from poolscout.engine.models.diffusion import save_model

    import copy

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # a CPU copy of the EMA model is saved; the live models stay on their device (a GPU run
    # goes on training there), and training.pt is read back with map_location="cpu"
    save_model(copy.deepcopy(ema).to("cpu"), tmp, model=model, opt=opt, state=state,
               meta={"settings": settings, "steps": steps})
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _ray_worker(config: dict) -> None:
    import ray.train
    import torch

    from poolscout.engine.core.run import RunDir as _Run

    run = _Run(Path(config["run"]))
    cfg = run.config([], config["overrides"])
    images, _ = load_pool_tensor(run, cfg, config["settings"])
    dev = "cuda" if torch.cuda.is_available() and config["gpu"] else "cpu"
    summary = fit(images, config["settings"], config["steps"], Path(config["out"]),
                  checkpoint_every=config["checkpoint_every"], device=dev, threads=config["threads"],
                  log=lambda *a: None)
    summary["images"] = int(len(images))
    io.atomic_write_json(Path(config["out"]).parent / "fit.json", summary)  # the run directory is shared
    ray.train.report({"steps": summary["steps"]})


def train_diffusion(run: RunDir, cfg: Config, *, steps: int | None = None, progress: bool = True,
                    executor: str | None = None, overrides: list[str] | None = None,
                    log: Callable[[str], None] = print, out: Path | None = None) -> dict:
    """Train GSAL's diffusion model on the run's pool (resumable); returns a summary that is
    also written beside the model (train.json). `out`: the model folder (default
    RUN/diffusion/model; a benchmark shares one between its loops)."""
    run.require()
    g = cfg.gsal
    steps = int(steps or g.train_steps)
    input_size = int(cfg.detector.input_size)
    settings = _settings(cfg, input_size)
    out = Path(out) if out is not None else model_dir(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    executor = executor or cfg.loop.executor
    t0 = time.time()
    from poolscout.jobs.train import in_process  # the detector's rule: see its docstring

    if executor == "ray" and not in_process(cfg):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        storage = run.root / "ray_train"
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"run": str(run.root), "overrides": list(overrides or []), "settings": settings,
                               "steps": steps, "out": str(out), "checkpoint_every": int(g.checkpoint_every),
                               "threads": int(g.train_threads), "gpu": bool(g.num_gpus)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(g.num_gpus),
                                         resources_per_worker={"CPU": 1, **({"GPU": 1} if g.num_gpus else {})}),
            run_config=RunConfig(name=f"diffusion_{int(time.time())}", storage_path=str(storage)))
        (out.parent / "fit.json").unlink(missing_ok=True)
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"diffusion training failed: {result.error}")
        fit_json = out.parent / "fit.json"
        summary = json.loads(fit_json.read_text())
        fit_json.unlink()
        shutil.rmtree(storage, ignore_errors=True)
        executor = "ray"
    elif executor in ("ray", "local"):
        images, ids = load_pool_tensor(run, cfg, settings, progress=progress)
        import torch

        dev = "cuda" if g.num_gpus and torch.cuda.is_available() else "cpu"
        summary = fit(images, settings, steps, out, checkpoint_every=int(g.checkpoint_every), device=dev,
                      threads=int(g.train_threads), log=log, progress=progress)
        summary["images"] = int(len(ids))
        executor = "local" if executor == "local" else "in_process"
    else:
        raise ValueError(f"loop.executor must be 'ray' or 'local', got {executor!r}")
    summary.update(model=str(out), executor=executor, wall_seconds=round(time.time() - t0, 2), settings=settings)
    io.atomic_write_json(out.parent / "train.json", summary)
    return summary


__all__ = ["StepBatches", "fit", "load_pool_tensor", "model_dir", "train_diffusion"]
