"""`poolscout score`: the Ray Data stream over the unlabeled pool (docs/design.md, flow 1).

    work list (pool + labeled rows) -> decode/letterbox (CPU tasks)
      -> detector actor pool (canonical predictions per view; embeddings only for labeled rows)
      -> signals (CPU map_batches) -> partitioned Parquet in cycles/<k>/predictions/

The driver then reads only the id and signal columns to write scores.parquet, and lists the
images that failed to decode in cycles/<k>/rejects.parquet (this cycle only; they stay in
the pool and are tried again by the next scoring): |pool rows| = |scored| + |failed|.
The driver never holds images or predictions of the pool.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError
from poolscout.jobs.stream import (BOX_STORE_COLUMNS, WORK_COLUMNS, decode_batch, decoded_batches,  # noqa: F401
                                   model_class_quality, signal_fields, write_box_store, write_part)

def worklist(run: RunDir, include_labeled: bool) -> pa.Table:
    """Manifest rows of the pool (and labeled) images, as a small columnar table."""
    led = io.read_table(run.ledger, columns=["image_id", "state"])
    states = ["pool", "labeled"] if include_labeled else ["pool"]
    led = led.filter(pc.is_in(led["state"], pa.array(states)))
    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    return man.join(led, "image_id", join_type="inner").sort_by("image_id").select(WORK_COLUMNS)


class DetectorStage:
    """Detector actor: loads the model once, returns canonical predictions as Arrow."""

    def __init__(self, model_path: str, views: tuple[str, ...], max_boxes: int, roi_embeddings: bool,
                 threads: int, embedding_dtype: str = "float16", mc_passes: int = 0,
                 view_params: dict | None = None, gsal_eps: float = 1e-8):
        import torch

        from poolscout.engine.models.detectors import load_checkpoint

        torch.set_num_threads(threads or (os.cpu_count() or 1))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_checkpoint(model_path, map_location=self.device)
        self.model.to(self.device).eval()
        self.views, self.max_boxes, self.roi = tuple(views), max_boxes, roi_embeddings
        self.embedding_dtype = embedding_dtype
        self.mc_passes, self.view_params = int(mc_passes), dict(view_params or {})
        self.gsal_eps = float(gsal_eps)

    def _widths(self) -> dict[str, int]:
        c1 = int(self.meta["num_classes"]) + 1
        w = {"boxes": 4, "scores": 1, "labels": 1, "probs": c1}
        if self.roi:
            w["roi_embedding"] = int(getattr(self.model, "poolscout_roi_dim", 1))
        if hasattr(getattr(getattr(self.model, "roi_heads", None), "box_predictor", None), "forward_with_var"):
            w["box_var"] = 4
        if self.mc_passes:
            w["mc_probs"], w["mc_entropy"] = c1, 1
        return w

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from poolscout.engine.models import predictions as P
        from poolscout.engine.models.inference import embed, predict

        n = len(batch["image_id"])
        ok = np.asarray(batch["error"], dtype=object) == ""
        pool = ok & (batch["state"] == "pool")
        lab = ok & (batch["state"] == "labeled")
        # Run the detector on the pool rows, the backbone only on labeled rows, nothing on errors.
        parts: dict[str, np.ndarray] = {}
        emb = None
        if pool.any():
            idx = np.flatnonzero(pool)
            pred = predict(self.model, batch["image"][idx], image_id=batch["image_id"][idx],
                           width=batch["width"][idx], height=batch["height"][idx], scale=batch["scale"][idx],
                           content_w=batch["content_w"][idx], content_h=batch["content_h"][idx],
                           views=self.views, max_boxes=self.max_boxes, roi_embeddings=self.roi,
                           device=self.device, mc_passes=self.mc_passes, params=self.view_params)
            # roi embeddings are kept for the original view only (diversity methods read
            # those; the augmented views' would multiply the predictions' size)
            parts = {k: v for k, v in pred.items() if not (k.endswith("_roi_embedding") and k != "roi_embedding")}
            emb = np.zeros((n, pred["embedding"].shape[1]), np.float32)
            emb[idx] = pred["embedding"]
        if lab.any():
            idx = np.flatnonzero(lab)
            e = embed(self.model, batch["image"][idx], device=self.device)
            if emb is None:
                emb = np.zeros((n, e.shape[1]), np.float32)
            emb[idx] = e
        if emb is None:
            emb = np.zeros((n, int(getattr(self.model, "poolscout_embed_dim", 1))), np.float32)
        full = _scatter(parts, pool, n, self.views, self._widths())
        full.update(image_id=batch["image_id"], width=batch["width"], height=batch["height"], embedding=emb)
        extra = {"state": pa.array(list(batch["state"]), pa.string()),
                 "error": pa.array(list(batch["error"]), pa.string())}
        if "gsal_maps" in batch:  # the diffusion stage ran first: pool its maps over the boxes
            from poolscout.engine.methods.gsal import pool_boxes

            g = pool_boxes(batch["gsal_maps"], full["offsets"], full["boxes"], batch["width"], batch["height"],
                           self.gsal_eps)
            full["gsal_d"], full["gsal_v"] = g["gsal_d"], g["gsal_v"]
            extra["gsal_d_image"], extra["gsal_v_image"] = g["gsal_d_image"], g["gsal_v_image"]
        return P.to_arrow(full, self.embedding_dtype, extra=extra)


def _scatter(pred: dict[str, np.ndarray], rows: np.ndarray, n: int, views: tuple[str, ...],
             widths: dict[str, int]) -> dict:
    """Spread per-box arrays of the predicted rows over all n rows (others get 0 boxes).

    Every field is always present (empty when no row was predicted) so that every
    Parquet file of the predictions has the same schema.
    """
    from poolscout.engine.models import predictions as P

    out: dict[str, np.ndarray] = {}
    idx = np.flatnonzero(rows)
    for view in views:
        p = P.prefix(view)
        cnt = np.zeros(n, np.int64)
        if pred:
            cnt[idx] = np.diff(pred[p + "offsets"])
        out[p + "offsets"] = P.offsets_from_counts(cnt)
        for field in P.BOX_FIELDS:
            if view != "orig" and (field in P.ORIG_ONLY_FIELDS or field == "roi_embedding"):
                continue
            if pred and p + field in pred:
                out[p + field] = pred[p + field]  # boxes stay in row order: rows are a subsequence
            elif field in widths:
                w = widths[field]
                dtype = P.BOX_FIELDS[field]
                out[p + field] = np.zeros((0, w) if w > 1 else (0,), dtype)
    return out


def signal_batch(table: pa.Table, specs: tuple[str, ...], seed: int, cycle: int, num_classes: int,
                 context: dict | None = None) -> pa.Table:
    """Adds one `sig__<column>` per configured signal (a Ray Data task on Arrow batches)."""
    from poolscout.engine.models import predictions as P
    from poolscout.engine.acquisition import signals as S

    parsed = [S.parse_spec(s) for s in specs]
    have = set(table.column_names)
    views = [v for v in S.required_views(parsed) if P.prefix(v) + "num_boxes" in have]
    batch = P.from_arrow(table, views=views, fields=signal_fields(parsed), num_classes=num_classes)
    values = S.compute(batch, parsed, seed=seed, cycle=cycle, context=context)
    for col, v in values.items():
        table = table.append_column(f"sig__{col}", pa.array(np.asarray(v, dtype=np.float64)))
    return table


def scoring_plan(cfg: Config, model: Path | None = None) -> dict:
    """What one scoring pass computes: signal specs, views, MC passes, view parameters and
    the signal context.

    Signals = score.signals plus those the configured strategy (select.strategy) needs, so
    the expensive image-level ones (cald, huale_*) run in the parallel workers. Views =
    score.views plus those the signals read; MC passes only when a signal needs them.
    """
    from poolscout.engine.acquisition import signals as S
    from poolscout.engine.acquisition import strategies as St

    specs: list = []
    strat = St.load_strategy(cfg.select.strategy)
    # a strategy reading GSAL's per-box D / V (selector gsal) gets them through gsal_g
    gsal_boxes = ("gsal_g:max",) if {"gsal_d", "gsal_v"} & set(strat.needs.box_fields or ()) else ()
    for s in (*cfg.score.signals, *strat.needs.signals, *gsal_boxes):
        s = S.parse_spec(s)
        if s not in specs:
            specs.append(s)
    views = list(dict.fromkeys([*S.required_views(specs), *cfg.score.views]))
    mc = int(cfg.score.mc_passes) if S.needs_mc(specs) else 0
    if S.needs_mc(specs) and mc < 1:
        raise ValueError("a configured signal needs MC dropout but score.mc_passes < 1")
    params = {"resize": cfg.score.view_resize, "rotate": cfg.score.view_rotate,
              "cutout_holes": cfg.score.cutout_holes, "cutout_size": cfg.score.cutout_size,
              "cutout_seed": cfg.seed}
    context = {}
    if model is not None:
        context["class_quality"] = model_class_quality(model)
    return {"specs": tuple(s.text for s in specs), "views": tuple(views), "mc_passes": mc, "params": params,
            "context": context, "diffusion": S.needs_diffusion(specs)}


def diffusion_model_dir(run: RunDir, cfg: Config) -> Path:
    """The diffusers directory GSAL's diffusion stage loads: gsal.model, else the run's own."""
    p = Path(cfg.gsal.model) if cfg.gsal.model else run.root / "diffusion" / "model"
    if not (p / "config.json").is_file() and not (p / "unet" / "config.json").is_file():
        raise RunError(f"{p}: no diffusion model; train one on the pool with `poolscout diffusion train {run.root}` "
                       "or set gsal.model to a local diffusers UNet2DModel directory")
    return p


def diffusion_stage_kwargs(cfg: Config, model_dir: Path | tuple[Path, Path]) -> dict:
    """DiffusionScorer's arguments; model_dir may be (model dir, map cache dir)."""
    g = cfg.gsal
    model_dir, cache = model_dir if isinstance(model_dir, tuple) else (model_dir, None)
    return {"model_dir": str(model_dir), "channels": 1 if g.channels == "grey" else 3, "k": g.seeds, "t0": g.t0,
            "steps": g.steps, "seed": cfg.seed, "batch": g.batch_size, "autocast": g.autocast, "threads": g.threads,
            "cache_dir": str(cache) if cache is not None else None}


