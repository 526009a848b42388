"""Per-pixel diffusion features for segmentation (docs/methods.md section 5), and the
pixel head that classifies them.

Features: a frozen diffusers UNet2DModel (the in-domain model of GSAL, `poolscout diffusion
train`, or any local diffusers directory). The image is resized to the model's R x R and
scaled to [-1, 1]; for each timestep t in `timesteps` (50, 150, 250 of T = 1000, the
training schedule's linear betas) it is noised with a fixed noise eps_k,
x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps_k, and denoised once; the outputs of the decoder
blocks (`blocks`, default all up blocks) are sampled bilinearly at the requested pixels
(pixel centres of the original image mapped onto the block's grid: the same as upsampling
the block to the image size, then reading the pixel, without the d x H x W tensor),
concatenated over blocks and timesteps, and L2-normalised per pixel. Noise k = 0 is the
base noise (training, prediction, stage 1); k = 1..K are the K fixed noises of eDALD's MI.
The noises are fixed per (seed, k) and shared by every image, as in the authors' code.

Head: an MLP d -> 128 -> 32 -> C (ReLU), cross-entropy on the labeled pixels. No Ray here:
jobs/ runs these in Ray Data actors and Ray Train workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from poolscout.engine.models.diffusion import TRAIN_TIMESTEPS, ddim_scheduler, load_model

TIMESTEPS = (50, 150, 250)


def fixed_noise(shape: tuple[int, ...], seed: int, k: int) -> torch.Tensor:
    """Noise k of the run (the same for every image)."""
    g = torch.Generator().manual_seed((int(seed) * 7_919 + int(k) * 104_729 + 12_345) % (2**63 - 1))
    return torch.randn(shape, generator=g)


def image_to_model(img: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """One uint8 image (H, W) or (H, W, 3) -> (C, R, R) in [-1, 1] (bilinear, antialiased;
    grey = the channel mean)."""
    a = np.array(img)  # a writable copy: torch refuses read-only arrays
    if a.ndim == 2:
        a = a[..., None]
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None]
    t = torch.nn.functional.interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    if channels == 1 and t.shape[0] != 1:
        t = t.mean(0, keepdim=True)
    elif channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.div(127.5).sub(1.0).clamp(-1.0, 1.0)


def grid_coords(x: np.ndarray, y: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Pixel indices (x column, y row) of a W x H image -> grid_sample coordinates (P, 2) in
    [-1, 1] (pixel centres, align_corners=False)."""
    gx = (np.asarray(x, np.float64) + 0.5) / float(width) * 2.0 - 1.0
    gy = (np.asarray(y, np.float64) + 0.5) / float(height) * 2.0 - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=1)).float()


