"""What a scored cycle holds, read for selection: stored predictions, signals computed from
them, embeddings, the candidates' boxes (box store or Parquet), the labeled class counts.
Shared by `jobs.select` and `jobs.query` (neither imports the other's internals)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError


def _pred_dataset(run: RunDir, k: int) -> pads.Dataset:
    d = run.predictions_dir(k)
    if not d.is_dir():
        raise RunError(f"{d} is missing: run `poolscout score {run.root}` first")
    return pads.dataset(str(d), format="parquet")


def compute_missing(run: RunDir, cfg: Config, k: int, specs: list, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Signals a strategy needs that scoring did not store, computed from the stored predictions.

    Streams the predictions in Arrow batches (never the whole pool at once); values are
    aligned to `ids` and empty images are filled with the configured rule.
    """
    from poolscout.engine.models import predictions as P
    from poolscout.engine.acquisition import signals as S
    from poolscout.engine.acquisition.checks import parse_empty_rule
    from poolscout.jobs.stream import model_class_quality, signal_fields

    fields = signal_fields(specs)
    ds = _pred_dataset(run, k)
    views = [v for v in S.required_views(specs) if P.prefix(v) + "num_boxes" in ds.schema.names]
    cols = ["image_id", "state", "error"] + [P.prefix(v) + f for v in views for f in ["num_boxes", *fields]]
    cols = [c for c in cols if c in ds.schema.names]
    context = {"class_quality": model_class_quality(run.model_path(k)) if run.model_path(k).is_file() else None}
    got_ids, got_vals, got_empty = [], {s.column: [] for s in specs}, []
    for rb in ds.to_batches(columns=cols, batch_size=2048):
        t = pa.Table.from_batches([rb])
        t = t.filter(pc.and_(pc.equal(t["state"], "pool"), pc.equal(t["error"], "")))
        if len(t) == 0:
            continue
        b = P.from_arrow(t, views=views, fields=fields, num_classes=run.num_classes())
        vals = S.compute(b, specs, seed=cfg.seed, cycle=k, context=context)
        got_ids.append(b["image_id"])
        got_empty.append(np.diff(b["offsets"]) == 0)
        for s in specs:
            got_vals[s.column].append(vals[s.column])
    if not got_ids:
        raise RunError(f"{run.predictions_dir(k)} holds no scored pool images")
    all_ids = np.concatenate(got_ids)
    order = np.argsort(all_ids)
    pos = order[np.minimum(np.searchsorted(all_ids[order], ids), len(all_ids) - 1)]
    if not np.array_equal(all_ids[pos], ids):
        raise RunError(f"{run.predictions_dir(k)}: some candidates have no stored prediction")
    empty = np.concatenate(got_empty)[pos]
    out = {}
    for s in specs:
        v = np.concatenate(got_vals[s.column])[pos]
        out[s.column] = S.fill_empty(v, empty & np.isnan(v), parse_empty_rule(cfg.score.empty_value), S.direction(s))
    return out


