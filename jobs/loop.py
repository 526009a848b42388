"""`poolscout run`: the active-learning loop, resumable at every stage.

    seed set (random, or k-center on the untrained detector's embeddings)
    -> for k = 0 .. N:  train -> evaluate -> [score -> select -> label]  (the last cycle
       only trains and evaluates, so N acquisition rounds give N + 1 points on the curve)

Every stage leaves an artifact in the run directory, written atomically, and a rerun
skips the stages whose artifact exists:

    seed      ledger rows labeled at cycle 0 (seed.json records the pick)
    train     cycles/<k>/train.json (after model.pt; a model.pt alone is retrained)
    evaluate  cycles/<k>/eval.json
    score     cycles/<k>/score.json (after scores.parquet); local scoring also resumes per chunk
    select    cycles/<k>/select.json (after selection.parquet)
    label     cycles/<k>/label.json (after the ledger update)

cycles/<k>/metrics.json gathers evaluation, acquisition diagnostics and stage timings;
loop.json at the run root says where the loop stands ("running", "waiting_for_labels",
"done") and pins the settings it was started with, so a resumed loop cannot drift.
Everything a stage draws at random is seeded from (seed, cycle), so a run killed with
SIGKILL anywhere and started again ends with the same ledger, selections and metrics as
an uninterrupted one (tests/test_loop.py kills it at every stage boundary).
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
from poolscout.engine.core.config import Config, ConfigError
from poolscout.engine.core.run import RunDir, RunError
from poolscout.jobs.hooks import crash_point

STAGES = ("train", "evaluate", "score", "select", "label")
# Settings that must not change once a loop has started (they change what it selects).
PINNED = ("seed", "detector", "train", "score", "select", "loop.oracle", "loop.seed_size", "loop.seed_strategy")


class LabelsPending(RuntimeError):
    """A human oracle has not answered the current selection yet."""


def _marker(run: RunDir, k: int, stage: str):
    return run.cycle_dir(k) / {"train": "train.json", "evaluate": "eval.json", "score": "score.json",
                               "select": "select.json", "label": "label.json"}[stage]


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def loop_state(run: RunDir) -> dict:
    return _read_json(run.root / "loop.json")


def _write_state(run: RunDir, state: dict) -> None:
    io.atomic_write_json(run.root / "loop.json", state)


def _pinned_view(cfg_dict: dict) -> dict:
    out = {}
    for key in PINNED:
        sect, _, sub = key.partition(".")
        v = cfg_dict.get(sect)
        out[key] = v.get(sub) if sub else v
    return out


def _same_settings(old, new, default) -> bool:
    """Equal, where a key the pinned settings lack (added by a later poolscout version)
    counts as equal when its current value is the default (the old code's behaviour)."""
    if isinstance(old, dict) and isinstance(new, dict):
        default = default if isinstance(default, dict) else {}
        return all(_same_settings(old[k], new.get(k), default.get(k)) if k in old
                   else new[k] == default.get(k, object()) for k in new) and set(old) <= set(new)
    return old == new


def _check_pinned(state: dict, cfg: Config, run: RunDir) -> None:
    old = state.get("pinned")
    if not old:
        return
    new = json.loads(json.dumps(_pinned_view(cfg.to_dict())))
    default = json.loads(json.dumps(_pinned_view(Config().to_dict())))
    diff = [k for k in PINNED if not _same_settings(old.get(k), new.get(k), default.get(k))]
    if diff:
        raise ConfigError(f"{run.root / 'loop.json'}: this loop was started with other settings for "
                          f"{', '.join(diff)}; resume with the same settings (or start a new run directory)")


# --- stages -------------------------------------------------------------------------------
def seed_set(run: RunDir, cfg: Config, *, progress: bool = True) -> dict:
    """Label a seed set when the run has none: `loop.seed_size` images, random or by coverage."""
    labeled = run.ids_in_state("labeled")
    if len(labeled):
        return {"skipped": f"{len(labeled)} images are labeled already", "images": int(len(labeled))}
    n = int(cfg.loop.seed_size)
    if cfg.loop.oracle == "human":
        raise RunError(f"{run.ledger}: no labeled images; with a human oracle, label a seed set first "
                       f"(`poolscout init ... --labeled IDS`) or pick one with the simulated oracle")
    if n <= 0:
        raise RunError(f"{run.ledger}: no labeled images and loop.seed_size is 0; set --seed-size "
                       f"(or init with --seed-fraction / --labeled)")
    pool = np.sort(run.ids_in_state("pool"))
    if n > len(pool):
        raise RunError(f"loop.seed_size={n} but the pool has only {len(pool)} images")
    how = cfg.loop.seed_strategy
    t0 = time.time()
    if how == "random":
        ids = np.sort(np.random.default_rng([cfg.seed, 0x5EED]).choice(pool, n, replace=False))
        rationale = {"method": "random"}
    elif how in ("kcenter", "maxherding", "typiclust", "probcover"):
        ids, rationale = _coverage_seed(run, cfg, pool, n, how, progress)
    else:
        raise ConfigError(f"loop.seed_strategy must be random, kcenter, maxherding, typiclust or probcover, "
                          f"got {how!r}")
    run.set_state(ids, "labeled", cycle=0, selected_by=f"seed:{how}")
    out = {"method": how, "images": int(n), "image_ids": [int(i) for i in ids], "seconds": round(time.time() - t0, 2),
           **rationale}
    io.atomic_write_json(run.root / "seed.json", out)
    return out


def _coverage_seed(run: RunDir, cfg: Config, pool: np.ndarray, n: int, how: str,
                   progress: bool) -> tuple[np.ndarray, dict]:
    """Cold start: a coverage pick (maxherding, typiclust, probcover, or k-center greedy)
    on the pool's backbone embeddings (ImageNet EfficientNet-Lite0, no label needed),
    computed by `jobs.embed` and cached in the run for later cycles."""
    from poolscout.engine.acquisition.selectors import SELECTORS, SelectContext
    from poolscout.jobs.embed import cached_ids, embed_backbone, load_backbone

    summary = embed_backbone(run, cfg, states=("pool",), progress=progress)
    ok = np.intersect1d(pool, cached_ids(run))  # an undecodable image cannot be a seed
    if len(ok) < n:
        raise RunError(f"loop.seed_size={n} but only {len(ok)} pool images could be embedded")
    emb = load_backbone(run, ok)
    table = {"image_id": ok, "embedding": emb}
    ctx = SelectContext(rng=np.random.default_rng([cfg.seed, 0x5EED]), labeled_embedding=None,
                        cache_dir=str(run.root / "embeddings" / "cache"))
    sel = SELECTORS.get("coreset" if how == "kcenter" else how)(table, n, ctx=ctx)
    return np.sort(np.asarray(sel.image_id, np.int64)), {
        "method": how, "embedding": "backbone", "embedding_dim": int(emb.shape[1]),
        "embed_seconds": summary.get("seconds"), "embedded": summary.get("embedded"),
        **({"undecodable": int(len(pool) - len(ok))} if len(ok) < len(pool) else {})}


def evaluate(run: RunDir, cfg: Config, k: int, *, progress: bool = True) -> dict:
    """pycocotools evaluation of cycle k's model on the test split -> cycles/<k>/eval.json."""
    import torch

    from poolscout.engine.models.detectors import load_checkpoint
    from poolscout.engine.evaluation.metrics import evaluate_model

    test = np.sort(run.ids_in_state("test"))
    if len(test) == 0:
        out = {"cycle": k, "skipped": "the run has no test split (init with --test)"}
        io.atomic_write_json(_marker(run, k, "evaluate"), out)
        return out
    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    man = man.filter(pc.is_in(man["image_id"], pa.array(test))).sort_by("image_id")
    ann = io.read_table(run.annotations)
    model, meta = load_checkpoint(run.model_path(k))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    threads = cfg.loop.eval_threads or cfg.score.torch_threads
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        res = evaluate_model(model, man, ann, run.read_categories(), input_size=int(meta["detector"]["input_size"]),
                             batch_size=cfg.loop.eval_batch_size, device=dev, max_pixels=cfg.dataset.max_pixels,
                             progress=progress)
        stop = stop_signal(run, cfg, k, model, int(meta["detector"]["input_size"]), dev)
        if stop is not None:
            res["stop"] = stop
    finally:
        torch.set_num_threads(old_threads)
    res["cycle"] = k
    io.atomic_write_json(_marker(run, k, "evaluate"), res)
    return res


def stop_set(run: RunDir, cfg: Config) -> np.ndarray:
    """The stopping signal's fixed sample: `loop.stop_set` images drawn (seeded) from the
    pool the first time it is asked for, kept in RUN/stop_set.json and read from there
    after (whatever is labeled later: the sample measures the model, not the pool)."""
    path = run.root / "stop_set.json"
    if path.is_file():
        return np.asarray(json.loads(path.read_text())["image_id"], np.int64)
    pool = np.sort(run.ids_in_state("pool"))
    n = min(int(cfg.loop.stop_set), len(pool))
    ids = np.sort(np.random.default_rng([cfg.seed, 0x5709]).choice(pool, size=n, replace=False)) if n else pool[:0]
    io.atomic_write_json(path, {"image_id": ids.tolist(), "drawn_from": "pool", "size": n})
    return ids


def _stop_predictions_path(run: RunDir, k: int) -> Path:
    return run.cycle_dir(k) / "stop_predictions.npz"


def stop_signal(run: RunDir, cfg: Config, k: int, model, input_size: int, device) -> dict | None:
    """Cycle k's model on the stop set (saved, arrays only) and its agreement with cycle
    k-1's there; None when loop.stop_set is 0 or the set is empty."""
    from poolscout.engine.evaluation.metrics import prediction_agreement, predict_images

    if int(cfg.loop.stop_set) <= 0:
        return None
    ids = stop_set(run, cfg)
    if len(ids) == 0:
        return None
    path = _stop_predictions_path(run, k)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            cur = {key: z[key] for key in z.files}
    else:
        man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
        man = man.filter(pc.is_in(man["image_id"], pa.array(ids))).sort_by("image_id")
        cur = predict_images(model, man, input_size=input_size, batch_size=cfg.loop.eval_batch_size, device=device,
                             max_pixels=cfg.dataset.max_pixels, what="stop-set image")
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **cur)
        io.commit_file(tmp, path)
    out = {"images": int(len(ids)), "threshold": float(cfg.loop.stop_agreement), "agreement": None,
           "labels_buy_little": False}
    prev = _stop_predictions_path(run, k - 1) if k > 0 else None
    if prev is not None and prev.is_file():
        with np.load(prev, allow_pickle=False) as z:
            before = {key: z[key] for key in z.files}
        if np.array_equal(before["image_id"], cur["image_id"]):
            agree = prediction_agreement(before, cur, min_score=float(cfg.loop.stop_min_score))
            out.update(agreement=agree["agreement"], identical_images=agree["identical_images"],
                       labels_buy_little=bool(agree["agreement"] >= float(cfg.loop.stop_agreement)))
    return out