class UNetFeatures:
    """Pixel features of a frozen UNet2DModel (see the module docstring).

    Args:
        model: a UNet2DModel, or the path of a local diffusers directory.
        timesteps: the noise levels (of T = 1000).
        blocks: indices of `model.up_blocks` to read (None: all).
        seed: the run's seed (the fixed noises).
        device: "cpu", "cuda" or None (CUDA when available).
    """

    def __init__(self, model, *, timesteps: Sequence[int] = TIMESTEPS, blocks: Sequence[int] | None = None,
                 seed: int = 0, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.unet = (load_model(Path(model)) if isinstance(model, (str, Path)) else model).to(self.device).eval()
        for p in self.unet.parameters():
            p.requires_grad_(False)
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or any(not 0 <= t < TRAIN_TIMESTEPS for t in self.timesteps):
            raise ValueError(f"feature timesteps must lie in 0..{TRAIN_TIMESTEPS - 1}, got {list(timesteps)}")
        n_up = len(self.unet.up_blocks)
        self.blocks = list(range(n_up)) if blocks is None else [int(b) for b in blocks]
        if not self.blocks or any(not 0 <= b < n_up for b in self.blocks):
            raise ValueError(f"feature blocks must be indices of the {n_up} up blocks, got {list(blocks or [])}")
        self.resolution = int(self.unet.config.sample_size)
        self.channels = int(self.unet.config.in_channels)
        self.seed = int(seed)
        self._ab = ddim_scheduler().alphas_cumprod.to(self.device)
        self._noises: dict[int, torch.Tensor] = {}
        ch = [int(self.unet.up_blocks[b].resnets[-1].conv2.out_channels) for b in self.blocks]
        self.dim = sum(ch) * len(self.timesteps)

    def noise(self, k: int) -> torch.Tensor:
        if k not in self._noises:
            self._noises[k] = fixed_noise((self.channels, self.resolution, self.resolution), self.seed, k).to(self.device)
        return self._noises[k]

    @torch.no_grad()
    def maps(self, x: torch.Tensor, k: int = 0) -> list[torch.Tensor]:
        """The decoder blocks' outputs for a batch (N, C, R, R) at noise k: one (N, C_b, h, w)
        tensor per (timestep, block), in that order. A few MB an image at R = 64."""
        n = x.shape[0]
        x = x.to(self.device).float()
        eps = self.noise(int(k))[None].expand(n, -1, -1, -1)
        out: list[torch.Tensor] = []
        caught: list[torch.Tensor] = []
        hooks = [self.unet.up_blocks[b].register_forward_hook(lambda m, a, o: caught.append(o)) for b in self.blocks]
        try:
            for t in self.timesteps:
                ab = self._ab[t]
                caught.clear()
                self.unet(ab.sqrt() * x + (1 - ab).sqrt() * eps, torch.full((n,), t, dtype=torch.long,
                                                                             device=self.device))
                out += [m.float() for m in caught]
        finally:
            for h in hooks:
                h.remove()
        return out

    @torch.no_grad()
    def sample(self, maps: list[torch.Tensor], coords: Sequence[torch.Tensor], rows: Sequence[int] | None = None
               ) -> list[np.ndarray]:
        """Features of pixels from `maps`: coords[j] (P_j, 2) belong to batch row rows[j]
        (default j). Returns float32 (P_j, dim) arrays with L2-normalised rows."""
        rows = list(range(len(coords))) if rows is None else [int(r) for r in rows]
        out = []
        for r, c in zip(rows, coords):
            if len(c) == 0:
                out.append(np.zeros((0, self.dim), np.float32))
                continue
            grid = c.to(self.device).float()[None, None]  # (1, 1, P, 2)
            parts = [torch.nn.functional.grid_sample(m[r : r + 1], grid, mode="bilinear", padding_mode="border",
                                                     align_corners=False)[0, :, 0, :] for m in maps]
            f = torch.nn.functional.normalize(torch.cat(parts, dim=0).T, dim=1)
            out.append(f.cpu().numpy().astype(np.float32))
        return out

    def __call__(self, x: torch.Tensor, coords: Sequence[torch.Tensor], k: int = 0) -> list[np.ndarray]:
        """Features of the requested pixels of a batch.

        Args:
            x: (N, C, R, R) images in [-1, 1] (`image_to_model`).
            coords: N tensors (P_i, 2) of grid coordinates (`grid_coords`).
            k: the noise (0 = base).

        Returns:
            N float32 arrays (P_i, dim), L2-normalised rows.
        """
        if len(coords) != x.shape[0]:
            raise ValueError(f"{len(coords)} coordinate sets for {x.shape[0]} images")
        return self.sample(self.maps(x, k), coords)


# --------------------------------------------------------------------------- head
class PixelHead(torch.nn.Module):
    """MLP d -> 128 -> 32 -> C (ReLU)."""

    def __init__(self, dim: int, num_classes: int, hidden: Sequence[int] = (128, 32)):
        super().__init__()
        layers: list[torch.nn.Module] = []
        d = int(dim)
        for h in hidden:
            layers += [torch.nn.Linear(d, int(h)), torch.nn.ReLU()]
            d = int(h)
        layers.append(torch.nn.Linear(d, int(num_classes)))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_head(feats: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int = 50, lr: float = 1e-3,
               batch: int = 256, weight_decay: float = 1e-4, hidden: Sequence[int] = (128, 32), seed: int = 0,
               class_weights: str = "sqrt") -> tuple[PixelHead, list[float]]:
    """Fit a PixelHead on labeled pixels (Adam, cross-entropy). Deterministic for a seed on
    the CPU.

    `class_weights` weighs the labeled classes: "sqrt" (default) by 1 / sqrt(count), "inverse"
    by 1 / count, "none" equally; weights are scaled so the labeled pixels' mean weight is 1.
    Inverse weights hurt at pixel budgets where a class has one or two labeled pixels: on
    Magnetic Tile (100 random pixels, 96 of them background) a single Break or Fray pixel
    weighed 96x a background one and the head painted defect classes over 29% of the test
    pixels (84% after 500 labels); sqrt keeps rare classes in the loss without that
    (benchmarks/pixel_efficiency.py, README).

    Returns:
        (the head in eval mode, the mean loss of each epoch).
    """
    x = torch.from_numpy(np.ascontiguousarray(feats, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need one label per feature row and at least one row, got {len(x)} and {len(y)}")
    if (y < 0).any() or (y >= num_classes).any():
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    head = PixelHead(x.shape[1], num_classes, hidden)
    w = class_weight_vector(y.numpy(), num_classes, class_weights)
    w = None if w is None else torch.from_numpy(w)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    head.train()
    for _ in range(int(epochs)):
        perm = torch.randperm(len(x), generator=g)
        tot, m = 0.0, 0
        for a in range(0, len(x), int(batch)):
            idx = perm[a : a + int(batch)]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            m += len(idx)
        losses.append(tot / m)
    return head.eval(), losses


CLASS_WEIGHTS = ("sqrt", "inverse", "none")


def class_weight_vector(labels: np.ndarray, num_classes: int, mode: str = "sqrt") -> np.ndarray | None:
    """(C,) float32 cross-entropy weights of `mode` (see `train_head`) for these labels, 0 for
    classes without a label, scaled to a mean weight of 1 over the labeled pixels; None for
    "none"."""
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"class weights must be one of {CLASS_WEIGHTS}, got {mode!r}")
    if mode == "none":
        return None
    cnt = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    have = cnt > 0
    w = np.zeros(num_classes)
    w[have] = 1.0 / (np.sqrt(cnt[have]) if mode == "sqrt" else cnt[have])
    w *= cnt.sum() / max(float((w * cnt).sum()), 1e-12)
    return w.astype(np.float32)


@torch.no_grad()
def predict_proba(head: torch.nn.Module, feats: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(P, C) softmax probabilities, float32."""
    x = np.ascontiguousarray(feats, np.float32)
    out = [torch.softmax(head(torch.from_numpy(x[a : a + chunk])), dim=1).numpy() for a in range(0, len(x), chunk)]
    return np.concatenate(out) if out else np.zeros((0, head.net[-1].out_features), np.float32)


# --------------------------------------------------------------------------- metrics
def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; `ignore` pixels skipped."""
    p, g = np.asarray(pred).reshape(-1).astype(np.int64), np.asarray(gt).reshape(-1).astype(np.int64)
    keep = g != ignore
    p, g = p[keep], g[keep]
    if len(g) and (g.max() >= num_classes or p.max() >= num_classes or min(g.min(), p.min()) < 0):
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> tuple[float, list[float | None]]:
    """(mIoU over the classes present in ground truth or prediction, per-class IoU (None
    where a class is in neither))."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    per = [float(tp[c] / denom[c]) if denom[c] > 0 else None for c in range(len(conf))]
    vals = [v for v in per if v is not None]
    return (float(np.mean(vals)) if vals else 0.0), per


__all__ = ["CLASS_WEIGHTS", "PixelHead", "TIMESTEPS", "UNetFeatures", "class_weight_vector", "confusion", "fixed_noise",
           "grid_coords", "image_to_model", "iou_from_confusion", "predict_proba", "train_head"]
