"""Plain-torch detector training: dataset, collate, optimizer and the epoch loop.

The Ray Train job (jobs/) wraps these; nothing here knows about Ray. Images are decoded
and letterboxed to `input_size x input_size` exactly as at inference (engine.images), so
train and test see the same geometry, and targets are in canvas pixels.
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from poolscout.engine.core.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class DetectionDataset(torch.utils.data.Dataset):
    """Labeled images as letterboxed canvases with canvas-pixel targets.

    Args:
        items: dicts with "image_id", "uri", "width", "height" (original pixels).
        boxes: image_id -> (n, 4) float32 x1, y1, x2, y2 in original pixels; an image
            without an entry is a negative (no boxes).
        labels: image_id -> (n,) int64 in 1..C.
        input_size: canvas side S.
        max_pixels: decompression-bomb limit passed to `engine.images.decode`.
        hflip_prob: probability of mirroring the image region (and its boxes).
        seed: the flip of item i in epoch e is drawn from RNG(seed, e, i), so runs repeat.
        root: the images root recorded at init; a file outside it (a symlink swapped in) or
            of another size than the item's is skipped like one that does not decode.

    Items:
        (image (3, S, S) float32 in [0, 1], {"boxes": (n, 4) float32 canvas pixels,
        "labels": (n,) int64, "image_id": int}).
    """

    def __init__(self, items: list[dict], boxes: dict[int, np.ndarray], labels: dict[int, np.ndarray],
                 input_size: int, max_pixels: int, hflip_prob: float = 0.0, seed: int = 0,
                 root: str | None = None):
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.items = list(items)
        self.boxes = boxes
        self.labels = labels
        self.input_size = int(input_size)
        self.max_pixels = int(max_pixels)
        self.hflip_prob = float(hflip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.root = root  # images root: files must lie inside it and keep the manifest's size
        # image_id -> (uri, reason) of images that failed to decode: skipped from then on
        self.failed: dict[int, tuple[str, str]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch` (call before iterating the loader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def flips(self, index: int) -> bool:
        """Whether item `index` is mirrored in the current epoch."""
        if self.hflip_prob <= 0:
            return False
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return bool(rng.random() < self.hflip_prob)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """The item, or None for an image that does not decode (recorded in `failed`; the
        collate function drops it, so training goes on without it)."""
        from poolscout.engine.data.images import ImageError, decode, letterbox

        item = self.items[index]
        iid = int(item["image_id"])
        if iid in self.failed:
            return None
        try:
            w, h = int(item.get("width") or 0), int(item.get("height") or 0)
            img = decode(item["uri"], self.max_pixels, root=self.root, expect=(w, h) if w > 0 and h > 0 else None)
        except ImageError as e:
            self.failed[iid] = (str(item["uri"]), str(e))
            return None
        h, w = img.shape[:2]
        canvas, scale = letterbox(img, self.input_size)
        s = self.input_size
        cw = min(s, max(1, int(round(w * scale))))  # the content extent, as engine.images
        ch = min(s, max(1, int(round(h * scale))))
        b = np.asarray(self.boxes.get(iid, np.zeros((0, 4), np.float32)), np.float64).reshape(-1, 4)
        lab = np.asarray(self.labels.get(iid, np.zeros(0, np.int64)), np.int64).reshape(-1)
        if len(b) != len(lab):
            raise ValueError(f"image {iid}: {len(b)} boxes but {len(lab)} labels")
        # boxes are in the item's pixels; the decoded image may differ (EXIF already applied)
        sx = scale * w / float(item.get("width") or w)
        sy = scale * h / float(item.get("height") or h)
        b = b * np.array([sx, sy, sx, sy])
        b[:, 0::2] = np.clip(b[:, 0::2], 0, cw)
        b[:, 1::2] = np.clip(b[:, 1::2], 0, ch)
        if self.flips(index):
            canvas[:ch, :cw] = canvas[:ch, :cw][:, ::-1]
            b = np.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], 1)
        ok = (b[:, 2] - b[:, 0] > 0.5) & (b[:, 3] - b[:, 1] > 0.5)  # tiny after scaling: not learnable
        image = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).float().div_(255.0)
        target = {"boxes": torch.from_numpy(b[ok].astype(np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(lab[ok]), "image_id": iid}
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict] | None]) -> tuple[list[torch.Tensor], list[dict]]:
    """List of (image, target) -> (images, targets) lists, as torchvision detectors take them;
    None items (images that failed to decode) are dropped."""
    batch = [b for b in batch if b is not None]
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def labeled_items(manifest: pa.Table, annotations: pa.Table, image_ids: np.ndarray
                  ) -> tuple[list[dict], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Dataset inputs for `image_ids` from the run's manifest and annotations tables.

    Args:
        manifest: MANIFEST_SCHEMA table (image_id, uri, width, height, ...).
        annotations: ANNOTATIONS_SCHEMA table (image_id, category_id, x1, y1, x2, y2, ...).
        image_ids: (K,) ids to train on, in the order wanted.

    Returns:
        (items in the order of `image_ids`, image_id -> (n, 4) float32 boxes,
        image_id -> (n,) int64 labels); images without annotations have no entry.

    Raises:
        KeyError: an id is not in the manifest.
    """
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    man = manifest.filter(pc.is_in(manifest["image_id"], pa.array(ids)))
    mid = man["image_id"].to_numpy()
    pos = {int(i): k for k, i in enumerate(mid)}
    missing = [int(i) for i in ids if int(i) not in pos]
    if missing:
        raise KeyError(f"image ids not in the manifest: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    uris = man["uri"].to_pylist()
    widths = man["width"].to_numpy()
    heights = man["height"].to_numpy()
    items = [{"image_id": int(i), "uri": uris[pos[int(i)]], "width": int(widths[pos[int(i)]]),
              "height": int(heights[pos[int(i)]])} for i in ids]
    ann = annotations.filter(pc.is_in(annotations["image_id"], pa.array(ids)))
    boxes: dict[int, np.ndarray] = {}
    labels: dict[int, np.ndarray] = {}
    if ann.num_rows:
        aid = ann["image_id"].to_numpy()
        xyxy = np.stack([ann[c].to_numpy().astype(np.float32) for c in ("x1", "y1", "x2", "y2")], 1)
        cat = ann["category_id"].to_numpy().astype(np.int64)
        order = np.argsort(aid, kind="stable")
        aid, xyxy, cat = aid[order], xyxy[order], cat[order]
        uniq, start = np.unique(aid, return_index=True)
        end = np.append(start[1:], len(aid))
        for i, a, b in zip(uniq, start, end):
            boxes[int(i)] = xyxy[a:b]
            labels[int(i)] = cat[a:b]
    return items, boxes, labels


def _is_no_decay(name: str, param: torch.Tensor, norm_params: set[int]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or id(param) in norm_params


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over trainable parameters; no weight decay on norm layers and biases.

    Returns:
        An optimizer with two parameter groups ("decay", "no_decay"), each with
        `initial_lr = cfg.lr` (the schedule scales it).
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _is_no_decay(name, p, norm_params) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)
    for g in opt.param_groups:
        g["initial_lr"] = cfg.lr
    return opt


def lr_factor(it: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at iteration `it` (0-based) of `total`.

    Linear warmup from 1/warmup to 1 over the first `warmup` iterations, then cosine decay
    from 1 to 0 at iteration `total`.
    """
    if warmup > 0 and it < warmup:
        return (it + 1) / warmup
    span = max(1, total - warmup)
    t = min(max(it - warmup, 0), span)
    return 0.5 * (1.0 + math.cos(math.pi * t / span))


class WarmupWarning(UserWarning):
    """train.warmup_iters is longer than the training run it belongs to."""


def warmup_warning(cfg: TrainConfig, iters_per_epoch: int) -> str | None:
    """The one-line warning when the warmup outlasts the run's `cfg.epochs * iters_per_epoch`
    iterations (the learning rate then never reaches cfg.lr), else None."""
    total = cfg.epochs * iters_per_epoch
    if cfg.warmup_iters <= total:
        return None
    return (f"train.warmup_iters={cfg.warmup_iters} is longer than this training run's {total} iterations "
            f"({cfg.epochs} epochs x {iters_per_epoch} batches per epoch, train.batch_size={cfg.batch_size}): the learning "
            f"rate never reaches train.lr={cfg.lr:g}; lower train.warmup_iters")


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def train_epochs(model: nn.Module, loader: torch.utils.data.DataLoader, cfg: TrainConfig, device: Any = "cpu", *,
                 start_epoch: int = 0, on_epoch: Callable[[dict], Any] | None = None, progress: bool = True,
                 log: Callable[[str], Any] = print, optimizer: torch.optim.Optimizer | None = None,
                 max_grad_norm: float | None = 10.0, desc: str = "train") -> list[dict]:
    """Train for epochs `start_epoch .. cfg.epochs - 1`.

    The learning rate follows `lr_factor` per iteration over all `cfg.epochs * len(loader)`
    iterations (so a resumed run continues the same schedule).

    The loss switches of `cfg` (emphasis_loss, eiou_loss, aware_loss, loss_lambda,
    quality_momentum) are applied first with `engine.roi_heads.configure_detector_losses`;
    the loss minimised is sum_k w_k L_k over the model's loss dict, w_k from the model's
    `poolscout_loss_weights` (default 1; with loss_lambda the RPN terms get 1 - lambda).

    Args:
        model: a torchvision detector (train mode is set here).
        loader: yields `collate` batches; its dataset's `set_epoch` is called when it has one.
        cfg: epochs, lr, momentum, weight decay, warmup_iters.
        device: where to train.
        start_epoch: first epoch to run (resume).
        on_epoch: called with each epoch's record after the epoch (checkpointing, reports).
        progress: one tqdm bar on stderr over all epochs, counted in images.
        desc: the bar's label.
        log: receives one summary line per epoch.
        optimizer: reuse an optimizer (resume); default `make_optimizer(model, cfg)`.
        max_grad_norm: clip the global gradient norm to this (None: no clipping); a guard
            against the loss spikes of small detection batches.

    Returns:
        One record per epoch run: {"epoch", "loss", "loss_<component>" (means over the
        epoch's iterations of the weighted terms w_k L_k, so they sum to "loss"), "images",
        "seconds", "lr"}.

    Warns:
        WarmupWarning: once, at the start (not on resume), when cfg.warmup_iters exceeds
            the run's iterations (see `warmup_warning`).

    Raises:
        FloatingPointError: a non-finite loss, naming the epoch, iteration and image ids.
        ValueError: loss switches the detector does not support (see configure_detector_losses).
    """
    from poolscout.engine.models.roi_heads import configure_detector_losses

    loss_weights = configure_detector_losses(model, cfg)
    dev = torch.device(device)
    model.to(dev)
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    iters_per_epoch = len(loader)
    total = cfg.epochs * iters_per_epoch
    msg = warmup_warning(cfg, iters_per_epoch) if start_epoch == 0 else None
    if msg:
        warnings.warn(msg, WarmupWarning, stacklevel=2)
    dataset = getattr(loader, "dataset", None)
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        per_epoch = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else iters_per_epoch
        bar = tqdm(total=(cfg.epochs - start_epoch) * per_epoch, desc=desc, unit="img", file=sys.stderr,
                   leave=False, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        n_iter = n_img = 0
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        for it, (images, targets) in enumerate(loader):
            if not images:  # every image of the batch failed to decode
                continue
            lr = cfg.lr * lr_factor(epoch * iters_per_epoch + it, total, cfg.warmup_iters)
            for g in opt.param_groups:
                g["lr"] = lr
            images, targets = _to_device(images, targets, dev)
            losses = model(images, targets)
            if loss_weights:
                losses = {k: (v * loss_weights[k] if k in loss_weights else v) for k, v in losses.items()}
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                ids = [t.get("image_id") for t in targets]
                parts = {k: float(v.detach()) for k, v in losses.items()}
                if bar is not None:
                    bar.close()
                raise FloatingPointError(f"non-finite loss {float(loss.detach())} at epoch {epoch} iteration {it} "
                                         f"(components {parts}); batch image ids {ids}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_grad_norm)
            opt.step()
            n_iter += 1
            n_img += len(images)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in losses.items():
                key = k if k.startswith("loss_") else f"loss_{k}"
                sums[key] = sums.get(key, 0.0) + float(v.detach())
            if bar is not None:
                bar.update(len(images))
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{sums['loss'] / n_iter:.3f}", refresh=False)
        rec: dict[str, Any] = {"epoch": epoch}
        rec.update({k: v / max(1, n_iter) for k, v in sums.items()})
        rec.setdefault("loss", float("nan"))
        rec.update({"images": n_img, "seconds": time.perf_counter() - t0, "lr": lr})
        history.append(rec)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f} ({n_img} images, {rec['seconds']:.1f} s)")
        if on_epoch is not None:
            on_epoch(rec)
    if bar is not None:
        bar.close()
    return history


def fit_detector(spec: dict, *, rank: int = 0, device: Any = "cpu",
                 prepare_loader: Callable[[Any], Any] | None = None,
                 prepare_model: Callable[[nn.Module], nn.Module] | None = None,
                 progress: bool = True, log: Callable[[str], Any] = print,
                 resume: dict | None = None,
                 on_epoch: Callable[[dict, nn.Module, torch.optim.Optimizer, list[dict]], Any] | None = None
                 ) -> tuple[nn.Module, list[dict]]:
    """Build (or warm-start) a detector and train it on a run's labeled images.

    One function for both executors: Ray Train's workers call it with their
    `prepare_*` hooks, the local executor calls it in-process.

    Args:
        spec: {"train": TrainConfig dict, "detector": DetectorConfig dict, "seed", "manifest"
            (path), "annotations" (path), "labeled_ids", "num_classes", "max_pixels",
            "warm_start" (checkpoint path or None), optional "pseudo" (a pseudo-label table
            in the annotations' columns: its images are trained on too)}.
        rank: worker rank (seeds differ per rank).
        device: where to train.
        resume: a training interrupted after some epochs, {"model": state_dict, "optimizer":
            state_dict, "epoch": the next epoch, "history": the records so far} (Ray Train's
            restart after a lost worker): training goes on from there.
        on_epoch: called after every epoch with (its record, the model, the optimizer, the
            history so far), e.g. to checkpoint.

    Returns:
        (the trained model, the per-epoch history).
    """
    import pyarrow.parquet as pq

    from poolscout.engine.core.config import DetectorConfig, _merge_into
    from poolscout.engine.models.detectors import build_detector, load_checkpoint

    tcfg = _merge_into(TrainConfig, TrainConfig(), spec["train"], "train.", "run.yaml")
    dcfg = _merge_into(DetectorConfig, DetectorConfig(), spec["detector"], "detector.", "run.yaml")
    seed_everything(int(spec["seed"]) + rank)
    manifest = pq.read_table(spec["manifest"])
    annotations = pq.read_table(spec["annotations"])
    ids = np.asarray(spec["labeled_ids"], dtype=np.int64)
    items, boxes, labels = labeled_items(manifest, annotations, ids)
    if spec.get("pseudo"):  # auto-labeling: pool images with the previous model's confident boxes
        pseudo = pq.read_table(spec["pseudo"])
        pids = np.setdiff1d(np.unique(pseudo["image_id"].to_numpy()), ids)
        p_items, p_boxes, p_labels = labeled_items(manifest, pseudo, pids)
        items += p_items
        boxes.update(p_boxes)
        labels.update(p_labels)
    ds = DetectionDataset(items, boxes, labels, dcfg.input_size, spec["max_pixels"],
                          hflip_prob=tcfg.hflip_prob, seed=int(spec["seed"]), root=spec.get("images_root"))
    loader = torch.utils.data.DataLoader(ds, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=0, generator=torch.Generator().manual_seed(int(spec["seed"])))
    if prepare_loader is not None:
        loader = prepare_loader(loader)
    if spec.get("warm_start"):
        model, _ = load_checkpoint(spec["warm_start"])
        if tcfg.warm_epochs or tcfg.warm_lr:
            import dataclasses

            tcfg = dataclasses.replace(tcfg, epochs=tcfg.warm_epochs or tcfg.epochs, lr=tcfg.warm_lr or tcfg.lr)
    else:
        model = build_detector(dcfg, int(spec["num_classes"]), load_pretrained=True)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.train()
    if prepare_model is not None:
        model = prepare_model(model)
    opt = make_optimizer(model, tcfg)
    start, done = 0, []
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        start, done = int(resume["epoch"]), list(resume.get("history", []))
        log(f"resuming at epoch {start + 1}/{tcfg.epochs} from a checkpoint")
    history = list(done)
    hook = None
    if on_epoch is not None:
        def hook(rec):
            history.append(rec)
            on_epoch(rec, model, opt, history)
    with warnings.catch_warnings():
        if rank != 0:  # one warning per training, not one per Ray Train worker
            warnings.simplefilter("ignore", WarmupWarning)
        ran = train_epochs(model, loader, tcfg, device, progress=progress, log=log, desc=spec.get("desc", "train"),
                           start_epoch=start, optimizer=opt, on_epoch=hook)
    history = done + ran
    if ds.failed:
        if len(ds.failed) == len(ds):
            uri, why = next(iter(ds.failed.values()))
            raise RuntimeError(f"none of the {len(ds)} labeled images decodes; the first: {uri}: {why}")
        for rec in history[-1:]:
            rec["skipped"] = [{"image_id": i, "uri": u, "reason": r} for i, (u, r) in sorted(ds.failed.items())]
        for i, (u, r) in sorted(ds.failed.items()):
            log(f"skipped {u}: {r}")
    return model, history