def label(run: RunDir, cfg: Config, k: int) -> dict:
    """The oracle: simulated (GT revealed) or human (wait for `poolscout import`)."""
    from poolscout.engine.data import oracle

    if cfg.loop.oracle == "simulated":
        res = oracle.simulated_label(run, k)
    elif cfg.loop.oracle == "human":
        if not run.export_dir(k).is_dir():
            from poolscout.jobs.export import export

            export(run, cfg, fmt="all", cycle=k)
        st = oracle.batch_status(run, k)
        if st["labeled"] < st["selected"]:
            raise LabelsPending(f"cycle {k}: {st['labeled']} of {st['selected']} selected images are labeled; "
                                f"export is in {run.export_dir(k)}; answer with "
                                f"`poolscout import {run.root} --labels FILE`, then rerun `poolscout run`")
        res = {"images": st["selected"], "oracle": "human"}
    else:
        raise ConfigError(f"loop.oracle must be 'simulated' or 'human', got {cfg.loop.oracle!r}")
    out = {"cycle": k, **res}
    io.atomic_write_json(_marker(run, k, "label"), out)
    return out


def write_metrics(run: RunDir, cfg: Config, k: int, strategy: str) -> dict:
    """cycles/<k>/metrics.json: evaluation + acquisition diagnostics + stage timings."""
    from poolscout.engine.evaluation.metrics import acquisition_stats

    ev = _read_json(_marker(run, k, "evaluate"))
    ann = io.read_table(run.annotations) if run.annotations.is_file() else io.ANNOTATIONS_SCHEMA.empty_table()
    acq = acquisition_stats(ann, run.read_ledger(), run.read_categories(), k)
    timings = _read_json(run.cycle_dir(k) / "timings.json")
    out = {"cycle": k, "strategy": strategy,
           "labeled_images": acq.pop("labeled_images"), "labeled_boxes": acq.pop("labeled_boxes"),
           "new_images": acq.pop("new_images"), "new_boxes": acq.pop("new_boxes"),
           "eval": ev, "acquisition": acq, "timings_s": timings}
    if ev.get("stop") is not None:
        out["stop"] = ev.pop("stop")
    io.atomic_write_json(run.cycle_dir(k) / "metrics.json", out)
    return out


