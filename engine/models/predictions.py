"""The canonical prediction batch: ragged per-box arrays plus per-image offsets.

Every detector family produces, and every signal reads, this one contract
(docs/methods.md §0). For a batch of N images and a view `v` with M kept boxes in total:

    image_id            (N,)        int64
    width, height       (N,)        int32   original image size (boxes are in these pixels)
    embedding           (N, d)      float32 image embedding (pooled backbone features)
    {v}offsets          (N+1,)      int64   boxes of image i are rows offsets[i]:offsets[i+1]
    {v}boxes            (M, 4)      float32 x1, y1, x2, y2, original frame, highest score first
    {v}scores           (M,)        float32
    {v}labels           (M,)        int64   1..C (0 is background)
    {v}probs            (M, C+1)    float32 full softmax, column 0 = background
    {v}roi_embedding    (M, r)      float32 optional, box-head features
    {v}box_var          (M, 4)      float32 optional, predicted coordinate variances
    mc_probs            (M, C+1)    float32 optional, original view only: mean softmax of
                                            T MC-dropout passes
    mc_entropy          (M,)        float32 optional, original view only: mean entropy of
                                            those passes (BALD = H(mc_probs) - mc_entropy)
    gsal_d, gsal_v      (M,)        float32 optional, original view only: GSAL's diffusion
                                            discrepancy / variability of the box (methods.md 4)

with `{v}` = "" for the original view and "hflip_", "cutout_", ... for the others. In
Parquet each per-box field is a list column (flattened row-major) plus `{v}num_boxes`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VIEWS = ("orig", "hflip", "cutout", "resize", "rotate")
# field -> dtype; widths other than 1 come from the data
BOX_FIELDS = {
    "boxes": np.float32,
    "scores": np.float32,
    "labels": np.int64,
    "probs": np.float32,
    "roi_embedding": np.float32,
    "box_var": np.float32,
    "mc_probs": np.float32,
    "mc_entropy": np.float32,
    "gsal_d": np.float32,
    "gsal_v": np.float32,
}
ORIG_ONLY_FIELDS = ("mc_probs", "mc_entropy", "gsal_d", "gsal_v")
# optional per-image float64 columns some signals read (GSAL's whole-image difficulty)
IMAGE_FIELDS = ("gsal_d_image", "gsal_v_image")
_WIDTH_FIXED = {"boxes": 4, "scores": 1, "labels": 1, "box_var": 4, "mc_entropy": 1, "gsal_d": 1, "gsal_v": 1}


def prefix(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    return "" if view == "orig" else f"{view}_"


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    off = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def counts(batch: dict[str, np.ndarray], view: str = "orig") -> np.ndarray:
    off = batch[prefix(view) + "offsets"]
    return np.diff(off)


def views_in(batch: dict[str, np.ndarray]) -> list[str]:
    return [v for v in VIEWS if prefix(v) + "offsets" in batch]


def to_arrow(batch: dict[str, np.ndarray], embedding_dtype: str = "float16",
             extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Canonical batch -> Arrow table, one row per image (list columns for per-box fields)."""
    n = len(batch["image_id"])
    cols: dict[str, pa.Array] = {
        "image_id": pa.array(np.asarray(batch["image_id"], dtype=np.int64)),
    }
    for k in ("width", "height"):
        if k in batch:
            cols[k] = pa.array(np.asarray(batch[k], dtype=np.int32))
    if "embedding" in batch and batch["embedding"] is not None:
        emb = np.asarray(batch["embedding"]).astype(embedding_dtype, copy=False).reshape(n, -1)
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    for view in views_in(batch):
        p = prefix(view)
        off = np.asarray(batch[p + "offsets"], dtype=np.int64)
        cnt = np.diff(off)
        cols[p + "num_boxes"] = pa.array(cnt.astype(np.int32))
        for field, dtype in BOX_FIELDS.items():
            key = p + field
            if key not in batch or batch[key] is None:
                continue
            arr = np.asarray(batch[key])
            if field == "roi_embedding":
                arr = arr.astype(embedding_dtype, copy=False)
            else:
                arr = arr.astype(dtype, copy=False)
            width = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
            flat = arr.reshape(-1)
            list_off = (off * width).astype(np.int32)
            cols[key] = pa.ListArray.from_arrays(pa.array(list_off), pa.array(flat))
    for k, v in (extra or {}).items():
        cols[k] = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
    return pa.table(cols)


