"""The in-domain diffusion model of GSAL (docs/methods.md section 4): a diffusers UNet2DModel
trained with the DDPM noise schedule on the unlabeled pool itself, sampled with DDIM.

* `build_unet(preset, ...)`: the presets ("cpu-small": 64 px, three resolution levels of 16 /
  32 / 32 channels, no attention, 0.27 M parameters: 0.54 s a training step of 16 images and
  12 ms a denoising pass of an image on 2 cores; "gpu": 128 px, four levels with attention
  at the lowest two).
* `reconstruct`: for K seeds, noise x to t0 (t0_frac T rounded down to a multiple of
  `steps`) and denoise with `steps` deterministic DDIM steps t0, t0 - s, ..., s (s = t0 /
  steps, alphas of the diffusers DDIMScheduler); the last step's predicted x_0 is the
  reconstruction. Each (image, seed) noise comes from its own generator seeded by
  (seed, image key, k), so the result does not depend on batching or chunking.
* `train_steps`: the DDPM epsilon-prediction loop with EMA weights, resumable;
  `save_model` / `load_model`: a diffusers directory (any local diffusers UNet2DModel
  directory loads); optimizer state is read with `weights_only=True`.

Images are float tensors in [-1, 1], (N, C, H, W), C = 1 (grey) or 3.
This module never imports Ray: it runs on any worker, GPU or CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

PRESETS = {
    "cpu-small": dict(resolution=64, block_out_channels=(16, 32, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "gpu": dict(resolution=128, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
}
TRAIN_TIMESTEPS = 1000


def build_unet(preset: str = "cpu-small", *, channels: int = 1, resolution: int | None = None):
    """A fresh UNet2DModel of a preset (`resolution` overrides the preset's)."""
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ValueError(f"diffusion preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = dict(PRESETS[preset])
    res = int(resolution or p.pop("resolution"))
    p.pop("resolution", None)
    levels = len(p["block_out_channels"])
    if res % (2 ** (levels - 1)):
        raise ValueError(f"diffusion resolution {res} must be a multiple of {2 ** (levels - 1)} for preset {preset!r}")
    return UNet2DModel(sample_size=res, in_channels=int(channels), out_channels=int(channels), **p)


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear")


def ddim_scheduler():
    """The DDIM sampling scheduler of the training schedule (its alphas_cumprod drive `reconstruct`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=True)


def ddim_step(e: torch.Tensor, xt: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0): (x_prev, predicted x_0) from the predicted noise e."""
    x0 = (xt - (1 - ab_t).sqrt() * e) / ab_t.sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e, x0


def start_timestep(t0_frac: float, steps: int) -> int:
    """t0 = t0_frac T rounded down to a multiple of `steps` (so that the DDIM steps are equal)."""
    if not 0.0 < t0_frac <= 1.0:
        raise ValueError(f"gsal t0 must lie in (0, 1], got {t0_frac}")
    if steps < 1:
        raise ValueError(f"gsal DDIM steps must be >= 1, got {steps}")
    t0 = int(round(t0_frac * TRAIN_TIMESTEPS)) // steps * steps
    t0 = min(t0, (TRAIN_TIMESTEPS - 1) // steps * steps)
    if t0 < steps:
        raise ValueError(f"gsal t0 = {t0_frac} T leaves fewer timesteps than the {steps} DDIM steps")
    return t0


def _noise(shape: tuple[int, ...], seed: int, key: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key) * 97 + int(k)) % (2**63 - 1))
    return torch.randn(shape, generator=g)


@torch.no_grad()
def reconstruct(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, keys: Iterable[int],
                *, k: int = 5, t0_frac: float = 0.25, steps: int = 10, seed: int = 0, batch: int = 32,
                device: str | torch.device = "cpu", autocast: str | None = None) -> torch.Tensor:
    """K DDIM reconstructions of each image.

    Args:
        denoiser: (x_t (B, C, H, W), t (B,) long) -> predicted noise (B, C, H, W); a
            UNet2DModel is wrapped by `unet_denoiser`.
        x: (N, C, H, W) float in [-1, 1].
        keys: (N,) an integer per image (its image_id): the noise seeds.
        k: seeds per image. t0_frac, steps: see the module docstring. seed: the run's seed.
        batch: (image, seed) pairs per denoiser call.
        autocast: None, "fp16" or "bf16" (CUDA autocast of the denoiser).

    Returns:
        (N, K, C, H, W) float32 on the CPU.
    """
    keys = [int(v) for v in keys]
    n = x.shape[0]
    if len(keys) != n:
        raise ValueError(f"reconstruct: {len(keys)} keys for {n} images")
    t0 = start_timestep(t0_frac, steps)
    ab = ddim_scheduler().alphas_cumprod.to(device)
    ts = list(range(t0, 0, -(t0 // steps)))
    out = torch.empty((n, k) + tuple(x.shape[1:]), dtype=torch.float32)
    pairs = [(i, j) for i in range(n) for j in range(k)]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(autocast or "", None)
    for a in range(0, len(pairs), batch):
        chunk = pairs[a : a + batch]
        x0 = torch.stack([x[i] for i, _ in chunk]).float()
        eps = torch.stack([_noise(tuple(x.shape[1:]), seed, keys[i], j) for i, j in chunk])
        xt = ab[t0].sqrt() * x0.to(device) + (1 - ab[t0]).sqrt() * eps.to(device)
        pred = xt
        for t in ts:
            tt = torch.full((len(chunk),), t, dtype=torch.long, device=device)
            if dtype is not None and torch.device(device).type == "cuda":
                with torch.autocast("cuda", dtype=dtype):
                    e = denoiser(xt, tt).float()
            else:
                e = denoiser(xt, tt).float()
            xt, pred = ddim_step(e, xt, ab[t], ab[t - t0 // steps])
        for (i, j), r in zip(chunk, pred.float().cpu()):
            out[i, j] = r
    return out


def unet_denoiser(unet) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda xt, t: unet(xt, t).sample


# --------------------------------------------------------------------------- training
@dataclass
class TrainState:
    step: int = 0
    losses: list | None = None


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def train_steps(model, ema, opt, batches: Iterable[torch.Tensor], *, state: TrainState, steps: int,
                ema_decay: float = 0.999, seed: int = 0, device: str | torch.device = "cpu",
                log: Callable[[int, float], None] | None = None) -> TrainState:
    """DDPM epsilon-prediction training until `state.step == steps` (resumes from state.step).

    The noise and timesteps of step s come from a generator seeded by (seed, s), and a sequence
    of batches is indexed by s, so a resumed run repeats an uninterrupted one.
    """
    sched = train_scheduler()
    model.train()
    losses = list(state.losses or [])
    indexable = hasattr(batches, "__getitem__") and hasattr(batches, "__len__")
    it = None if indexable else iter(batches)
    while state.step < steps:
        if indexable:  # step s trains on batches[s mod len]: a resume sees the same batches
            x0 = batches[state.step % len(batches)]
        else:
            try:
                x0 = next(it)
            except StopIteration:
                it = iter(batches)
                x0 = next(it)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + state.step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = model(xt.to(device), t.to(device)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, ema_decay)
        state.step += 1
        losses.append(float(loss.detach()))
        if log is not None:
            log(state.step, losses[-1])
    state.losses = losses
    return state


def save_model(ema, out: Path, *, model=None, opt=None, state: TrainState | None = None,
               meta: dict | None = None) -> None:
    """The EMA weights as a diffusers directory `out` (+ `training.pt` with the raw weights
    and optimizer for a resume, and `poolscout.json`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(str(out))
    if model is not None and opt is not None:
        tmp = out / "training.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": state.step if state else 0,
                    "losses": (state.losses if state else []) or []}, tmp)
        tmp.replace(out / "training.pt")
    (out / "poolscout.json").write_text(json.dumps({**(meta or {}), "step": state.step if state else None}, indent=1))


def load_model(path: Path):
    """A UNet2DModel from a local diffusers directory (a `unet/` subfolder is accepted)."""
    from diffusers import UNet2DModel

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"diffusion model directory not found: {p}")
    if not (p / "config.json").is_file() and (p / "unet" / "config.json").is_file():
        p = p / "unet"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a diffusers UNet2DModel directory (no config.json)")
    return UNet2DModel.from_pretrained(str(p), low_cpu_mem_usage=False)


def load_training(path: Path, model, opt) -> TrainState:
    """Restore raw weights, optimizer and step from `training.pt` (weights_only)."""
    f = Path(path) / "training.pt"
    blob = torch.load(f, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["opt"])
    return TrainState(step=int(blob["step"]), losses=list(blob.get("losses", [])))


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float().div(127.5).sub(1.0)


def canvas_to_model(images: np.ndarray, content_w: np.ndarray, content_h: np.ndarray, resolution: int,
                    channels: int) -> torch.Tensor:
    """Letterboxed detector canvases (N, S, S, 3) uint8 (content top-left, content_w x
    content_h) -> the model's input (N, C, R, R) in [-1, 1]: the content region resized to
    R x R (bilinear, antialiased), grey = the channel mean."""
    out = torch.zeros((len(images), int(channels), resolution, resolution))
    for i in range(len(images)):
        w, h = int(content_w[i]), int(content_h[i])
        if w <= 0 or h <= 0:
            continue
        im = torch.from_numpy(np.ascontiguousarray(images[i, :h, :w])).permute(2, 0, 1).float()[None]
        im = torch.nn.functional.interpolate(im, size=(resolution, resolution), mode="bilinear", antialias=True,
                                             align_corners=False)[0]
        if channels == 1:
            im = im.mean(0, keepdim=True)
        out[i] = im.div(127.5).sub(1.0).clamp(-1.0, 1.0)
    return out


class DiffusionScorer:
    """The diffusion stage of scoring: D and V maps of the pool images of a decoded batch.

    Called on the decode stage's numpy batch (image = detector canvas); returns the batch
    with "gsal_maps" (N, 2, R, R) float32 added: D and V of each pool image that decoded,
    NaN for the other rows (labeled images, errors). No Ray import: a Ray Data actor or the
    local executor holds one.
    """

    def __init__(self, model_dir: str, *, channels: int = 1, k: int = 5, t0: float = 0.25, steps: int = 10,
                 seed: int = 0, batch: int = 32, autocast: str = "none", threads: int = 0,
                 cache_dir: str | None = None):
        if threads:
            torch.set_num_threads(int(threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.unet = load_model(Path(model_dir)).to(self.device).eval()
        self.resolution = int(self.unet.config.sample_size)
        self.channels = int(self.unet.config.in_channels)
        if self.channels != int(channels):
            raise ValueError(f"{model_dir}: the diffusion model takes {self.channels} channels, gsal.channels "
                             f"asks for {channels}")
        self.k, self.t0, self.steps, self.seed, self.batch = int(k), float(t0), int(steps), int(seed), int(batch)
        self.autocast = None if autocast == "none" else autocast
        self.cache = MapCache(Path(cache_dir)) if cache_dir else None

    def maps(self, x: torch.Tensor, keys) -> np.ndarray:
        from poolscout.engine.methods.gsal import difficulty_maps

        rec = reconstruct(unet_denoiser(self.unet), x, keys, k=self.k, t0_frac=self.t0, steps=self.steps,
                          seed=self.seed, batch=self.batch, device=self.device, autocast=self.autocast)
        d, v = difficulty_maps(x.numpy(), rec.numpy())
        return np.stack([d, v], axis=1).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        r = self.resolution
        out = np.full((n, 2, r, r), np.nan, np.float32)
        ok = (np.asarray(batch["error"], dtype=object) == "") & (np.asarray(batch["state"]) == "pool")
        idx = np.flatnonzero(ok)
        if self.cache is not None and len(idx):
            found, maps = self.cache.get(np.asarray(batch["image_id"])[idx], r)
            out[idx[found]] = maps
            idx = idx[~found]
        if len(idx):
            x = canvas_to_model(batch["image"][idx], batch["content_w"][idx], batch["content_h"][idx], r,
                                self.channels)
            out[idx] = self.maps(x, batch["image_id"][idx])
            if self.cache is not None:
                self.cache.put(np.asarray(batch["image_id"])[idx], out[idx])
        return {**batch, "gsal_maps": out}


class MapCache:
    """D / V maps of images already scored with the same diffusion model and settings: Arrow
    IPC parts (image_id, maps float32 flattened) in one folder per (model, settings) digest.
    The maps of an image never change with the cycle, so only the first scoring of a run
    pays for the diffusion stage. Parts are written atomically; concurrent writers (Ray
    actors) write different parts; an image found in two parts has the same maps in both."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index: dict[int, tuple[Path, int]] | None = None
        self.tables: dict[Path, object] = {}

    def _load_index(self) -> dict[int, tuple[Path, int]]:
        import pyarrow as pa

        if self.index is None:
            self.index = {}
            for f in sorted(self.root.glob("part-*.arrow")) if self.root.is_dir() else []:
                try:
                    t = pa.ipc.open_file(pa.memory_map(str(f), "r")).read_all()
                except (OSError, pa.ArrowInvalid):
                    continue  # a part that is not whole: its images are computed again
                self.tables[f] = t
                for row, iid in enumerate(t["image_id"].to_numpy().tolist()):
                    self.index[int(iid)] = (f, row)
        return self.index

    def get(self, ids: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(found (n,) bool, maps (found.sum(), 2, r, r) float32) for these image ids (maps of
        another resolution count as missing)."""
        index = self._load_index()
        found = np.zeros(len(ids), dtype=bool)
        maps = []
        for j, iid in enumerate(np.asarray(ids).tolist()):
            hit = index.get(int(iid))
            if hit is None:
                continue
            flat = self.tables[hit[0]]["maps"][hit[1]].values.to_numpy(zero_copy_only=False)
            if flat.size == 2 * r * r:
                found[j] = True
                maps.append(flat.reshape(2, r, r))
        return found, (np.stack(maps).astype(np.float32) if maps else np.zeros((0, 2, r, r), np.float32))

    def put(self, ids: np.ndarray, maps: np.ndarray) -> None:
        import os
        import uuid

        import pyarrow as pa

        self.root.mkdir(parents=True, exist_ok=True)
        flat = np.ascontiguousarray(maps, dtype=np.float32).reshape(len(maps), -1)
        t = pa.table({"image_id": pa.array(np.asarray(ids, dtype=np.int64)),
                      "maps": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])})
        name = f"part-{uuid.uuid4().hex}.arrow"
        tmp = self.root / f".{name}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
        os.replace(tmp, self.root / name)
        index = self._load_index()
        f = self.root / name
        self.tables[f] = t
        for row, iid in enumerate(np.asarray(ids).tolist()):
            index[int(iid)] = (f, row)


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


__all__ = ["PRESETS", "DiffusionScorer", "MapCache", "TrainState", "canvas_to_model", "build_unet",
           "ddim_scheduler", "ddim_step", "ema_update", "load_model", "load_training", "parameter_count",
           "reconstruct", "save_model", "start_timestep", "to_model_range", "train_scheduler", "train_steps",
           "unet_denoiser"]