def load_embeddings(run: RunDir, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_id, state, embedding (n, d) float32) of the scored pool and labeled rows."""
    ds = _pred_dataset(run, k)
    if "embedding" not in ds.schema.names:
        raise RunError(f"{run.predictions_dir(k)} has no embedding column")
    t = ds.to_table(columns=["image_id", "state", "error", "embedding"], filter=pc.field("error") == "")
    flat = pc.list_flatten(t["embedding"].combine_chunks()).to_numpy(zero_copy_only=False)
    emb = flat.astype(np.float32).reshape(len(t), -1) if len(t) else np.zeros((0, 0), np.float32)
    return t["image_id"].to_numpy(), np.asarray(t["state"].to_pylist(), dtype=object), emb


BOX_COLUMNS = ("boxes", "scores", "labels", "probs", "roi_embedding", "box_var", "gsal_d", "gsal_v")


def boxes_loader(run: RunDir, k: int, fields: tuple[str, ...] | None = None):
    """ids -> canonical batch (orig view: boxes, scores, labels, probs, roi_embedding,
    box_var, gsal_d, gsal_v, or only `fields`) of those scored pool images, in that order.

    Reads the cycle's box store when scoring wrote one (memory-mapped Arrow IPC files
    beside the Parquet parts, `jobs.score.write_box_store`): an index from image id to
    (file, row) is built once from the files' image_id columns, and only the candidates'
    rows are touched, never a scan of the prediction set. Without a complete store (runs
    scored by older versions) it filters the Parquet parts, reading only the id column and
    `fields` (CALD's re-rank reads `probs` alone, 65-90x cheaper than every box column).
    """
    from poolscout.engine.models import predictions as P

    want = BOX_COLUMNS if fields is None else tuple(f for f in BOX_COLUMNS if f in fields)
    store: dict = {}

    def index():
        if "ids" in store:
            return store
        d = run.predictions_dir(k)
        parquet = sorted(d.glob("part-*.parquet"))
        arrow = [d / f"_boxes.{p.stem}.arrow" for p in parquet]
        store["tables"] = None
        if parquet and all(a.is_file() for a in arrow):
            tables, ids, part, row = [], [], [], []
            for i, a in enumerate(arrow):
                t = pa.ipc.open_file(pa.memory_map(str(a), "r")).read_all()  # zero-copy
                tables.append(t)
                got = t["image_id"].to_numpy()
                ids.append(got)
                part.append(np.full(len(got), i, np.int32))
                row.append(np.arange(len(got), dtype=np.int64))
            ids_all = np.concatenate(ids)
            order = np.argsort(ids_all, kind="stable")
            store.update(tables=tables, ids=ids_all[order], part=np.concatenate(part)[order],
                         row=np.concatenate(row)[order])
        else:
            store["ids"] = None
        return store

    def load_store(ids: np.ndarray, st: dict) -> pa.Table:
        pos = np.searchsorted(st["ids"], ids)
        pos = np.minimum(pos, max(len(st["ids"]) - 1, 0))
        ok = st["ids"][pos] == ids if len(st["ids"]) else np.zeros(len(ids), bool)
        if not ok.all() or len(np.unique(ids)) != len(ids):
            raise RunError(f"{run.predictions_dir(k)}: expected one prediction row for each of {len(ids)} "
                           f"candidates, found {int(ok.sum())}")
        parts, rows = st["part"][pos], st["row"][pos]
        pieces, where = [], []
        for p in np.unique(parts):
            sel = np.flatnonzero(parts == p)
            t = st["tables"][int(p)]
            t = t.select([c for c in ["image_id", "width", "height", "num_boxes", *want] if c in t.column_names])
            pieces.append(t.take(pa.array(rows[sel])))
            where.append(sel)
        t = pa.concat_tables(pieces).combine_chunks()
        inv = np.empty(len(ids), np.int64)
        inv[np.concatenate(where)] = np.arange(len(ids))
        return t.take(pa.array(inv))

    def load(ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        st = index()
        if st["ids"] is not None:
            t = load_store(ids, st)
            return P.from_arrow(t, views=["orig"], num_classes=run.num_classes())
        ds = _pred_dataset(run, k)
        cols = [c for c in ["image_id", "width", "height", "num_boxes", *want] if c in ds.schema.names]
        t = ds.to_table(columns=cols, filter=pc.field("image_id").isin(pa.array(ids)))
        got = t["image_id"].to_numpy()
        if len(np.unique(got)) != len(got) or len(got) != len(ids):
            raise RunError(f"{run.predictions_dir(k)}: expected one prediction row for each of {len(ids)} "
                           f"candidates, found {len(got)}")
        b = P.from_arrow(t, views=["orig"], num_classes=run.num_classes())
        order = np.argsort(got)
        return P.take_rows(b, order[np.searchsorted(got[order], ids)])

    return load


def labeled_class_counts(run: RunDir) -> np.ndarray:
    """(C,) GT instances per class 1..C over the labeled images."""
    c = run.num_classes()
    if not run.annotations.is_file():
        return np.zeros(c, np.int64)
    ann = io.read_table(run.annotations, columns=["image_id", "category_id"])
    ann = ann.filter(pc.is_in(ann["image_id"], pa.array(run.ids_in_state("labeled"))))
    cat = ann["category_id"].to_numpy().astype(np.int64)
    return np.bincount(cat[(cat >= 1) & (cat <= c)] - 1, minlength=c)[:c]


def needs_model(strategy) -> bool:
    """Whether a strategy needs the pool scored by the current model."""
    return strategy.needs.model
