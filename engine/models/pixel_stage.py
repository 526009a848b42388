"""The per-image work of a segmentation round, as one callable on a batch of manifest rows
(a Ray Data actor in jobs/segment.py, or called in-process by the local executor).

Modes:
* "candidates": N_c random unlabeled pixels of each pool image (seeded by the run's seed,
  the round and the image id); their base-noise features; stage 1a (local MaxHerding, b
  picks, their features returned as float16); with a head, the head's probabilities at the
  base noise and at the K fixed noises -> entropy, MI and eDALD of every candidate.
* "pixels": the base-noise features of requested pixels (newly labeled ones: the head's
  training set).
* "eval": the head's prediction at every pixel of a test image (at most `eval_max_side` on
  the longer side, nearest-neighbour grid on the mask) -> the image's confusion matrix.

Per-image output rows hold variable-length lists; nothing of size d x H x W leaves a call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from poolscout.engine.data.images import decode
from poolscout.engine.methods import edald as E
from poolscout.engine.models import pixel_features as F

MODES = ("candidates", "pixels", "eval")


def candidate_pixels(width: int, height: int, n: int, *, seed: int, round_: int, image_id: int,
                     exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """N_c distinct random pixels (x, y) of a W x H image, none of `exclude` (flat indices
    y * W + x), seeded by (seed, round, image id): the same on any worker."""
    total = int(width) * int(height)
    rng = np.random.default_rng([int(seed), int(round_), int(image_id) & 0x7FFFFFFFFFFFFFFF])
    ex = np.unique(np.asarray(exclude if exclude is not None else [], np.int64))
    avail = total - len(ex)
    k = min(int(n), avail)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(ex) == 0:
        flat = rng.choice(total, size=k, replace=False)
    else:  # draw among the allowed indices: rank r -> the r-th index not excluded
        ranks = np.sort(rng.choice(avail, size=k, replace=False))
        flat = ranks + np.searchsorted(ex - np.arange(len(ex)), ranks, side="right")
        flat = rng.permutation(flat)
    return flat % int(width), flat // int(width)


# what a candidate pass can compute, for the strategies that read it (jobs.segment.READS)
READS = ("features", "head", "noises", "local")


def eval_grid(width: int, height: int, max_side: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation grid of an image: at most `max_side` cells on the longer side (0 = one
    per pixel), each cell's centre in image pixels (x, y), row by row."""
    w, h = int(width), int(height)
    s = 1.0 if not max_side or max(w, h) <= max_side else max_side / max(w, h)
    gw, gh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    gx, gy = np.meshgrid(np.arange(gw), np.arange(gh))
    px = np.minimum(((gx.reshape(-1) + 0.5) / gw * w).astype(np.int64), w - 1)
    py = np.minimum(((gy.reshape(-1) + 0.5) / gh * h).astype(np.int64), h - 1)
    return px, py


def _as_list(v) -> np.ndarray:
    return np.asarray(v if v is not None else [], np.int64)


