"""`poolscout select`: run a strategy over scores.parquet (and embeddings) -> selection.parquet."""
from __future__ import annotations

import pyarrow as pa

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir
from poolscout.jobs.cycle_data import (BOX_COLUMNS, boxes_loader, compute_missing,  # noqa: F401 - re-exported
                                      labeled_class_counts, load_embeddings, needs_model)


def query(run: RunDir, cfg: Config, *, strategy: str | None = None, budget: int | None = None,
          cycle: int | None = None, where: str | None = None, log=None) -> tuple[pa.Table, dict]:
    """Pick `budget` pool images with a named strategy from a scored cycle, writing nothing
    but the cycle's cache (the kNN graph of its embeddings, cycles/<k>/cache). One query of
    a `jobs.query.QuerySession`; open a session to ask many.

    Returns:
        The selection table (image_id, rank, score, rationale JSON; selection.parquet's
        schema) and a summary dict (cycle, strategy, budget, where, selected, candidates,
        seconds, no_detections, warnings).
    """
    from poolscout.jobs.query import QuerySession

    return QuerySession(run, cfg, cycle, log=log).ask(strategy, budget, where)


def select(run: RunDir, cfg: Config, *, strategy: str | None = None, budget: int | None = None,
           cycle: int | None = None) -> dict:
    """Pick `budget` pool images with a named strategy; writes cycles/<k>/selection.parquet.
    With `select.embedding: backbone`, images without a cached backbone embedding are
    embedded first (jobs.embed; only the new ones)."""
    from poolscout.engine.acquisition import strategies as St

    if cfg.select.embedding == "backbone" and St.load_strategy(strategy or cfg.select.strategy).needs.embedding:
        from poolscout.jobs.embed import embed_backbone

        executor = cfg.loop.executor
        if executor == "ray":
            import ray

            executor = "ray" if ray.is_initialized() else "local"
        embed_backbone(run, cfg, executor=executor, progress=False)
    out, summary = query(run, cfg, strategy=strategy, budget=budget, cycle=cycle)
    k = summary["cycle"]
    io.write_table(out, run.selection_path(k), io.SELECTION_SCHEMA)
    summary["selection"] = str(run.selection_path(k))
    io.atomic_write_json(run.cycle_dir(k) / "select.json", summary)
    return summary

