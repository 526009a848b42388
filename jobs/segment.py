"""`poolscout segment`: pixel-level active learning for segmentation (two-stage eDALD,
docs/methods.md section 5).

A segmentation run is a run directory whose pool has masks (`masks.parquet`, see
engine.data.segmentation) and whose labels are pixels (the pixel ledger, RUN/pixels/).
Features come from a frozen diffusion UNet (`poolscout diffusion train RUN`, or
gsal.model); a small MLP head classifies them.

Round r (r = 0..segment.rounds), each step resumable from its output in cycles/<r>/:

1. candidates (`candidates/`): a feature pass over the pool images (Ray Data actors, or
   in-process): N_c random unlabeled pixels per image, their features, local herding, and
   with the head of round r - 1 the entropy / MI / eDALD of every candidate;
2. select (`pixel_selection.parquet`): B pixels by the strategy: "two_stage" (global
   herding over the local picks from the labeled coverage, keep a share, then the top B by
   eDALD; round 0: global herding alone), "herding" (global herding picks B), "edald" and
   "entropy" (top B over all candidates), "random" (B uniform candidates); without a head
   (round 0) "edald" and "entropy" pick at random;
3. label: the simulated oracle reads the masks (loop.oracle "simulated"), or the picks are
   exported as CSV for people and the loop waits for `poolscout segment import`;
4. features of the new labels (`pixel_feats/part-<r>.parquet`);
5. train (`head.pt`, `head.json`): the head on every labeled pixel (Ray Train, or
   in-process where a Ray Train job would only add its start-up);
6. evaluate (`metrics.json`): mIoU and per-class IoU of the head on the test images' masks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError
from poolscout.engine.data import segmentation as S

STRATEGIES = ("two_stage", "random", "entropy", "herding", "edald")
# what each strategy reads from the candidate pass (engine.models.pixel_stage.READS): the
# pass computes nothing else (random needs no UNet pass; entropy no noisy passes)
STRATEGY_READS = {"random": (), "entropy": ("features", "head"), "edald": ("features", "head", "noises"),
                  "herding": ("features", "local"), "two_stage": ("features", "head", "noises", "local")}
SELECTION_SCHEMA = pa.schema([("image_id", pa.int64()), ("x", pa.int32()), ("y", pa.int32()),
                              ("rank", pa.int32()), ("score", pa.float64()), ("stage", pa.string())])
FEATS_SCHEMA = pa.schema([("image_id", pa.int64()), ("x", pa.int32()), ("y", pa.int32()),
                          ("feat", pa.list_(pa.float16()))])


def masks_path(run: RunDir) -> Path:
    return run.root / "masks.parquet"


def is_segmentation(run: RunDir) -> bool:
    return masks_path(run).is_file()


# --------------------------------------------------------------------------- init
def init_segmentation(run: RunDir, *, images, masks, test=None, cfg: Config, force: bool = False,
                      progress: bool = True) -> dict:
    """`init` for a pool with masks: the image tables (engine.data.pool.init_run, no boxes),
    then masks.parquet; images whose mask is bad (or missing, for test images) are rejected
    with the reason. Idempotent for the same inputs."""
    from poolscout.engine.data.pool import init_run

    if not cfg.dataset.classes:
        raise ValueError("a segmentation pool needs dataset.classes: the names of the mask's class ids 1..C "
                         "(for --mask-format folder, the class folders)")
    summary = init_run(run, images=images, test=test, cfg=cfg, force=force, progress=progress)
    seg = cfg.segment
    inputs = {"masks": str(Path(masks).expanduser().resolve()), "format": seg.mask_format,
              "threshold": int(seg.mask_threshold), "classes": list(cfg.dataset.classes)}
    meta = run.root / "segment.json"
    if masks_path(run).is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return {**summary, **_mask_summary(run)}
    manifest = io.read_table(run.manifest)
    led = io.read_table(run.ledger, columns=["image_id", "state"])
    live = pc.is_in(manifest["image_id"], led.filter(pc.not_equal(led["state"], "rejected"))["image_id"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = lambda rows: tqdm(rows, desc="init: check masks", unit="mask", leave=False, dynamic_ncols=True)  # noqa: E731
    table, rejects = S.build_masks(manifest.filter(live), masks, fmt=seg.mask_format, classes=list(cfg.dataset.classes),
                                   required=run.ids_in_state("test"), threshold=int(seg.mask_threshold),
                                   progress=bar)
    if rejects.num_rows:
        run.append_rejects(rejects)
        run.set_state(rejects["image_id"].to_numpy(), "rejected")
    io.write_table(table, masks_path(run), S.MASKS_SCHEMA)
    io.atomic_write_json(meta, {"inputs": inputs})
    return {**summary, **_mask_summary(run)}


def _mask_summary(run: RunDir) -> dict:
    m = io.read_table(masks_path(run), columns=["image_id"])
    return {"masks": int(m.num_rows), "pool": int(len(run.ids_in_state("pool"))),
            "test": int(len(run.ids_in_state("test"))), "rejected": int(len(run.ids_in_state("rejected")))}


# --------------------------------------------------------------------------- passes
def _model_dir(run: RunDir, cfg: Config) -> str:
    from poolscout.jobs.diffusion import model_dir

    d = Path(cfg.gsal.model) if cfg.gsal.model else model_dir(run)
    if not (d / "config.json").is_file() and not (d / "unet" / "config.json").is_file():
        raise RunError(f"{d}: no diffusion model; train one with `poolscout diffusion train {run.root}` "
                       f"or set gsal.model to a local diffusers directory")
    return str(d)


def _stage_kwargs(run: RunDir, cfg: Config, mode: str, round_: int, head: Path | None) -> dict:
    seg = cfg.segment
    return {"model_dir": _model_dir(run, cfg), "mode": mode, "num_classes": len(cfg.dataset.classes) + 1,
            "head": str(head) if head is not None else None, "timesteps": list(seg.timesteps),
            "blocks": list(seg.blocks) or None, "noises": int(seg.noises), "candidates": int(seg.candidates),
            "local_budget": int(seg.local_budget), "round_": int(round_), "seed": int(cfg.seed),
            "images_root": run.fingerprint().get("images_root"), "max_pixels": int(cfg.dataset.max_pixels),
            "eval_max_side": int(seg.eval_max_side), "knn_k": int(seg.knn_k), "threads": int(seg.threads),
            "mask_format": seg.mask_format, "mask_threshold": int(seg.mask_threshold),
            **({"reads": list(STRATEGY_READS[seg.strategy])} if mode == "candidates" and seg.strategy in STRATEGY_READS
               else {})}


def run_pass(rows: pa.Table, kwargs: dict, out_dir: Path, *, cfg: Config, executor: str, progress: bool = True,
             desc: str = "pixels") -> pa.Table:
    """The pixel stage over `rows` (image_id, uri, width, height, + the mode's columns),
    written as Parquet parts in `out_dir` (a finished pass, marked by `_done`, is read back,
    not rerun); returns the output table."""
    done = out_dir / "_done"
    if done.is_file():
        return _read_dir(out_dir)
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg = cfg.segment
    if executor == "ray" and rows.num_rows:
        import ray

        from poolscout.engine.models.pixel_stage import PixelStage

        ds = ray.data.from_arrow(rows).map_batches(
            PixelStage, fn_constructor_kwargs=kwargs, batch_size=int(seg.batch_size), batch_format="numpy",
            concurrency=int(seg.concurrency), num_cpus=float(seg.num_cpus), num_gpus=float(seg.num_gpus))
        n = 0
        bar = _bar(rows.num_rows, desc, progress)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            io.write_table(batch, out_dir / f"part-{n:05d}.parquet")
            n += 1
            if bar is not None:
                bar.update(batch.num_rows)
        if bar is not None:
            bar.close()
    elif rows.num_rows:
        import torch

        threads = torch.get_num_threads()  # the stage sets its own; this process keeps its count
        try:
            _local_pass(rows, kwargs, out_dir, b=int(seg.batch_size), desc=desc, progress=progress)
        finally:
            torch.set_num_threads(threads)
    done.write_text("")
    return _read_dir(out_dir)


def _local_pass(rows: pa.Table, kwargs: dict, out_dir: Path, *, b: int, desc: str, progress: bool) -> None:
    from poolscout.engine.models.pixel_stage import PixelStage

    stage = PixelStage(**kwargs)
    bar = _bar(rows.num_rows, desc, progress)
    for n, a in enumerate(range(0, rows.num_rows, b)):
        batch = _numpy_batch(rows.slice(a, b))
        io.write_table(stage(batch), out_dir / f"part-{n:05d}.parquet")
        if bar is not None:
            bar.update(len(batch["image_id"]))
    if bar is not None:
        bar.close()


def _numpy_batch(t: pa.Table) -> dict[str, np.ndarray]:
    """Arrow rows -> the numpy batch a Ray Data actor gets (list columns: object arrays)."""
    out = {}
    for name in t.column_names:
        v = t[name].to_pylist()
        if pa.types.is_list(t.schema.field(name).type):
            arr = np.empty(len(v), dtype=object)
            for i, x in enumerate(v):
                arr[i] = np.asarray(x)
            out[name] = arr
        else:
            out[name] = np.asarray(v)
    return out


def _read_dir(d: Path) -> pa.Table:
    parts = sorted(d.glob("part-*.parquet"))
    if not parts:
        return pa.table({"image_id": pa.array([], pa.int64()), "error": pa.array([], pa.string())})
    return pa.concat_tables([io.read_table(p) for p in parts], promote_options="default").sort_by("image_id")


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def _image_rows(run: RunDir, ids: np.ndarray) -> pa.Table:
    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    t = man.filter(pc.is_in(man["image_id"], pa.array(np.asarray(ids, np.int64)))).sort_by("image_id")
    return t


def _errors_to_rejects(run: RunDir, k: int, stage: str, out: pa.Table, rows: pa.Table) -> None:
    bad = out.filter(pc.not_equal(out["error"], ""))
    if bad.num_rows == 0:
        run.write_cycle_rejects(k, stage, None)
        return
    uri = dict(zip(rows["image_id"].to_pylist(), rows["uri"].to_pylist()))
    run.write_cycle_rejects(k, stage, pa.table({
        "image_id": bad["image_id"], "uri": pa.array([uri.get(i, "") for i in bad["image_id"].to_pylist()]),
        "stage": pa.array([stage] * bad.num_rows), "reason": bad["error"]}))


# --------------------------------------------------------------------------- selection
def _labeled_by_image(led: S.PixelLedger) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    t = led.read(columns=["image_id", "x", "y"])
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if t.num_rows == 0:
        return out
    ids, xs, ys = t["image_id"].to_numpy(), t["x"].to_numpy(), t["y"].to_numpy()
    order = np.argsort(ids, kind="stable")
    cut = np.flatnonzero(np.diff(ids[order])) + 1
    for g in np.split(order, cut):
        out[int(ids[g[0]])] = (xs[g].astype(np.int64), ys[g].astype(np.int64))
    return out


def _flat_candidates(cand: pa.Table) -> dict[str, np.ndarray]:
    ok = cand.filter(pc.equal(cand["error"], ""))
    counts = pc.list_value_length(ok["cand_x"]).to_numpy(zero_copy_only=False).astype(np.int64)
    return {"image_id": np.repeat(ok["image_id"].to_numpy(), counts),
            "x": pc.list_flatten(ok["cand_x"]).to_numpy().astype(np.int64),
            "y": pc.list_flatten(ok["cand_y"]).to_numpy().astype(np.int64),
            "entropy": pc.list_flatten(ok["entropy"]).to_numpy(zero_copy_only=False).astype(np.float64),
            "edald": pc.list_flatten(ok["edald"]).to_numpy(zero_copy_only=False).astype(np.float64),
            "offset": np.concatenate([[0], np.cumsum(counts)])[:-1], "table": ok}


def _local_picks(flat: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows into the flat candidates of every image's local picks in order, their features)."""
    ok = flat["table"]
    nloc = pc.list_value_length(ok["local_idx"]).to_numpy(zero_copy_only=False).astype(np.int64)
    idx = pc.list_flatten(ok["local_idx"]).to_numpy().astype(np.int64)
    rows = np.repeat(flat["offset"], nloc) + idx
    f = pc.list_flatten(ok["local_feat"]).to_numpy(zero_copy_only=False).astype(np.float32)
    dim = len(f) // max(len(rows), 1) if len(rows) else 0
    return rows, f.reshape(len(rows), dim) if len(rows) else np.zeros((0, 0), np.float32)


def labeled_features(run: RunDir) -> tuple[pa.Table, np.ndarray]:
    """(image_id, x, y, class of every labeled pixel with features, their features (L, d))."""
    d = run.root / "pixel_feats"
    parts = sorted(d.glob("part-*.parquet")) if d.is_dir() else []
    led = S.PixelLedger(run.root).read(columns=["image_id", "x", "y", "class"])
    if not parts or led.num_rows == 0:
        return led.slice(0, 0), np.zeros((0, 0), np.float32)
    ft = pa.concat_tables([io.read_table(p) for p in parts])
    kl = S.pixel_keys(led["image_id"].to_numpy(), led["x"].to_numpy(), led["y"].to_numpy())
    kf = S.pixel_keys(ft["image_id"].to_numpy(), ft["x"].to_numpy(), ft["y"].to_numpy())
    _, inv = np.unique(np.concatenate([kl, kf]), return_inverse=True)  # (Arrow joins no float16 lists)
    pos = np.full(int(inv.max()) + 1, -1, np.int64)
    pos[inv[len(kl):]] = np.arange(len(kf))
    match = pos[inv[: len(kl)]]
    has = np.flatnonzero(match >= 0)
    order = has[np.argsort(kl[has], kind="stable")]
    dim = len(ft["feat"][0]) if ft.num_rows else 0
    allf = pc.list_flatten(ft["feat"]).to_numpy(zero_copy_only=False).astype(np.float32).reshape(ft.num_rows, dim)
    return led.take(pa.array(order)), allf[match[order]]


def select_pixels(strategy: str, cand: pa.Table, budget: int, *, has_head: bool, labeled_feats: np.ndarray,
                  keep: float, knn_k: int, seed: int, round_: int) -> pa.Table:
    """B pixels of the round from the candidate pass's output (see the module docstring)."""
    from poolscout.engine.methods import edald as E

    if strategy not in STRATEGIES:
        raise ValueError(f"segment.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    flat = _flat_candidates(cand)
    n = len(flat["x"])
    b = min(int(budget), n)
    rng = np.random.default_rng([int(seed), int(round_), 7])
    stage = strategy
    if strategy == "random" or (strategy in ("entropy", "edald") and not has_head):
        rows = np.sort(rng.choice(n, size=b, replace=False)) if b else np.zeros(0, np.int64)
        rows = rng.permutation(rows)
        score = np.zeros(len(rows))
        stage = "random" if strategy == "random" else f"{strategy}: random (no head yet)"
    elif strategy in ("entropy", "edald"):
        s = np.nan_to_num(flat[strategy], nan=-np.inf)
        rows = E.top(s, b)
        score = s[rows]
    else:
        lrows, lfeat = _local_picks(flat)
        lab = labeled_feats if len(labeled_feats) else None
        if len(lrows) == 0:
            rows, score = np.zeros(0, np.int64), np.zeros(0)
        elif strategy == "herding" or not has_head:
            g, _ = E.global_herding(lfeat, lab, b, k=knn_k, seed=seed)
            rows, score = lrows[g], np.zeros(len(g))
            stage = "global herding" + (" (no head yet)" if strategy == "two_stage" else "")
        else:
            g, _ = E.global_herding(lfeat, lab, E.keep_count(len(lrows), keep), k=knn_k, seed=seed)
            kept = lrows[g]
            s = np.nan_to_num(flat["edald"][kept], nan=-np.inf)
            top = E.top(s, b)
            rows, score = kept[top], s[top]
            stage = f"global herding kept {len(kept)} of {len(lrows)}, eDALD top {len(rows)}"
    return pa.table({"image_id": pa.array(flat["image_id"][rows], pa.int64()),
                     "x": pa.array(flat["x"][rows], pa.int32()), "y": pa.array(flat["y"][rows], pa.int32()),
                     "rank": pa.array(np.arange(1, len(rows) + 1), pa.int32()),
                     "score": pa.array(np.asarray(score, np.float64)),
                     "stage": pa.array([stage] * len(rows), pa.string())}, schema=SELECTION_SCHEMA)


# --------------------------------------------------------------------------- head
def _train_head_in_process(run: RunDir, cfg: Config, out: Path) -> dict:
    import torch

    from poolscout.engine.models.pixel_features import train_head

    seg = cfg.segment
    meta, feats = labeled_features(run)
    if meta.num_rows == 0:
        raise RunError(f"{run.root}: no labeled pixel has features yet; nothing to train the head on")
    y = meta["class"].to_numpy().astype(np.int64)
    keep = y != S.IGNORE
    threads = torch.get_num_threads()
    if seg.threads:
        torch.set_num_threads(int(seg.threads))
    t0 = time.time()
    try:
        head, losses = train_head(feats[keep], y[keep], len(cfg.dataset.classes) + 1, epochs=int(seg.head_epochs),
                                  lr=float(seg.head_lr), batch=int(seg.head_batch_size), seed=int(cfg.seed),
                                  class_weights=seg.head_class_weights)
    finally:
        torch.set_num_threads(threads)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(head.state_dict(), tmp)
    tmp.replace(out)
    counts = np.bincount(y[keep], minlength=len(cfg.dataset.classes) + 1)
    return {"pixels": int(keep.sum()), "class_counts": counts.tolist(), "class_weights": seg.head_class_weights,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": round(time.time() - t0, 2)}


def _ray_head_worker(config: dict) -> None:
    import ray.train

    run = RunDir(Path(config["run"]))
    cfg = run.config([], config["overrides"])
    summary = _train_head_in_process(run, cfg, Path(config["out"]))
    io.atomic_write_json(Path(config["out"]).with_suffix(".fit.json"), summary)
    ray.train.report({"pixels": summary["pixels"]})


def train_pixel_head(run: RunDir, cfg: Config, k: int, *, executor: str, overrides: list[str] | None = None) -> dict:
    """The head of round k on every labeled pixel (cycles/<k>/head.pt + head.json)."""
    from poolscout.jobs.train import in_process

    out = run.cycle_dir(k) / "head.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if executor == "ray" and not in_process(cfg):
        import shutil

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        storage = run.root / "ray_train"
        trainer = TorchTrainer(
            _ray_head_worker,
            train_loop_config={"run": str(run.root), "overrides": list(overrides or []), "out": str(out)},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"pixel_head_{k}_{int(time.time())}", storage_path=str(storage)))
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"pixel head training failed: {result.error}")
        fit = out.with_suffix(".fit.json")
        summary = json.loads(fit.read_text())
        fit.unlink()
        shutil.rmtree(storage, ignore_errors=True)
        summary["executor"] = "ray_train"
    else:
        summary = _train_head_in_process(run, cfg, out)
        summary["executor"] = "in_process" if executor == "ray" else "local"
    summary["wall_seconds"] = round(time.time() - t0, 2)
    io.atomic_write_json(run.cycle_dir(k) / "head.json", summary)
    return summary


# --------------------------------------------------------------------------- the loop
def _oracle_store(run: RunDir, cfg: Config) -> S.MaskStore:
    return S.MaskStore(io.read_table(masks_path(run)), fmt=cfg.segment.mask_format,
                       num_classes=len(cfg.dataset.classes), threshold=int(cfg.segment.mask_threshold))


def export_csv(run: RunDir, k: int) -> Path:
    """The round's picks as image,x,y,class (class empty) for people to fill in."""
    from poolscout.engine.data.export import csv_text

    sel = io.read_table(run.cycle_dir(k) / "pixel_selection.parquet")
    man = io.read_table(run.manifest, columns=["image_id", "source_key"])
    key = dict(zip(man["image_id"].to_pylist(), man["source_key"].to_pylist()))
    rows = [("image", "x", "y", "class")] + [(key[i], x, y, "") for i, x, y in zip(
        sel["image_id"].to_pylist(), sel["x"].to_pylist(), sel["y"].to_pylist())]
    out = run.export_dir(k) / "pixels_to_label.csv"
    io.atomic_write_text(out, csv_text(rows))
    return out


def import_points(run: RunDir, cfg: Config, path: str | Path, *, cycle: int | None = None) -> dict:
    """Human point labels (CSV or COCO keypoints) into the pixel ledger; a pixel labeled
    already is skipped and counted."""
    t = S.read_point_labels(path, io.read_table(run.manifest), list(cfg.dataset.classes))
    # a label on a test image would train on what mIoU is measured against; a rejected image
    # cannot be decoded or has a bad mask
    for state in ("test", "rejected"):
        bad = np.isin(t["image_id"].to_numpy(), run.ids_in_state(state))
        if bad.any():
            ids = sorted(set(t["image_id"].to_numpy()[bad].tolist()))
            raise ValueError(f"{path}: {int(bad.sum())} point label(s) on {len(ids)} {state} image(s) (image_id "
                             f"{', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''}); only pool and "
                             f"labeled images take labels")
    k = int(cycle) if cycle is not None else _current_round(run)
    return S.PixelLedger(run.root).add(t["image_id"].to_numpy(), t["x"].to_numpy(), t["y"].to_numpy(),
                                       t["class"].to_numpy(), cycle=k, source=f"human:{Path(path).name}",
                                       on_duplicate="skip")


def _current_round(run: RunDir) -> int:
    d = run.root / "cycles"
    ks = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(ks) if ks else 0


def run_round(run: RunDir, cfg: Config, k: int, *, executor: str, progress: bool = True,
              log: Callable[[str], None] = print, overrides: list[str] | None = None) -> dict:
    """One round (see the module docstring); finished steps are skipped on a rerun."""
    seg = cfg.segment
    cdir = run.cycle_dir(k)
    cdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    led = S.PixelLedger(run.root)
    prev_head = run.cycle_dir(k - 1) / "head.pt" if k > 0 else None
    has_head = prev_head is not None and prev_head.is_file()
    sel_path = cdir / "pixel_selection.parquet"
    if not sel_path.is_file():
        t0 = time.time()
        pool = run.ids_in_state("pool")
        rows = _image_rows(run, pool)
        lab = _labeled_by_image(led)
        rows = rows.append_column("labeled_x", pa.array([lab.get(i, (np.zeros(0, np.int64),) * 2)[0].tolist()
                                                         for i in rows["image_id"].to_pylist()], pa.list_(pa.int64())))
        rows = rows.append_column("labeled_y", pa.array([lab.get(i, (np.zeros(0, np.int64),) * 2)[1].tolist()
                                                         for i in rows["image_id"].to_pylist()], pa.list_(pa.int64())))
        kw = _stage_kwargs(run, cfg, "candidates", k, prev_head if has_head else None)
        cand = run_pass(rows, kw, cdir / "candidates", cfg=cfg, executor=executor, progress=progress,
                        desc=f"round {k}: candidates")
        _errors_to_rejects(run, k, "candidates", cand, rows)
        timings["candidates"] = round(time.time() - t0, 2)
        t0 = time.time()
        _, lf = labeled_features(run)
        sel = select_pixels(seg.strategy, cand, int(seg.budget), has_head=has_head, labeled_feats=lf,
                            keep=float(seg.keep), knn_k=int(seg.knn_k), seed=int(cfg.seed), round_=k)
        io.write_table(sel, sel_path, SELECTION_SCHEMA)
        timings["select"] = round(time.time() - t0, 2)
        log(f"[round {k}] select done: {sel.num_rows} pixels on {len(set(sel['image_id'].to_pylist()))} images "
            f"by {seg.strategy} ({sel['stage'][0].as_py() if sel.num_rows else '-'})")
    sel = io.read_table(sel_path)
    # label
    if not led.part_path(k, "oracle").is_file():
        if cfg.loop.oracle == "human":
            out = export_csv(run, k)
            if not any(p.name.startswith(f"part-{k:05d}-human") for p in led.parts()):
                return {"round": k, "pending": str(out)}
        else:
            t0 = time.time()
            ids, xs, ys = sel["image_id"].to_numpy(), sel["x"].to_numpy(), sel["y"].to_numpy()
            cls = S.oracle_labels(_oracle_store(run, cfg), ids, xs, ys)
            led.add(ids, xs, ys, cls, cycle=k, source="oracle")
            timings["label"] = round(time.time() - t0, 2)
    # features of the labeled pixels that have none yet
    fpath = run.root / "pixel_feats" / f"part-{k:05d}.parquet"
    if not fpath.is_file():
        t0 = time.time()
        meta, _ = labeled_features(run)
        allp = led.read(columns=["image_id", "x", "y"])
        have = S.pixel_keys(meta["image_id"].to_numpy(), meta["x"].to_numpy(), meta["y"].to_numpy())
        keys = S.pixel_keys(allp["image_id"].to_numpy(), allp["x"].to_numpy(), allp["y"].to_numpy())
        need = allp.filter(pa.array(~np.isin(keys, have)))
        by = _labeled_by_image(_TableLedger(need))
        rows = _image_rows(run, np.array(sorted(by), np.int64))
        rows = rows.append_column("req_x", pa.array([by[i][0].tolist() for i in rows["image_id"].to_pylist()],
                                                    pa.list_(pa.int64())))
        rows = rows.append_column("req_y", pa.array([by[i][1].tolist() for i in rows["image_id"].to_pylist()],
                                                    pa.list_(pa.int64())))
        out = run_pass(rows, _stage_kwargs(run, cfg, "pixels", k, None), cdir / "label_feats", cfg=cfg,
                       executor=executor, progress=progress, desc=f"round {k}: label features")
        _write_feats(rows, out, fpath)
        timings["features"] = round(time.time() - t0, 2)
    # train
    if not (cdir / "head.json").is_file():
        h = train_pixel_head(run, cfg, k, executor=executor, overrides=overrides)
        timings["train"] = h["wall_seconds"]
        log(f"[round {k}] train done in {h['wall_seconds']:.1f} s: head on {h['pixels']} labeled pixels")
    # evaluate
    mpath = cdir / "metrics.json"
    if not mpath.is_file():
        t0 = time.time()
        test = run.ids_in_state("test")
        rows = _image_rows(run, test)
        masks = io.read_table(masks_path(run))
        rows = rows.join(masks, keys="image_id", join_type="inner").sort_by("image_id")
        out = run_pass(rows, _stage_kwargs(run, cfg, "eval", k, cdir / "head.pt"), cdir / "eval", cfg=cfg,
                       executor=executor, progress=progress, desc=f"round {k}: evaluate")
        _errors_to_rejects(run, k, "eval", out, rows)
        c = len(cfg.dataset.classes) + 1
        ok = out.filter(pc.equal(out["error"], ""))
        conf = pc.list_flatten(ok["confusion"]).to_numpy().reshape(-1, c, c).sum(0) if ok.num_rows else np.zeros((c, c))
        from poolscout.engine.models.pixel_features import iou_from_confusion

        miou, per = iou_from_confusion(conf)
        names = ["background", *cfg.dataset.classes]
        lab = led.read(columns=["class"])["class"].to_numpy()
        timings["evaluate"] = round(time.time() - t0, 2)
        old = json.loads(mpath.read_text()) if mpath.is_file() else {}
        metrics = {"round": k, "strategy": seg.strategy, "labeled_pixels": int(len(lab)),
                   "labeled_per_class": {n: int((lab == i).sum()) for i, n in enumerate(names)},
                   "eval": {"miou": miou, "per_class_iou": dict(zip(names, per)), "test_images": int(ok.num_rows),
                            "pixel_accuracy": float(np.trace(conf) / max(conf.sum(), 1))},
                   "timings_s": {**old.get("timings_s", {}), **timings}}
        io.atomic_write_json(mpath, metrics)
        log(f"[round {k}] evaluate done: mIoU {miou:.3f} with {len(lab)} labeled pixels")
    return json.loads(mpath.read_text())


class _TableLedger:
    """A table shaped like the pixel ledger's read()."""

    def __init__(self, t: pa.Table):
        self.t = t

    def read(self, columns=None) -> pa.Table:
        return self.t.select(columns) if columns else self.t


def _write_feats(rows: pa.Table, out: pa.Table, path: Path) -> None:
    req = {i: (x, y) for i, x, y in zip(rows["image_id"].to_pylist(), rows["req_x"].to_pylist(),
                                        rows["req_y"].to_pylist())}
    ids, xs, ys, feats = [], [], [], []
    for i, err, f in zip(out["image_id"].to_pylist(), out["error"].to_pylist(), out["feat"].to_pylist()):
        if err:
            continue
        x, y = req[i]
        dim = len(f) // max(len(x), 1)
        ids += [i] * len(x)
        xs += list(x)
        ys += list(y)
        feats += [f[j * dim:(j + 1) * dim] for j in range(len(x))]
    t = pa.table({"image_id": pa.array(ids, pa.int64()), "x": pa.array(xs, pa.int32()), "y": pa.array(ys, pa.int32()),
                  "feat": pa.array(feats, pa.list_(pa.float16()))}, schema=FEATS_SCHEMA)
    io.write_table(t, path, FEATS_SCHEMA)


def run_segmentation(run: RunDir, cfg: Config, *, rounds: int | None = None, executor: str | None = None,
                     progress: bool = True, log: Callable[[str], None] = print,
                     overrides: list[str] | None = None) -> dict:
    """Rounds 0..rounds (resumable): returns {"rounds": [metrics...], "pending": ...}."""
    run.require()
    if not is_segmentation(run):
        raise RunError(f"{run.root} has no masks.parquet; initialise it with `poolscout segment init`")
    executor = executor or cfg.loop.executor
    if executor == "ray":
        from poolscout.jobs.ray_env import connect

        connect(cfg.ray.address, num_cpus=int(cfg.ray.num_cpus), log_dir=run.root / "logs")
    n = int(cfg.segment.rounds if rounds is None else rounds)
    out = []
    for k in range(n + 1):
        m = run_round(run, cfg, k, executor=executor, progress=progress, log=log, overrides=overrides)
        if "pending" in m:
            log(f"[round {k}] waiting for labels: fill in {m['pending']} and `poolscout segment import`")
            return {"rounds": out, "pending": m["pending"]}
        out.append(m)
    return {"rounds": out}


def segment_status(run: RunDir) -> dict:
    """Where a segmentation run stands (`poolscout status`): images by state, labeled pixels,
    and per round the steps done, labeled pixels and mIoU; a pending CSV of pixels to label;
    the refinement sessions (RUN/refine*/) with their answers, model version and F1."""
    run.require()
    st = np.asarray(run.read_ledger()["state"].to_pylist(), dtype=object)
    counts = {s: int((st == s).sum()) for s in io.STATES}
    rounds = []
    root = run.root / "cycles"
    ks = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    led = S.PixelLedger(run.root)
    for k in ks:
        d = run.cycle_dir(k)
        m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        done = {"selection": (d / "pixel_selection.parquet").is_file(),
                "label": any(p.name.startswith(f"part-{k:05d}-") for p in led.parts()),
                "features": (run.root / "pixel_feats" / f"part-{k:05d}.parquet").is_file(),
                "train": (d / "head.json").is_file(), "evaluate": (d / "metrics.json").is_file()}
        rounds.append({"round": k, "steps": [n for n, ok in done.items() if ok],
                       "labeled_pixels": m.get("labeled_pixels"), "miou": (m.get("eval") or {}).get("miou")})
    pending = None
    if ks:
        csv_path = run.export_dir(ks[-1]) / "pixels_to_label.csv"
        if csv_path.is_file() and not (run.cycle_dir(ks[-1]) / "metrics.json").is_file():
            pending = str(csv_path)
    refine = []
    for d in sorted(run.root.glob("refine*")):
        if not (d / "answers.jsonl").is_file() or not (d / "session.json").is_file():
            continue
        from poolscout.engine.data.answers import AnswerLog

        log = AnswerLog(d / "answers.jsonl")
        rt = log.retrains()
        refine.append({"dir": str(d), "answers": len(log.live()), "model_version": rt[-1]["model_version"] if rt else 0,
                       "f1": rt[-1].get("f1") if rt else None, **json.loads((d / "session.json").read_text())})
    return {"run": str(run.root), "kind": "segmentation", "ledger": counts,
            "labeled_pixels": int(led.read(columns=["class"]).num_rows), "rounds": rounds, "pending": pending,
            "refine": refine}


__all__ = ["STRATEGIES", "export_csv", "import_points", "init_segmentation", "is_segmentation", "labeled_features",
           "run_pass", "run_round", "run_segmentation", "segment_status", "select_pixels", "train_pixel_head"]