class PixelStage:
    """See the module docstring.

    Args:
        model_dir: the diffusion model (a local diffusers directory).
        mode: "candidates", "pixels" or "eval".
        num_classes: C including background (class ids 0..C-1).
        head: a state_dict path of the PixelHead (needed by "eval", optional for
            "candidates"), or None.
        timesteps, blocks: of the features. noises: K (eDALD's MI).
        candidates: N_c per image. local_budget: b. round_: the round (candidate seeds).
        images_root: every image must lie inside it. max_pixels: decode limit.
        eval_max_side: "eval" at most this many pixels on the longer side (0 = full size).
        threads: torch threads (0 = torch's default).
        reads: "candidates": what the strategy will read, a subset of READS ("features",
            "head", "noises", "local"); None = everything. Nothing read (random) costs no
            UNet pass; no "noises" skips the K extra passes (MI and eDALD stay NaN); no
            "local" skips local herding. What is not computed is NaN / empty, never a guess.
    """

    def __init__(self, model_dir: str, *, mode: str, num_classes: int, head: str | None = None,
                 timesteps: Sequence[int] = F.TIMESTEPS, blocks: Sequence[int] | None = None, noises: int = 5,
                 candidates: int = 1000, local_budget: int = 20, round_: int = 0, seed: int = 0,
                 images_root: str | None = None, max_pixels: int = 64_000_000, eval_max_side: int = 0,
                 batch_pixels: int = 65536, knn_k: int = 64, threads: int = 0, mask_format: str = "ids",
                 mask_threshold: int = 127, reads: Sequence[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"pixel stage mode must be one of {MODES}, got {mode!r}")
        bad = set(reads or ()) - set(READS)
        if bad:
            raise ValueError(f"pixel stage reads: unknown {sorted(bad)} (known: {', '.join(READS)})")
        self.reads = set(READS if reads is None else reads)
        if threads:
            torch.set_num_threads(int(threads))
        self.mode, self.num_classes = mode, int(num_classes)
        self.features = F.UNetFeatures(model_dir, timesteps=timesteps, blocks=blocks or None, seed=seed)
        self.head = None
        if head:
            self.head = F.PixelHead(self.features.dim, self.num_classes)
            self.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
            self.head.eval()
        if mode == "eval" and self.head is None:
            raise ValueError("pixel stage: eval needs a head")
        self.noises, self.candidates, self.local_budget = int(noises), int(candidates), int(local_budget)
        self.round, self.seed = int(round_), int(seed)
        self.images_root, self.max_pixels = images_root, int(max_pixels)
        self.eval_max_side, self.batch_pixels, self.knn_k = int(eval_max_side), int(batch_pixels), int(knn_k)
        self.mask_format, self.mask_threshold = mask_format, int(mask_threshold)

    # ------------------------------------------------------------------ helpers
    def _image(self, uri: str, w: int, h: int) -> torch.Tensor:
        img = decode(uri, self.max_pixels, root=self.images_root, expect=(int(w), int(h)))
        return F.image_to_model(img, self.features.resolution, self.features.channels)

    def _sample(self, maps, j: int, xs: np.ndarray, ys: np.ndarray, w: int, h: int) -> np.ndarray:
        """Features of pixels (xs, ys) of batch row j, `batch_pixels` at a time."""
        out = [self.features.sample(maps, [F.grid_coords(xs[a : a + self.batch_pixels], ys[a : a + self.batch_pixels],
                                                         w, h)], rows=[j])[0]
               for a in range(0, len(xs), self.batch_pixels)]
        return np.concatenate(out) if out else np.zeros((0, self.features.dim), np.float32)

    # ------------------------------------------------------------------ modes (one batch)
    def _candidates(self, rows: list[dict], X: torch.Tensor) -> list[dict]:
        pix = []
        for row in rows:
            iid, w, h = int(row["image_id"]), int(row["width"]), int(row["height"])
            lx, ly = _as_list(row.get("labeled_x")), _as_list(row.get("labeled_y"))
            pix.append(candidate_pixels(w, h, self.candidates, seed=self.seed, round_=self.round, image_id=iid,
                                        exclude=ly * w + lx))
        wh = [(int(r["width"]), int(r["height"])) for r in rows]
        reads = self.reads
        if reads & {"features", "head", "noises", "local"}:
            maps = self.features.maps(X, 0)
            f0 = [self._sample(maps, j, xs, ys, *wh[j]) for j, (xs, ys) in enumerate(pix)]
            del maps
        else:  # a strategy that reads no score (random): no UNet pass at all
            f0 = [np.zeros((len(xs), 0), np.float32) for xs, _ in pix]
        p0 = pk = None
        if self.head is not None and reads & {"head", "noises"}:
            p0 = [F.predict_proba(self.head, f) for f in f0]
            pk = [[] for _ in rows]
            for k in range(1, (self.noises if "noises" in reads else 0) + 1):
                mk = self.features.maps(X, k)
                for j, (xs, ys) in enumerate(pix):
                    pk[j].append(F.predict_proba(self.head, self._sample(mk, j, xs, ys, *wh[j])))
                del mk
        out = []
        for j, (xs, ys) in enumerate(pix):
            local = (E.local_herding(f0[j], self.local_budget, k=self.knn_k, seed=self.seed)[0]
                     if len(f0[j]) and "local" in reads else np.zeros(0, np.int64))
            nan = np.full(len(xs), np.nan, np.float32)
            ent, mi, ed = nan, nan, nan
            if p0 is not None and len(xs):
                sc = E.edald_scores(p0[j], np.stack(pk[j]) if pk[j] else p0[j][None])
                ent = sc["entropy"].astype(np.float32)
                if pk[j]:  # MI (and eDALD = H + MI) only from the K noisy passes
                    mi, ed = sc["mi"].astype(np.float32), sc["edald"].astype(np.float32)
            out.append({"cand_x": xs.astype(np.int32), "cand_y": ys.astype(np.int32), "entropy": ent, "mi": mi,
                        "edald": ed, "local_idx": local.astype(np.int32),
                        "local_feat": f0[j][local].astype(np.float16).reshape(-1)})
        return out

    def _pixels(self, rows: list[dict], X: torch.Tensor) -> list[dict]:
        maps = self.features.maps(X, 0)
        return [{"feat": self._sample(maps, j, _as_list(r.get("req_x")), _as_list(r.get("req_y")), int(r["width"]),
                                      int(r["height"])).astype(np.float16).reshape(-1)} for j, r in enumerate(rows)]

    def _eval(self, rows: list[dict], X: torch.Tensor) -> list[dict]:
        from poolscout.engine.data.segmentation import read_mask

        maps = self.features.maps(X, 0)
        out = []
        for j, row in enumerate(rows):
            w, h = int(row["width"]), int(row["height"])
            try:
                mask = read_mask(row["mask_uri"], fmt=self.mask_format, num_classes=self.num_classes - 1,
                                 mask_class=int(row.get("mask_class") or 0), threshold=self.mask_threshold,
                                 size=(w, h))
            except Exception as e:
                out.append(e)
                continue
            px, py = eval_grid(w, h, self.eval_max_side)
            pred = np.concatenate([F.predict_proba(self.head, self._sample(maps, j, px[a : a + self.batch_pixels],
                                                                           py[a : a + self.batch_pixels], w, h)
                                                   ).argmax(1) for a in range(0, len(px), self.batch_pixels)])
            out.append({"confusion": F.confusion(pred, mask[py, px], self.num_classes).reshape(-1).astype(np.int64)})
        return out

    COLUMNS = {"candidates": {"cand_x": pa.int32(), "cand_y": pa.int32(), "entropy": pa.float32(),
                              "mi": pa.float32(), "edald": pa.float32(), "local_idx": pa.int32(),
                              "local_feat": pa.float16()},
               "pixels": {"feat": pa.float16()},
               "eval": {"confusion": pa.int64()}}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A numpy batch of rows (image_id, uri, width, height + the mode's columns) -> an
        Arrow table: image_id, error ("" or the reason) and the mode's list columns."""
        fn = {"candidates": self._candidates, "pixels": self._pixels, "eval": self._eval}[self.mode]
        n = len(batch["image_id"])
        cols = self.COLUMNS[self.mode]
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        errors = [""] * n
        results: list[dict] = [{} for _ in range(n)]
        images = {}
        for i, row in enumerate(rows):  # a bad image is an error row (the job makes it a reject)
            try:
                images[i] = self._image(row["uri"], int(row["width"]), int(row["height"]))
            except Exception as e:
                errors[i] = f"{type(e).__name__}: {e}"
        ok = sorted(images)
        if ok:
            got = fn([rows[i] for i in ok], torch.stack([images[i] for i in ok]))
            for i, r in zip(ok, got):
                if isinstance(r, Exception):
                    errors[i] = f"{type(r).__name__}: {r}"
                else:
                    results[i] = r
        vals: dict[str, list] = {k: [] for k in cols}
        for r in results:
            for k, tp in cols.items():
                vals[k].append(np.asarray(r.get(k, []), dtype=tp.to_pandas_dtype()))
        out = {"image_id": pa.array(np.asarray(batch["image_id"], np.int64)), "error": pa.array(errors, pa.string())}
        for k, tp in cols.items():
            flat = np.concatenate(vals[k]) if vals[k] else np.zeros(0, tp.to_pandas_dtype())
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in vals[k]])]).astype(np.int32)
            out[k] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, tp))
        return pa.table(out)


def head_path(cycle_dir: Path) -> Path:
    return Path(cycle_dir) / "head.pt"


__all__ = ["MODES", "PixelStage", "candidate_pixels", "eval_grid", "head_path"]