def diffusion_key(cfg: Config, model_dir: Path, input_size: int) -> str:
    """Hex digest of what a pool image's D / V maps depend on: the diffusion model's files, the
    sampling settings and the detector canvas they are cut from (maps are cached under it)."""
    import hashlib

    d = model_dir / "unet" if (model_dir / "unet" / "config.json").is_file() else model_dir
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")) + [d / "config.json"]:
        h.update(_file_hash(f))
    kw = {k: v for k, v in diffusion_stage_kwargs(cfg, model_dir).items()
          if k not in ("model_dir", "threads", "batch", "cache_dir")}
    h.update(json.dumps({**kw, "input_size": int(input_size)}, sort_keys=True).encode())
    return h.hexdigest()


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _ids_in_parts(d: Path) -> np.ndarray:
    """Image ids of the finished parts in a partial predictions folder (a part that does not
    read whole is removed with its box store: its images are scored again)."""
    import pyarrow.parquet as pq

    ids = []
    for f in sorted(d.glob("part-*.parquet")) if d.is_dir() else []:
        try:
            ids.append(pq.read_table(f, columns=["image_id"])["image_id"].to_numpy())
        except (OSError, pa.ArrowInvalid):
            f.unlink(missing_ok=True)
            for b in d.glob(f"_boxes.{f.stem}*"):
                b.unlink(missing_ok=True)
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _clean_stale(cdir: Path) -> None:
    """Remove temp prediction dirs a killed run left behind (never the resumable partial)."""
    for p in cdir.glob(".predictions.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _score_local(work: pa.Table, model: Path, cfg: Config, k: int, num_classes: int, input_size: int, root: str | None,
                 partial: Path, progress: bool, diffusion: Path | tuple | None = None) -> None:
    """The local executor: the same stages in this process, one Parquet part per chunk.

    Parts are written atomically into `partial` (named after the model's digest), so a run
    killed mid-scoring resumes at the first missing part instead of starting over.
    """
    import torch

    from poolscout.jobs.hooks import crash_point

    sc = cfg.score
    chunk = max(1, sc.batch_size) * 8
    starts = list(range(0, len(work), chunk))
    todo = [(i, st) for i, st in enumerate(starts) if not (partial / f"part-{i:05d}.parquet").is_file()]
    partial.mkdir(parents=True, exist_ok=True)
    if not todo:
        return
    old = torch.get_num_threads()
    if sc.torch_threads:
        torch.set_num_threads(sc.torch_threads)
    try:
        plan = scoring_plan(cfg, model)
        stage = DetectorStage(str(model), plan["views"], cfg.detector.max_boxes, sc.store_roi_embeddings,
                              sc.torch_threads or torch.get_num_threads(), mc_passes=plan["mc_passes"],
                              view_params=plan["params"], gsal_eps=cfg.gsal.eps)
        dstage = None
        if diffusion is not None:
            from poolscout.engine.models.diffusion import DiffusionScorer

            dstage = DiffusionScorer(**diffusion_stage_kwargs(cfg, diffusion))
        bar = None
        if progress:
            from tqdm import tqdm

            is_pool = np.asarray(work["state"].to_pylist(), dtype=object) == "pool"
            left = sum(int(is_pool[st:st + chunk].sum()) for _, st in todo)
            bar = tqdm(total=int(is_pool.sum()), initial=int(is_pool.sum()) - left, desc=f"score cycle {k}",
                       unit="img", leave=False, dynamic_ncols=True)
        for n_done, (i, st) in enumerate(todo):
            rows = work.slice(st, chunk)
            parts = []
            for dec in decoded_batches(rows, sc.batch_size, WORK_COLUMNS, input_size, cfg.dataset.max_pixels, root):
                if dstage is not None:
                    dec = dstage(dec)
                parts.append(signal_batch(stage(dec), plan["specs"], cfg.seed, k, num_classes, plan["context"]))
                if bar is not None:
                    bar.update(int((dec["state"] == "pool").sum()))
            part = pa.concat_tables(parts)
            write_box_store(part, partial / f"part-{i:05d}.parquet")
            io.write_table(part, partial / f"part-{i:05d}.parquet")
            if n_done == len(todo) // 2:
                crash_point(f"{k}:score:mid")
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(old)