def _record_time(run: RunDir, k: int, stage: str, seconds: float) -> None:
    p = run.cycle_dir(k) / "timings.json"
    t = _read_json(p)
    t[stage] = round(seconds, 2)
    io.atomic_write_json(p, t)


# --- the loop -----------------------------------------------------------------------------
def loop_config(run: RunDir, extra_files=(), overrides=()) -> Config:
    """The loop's config: loop.json's pinned config when resuming, else run.yaml; then
    --config files and --set overrides on top."""
    from poolscout.engine.core.config import build_config, load_yaml

    state = loop_state(run)
    if state.get("config"):
        layers = [(str(run.root / "loop.json"), state["config"])]
        layers += [(str(p), load_yaml(p)) for p in extra_files]
        return build_config(layers, overrides)
    return run.config(extra_files, overrides)


def run_loop(run: RunDir, cfg: Config, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the loop to `cfg.loop.cycles`; returns loop.json's content.

    Returns with status "waiting_for_labels" when a human oracle has not answered yet.
    """
    from poolscout.engine.acquisition import strategies as St
    from poolscout.jobs.score import score
    from poolscout.jobs.select import needs_model, select
    from poolscout.jobs.train import train

    run.require()
    state = loop_state(run)
    _check_pinned(state, cfg, run)
    if cfg.loop.cycles < 0:
        raise ConfigError(f"loop.cycles must be >= 0, got {cfg.loop.cycles}")
    if cfg.loop.executor not in ("ray", "local"):
        raise ConfigError(f"loop.executor must be 'ray' or 'local', got {cfg.loop.executor!r}")
    strat = St.load_strategy(cfg.select.strategy)
    state.update({"strategy": strat.name, "seed": cfg.seed, "cycles": cfg.loop.cycles, "budget": cfg.select.budget,
                  "oracle": cfg.loop.oracle, "executor": cfg.loop.executor,
                  "pinned": state.get("pinned") or json.loads(json.dumps(_pinned_view(cfg.to_dict()))),
                  "config": cfg.to_dict(), "status": "running"})
    state.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_state(run, state)
    if cfg.loop.executor == "ray":
        from poolscout.jobs.ray_env import connect

        connect(cfg.ray.address, cfg.ray.num_cpus, log_dir=run.root / "logs")

    crash_point("0:seed:before")
    if not run.ids_in_state("labeled").size:
        res = seed_set(run, cfg, progress=progress)
        log(f"[seed] {res['images']} images ({res['method']})")
    crash_point("0:seed:after")

    model_free = not needs_model(strat) and not cfg.loop.always_score
    for k in range(cfg.loop.cycles + 1):
        last = k == cfg.loop.cycles
        for stage in STAGES:
            if last and stage not in ("train", "evaluate"):
                continue
            if stage == "score" and model_free:
                continue
            if _marker(run, k, stage).is_file():
                continue
            state.update(cycle=k, stage=stage)
            _write_state(run, state)
            crash_point(f"{k}:{stage}:before")
            t0 = time.time()
            try:
                if stage == "train":
                    res = train(run, cfg, cycle=k, progress=progress)
                elif stage == "evaluate":
                    res = evaluate(run, cfg, k, progress=progress)
                elif stage == "score":
                    res = score(run, cfg, cycle=k, progress=progress)
                elif stage == "select":
                    res = select(run, cfg, strategy=cfg.select.strategy, cycle=k)  # a name or a YAML path
                else:
                    res = label(run, cfg, k)
            except LabelsPending as e:
                state.update(status="waiting_for_labels", message=str(e))
                _write_state(run, state)
                log(str(e))
                return state
            dt = time.time() - t0
            _record_time(run, k, stage, dt)
            log(f"[cycle {k}] {stage} done in {dt:.1f} s{_brief(stage, res)}")
            for w in res.get("warnings", []) if isinstance(res, dict) else []:
                log(f"[cycle {k}] warning: {w}")
            if stage == "evaluate":
                write_metrics(run, cfg, k, strat.name)
            crash_point(f"{k}:{stage}:after")
        write_metrics(run, cfg, k, strat.name)  # again, with every stage's time
    state.update(status="done", cycle=cfg.loop.cycles, stage=None, message=None,
                 finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_state(run, state)
    return state


def _brief(stage: str, res: dict) -> str:
    if stage == "evaluate" and res.get("map50") is not None:
        return f": mAP50 {res['map50']:.3f}, mAP {res['map']:.3f} on {res.get('test_images')} test images"
    if stage == "train" and res.get("labeled"):
        return f": {res['labeled']} labeled images"
    if stage == "select" and "selected" in res:
        return f": {res['selected']} images by {res.get('strategy')}"
    if stage == "label" and "images" in res:
        return f": {res['images']} images labeled"
    return ""


def status(run: RunDir) -> dict:
    """Where a run stands: loop state, per-cycle labeled counts, mAP, finished stages."""
    run.require()
    state = loop_state(run)
    led = run.read_ledger()
    st = np.asarray(led["state"].to_pylist(), dtype=object)
    counts = {s: int((st == s).sum()) for s in io.STATES}
    cycles = []
    root = run.root / "cycles"
    ks = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    for k in ks:
        m = _read_json(run.cycle_dir(k) / "metrics.json")
        ev = m.get("eval") or _read_json(run.cycle_dir(k) / "eval.json")  # stages run by hand write no metrics
        stages = [s for s in STAGES if _marker(run, k, s).is_file()]
        if (run.export_dir(k)).is_dir() and any(run.export_dir(k).iterdir()):
            stages.append("export")
        stop = m.get("stop") or ev.get("stop") or {}
        cycles.append({"cycle": k, "stages": stages, "labeled_images": m.get("labeled_images"),
                       "map50": ev.get("map50"), "map": ev.get("map"), "agreement": stop.get("agreement"),
                       "labels_buy_little": bool(stop.get("labels_buy_little"))})
    out = {"run": str(run.root), "status": state.get("status", "not started"), "strategy": state.get("strategy"),
           "cycle": state.get("cycle"), "stage": state.get("stage"), "cycles_planned": state.get("cycles"),
           "ledger": counts, "cycles": cycles, "message": state.get("message")}
    last = next((c for c in reversed(cycles) if c["agreement"] is not None), None)
    if last is not None:  # the stopping signal of the latest cycle that has one
        out["stop"] = {"cycle": last["cycle"], "agreement": last["agreement"],
                       "labels_buy_little": last["labels_buy_little"]}
    done = [c for c in cycles if c["stages"]]
    if not state and done:  # no loop, but `poolscout train/score/select/export` ran
        out.update(status="stages run by hand", cycle=done[-1]["cycle"], stage=done[-1]["stages"][-1])
        sel = _read_json(run.cycle_dir(done[-1]["cycle"]) / "select.json")
        out["strategy"] = sel.get("strategy")
    if state.get("status") == "waiting_for_labels" and state.get("cycle") is not None:
        from poolscout.engine.data import oracle

        out["batch"] = oracle.batch_status(run, int(state["cycle"]))
    return out
