"""Selectors: turn a table of signal columns (and embeddings) into a ranked batch of images.

A selector is `fn(table, budget, *, ctx, **params) -> Selection`, registered in
`SELECTORS` with meta `final` (whether it may be the last stage of a strategy: a
narrowing stage such as `retrieve` returns more than `budget` rows) and `needs_embedding`.

`table` maps column names to arrays of one row per candidate image: "image_id" (N,) int64,
signal columns (N,) float64 named as `engine.signals.SignalSpec.column`, and optionally
"embedding" (N, d) float32 (float16 is converted).

`by` parameters accept a signal spec ("entropy:max", "hflip/margin:mean"), a signal column
name ("entropy_max"), or, together with an explicit `direction`, any column of the table.

Ranking order everywhere: most informative first, ties by image_id ascending, NaN last
(a NaN should have been filled with `signals.fill_empty` before selection). This is a
strict total order, so the top-k of a union of per-shard top-k lists equals the global
top-k (`merge_topk`).

Rationale dicts are keyed by the selector name, e.g.
`{"topk": {"by": "margin_max", "value": 0.02, "rank": 1}}`; ranks are 1-based, like the
`rank` column of selection.parquet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from poolscout.engine.acquisition import signals as S
from poolscout.engine.core.registry import Registry

SELECTORS: Registry[Callable[..., "Selection"]] = Registry("selector", plugins="poolscout.engine.methods")
DEFAULT_CHUNK = 65536


@dataclass
class Selection:
    """The picks of one selector.

    Attributes:
        image_id: (B,) int64, in pick order.
        score: (B,) float64, the value that ranked each pick in this stage.
        rationale: one JSON-able dict per pick.
    """

    image_id: np.ndarray
    score: np.ndarray
    rationale: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_id)


@dataclass
class SelectContext:
    """What a selector may need beyond the table.

    Attributes:
        rng: the random generator of the cycle.
        labeled_embedding: (L, d) float32 embeddings of already labeled images (initial
            core-set centres), or None.
        distance: pairwise kernel (x (a, d), y (b, d)) -> squared L2 (a, b); None = the
            built-in path (FAISS IndexFlatL2 search for the labeled centres, a Numba
            min-update for each pick). Pass a GPU kernel (torch, faiss-gpu) to swap it.
        boxes: canonical prediction batch (engine.predictions) of the candidate images, rows
            in the order of the table's image_id, for selectors registered with meta
            `needs_boxes=True` (the select job loads it); None otherwise.
        labeled_class_counts: (C,) labeled instances per class 1..C (index 0 = class 1),
            for selectors that compare against the labeled set's class prior; None if unknown.
        boxes_loader: image ids -> canonical prediction batch of those images in that
            order; `engine.strategies.select` calls it to fill `boxes` for each stage that
            needs them (only the candidates left at that stage are loaded).
        cache_dir: a folder where selectors may memoise what depends only on their input
            (the kNN graph of an embedding); the select job passes cycles/<k>/cache, so
            it is built once per cycle. None = no cache. Selectors that do register with
            meta `uses_cache=True` (scoring then warms them: `score.warm_queries`).
        log: progress messages of long steps (index builds), or None.
        categories: the run's categories (categories.json: id, name, supercategory, ...), or
            None; class c is categories[c - 1].
    """

    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    labeled_embedding: np.ndarray | None = None
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    boxes: dict[str, np.ndarray] | None = None
    labeled_class_counts: np.ndarray | None = None
    boxes_loader: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
    cache_dir: str | None = None
    log: Callable[[str], None] | None = None
    categories: list[dict] | None = None


def json_float(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def resolve_by(by: str, table: dict[str, np.ndarray], direction: str | None = None) -> tuple[str, str]:
    """`by` -> (column name, direction).

    Raises:
        ValueError: `by` is neither a signal spec nor a signal column, nor a table column
            with an explicit direction; or the column is missing from the table.
    """
    if direction is not None and direction not in S.DIRECTIONS:
        raise ValueError(f"direction must be one of {S.DIRECTIONS}, got {direction!r}")
    spec: S.SignalSpec | None = None
    try:
        spec = S.parse_spec(by)
    except ValueError as err:
        try:
            spec = S.from_column(by)
        except ValueError:
            if direction is None or by not in table:
                raise ValueError(f"by={by!r}: {err}") from None
    col = spec.column if spec is not None else by
    if col not in table:
        raise ValueError(f"by={by!r}: the table has no column {col!r}; columns: {', '.join(sorted(table))}")
    return col, direction or S.direction(spec)


def topk_indices(values: np.ndarray, ids: np.ndarray, k: int, direction: str = "high") -> np.ndarray:
    """Rows of the k most informative values; ties by id ascending, NaN last.

    Args:
        values: (N,) float.
        ids: (N,) int64 tie-breakers.
        k: how many (clipped to N).
        direction: "high" or "low".

    Returns:
        (min(k, N),) int64 row indices in rank order. O(N + k log k) via argpartition.
    """
    v = np.asarray(values, dtype=np.float64)
    key = v if direction == "high" else -v
    key = np.where(np.isnan(key), -np.inf, key)
    n = len(key)
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(-key, k - 1)[k - 1]  # the k-th largest key is -kth
        cand = np.flatnonzero(-key <= kth)  # every row tied with the k-th comes along
    else:
        cand = np.arange(n)
    # NaN rows were mapped to -inf; push them below genuine -inf values too
    nan_last = np.isnan(v[cand])
    order = np.lexsort((np.asarray(ids)[cand], nan_last, -key[cand]))
    return cand[order[:k]].astype(np.int64)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, direction: str = "high") -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists [(ids, values), ...] into the global top-k (ids, values)."""
    ids = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    vals = np.concatenate([np.asarray(p[1], dtype=np.float64) for p in parts]) if parts else np.zeros(0)
    rows = topk_indices(vals, ids, k, direction)
    return ids[rows], vals[rows]