def score(run: RunDir, cfg: Config, *, cycle: int | None = None, blocks: int | None = None,
          progress: bool = True, executor: str | None = None, force: bool = False) -> dict:
    """Score the pool of cycle k with its model; returns a summary with counts and timings.

    executor: "ray" (the Ray Data stream) or "local" (this process, resumable per chunk);
    default cfg.loop.executor. A cycle already scored by the same model over the same work
    list, with every signal now needed, is kept (summary "skipped": true) unless `force`.
    """
    run.require()
    k = run.current_cycle() if cycle is None else cycle
    model = run.model_path(k)
    if not model.is_file():
        raise RunError(f"{model} is missing: run `poolscout train {run.root}` first")
    sc = cfg.score
    # The model fixes the canvas size it was trained at, whatever the current config says.
    import torch

    input_size = int(torch.load(model, map_location="cpu", weights_only=True, mmap=True)["detector"]["input_size"])
    plan0 = scoring_plan(cfg)  # fails before starting Ray work on a bad spec or strategy
    specs = plan0["specs"]
    diffusion = diffusion_model_dir(run, cfg) if plan0["diffusion"] else None
    work = worklist(run, sc.embed_labeled)
    n_pool = int(pc.sum(pc.equal(work["state"], "pool")).as_py() or 0)
    if n_pool == 0:
        raise RunError(f"{run.ledger}: the pool is empty; nothing to score")
    cdir = run.cycle_dir(k)
    model_hash = _file_hash(model)
    if diffusion is not None:  # another diffusion model (or its settings): other values
        import hashlib

        dkey = diffusion_key(cfg, diffusion, input_size)
        model_hash = hashlib.sha256(model_hash + dkey.encode() + str(cfg.gsal.eps).encode()).digest()
        if cfg.gsal.cache_maps:
            maps = Path(cfg.gsal.maps_dir) if cfg.gsal.maps_dir else run.root / "diffusion" / "maps"
            diffusion = (diffusion, maps / dkey[:16])
    digest = _digest(model_hash, work["image_id"].to_numpy())
    done = _finished(run, k, digest, specs)
    if done is not None and not force:
        return {**done, "skipped": True}
    cdir.mkdir(parents=True, exist_ok=True)
    _clean_stale(cdir)
    wl_path = cdir / "worklist.parquet"
    io.write_table(work, wl_path)
    executor = executor or cfg.loop.executor
    root = run.fingerprint().get("images_root")  # files must still lie inside it
    t0 = time.time()
    if executor == "local":
        partial = cdir / f".predictions.partial-{digest}"
        for p in cdir.glob(".predictions.partial-*"):
            if p != partial:  # parts of another model (retrained) are worthless
                shutil.rmtree(p, ignore_errors=True)
        if any(not re.fullmatch(r"part-\d{5}\.parquet", f.name) for f in partial.glob("part-*.parquet")):
            shutil.rmtree(partial, ignore_errors=True)  # the Ray executor's parts (by ids): start over
        _score_local(work, model, cfg, k, run.num_classes(), input_size, root, partial, progress, diffusion)
        tmp_dir = partial
    elif executor == "ray":
        # parts are named by their image ids and written atomically, so a driver killed mid-
        # scoring resumes with the images that no finished part holds
        partial = cdir / f".predictions.partial-{digest}"
        for p in cdir.glob(".predictions.partial-*"):
            if p != partial:
                shutil.rmtree(p, ignore_errors=True)
        done_ids = _ids_in_parts(partial)
        todo = work.filter(pc.invert(pc.is_in(work["image_id"], pa.array(done_ids, pa.int64())))) \
            if len(done_ids) else work
        if todo.num_rows:
            n_todo = int(pc.sum(pc.equal(todo["state"], "pool")).as_py() or 0)
            _score_ray(todo, model, cfg, k, run.num_classes(), input_size, root, partial, blocks, progress, n_todo,
                       diffusion)
        tmp_dir = partial
    else:
        raise ValueError(f"loop.executor must be 'ray' or 'local', got {executor!r}")
    seconds = time.time() - t0
    _replace_dir(tmp_dir, run.predictions_dir(k))
    summary = finalize_scores(run, cfg, k, specs)
    summary.update(cycle=k, seconds=round(seconds, 2), images=int(len(work)), pool=n_pool, input_size=input_size,
                   executor=executor, images_per_s=round(len(work) / seconds, 2) if seconds else None,
                   specs=list(specs))
    summary["digest"] = digest
    summary["warm"] = warm_queries(run, cfg, k)
    io.atomic_write_json(cdir / "score.json", summary)
    return summary


