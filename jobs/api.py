"""poolscout's Python API: the CLI's verbs as functions that return Arrow tables and dicts.

    from poolscout.jobs import api

    api.init("runs/steel", images="data/images", annotations="data/coco.json", seed_fraction=0.05)
    api.run("runs/steel", cycles=4, budget=100, strategy="entropy")        # the loop
    picks = api.query("runs/steel", strategy="margin", budget=50)         # no re-scoring, no writes
    picks = api.query("runs/steel", strategy="maxherding", budget=50, where="class == 'scratches'")
    tables = api.query_batch("runs/steel", "queries.yaml")               # many at once, saved by name
    api.scores("runs/steel")                                              # image_id + one column per signal
    api.metrics("runs/steel")                                             # mAP per cycle

Every function takes `configs` (YAML files layered over the run's run.yaml) and
`overrides` ("key=value" strings), like the CLI's --config and --set. Functions that train
or score start an embedded local Ray unless `address` (or $RAY_ADDRESS) names a cluster.
Errors raise `ConfigError`, `RunError` or `ValueError` with the message the CLI prints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, load_config
from poolscout.engine.core.run import RunDir, RunError

PathLike = str | Path


def _open(run_dir: PathLike, configs: Sequence[str] = (), overrides: Sequence[str] = ()) -> tuple[RunDir, Config]:
    run = RunDir(Path(run_dir))
    run.require()
    return run, run.config(list(configs), list(overrides))


def _connect(cfg: Config, address: str | None) -> None:
    from poolscout.jobs.ray_env import connect

    connect(address or cfg.ray.address, cfg.ray.num_cpus, quiet=True)


def init(run_dir: PathLike, images: PathLike, *, annotations: PathLike | None = None, fmt: str | None = None,
         labeled: PathLike | None = None, seed_fraction: float | None = None, test: PathLike | None = None,
         configs: Sequence[str] = (), overrides: Sequence[str] = (), force: bool = False) -> dict:
    """Create a run directory from an image folder (and the labels there are).

    Args:
        images: folder of images (the pool).
        annotations: COCO JSON, VOC folder or YOLO folder with ground truth, if any.
        fmt: "coco", "voc" or "yolo" (default: guessed from `annotations`).
        labeled: file of ids already labeled; or `seed_fraction` of the pool labeled at random.
        test: file of ids held out for evaluation.

    Returns:
        The init summary: counts per ledger state, rejects, categories, the run path.
    """
    from poolscout.engine.data.pool import init_run

    cfg = load_config(list(configs), list(overrides))
    return init_run(RunDir(Path(run_dir)), images=str(images), annotations=None if annotations is None else str(annotations),
                    fmt=fmt, labeled=None if labeled is None else str(labeled), seed_fraction=seed_fraction,
                    test=None if test is None else str(test), cfg=cfg, force=force)


def run(run_dir: PathLike, *, cycles: int | None = None, budget: int | None = None, strategy: str | None = None,
        executor: str | None = None, configs: Sequence[str] = (), overrides: Sequence[str] = (),
        address: str | None = None, progress: bool = False) -> dict:
    """Run (or resume) the active-learning loop; returns its state (status, cycle, ...)."""
    from poolscout.jobs.loop import loop_config, run_loop

    run_ = RunDir(Path(run_dir))
    run_.require()
    ov = list(overrides)
    for key, val in (("loop.cycles", cycles), ("select.budget", budget), ("select.strategy", strategy),
                     ("loop.executor", executor), ("ray.address", address)):
        if val is not None:
            ov.append(f"{key}={val}")
    cfg = loop_config(run_, list(configs), ov)
    return run_loop(run_, cfg, progress=progress, log=lambda m: None)


def score(run_dir: PathLike, *, cycle: int | None = None, force: bool = False, configs: Sequence[str] = (),
          overrides: Sequence[str] = (), address: str | None = None) -> dict:
    """Score the pool with the cycle's model (Ray Data); a finished cycle is kept unless `force`."""
    from poolscout.jobs.score import score as do_score

    run_, cfg = _open(run_dir, configs, overrides)
    _connect(cfg, address)
    return do_score(run_, cfg, cycle=cycle, progress=False, force=force)


