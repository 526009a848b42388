"""`poolscout embed`: backbone embeddings of the pool, in a Ray Data stream, cached per run.

    work list (ids + uris) -> decode (letterbox to embed.input_size) -> backbone actors
    (EfficientNet-Lite0, pooled, unit norm) -> Parquet parts in RUN/embeddings/backbone/

The embedding depends on the image and the fixed ImageNet weights only, not on any
trained model, so it is computed once per run and reused by every cycle: a later call
embeds only the images not cached yet (new images, or an interrupted run: every finished
block is already a part on disk). Settings that change the vectors (weights, input size,
dtype) are recorded in embed.json; a mismatch starts the cache over.

Used by the cold start (`loop.seed_strategy`: a coverage pick before any label) and by
selection with `select.embedding: backbone`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError

EMBED_COLUMNS = ("image_id", "uri", "width", "height", "state")


def cache_dir(run: RunDir) -> Path:
    return run.root / "embeddings" / "backbone"


def _settings(cfg: Config) -> dict:
    e = cfg.embed
    return {"model": "tf_efficientnet_lite0", "weights": str(e.weights), "input_size": int(e.input_size),
            "dtype": e.dtype}


class BackboneStage:
    """Ray Data actor (or a plain object): decoded canvases -> (image_id, embedding) Arrow."""

    def __init__(self, weights: str, threads: int = 0, dtype: str = "float16"):
        import torch

        from poolscout.engine.models.backbone import build_backbone

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = build_backbone(None if weights in ("none", "") else weights).to(self.device)
        self.dtype = np.float16 if dtype == "float16" else np.float32

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from poolscout.engine.models.backbone import EMBED_DIM, embed_images

        ok = np.asarray(batch["error"], dtype=object) == ""
        emb = np.zeros((len(ok), EMBED_DIM), np.float32)
        if ok.any():
            emb[ok] = embed_images(self.model, batch["image"][ok], device=self.device)
        flat = pa.array(emb.astype(self.dtype).reshape(-1))
        offsets = pa.array(np.arange(0, len(ok) * EMBED_DIM + 1, EMBED_DIM, dtype=np.int32))
        return pa.table({"image_id": pa.array(np.asarray(batch["image_id"], np.int64)),
                         "embedding": pa.ListArray.from_arrays(offsets, flat),
                         "error": pa.array([str(e) for e in batch["error"]], pa.string())})


def cached_ids(run: RunDir) -> np.ndarray:
    """Image ids with a cached backbone embedding (no decode error)."""
    d = cache_dir(run)
    parts = sorted(d.glob("part-*.parquet")) if d.is_dir() else []
    if not parts:
        return np.zeros(0, np.int64)
    import pyarrow.dataset as pads

    t = pads.dataset([str(p) for p in parts], format="parquet").to_table(columns=["image_id", "error"])
    return np.unique(t.filter(pc.equal(t["error"], ""))["image_id"].to_numpy())


def embed_backbone(run: RunDir, cfg: Config, *, states: tuple[str, ...] = ("pool", "labeled"),
                   executor: str | None = None, progress: bool = True) -> dict:
    """Embed every image in `states` not cached yet; returns a summary (counts, seconds)."""
    run.require()
    d = cache_dir(run)
    meta_path = d / "embed.json"
    settings = _settings(cfg)
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(meta_path, settings)
    led = io.read_table(run.ledger, columns=["image_id", "state"])
    led = led.filter(pc.is_in(led["state"], pa.array(list(states))))
    have = cached_ids(run)
    led = led.filter(pc.invert(pc.is_in(led["image_id"], pa.array(have))))
    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    work = man.join(led, "image_id", join_type="inner").sort_by("image_id").select(list(EMBED_COLUMNS))
    out = {"cached": int(len(have)), "embedded": int(len(work)), "dir": str(d), **settings}
    if len(work) == 0:
        return {**out, "seconds": 0.0, "failed": 0}
    e = cfg.embed
    root = run.fingerprint().get("images_root")
    executor = executor or cfg.loop.executor
    t0 = time.time()
    if executor == "local":
        _embed_local(work, cfg, root, d, progress)
    elif executor == "ray":
        _embed_ray(work, cfg, root, d, progress)
    else:
        raise ValueError(f"loop.executor must be 'ray' or 'local', got {executor!r}")
    got = cached_ids(run)
    failed = int(len(work) - len(np.intersect1d(got, work["image_id"].to_numpy())))
    secs = time.time() - t0
    return {**out, "failed": failed, "seconds": round(secs, 2),
            "images_per_s": round(len(work) / secs, 2) if secs else None, "batch_size": e.batch_size}


def _embed_local(work: pa.Table, cfg: Config, root: str | None, d: Path, progress: bool) -> None:
    from poolscout.jobs.stream import decoded_batches, write_part

    e = cfg.embed
    stage = BackboneStage(str(e.weights), e.torch_threads, e.dtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="embed (backbone)", unit="img", leave=False, dynamic_ncols=True)
    chunk = max(1, e.batch_size) * 8
    for st in range(0, len(work), chunk):
        rows = work.slice(st, chunk)
        parts = []
        for dec in decoded_batches(rows, e.batch_size, EMBED_COLUMNS, e.input_size, cfg.dataset.max_pixels, root):
            parts.append(stage(dec))
            if bar is not None:
                bar.update(len(dec["image_id"]))
        write_part(pa.concat_tables(parts), str(d))
    if bar is not None:
        bar.close()


def _embed_ray(work: pa.Table, cfg: Config, root: str | None, d: Path, progress: bool) -> None:
    import ray

    from poolscout.jobs.stream import decode_batch, write_part

    e = cfg.embed
    nblocks = max(1, min(200, -(-len(work) // max(1, e.batch_size * 4))))
    step = -(-len(work) // nblocks)
    ds = ray.data.from_arrow([work.slice(i, step) for i in range(0, len(work), step)])
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": e.input_size, "root": root,
                                                 "max_pixels": cfg.dataset.max_pixels},
                        batch_size=e.batch_size, batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(BackboneStage, fn_constructor_kwargs={"weights": str(e.weights), "threads": e.torch_threads,
                                                              "dtype": e.dtype},
                        batch_size=e.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=e.concurrency), num_cpus=e.num_cpus,
                        num_gpus=e.num_gpus or None)
    ds = ds.map_batches(write_part, fn_kwargs={"out_dir": str(d)}, batch_format="pyarrow", batch_size=None,
                        num_cpus=0.25)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="embed (backbone)", unit="img", leave=False, dynamic_ncols=True)
    for counts in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if bar is not None:
            bar.update(int(counts["rows"].sum()))
    if bar is not None:
        bar.close()


def load_backbone(run: RunDir, ids: np.ndarray) -> np.ndarray:
    """(len(ids), 1280) float32 cached backbone embeddings of `ids`, in that order.

    Raises:
        RunError: an id without a cached embedding (run `poolscout embed` first).
    """
    import pyarrow.dataset as pads

    ids = np.asarray(ids, np.int64)
    d = cache_dir(run)
    parts = sorted(d.glob("part-*.parquet")) if d.is_dir() else []
    if len(ids) == 0:
        return np.zeros((0, 1280), np.float32)
    if not parts:
        raise RunError(f"{d} holds no backbone embeddings: run `poolscout embed {run.root}` first")
    t = pads.dataset([str(p) for p in parts], format="parquet").to_table(
        columns=["image_id", "embedding"], filter=(pc.field("error") == "") & pc.field("image_id").isin(pa.array(ids)))
    got = t["image_id"].to_numpy()
    # a part rewritten after a retry may repeat an id: keep one row per id
    uniq, first = np.unique(got, return_index=True)
    missing = np.setdiff1d(ids, uniq)
    if len(missing):
        raise RunError(f"{d}: no backbone embedding for {len(missing)} of {len(ids)} images (e.g. id "
                       f"{int(missing[0])}): run `poolscout embed {run.root}`")
    flat = pc.list_flatten(t["embedding"].combine_chunks()).to_numpy(zero_copy_only=False)
    emb = flat.reshape(len(t), -1)
    rows = first[np.searchsorted(uniq, ids)]
    return np.ascontiguousarray(emb[rows], dtype=np.float32)


__all__ = ["embed_backbone", "load_backbone", "cached_ids", "cache_dir", "BackboneStage"]