def warm_maps(run: RunDir, cfg: Config, *, input_size: int | None = None, progress: bool = True) -> dict:
    """Fill GSAL's map cache with the D / V maps of every pool and labeled image, before
    any loop scores (benchmarks run several loops of one pool side by side: without this,
    each computes the same maps; with it, the first scoring of every loop reads them).

    input_size: the detector canvas the maps are cut from (default detector.input_size, the
    size every loop of a preset trains at). Returns {"images", "computed", "seconds", "cache"}.
    """
    from poolscout.engine.models.diffusion import DiffusionScorer

    if not cfg.gsal.cache_maps:
        raise ValueError("warm_maps needs gsal.cache_maps: true (nothing would be kept)")
    diffusion = diffusion_model_dir(run, cfg)
    size = int(input_size or cfg.detector.input_size)
    maps = Path(cfg.gsal.maps_dir) if cfg.gsal.maps_dir else run.root / "diffusion" / "maps"
    cache = maps / diffusion_key(cfg, diffusion, size)[:16]
    work = worklist(run, True)
    work = work.set_column(work.schema.get_field_index("state"), "state",
                           pa.array(["pool"] * work.num_rows))  # every image's maps, seed set included
    t0 = time.time()
    stage = DiffusionScorer(**diffusion_stage_kwargs(cfg, (diffusion, cache)))
    found, _ = stage.cache.get(work["image_id"].to_numpy(), stage.resolution) if stage.cache else (None, None)
    todo = work.filter(pa.array(~found)) if found is not None else work
    bar = None
    if progress and todo.num_rows:
        from tqdm import tqdm

        bar = tqdm(total=todo.num_rows, desc="gsal: warm the map cache", unit="img", leave=False, dynamic_ncols=True)
    root = run.fingerprint().get("images_root")
    for dec in decoded_batches(todo, max(1, cfg.gsal.batch_size), WORK_COLUMNS, size, cfg.dataset.max_pixels, root):
        stage(dec)
        if bar is not None:
            bar.update(len(dec["image_id"]))
    if bar is not None:
        bar.close()
    return {"images": int(work.num_rows), "computed": int(todo.num_rows), "seconds": round(time.time() - t0, 1),
            "cache": str(cache)}