def _flat(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.list_flatten(col).to_numpy(zero_copy_only=False)


def from_arrow(table: pa.Table, views: Iterable[str] | None = None,
               fields: Iterable[str] | None = None, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Arrow table (as written by `to_arrow`) -> canonical batch.

    Args:
        views: views to load (default: all present).
        fields: per-box fields to load (default: all present).
        num_classes: C; fixes the width of `probs` when a batch has no boxes at all.
    """
    out: dict[str, np.ndarray] = {"image_id": table.column("image_id").to_numpy()}
    n = table.num_rows
    for k in ("width", "height"):
        if k in table.column_names:
            out[k] = table.column(k).to_numpy()
    if "embedding" in table.column_names:
        col = table.column("embedding").combine_chunks()
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.float32)
        out["embedding"] = flat.astype(np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    names = set(table.column_names)
    views = list(views) if views is not None else [v for v in VIEWS if prefix(v) + "num_boxes" in names]
    fields = list(fields) if fields is not None else list(BOX_FIELDS) + list(IMAGE_FIELDS)
    for key in IMAGE_FIELDS:
        if key in fields and key in names:
            out[key] = table.column(key).to_numpy(zero_copy_only=False).astype(np.float64)
    fields = [f for f in fields if f not in IMAGE_FIELDS]
    for view in views:
        p = prefix(view)
        if p + "num_boxes" not in names:
            raise KeyError(f"predictions have no view {view!r}")
        cnt = table.column(p + "num_boxes").to_numpy().astype(np.int64)
        off = offsets_from_counts(cnt)
        out[p + "offsets"] = off
        m = int(off[-1])
        for field in fields:
            key = p + field
            if key not in names:
                continue
            flat = _flat(table.column(key)).astype(BOX_FIELDS[field], copy=False)
            if field in _WIDTH_FIXED:
                w = _WIDTH_FIXED[field]
            elif m > 0:
                w = flat.size // m
            elif field in ("probs", "mc_probs") and num_classes is not None:
                w = num_classes + 1
            else:
                w = 0
            out[key] = flat.reshape(m, w) if w != 1 else flat.reshape(m)
    return out


def slice_rows(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows start:stop of a canonical batch (used by chunking tests and per-image loops)."""
    out: dict[str, np.ndarray] = {}
    n = len(batch["image_id"])
    views = views_in(batch)
    for k, v in batch.items():
        if any(k == prefix(vw) + "offsets" for vw in views):
            continue
        if k in ("image_id", "width", "height", "embedding") or (isinstance(v, np.ndarray) and v.shape[:1] == (n,)
                                                                   and not any(k == prefix(vw) + f for vw in views for f in BOX_FIELDS)):
            out[k] = v[start:stop]
    for view in views:
        p = prefix(view)
        off = batch[p + "offsets"]
        a, b = off[start], off[stop]
        out[p + "offsets"] = off[start : stop + 1] - a
        for field in BOX_FIELDS:
            if p + field in batch and batch[p + field] is not None:
                out[p + field] = batch[p + field][a:b]
    return out


def take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Images `rows` (any order) of a canonical batch, per-box fields gathered to match."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(batch["image_id"])
    views = views_in(batch)
    box_keys = {prefix(v) + f for v in views for f in BOX_FIELDS}
    out: dict[str, np.ndarray] = {}
    for k, v in batch.items():
        if k not in box_keys and k not in {prefix(vw) + "offsets" for vw in views} and \
                isinstance(v, np.ndarray) and v.shape[:1] == (n,):
            out[k] = v[rows]
    for view in views:
        p = prefix(view)
        off = np.asarray(batch[p + "offsets"], np.int64)
        cnt = np.diff(off)[rows]
        new_off = offsets_from_counts(cnt)
        # box i of the output comes from row off[rows[img]] + (i - new_off[img])
        box_idx = np.repeat(off[:-1][rows] - new_off[:-1], cnt) + np.arange(int(new_off[-1])) - off[0]
        out[p + "offsets"] = new_off
        for field in BOX_FIELDS:
            if p + field in batch and batch[p + field] is not None:
                out[p + field] = batch[p + field][box_idx]
    return out


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate canonical batches (inverse of `slice_rows`)."""
    if not batches:
        raise ValueError("nothing to concatenate")
    out: dict[str, np.ndarray] = {}
    views = views_in(batches[0])
    box_keys = {prefix(v) + f for v in views for f in BOX_FIELDS}
    off_keys = {prefix(v) + "offsets" for v in views}
    for k in batches[0]:
        if k in off_keys:
            cnts = np.concatenate([np.diff(b[k]) for b in batches])
            out[k] = offsets_from_counts(cnts)
        else:
            out[k] = np.concatenate([b[k] for b in batches], axis=0)
    assert box_keys is not None
    return out