def _ranked(name: str, table: dict[str, np.ndarray], k: int, by: str, direction: str | None) -> Selection:
    col, dirn = resolve_by(by, table, direction)
    ids = np.asarray(table["image_id"], dtype=np.int64)
    vals = np.asarray(table[col], dtype=np.float64)
    rows = topk_indices(vals, ids, k, dirn)
    picked = vals[rows]
    rat = [{name: {"by": col, "direction": dirn, "value": json_float(v), "rank": r}}
           for r, v in enumerate(picked.tolist(), start=1)]
    return Selection(ids[rows], picked, rat)


def check_budget(budget: int) -> int:
    if int(budget) != budget or budget <= 0:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    return int(budget)


def candidate_boxes(name: str, ctx: SelectContext, ids: np.ndarray, fields: tuple[str, ...] = ()) -> dict:
    """The candidates' boxes from `ctx.boxes`, checked: present, rows aligned with `ids`,
    and every field in `fields` there (a ValueError naming selector `name` otherwise)."""
    b = ctx.boxes
    if b is None:
        raise ValueError(f"selector {name} needs the candidates' boxes (ctx.boxes is None)")
    if not np.array_equal(np.asarray(b["image_id"], dtype=np.int64), ids):
        raise ValueError(f"selector {name}: ctx.boxes rows differ from the table's image_id")
    for f in fields:
        if b.get(f) is None:
            hint = " (score with score.store_roi_embeddings on)" if f == "roi_embedding" else ""
            raise ValueError(f"selector {name} needs {f!r} in ctx.boxes{hint}")
    return b


@SELECTORS.register("topk", final=True, needs_embedding=False)
def topk(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, by: str,
         direction: str | None = None) -> Selection:
    """Take the `budget` most informative images by one column.

    Args:
        table: candidate table with "image_id" and the `by` column.
        budget: how many to take.
        ctx: unused.
        by: signal spec or column.
        direction: "high" | "low"; default the signal's own.

    Returns:
        Selection with score = the column value; rationale {"topk": {by, direction, value, rank}}.

    References:
        Uncertainty sampling: Lewis & Gale, "A Sequential Algorithm for Training Text
        Classifiers", SIGIR 1994.
    """
    return _ranked("topk", table, check_budget(budget), by, direction)


@SELECTORS.register("retrieve", final=False, needs_embedding=False)
def retrieve(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, by: str,
             keep: float = 2.0, direction: str | None = None) -> Selection:
    """Narrowing stage: keep the ceil(keep * budget) most informative candidates.

    Args:
        table: candidate table.
        budget: the final budget of the strategy.
        ctx: unused.
        by: signal spec or column.
        keep: multiple of the budget to keep (> 0).
        direction: default the signal's own.

    Returns:
        Selection of ceil(keep * budget) rows (all when fewer); rationale
        {"retrieve": {by, direction, value, rank}}.

    References:
        The retrieval gate of hybrid uncertainty-then-diversity methods, e.g. HUALE's
        E(I) gate and Citovsky et al., "Batch Active Learning at Scale" (Cluster-Margin),
        NeurIPS 2021.
    """
    budget = check_budget(budget)
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and keep > 0):
        raise ValueError(f"retrieve: keep must be a positive number, got {keep!r}")
    return _ranked("retrieve", table, math.ceil(keep * budget), by, direction)


__all__ = ["SELECTORS", "Selection", "SelectContext", "topk", "retrieve", "topk_indices", "merge_topk", "resolve_by"]