def warm_queries(run: RunDir, cfg: Config, k: int) -> dict:
    """Build the per-cycle caches of the `score.warm_queries` strategies (a one-image query
    each, saved nowhere), so that the cycle's queries find the kNN graph built. A failure
    is recorded, not raised: scoring has succeeded and the query builds what it needs."""
    from poolscout.jobs.query import QuerySession

    out: dict[str, dict] = {}
    names = warm_strategies(cfg)
    if not names:
        return out
    session = QuerySession(run, cfg, k)
    for name in names:
        t0 = time.time()
        try:
            session.ask(name, 1)
            out[name] = {"seconds": round(time.time() - t0, 3)}
        except (RunError, ValueError, OSError) as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def warm_strategies(cfg: Config) -> list[str]:
    """`score.warm_queries` with "auto" expanded: select.strategy if one of its stages'
    selectors keeps a per-cycle cache (meta `uses_cache`), else nothing. An unknown
    strategy expands to nothing here; the query names the problem."""
    from poolscout.engine.acquisition.selectors import SELECTORS
    from poolscout.engine.acquisition.strategies import load_strategy

    out: list[str] = []
    for name in cfg.score.warm_queries:
        if name != "auto":
            out.append(name)
            continue
        try:
            strat = load_strategy(cfg.select.strategy)
        except (ValueError, OSError):
            continue
        if any(SELECTORS.entry(st.selector).meta.get("uses_cache", False) for st in strat.stages):
            out.append(cfg.select.strategy)
    return list(dict.fromkeys(out))


