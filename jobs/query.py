"""Batch queries of a scored pool: many (strategy, budget, filter) questions, one load.

Scoring is the expensive part of a cycle and is cached (scores.parquet, predictions with
embeddings); a `QuerySession` opens a scored cycle once and answers any number of
queries from it, never re-scoring:

    s = QuerySession(run, cfg)
    table, summary = s.ask("entropy", 100, where="class == 'scratch' and score_max < 0.5")
    s.save("scratch_low_conf", table, summary)      # cycles/<k>/queries/scratch_low_conf.*

Within a session the scores table, the image-level filter columns, the embeddings and any
signal computed from the stored predictions are loaded once and shared by every query;
the kNN graph of the embeddings is cached per cycle on disk (cycles/<k>/cache), so
coverage strategies (maxherding, uncertainty herding, probcover) pay for it once.

Filter columns (`--where`, see engine.acquisition.where): every stored signal column,
`num_boxes`, and `class` (the class name of the image's highest-scoring box, "" when it
has none) and `score_max` (that box's score, NaN when none), derived from the stored
predictions once per cycle (cached in cycles/<k>/cache/image_fields.parquet).

A batch file (YAML) lists queries; each entry: `strategy`, `budget`, optional `where`
and `name` (default "<strategy>_b<budget>[_<filter digest>]"):

    - {strategy: entropy, budget: 100}
    - {strategy: maxherding, budget: 200, where: "num_boxes >= 1", name: cover_detected}

`poolscout select` runs the same code (a query of the configured strategy without a
filter, saved as the cycle's selection.parquet), so a query and a selection of the same
strategy and budget pick the same images.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, ConfigError
from poolscout.engine.core.run import RunDir, RunError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
BATCH_KEYS = ("strategy", "budget", "where", "name")
FIELDS_FILE = "image_fields.parquet"


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def default_name(strategy: str, budget: int, where: str | None) -> str:
    base = f"{Path(str(strategy)).stem}_b{int(budget)}"
    if where:
        base += "_" + hashlib.sha256(where.encode()).hexdigest()[:8]
    return base


def categories_for_selectors(cats: list[dict], dataset) -> list[dict]:
    """The run's categories as selectors see them: `dataset.supercategories` (one per name of
    `dataset.classes`) replaces the annotations' `supercategory`; `dataset.use_supercategories:
    false` removes it."""
    if not dataset.use_supercategories:
        return [{k: v for k, v in c.items() if k != "supercategory"} for c in cats]
    if dataset.supercategories:
        sup = dict(zip(dataset.classes, dataset.supercategories))
        return [{**c, "supercategory": sup[c["name"]]} if c.get("name") in sup else c for c in cats]
    return cats


class QuerySession:
    """A scored cycle opened for queries (see the module docstring).

    Args:
        run: the run directory.
        cfg: its configuration (empty-image rule, seed).
        cycle: the scored cycle (default the current one).
        log: progress messages (long steps), or None.
    """

    def __init__(self, run: RunDir, cfg: Config, cycle: int | None = None, log=None):
        run.require()
        self.run, self.cfg, self.log = run, cfg, log
        self.k = run.current_cycle() if cycle is None else int(cycle)
        self.scores_path = run.scores_path(self.k)
        self._ids: np.ndarray | None = None
        self._cols: dict[str, np.ndarray] = {}
        self._stored: list[str] | None = None
        self._num_boxes: np.ndarray | None = None
        self._fields: pa.Table | None = None
        self._emb: tuple[np.ndarray, np.ndarray] | None = None  # (candidate embeddings, labeled)
        self._class_counts: np.ndarray | None = None
        self._loaders: dict = {}  # box loaders by the fields they read (their id index is built once)

    # ---------------------------------------------------------------- loading (once)

    def _load_scores(self) -> None:
        if self._ids is not None:
            return
        run = self.run
        pool_ids = np.sort(run.ids_in_state("pool"))
        if not self.scores_path.is_file():
            self._ids, self._stored = pool_ids, []
            return
        t = io.read_table(self.scores_path)
        t = t.filter(pc.is_in(t["image_id"], pa.array(pool_ids))).sort_by("image_id")
        self._ids = t["image_id"].to_numpy()
        self._stored = [c for c in t.column_names if c not in ("image_id", "num_boxes")]
        for c in self._stored:
            self._cols[c] = t[c].to_numpy(zero_copy_only=False).astype(np.float64)
        if "num_boxes" in t.column_names:
            self._num_boxes = t["num_boxes"].to_numpy()

    @property
    def ids(self) -> np.ndarray:
        """Candidate image ids (scored pool images), ascending."""
        self._load_scores()
        return self._ids

    def _signal_columns(self, specs) -> dict[str, np.ndarray]:
        """Signal columns of all candidates, computing (once) those scoring did not store."""
        from poolscout.engine.acquisition import signals as S
        from poolscout.jobs.cycle_data import compute_missing

        self._load_scores()
        missing = [s for s in specs if s.column not in self._cols]
        if missing and not self.scores_path.is_file():
            self._cols.update(S.compute({"image_id": self._ids, "offsets": np.zeros(len(self._ids) + 1, np.int64)},
                                        missing, seed=self.cfg.seed, cycle=self.k))
        elif missing:
            if self.log:
                self.log(f"query: computing {', '.join(s.column for s in missing)} from the stored predictions")
            self._cols.update(compute_missing(self.run, self.cfg, self.k, missing, self._ids))
        return {s.column: self._cols[s.column] for s in specs}

    def image_fields(self) -> pa.Table:
        """image_id, num_boxes, class, score_max of the candidates (for --where)."""
        if self._fields is not None:
            return self._fields
        self._load_scores()
        cache = self.run.cycle_dir(self.k) / "cache" / FIELDS_FILE
        st = self.scores_path.stat() if self.scores_path.is_file() else None
        key = f"{st.st_size}:{st.st_mtime_ns}" if st else "unscored"
        t = None
        if cache.is_file():
            try:
                got = io.read_table(cache)
                if (got.schema.metadata or {}).get(b"scores_key", b"").decode() == key:
                    t = got
            except (OSError, pa.ArrowInvalid):
                t = None
        if t is None:
            t = self._derive_fields().replace_schema_metadata({"scores_key": key})
            io.write_table(t, cache)
        t = t.filter(pc.is_in(t["image_id"], pa.array(self._ids))).sort_by("image_id")
        if not np.array_equal(t["image_id"].to_numpy(), self._ids):
            raise RunError(f"{self.run.predictions_dir(self.k)}: filter columns found for {len(t)} of "
                           f"{len(self._ids)} candidates")
        self._fields = t.replace_schema_metadata(None)
        return self._fields

    def _categories(self) -> list[dict] | None:
        if not hasattr(self, "_cats"):
            try:
                self._cats = categories_for_selectors(list(self.run.read_categories()), self.cfg.dataset)
            except (OSError, ValueError):
                self._cats = None
        return self._cats

    def _derive_fields(self) -> pa.Table:
        import pyarrow.dataset as pads

        names = [c.get("name", str(c.get("id"))) for c in self.run.read_categories()]
        name_arr = pa.array([""] + names, pa.string())
        d = self.run.predictions_dir(self.k)
        if not d.is_dir():
            n = len(self._ids)
            return pa.table({"image_id": pa.array(self._ids, pa.int64()), "num_boxes": pa.array(np.zeros(n, np.int64)),
                             "class": pa.array([""] * n), "score_max": pa.array(np.full(n, np.nan))})
        ds = pads.dataset(str(d), format="parquet")
        parts = []
        for rb in ds.to_batches(columns=["image_id", "state", "error", "num_boxes", "scores", "labels"],
                                filter=(pc.field("state") == "pool") & (pc.field("error") == ""), batch_size=8192):
            if rb.num_rows == 0:
                continue
            cnt = rb.column("num_boxes").to_numpy().astype(np.int64)
            off = np.concatenate([[0], np.cumsum(cnt)])
            s = pc.list_flatten(rb.column("scores")).to_numpy(zero_copy_only=False).astype(np.float64)
            lab = pc.list_flatten(rb.column("labels")).to_numpy(zero_copy_only=False).astype(np.int64)
            top = np.full(len(cnt), -1, np.int64)
            smax = np.full(len(cnt), np.nan)
            has = cnt > 0
            if has.any():
                # first maximum of each non-empty image's scores
                seg = np.repeat(np.arange(len(cnt)), cnt)
                order = np.lexsort((np.arange(len(s)), -s, seg))
                first = order[off[:-1][has]]
                top[has] = lab[first]
                smax[has] = s[first]
            # label t (1..C) -> names[t - 1]; no box or an unknown label -> ""
            cls = name_arr.take(pa.array(np.where((top >= 1) & (top <= len(names)), top, 0)))
            parts.append(pa.table({"image_id": rb.column("image_id"), "num_boxes": pa.array(cnt),
                                   "class": cls, "score_max": pa.array(smax)}))
        if not parts:
            raise RunError(f"{d} holds no scored pool images")
        return pa.concat_tables(parts).sort_by("image_id")

    def _embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        if self._emb is None and self.cfg.select.embedding == "backbone":
            from poolscout.jobs.embed import load_backbone

            self._emb = (load_backbone(self.run, self.ids), load_backbone(self.run, self.run.ids_in_state("labeled")))
        if self._emb is None:
            from poolscout.jobs.cycle_data import load_embeddings

            eid, state, emb = load_embeddings(self.run, self.k)
            if len(eid) == 0:
                raise RunError(f"{self.run.predictions_dir(self.k)}: no image has an embedding")
            order = np.argsort(eid, kind="stable")
            pos = np.searchsorted(eid[order], self.ids)
            pos = np.minimum(pos, len(eid) - 1)
            rows = order[pos]
            if not np.array_equal(eid[rows], self.ids):
                raise RunError(f"{self.run.predictions_dir(self.k)}: some candidates have no embedding")
            self._emb = (emb[rows], emb[state == "labeled"])
        return self._emb

    def _boxes_loader(self, fields):
        from poolscout.jobs.cycle_data import boxes_loader

        key = None if fields is None else tuple(fields)
        if key not in self._loaders:
            self._loaders[key] = boxes_loader(self.run, self.k, key)
        return self._loaders[key]

    # ---------------------------------------------------------------- queries

    def candidates(self, where: str | None) -> np.ndarray:
        """Rows (into `ids`) of the candidates that pass the filter (all without one)."""
        n = len(self.ids)
        if not where:
            return np.arange(n)
        from poolscout.engine.acquisition.where import filter_table, parse_where

        fields = self.image_fields()
        # the stored columns only: what a filter may name does not depend on earlier queries
        expr, used = parse_where(where, set(fields.column_names) | set(self._stored or []))
        t = fields.append_column("_row", pa.array(np.arange(n)))
        for c in sorted(used - set(fields.column_names)):
            t = t.append_column(c, pa.array(self._cols[c]))
        return filter_table(t, expr, where)["_row"].to_numpy()

    def ask(self, strategy: str | None = None, budget: int | None = None, where: str | None = None
            ) -> tuple[pa.Table, dict]:
        """Which `budget` candidates `strategy` picks among those passing `where`.

        Returns:
            The selection table (image_id, rank, score, rationale JSON: selection.parquet's
            schema) and a summary (cycle, strategy, budget, where, selected, candidates,
            seconds, no_detections, warnings).
        """
        from poolscout.engine.acquisition import signals as S
        from poolscout.engine.acquisition import strategies as St
        from poolscout.engine.acquisition.checks import note_empty, parse_empty_rule, selection_warnings
        from poolscout.engine.acquisition.selectors import SelectContext
        from poolscout.jobs.cycle_data import labeled_class_counts, needs_model

        t0 = time.time()
        run, cfg, k = self.run, self.cfg, self.k
        strat = St.load_strategy(strategy or cfg.select.strategy)
        budget = int(budget if budget is not None else cfg.select.budget)
        if budget <= 0:
            raise ValueError(f"--budget must be positive, got {budget}")
        sp = self.scores_path
        if not sp.is_file() and needs_model(strat):
            raise RunError(f"{sp} is missing: run `poolscout score {run.root}` first")
        ids = self.ids
        if len(ids) == 0:
            failed = run.cycle_dir(k) / "rejects.parquet"
            n_failed = io.read_table(failed).num_rows if failed.is_file() else 0
            raise RunError(f"{sp}: no scored images left in the pool"
                           + (f"; {n_failed} failed at scoring ({failed}): fix the cause and rerun "
                              f"`poolscout score {run.root} --force`" if n_failed else ""))
        rows = self.candidates(where)
        if len(rows) == 0:
            raise RunError(f"--where {where!r} keeps none of the {len(ids)} scored pool images of cycle {k}")
        specs = list(strat.needs.signals)
        cols = self._signal_columns(specs)
        sub = rows if len(rows) < len(ids) else None
        table: dict[str, np.ndarray] = {"image_id": ids if sub is None else ids[sub]}
        for c, v in cols.items():
            table[c] = v if sub is None else v[sub]
        labeled_emb = None
        if strat.needs.embedding:
            emb, labeled_emb = self._embeddings()
            table["embedding"] = emb if sub is None else emb[sub]
        if self._class_counts is None:
            self._class_counts = labeled_class_counts(run)
        ctx = SelectContext(rng=np.random.default_rng([cfg.seed, k]), labeled_embedding=labeled_emb,
                            labeled_class_counts=self._class_counts,
                            boxes_loader=self._boxes_loader(strat.needs.box_fields) if strat.needs.boxes else None,
                            cache_dir=str(run.cycle_dir(k) / "cache"), log=self.log,
                            categories=self._categories())
        classes = None
        if cfg.select.quota != "none":
            cls = self.image_fields()["class"].to_numpy(zero_copy_only=False)
            classes = cls if sub is None else cls[sub]
        sel = pick(strat, table, budget, ctx=ctx, mix_random=cfg.select.mix_random, quota=cfg.select.quota,
                   classes=classes)
        rationale, empty = sel.rationale, None
        cand_ids = table["image_id"]
        if self._num_boxes is not None and any(S.SIGNALS.entry(s.name).meta["per_box"] for s in specs):
            # picks whose box-reduced score came from score.empty_value, not from the model
            nb = self._num_boxes if sub is None else self._num_boxes[sub]
            empty = nb[np.searchsorted(cand_ids, np.asarray(sel.image_id, dtype=np.int64))] == 0
            rationale = note_empty(rationale, empty, parse_empty_rule(cfg.score.empty_value))
        warnings = selection_warnings(np.asarray(sel.score, dtype=np.float64), budget=budget,
                                      candidates=len(cand_ids), empty=empty)
        out = pa.table({
            "image_id": pa.array(sel.image_id, pa.int64()),
            "rank": pa.array(np.arange(1, len(sel.image_id) + 1), pa.int32()),
            "score": pa.array(np.asarray(sel.score, dtype=np.float64)),
            "rationale": pa.array([json.dumps(r, default=_jsonable) for r in rationale], pa.string()),
        })
        summary = {"cycle": k, "strategy": strat.name, "budget": budget, "where": where, "selected": len(out),
                   "embedding": cfg.select.embedding if strat.needs.embedding else None,
                   "mix_random": cfg.select.mix_random, "quota": cfg.select.quota,
                   "candidates": int(len(cand_ids)), "seconds": round(time.time() - t0, 3),
                   "no_detections": int(empty.sum()) if empty is not None else None, "warnings": warnings}
        return out, summary

    def save(self, name: str, table: pa.Table, summary: dict) -> Path:
        """Write a named query beside the cycle: cycles/<k>/queries/<name>.parquet + .json
        (the cycle's selection.parquet is not touched)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"query name {name!r}: use letters, digits, '_', '.', '-' (at most 100, "
                             f"not starting with a dot)")
        d = self.run.cycle_dir(self.k) / "queries"
        io.write_table(table, d / f"{name}.parquet", io.SELECTION_SCHEMA)
        io.atomic_write_json(d / f"{name}.json", {**summary, "name": name, "file": str(d / f"{name}.parquet")})
        return d / f"{name}.parquet"

    def batch(self, queries: list[dict], *, save: bool = True) -> list[tuple[pa.Table, dict]]:
        """Answer a list of queries ({strategy, budget, where?, name?}) in one session."""
        out = []
        for q in queries:
            table, summary = self.ask(q["strategy"], q["budget"], q.get("where"))
            name = q.get("name") or default_name(q["strategy"], q["budget"], q.get("where"))
            summary["name"] = name
            if save:
                summary["file"] = str(self.save(name, table, summary))
            out.append((table, summary))
        return out


def _take(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {c: (v[rows] if v is not None else None) for c, v in table.items()}


def _tag(sel, key: str, info: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    return (np.asarray(sel.image_id, np.int64), np.asarray(sel.score, np.float64),
            [{**r, key: dict(info)} for r in sel.rationale])


def pick(strat, table: dict[str, np.ndarray], budget: int, *, ctx, mix_random: float = 0.0, quota: str = "none",
         classes: np.ndarray | None = None):
    """A strategy's picks with the stage options any strategy can use.

    * `quota="uniform"`: the budget is split evenly over the predicted classes present
      among the candidates (`classes`, the top box's class name per candidate; "" = no
      detection, not a class), the rarest classes taking the remainder; each class's quota
      is picked by the strategy among that class's candidates (a class with fewer
      candidates than its quota gives them all), and what is left of the budget is picked
      by the strategy among the remaining candidates. So rare classes get a floor.
    * `mix_random = r`: round(r * budget) picks are drawn uniformly (ctx.rng) from the
      candidates the strategy did not take; the strategy picks the rest first.

    Returns:
        A Selection in rank order (strategy/quota picks, then random ones); each rationale
        gains "quota" ({class, quota}) or "mix_random" ({draw}) entries.
    """
    from poolscout.engine.acquisition import strategies as St
    from poolscout.engine.acquisition.selectors import Selection

    ids = np.asarray(table["image_id"], np.int64)
    n = len(ids)
    budget = int(budget)
    n_rand = int(round(float(mix_random) * budget)) if mix_random else 0
    n_rand = min(n_rand, max(0, n - 1), budget)
    main = budget - n_rand
    got_ids, got_scores, got_rat = [], [], []
    if quota == "uniform" and main > 0:
        if classes is None or len(classes) != n:
            raise ValueError("select.quota: uniform needs each candidate's predicted class")
        names, counts = np.unique(np.asarray([c or "" for c in classes], dtype=object).astype(str),
                                  return_counts=True)
        real = [(int(c), str(nm)) for nm, c in zip(names, counts) if nm != ""]
        real.sort()  # rarest first (ties by name)
        taken = np.zeros(n, bool)
        if real:
            per, extra = divmod(main, len(real))
            cls_arr = np.asarray(classes, dtype=object)
            for i, (cnt, nm) in enumerate(real):
                q = per + (1 if i < extra else 0)
                rows = np.flatnonzero(cls_arr == nm)
                take = min(q, len(rows))
                if take == 0:
                    continue
                sel = St.select(strat, _take(table, rows), take, ctx=ctx)
                a, b, r = _tag(sel, "quota", {"class": nm, "quota": q, "candidates": int(len(rows))})
                got_ids.append(a), got_scores.append(b), got_rat.extend(r)
                taken |= np.isin(ids, a)
        left = main - sum(len(a) for a in got_ids)
        rest = np.flatnonzero(~taken)
        if left > 0 and len(rest):
            sel = St.select(strat, _take(table, rest), min(left, len(rest)), ctx=ctx)
            a, b, r = _tag(sel, "quota", {"class": None, "leftover": True})
            got_ids.append(a), got_scores.append(b), got_rat.extend(r)
    elif main > 0:
        sel = St.select(strat, table, main, ctx=ctx)
        got_ids.append(np.asarray(sel.image_id, np.int64))
        got_scores.append(np.asarray(sel.score, np.float64))
        got_rat.extend(sel.rationale)
    picked = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
    if n_rand > 0:
        free = np.setdiff1d(ids, picked)
        draw = np.sort(ctx.rng.choice(free, size=min(n_rand, len(free)), replace=False))
        draw = ctx.rng.permutation(draw)
        got_ids.append(draw.astype(np.int64))
        got_scores.append(np.full(len(draw), np.nan))
        got_rat.extend({"mix_random": {"draw": i + 1, "of": int(len(draw)), "share": float(mix_random)}}
                       for i in range(len(draw)))
    out_ids = np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64)
    out_scores = np.concatenate(got_scores) if got_scores else np.zeros(0)
    return Selection(out_ids, out_scores, got_rat)


def read_batch(path: str | Path) -> list[dict]:
    """A batch file -> validated query dicts; errors name the file, the entry and the key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"query batch file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if isinstance(data, dict) and "queries" in data:
        data = data["queries"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{p}: expected a non-empty list of queries ({{strategy, budget, where?, name?}})")
    out, names = [], set()
    for i, q in enumerate(data):
        where = f"{p}: queries[{i}]"
        if not isinstance(q, dict):
            raise ConfigError(f"{where}: a query must be a mapping with strategy and budget")
        for key in q:
            if key not in BATCH_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(BATCH_KEYS)})")
        for key in ("strategy", "budget"):
            if key not in q:
                raise ConfigError(f"{where}: missing key {key!r}")
        if not isinstance(q["strategy"], str) or not q["strategy"]:
            raise ConfigError(f"{where}.strategy: expected a strategy name")
        b = q["budget"]
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ConfigError(f"{where}.budget: expected a positive integer, got {b!r}")
        if q.get("where") is not None and not isinstance(q["where"], str):
            raise ConfigError(f"{where}.where: expected a filter string")
        name = q.get("name") or default_name(q["strategy"], b, q.get("where"))
        if not NAME_RE.match(str(name)):
            raise ConfigError(f"{where}.name: {name!r} is not a valid query name")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice in the batch")
        names.add(name)
        out.append({"strategy": q["strategy"], "budget": b, "where": q.get("where"), "name": str(name)})
    return out


__all__ = ["QuerySession", "categories_for_selectors", "read_batch", "default_name"]