def query(run_dir: PathLike, *, strategy: str, budget: int, where: str | None = None, name: str | None = None,
          cycle: int | None = None, configs: Sequence[str] = (), overrides: Sequence[str] = ()) -> pa.Table:
    """Ask a scored cycle which `budget` images `strategy` would pick, without re-scoring.

    Reads the cycle's cached scores, embeddings and predictions; never re-scores, so many
    (strategy, budget) questions cost seconds each. Signals the strategy needs that scoring
    did not store are computed from the stored predictions.

    Args:
        where: only candidates where this filter holds (engine.acquisition.where), e.g.
            "class == 'scratch' and score_max < 0.5".
        name: also save the answer as cycles/<k>/queries/<name>.parquet (+ .json); the
            cycle's selection.parquet is never touched. None = write nothing (but the
            cycle's cache).

    Returns:
        image_id (int64), rank (int32, 1-based), score (float64), rationale (JSON string),
        file (the image's path relative to the pool root). The schema metadata holds the
        selection summary as JSON under b"poolscout": cycle, candidates, where, "warnings"
        (ties, a budget above the pool) and "no_detections" (picks scored by score.empty_value).
    """
    return query_batch(run_dir, [{"strategy": strategy, "budget": budget, "where": where, "name": name}],
                       cycle=cycle, configs=configs, overrides=overrides)[0]


def query_batch(run_dir: PathLike, queries: Sequence[dict] | PathLike, *, cycle: int | None = None,
                configs: Sequence[str] = (), overrides: Sequence[str] = ()) -> list[pa.Table]:
    """Answer many queries ({strategy, budget, where?, name?} dicts, or a batch YAML file)
    from one load of the scored cycle (scores, filter columns, embeddings, kNN graph).
    Queries with a `name` (all of them, from a file) are saved beside the cycle.

    Returns:
        One table per query, as `query` returns them, in order.
    """
    from poolscout.jobs.query import QuerySession, read_batch

    run_, cfg = _open(run_dir, configs, overrides)
    qs = read_batch(queries) if isinstance(queries, (str, Path)) else list(queries)
    session = QuerySession(run_, cfg, cycle)
    out = []
    for q in qs:
        table, summary = session.ask(q["strategy"], q["budget"], q.get("where"))
        if q.get("name"):
            summary["name"] = q["name"]
            summary["file"] = str(session.save(q["name"], table, summary))
        out.append(_with_files(run_, table).replace_schema_metadata({"poolscout": json.dumps(summary, default=str)}))
    return out


def summary_of(table: pa.Table) -> dict:
    """The selection summary stored in a `query`/`select` result's schema metadata."""
    meta = table.schema.metadata or {}
    return json.loads(meta.get(b"poolscout", b"{}"))


def select(run_dir: PathLike, *, strategy: str, budget: int, cycle: int | None = None,
           configs: Sequence[str] = (), overrides: Sequence[str] = ()) -> pa.Table:
    """Like `query`, and writes the pick as the cycle's selection.parquet (what the loop labels)."""
    from poolscout.jobs.select import select as do_select

    run_, cfg = _open(run_dir, configs, overrides)
    summary = do_select(run_, cfg, strategy=strategy, budget=budget, cycle=cycle)
    table = _with_files(run_, io.read_table(summary["selection"]))
    return table.replace_schema_metadata({"poolscout": json.dumps(summary, default=str)})


def scores(run_dir: PathLike, *, cycle: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The scored pool of a cycle: image_id plus one column per signal (scores.parquet)."""
    run_ = RunDir(Path(run_dir))
    run_.require()
    k = run_.current_cycle() if cycle is None else int(cycle)
    path = run_.scores_path(k)
    if not path.is_file():
        raise RunError(f"{path} is missing: run `poolscout score {run_.root}` first")
    return io.read_table(path, columns=list(columns) if columns else None)


def ledger(run_dir: PathLike) -> pa.Table:
    """Every image's state (pool, labeled, test, rejected), the cycle and strategy that labeled it."""
    run_ = RunDir(Path(run_dir))
    run_.require()
    return io.read_table(run_.ledger)


def metrics(run_dir: PathLike) -> list[dict]:
    """metrics.json of every evaluated cycle, in cycle order."""
    run_ = RunDir(Path(run_dir))
    run_.require()
    out = []
    for d in sorted(run_.root.glob("cycles/*/metrics.json"), key=lambda p: int(p.parent.name)):
        out.append(json.loads(d.read_text()))
    return out


def _with_files(run_: RunDir, table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    man = io.read_table(run_.manifest, columns=["image_id", "source_key"])
    idx = pc.index_in(table["image_id"], man["image_id"])
    return table.append_column("file", pc.take(man["source_key"], idx))


__all__ = ["init", "run", "score", "query", "query_batch", "select", "summary_of", "scores", "ledger", "metrics"]