def _finished(run: RunDir, k: int, digest: str, specs: tuple[str, ...]) -> dict | None:
    """score.json of cycle k if it was scored by this model over this work list with `specs`."""
    path = run.cycle_dir(k) / "score.json"
    if not (path.is_file() and run.scores_path(k).is_file() and run.predictions_dir(k).is_dir()):
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if done.get("digest") != digest or not set(specs) <= set(done.get("specs", ())):
        return None
    return done


def _file_hash(path: Path) -> bytes:
    """SHA-256 of a file's bytes (the model: read once per scoring)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _digest(model_hash: bytes, ids: np.ndarray) -> str:
    """Model + work list ids: the identity of a scoring (resumable partials, finished cycles)."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    h.update(model_hash)
    return h.hexdigest()[:12]


def _score_ray(work: pa.Table, model: Path, cfg: Config, k: int, num_classes: int, input_size: int, root: str | None,
               tmp_dir: Path, blocks: int | None, progress: bool = False, n_pool: int = 0,
               diffusion: Path | tuple | None = None) -> None:
    import ray

    sc = cfg.score
    plan = scoring_plan(cfg, model)
    # The work list (ids + uris, no pixels) enters the stream as Arrow blocks; every stage
    # but the detector takes a fraction of a CPU so that, on a 2-core node, decode and
    # signal tasks still fit beside a detector actor (a whole-CPU stage would deadlock).
    nblocks = blocks or max(1, min(200, -(-len(work) // max(1, sc.decode_batch_size))))
    step = -(-len(work) // nblocks)
    ds = ray.data.from_arrow([work.slice(i, step) for i in range(0, len(work), step)])
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": input_size, "root": root,
                                                 "max_pixels": cfg.dataset.max_pixels},
                        batch_size=sc.decode_batch_size, batch_format="numpy", num_cpus=0.25)
    if diffusion is not None:  # GSAL's diffusion actors, their own pool (GPU or CPU), before the detector
        from poolscout.engine.models.diffusion import DiffusionScorer

        g = cfg.gsal
        ds = ds.map_batches(DiffusionScorer, fn_constructor_kwargs=diffusion_stage_kwargs(cfg, diffusion),
                            batch_size=sc.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=g.concurrency), num_cpus=g.num_cpus,
                            num_gpus=g.num_gpus or None)
    ds = ds.map_batches(DetectorStage, fn_constructor_kwargs={
        "model_path": str(model), "views": plan["views"], "max_boxes": cfg.detector.max_boxes,
        "roi_embeddings": sc.store_roi_embeddings, "threads": sc.torch_threads, "mc_passes": plan["mc_passes"],
        "view_params": plan["params"], "gsal_eps": cfg.gsal.eps},
        batch_size=sc.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=sc.concurrency),
        num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None)
    ds = ds.map_batches(signal_batch, fn_kwargs={"specs": plan["specs"], "seed": cfg.seed, "cycle": k,
                                                 "num_classes": num_classes, "context": plan["context"]},
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    # Each block is written by the task that made it; only its row counts reach the driver,
    # which turns them into the progress bar (the driver never holds predictions).
    tmp_dir.mkdir(parents=True, exist_ok=True)
    ds = ds.map_batches(write_part, fn_kwargs={"out_dir": str(tmp_dir)}, batch_format="pyarrow", batch_size=None,
                        num_cpus=0.25)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_pool, desc=f"score cycle {k}", unit="img", leave=False, dynamic_ncols=True)
    from poolscout.jobs.hooks import crash_point

    seen, crashed = 0, False
    for counts in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seen += int(counts["pool_rows"].sum())
        if bar is not None:
            bar.update(int(counts["pool_rows"].sum()))
        if not crashed and seen * 2 >= n_pool:
            crashed = True  # a test's kill point, half way through the pool
            crash_point(f"{k}:score:mid")
    if bar is not None:
        bar.close()


def pool_context_columns(dataset, parsed: list, seed: int, k: int) -> dict[str, np.ndarray]:
    """The columns of signals that need the whole pool's statistics (meta `pool_context`,
    e.g. GSAL's z-scored gsal_g): computed here over every scored pool image, in image_id
    order, from the stored per-box / per-image fields (the stream wrote placeholders)."""
    from poolscout.engine.acquisition import signals as S
    from poolscout.engine.models import predictions as P

    todo = [p for p in parsed if S.SIGNALS.entry(p.name).meta.get("pool_context") is not None]
    if not todo:
        return {}
    fields = sorted({f for p in todo for f in S.SIGNALS.entry(p.name).meta["fields"]})
    names = set(dataset.schema.names)
    t = dataset.to_table(columns=["image_id", "num_boxes"] + [f for f in fields if f in names],
                         filter=(pc.field("state") == "pool") & (pc.field("error") == "")).sort_by("image_id")
    batch = P.from_arrow(t, views=["orig"], fields=fields)
    out = {}
    for p in todo:
        ctx = S.SIGNALS.entry(p.name).meta["pool_context"](batch)
        out[p.column] = S.compute_one(batch, p, seed=seed, cycle=k, context=ctx)
    return out


def finalize_scores(run: RunDir, cfg: Config, k: int, specs: tuple[str, ...]) -> dict:
    """Predictions -> scores.parquet (empty images filled) and rejects for failed decodes."""
    from poolscout.engine.acquisition import signals as S
    from poolscout.engine.acquisition.checks import parse_empty_rule

    parsed = [S.parse_spec(s) for s in specs]
    cols = [p.column for p in parsed]
    dataset = pads.dataset(str(run.predictions_dir(k)), format="parquet")
    t = dataset.to_table(columns=["image_id", "state", "error", "num_boxes"] + [f"sig__{c}" for c in cols])
    pool = t.filter(pc.equal(t["state"], "pool"))
    bad = pool.filter(pc.not_equal(pool["error"], ""))
    good = pool.filter(pc.equal(pool["error"], "")).sort_by("image_id")
    n_pool_expected = len(run.ids_in_state("pool"))
    if len(good) + len(bad) != n_pool_expected:
        raise RuntimeError(f"scoring lost rows: pool {n_pool_expected} != scored {len(good)} + rejected {len(bad)}")
    # Failures at scoring time (a file unreadable now, a one-off override) are this cycle's:
    # the images stay in the pool, out of this cycle's candidates, and the next scoring
    # (next cycle, or `score --force`) tries them again. Only init's rejects are final.
    rows = None
    if len(bad):
        man = io.read_table(run.manifest, columns=["image_id", "uri"])
        rej = bad.select(["image_id", "error"]).join(man, "image_id").sort_by("image_id")
        rows = pa.table({"image_id": rej["image_id"], "uri": rej["uri"], "stage": pa.array(["score"] * len(rej)),
                         "reason": rej["error"]})
    run.write_cycle_rejects(k, "score", rows)
    empty = good["num_boxes"].to_numpy() == 0
    out = {"image_id": good["image_id"], "num_boxes": good["num_boxes"]}
    pooled = pool_context_columns(dataset, parsed, cfg.seed, k)
    for p, c in zip(parsed, cols):
        v = pooled[c] if c in pooled else good[f"sig__{c}"].to_numpy(zero_copy_only=False).astype(np.float64)
        out[c] = S.fill_empty(v, empty & np.isnan(v), parse_empty_rule(cfg.score.empty_value), S.direction(p))
    io.write_table(pa.table(out), run.scores_path(k))
    return {"scored": int(len(good)), "failed": int(len(bad)), "signals": cols, "empty_images": int(empty.sum())}
