"""The stream's stateless pieces, shared by scoring, embedding and queries: the work-row
columns, decoding a batch of manifest rows, writing a block of predictions as a Parquet part
with its box store, and what a checkpoint or a set of signals needs read. Nothing here
imports another job module, so every job can import it."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io

WORK_COLUMNS = ["image_id", "uri", "width", "height", "state"]


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int,
                 root: str | None = None) -> dict[str, np.ndarray]:
    """Stateless decode + letterbox of a batch of manifest rows (a Ray Data task).

    Files are checked against what init recorded: inside the images `root` (a symlink
    swapped in later is refused) and of the manifest's size (a replaced file is refused).
    """
    from poolscout.engine.data.images import load_batch

    expect = [(int(w), int(h)) if w > 0 and h > 0 else None for w, h in zip(batch["width"], batch["height"])]
    out = load_batch(list(batch["uri"]), size, max_pixels, root=root, expect=expect)
    err = np.asarray(out["error"], dtype=object)
    err[np.equal(err, None)] = ""
    return {**{k: batch[k] for k in WORK_COLUMNS}, "image": out["image"], "scale": out["scale"],
            "content_w": out["content_w"], "content_h": out["content_h"], "error": err}


def decoded_batches(rows: pa.Table, batch_size: int, columns: tuple[str, ...], size: int, max_pixels: int,
                    root: str | None):
    """Yield the decoded batches (`decode_batch`) of a slice of work rows, `batch_size` at a
    time, for the local (no Ray) paths."""
    for j in range(0, len(rows), batch_size):
        b = rows.slice(j, batch_size)
        batch = {c: b[c].to_numpy(zero_copy_only=False) for c in columns if c not in ("uri", "state")}
        batch["uri"] = np.asarray(b["uri"].to_pylist(), dtype=object)
        batch["state"] = np.asarray(b["state"].to_pylist(), dtype=object)
        yield decode_batch(batch, size, max_pixels, root)


def signal_fields(specs) -> list[str]:
    """Per-box fields to load for `specs` (all views): scores, labels, probs + what they read."""
    from poolscout.engine.acquisition import signals as S

    fields = ["scores", "labels", "probs"]
    for fs in S.required_fields(specs).values():
        fields += [f for f in fs if f not in fields]
    return fields


def model_class_quality(model: Path) -> np.ndarray | None:
    """The per-class quality Q_c (C,) a Faster R-CNN tracked while training (PPAL's DCUS), or
    None when the checkpoint has none."""
    import torch

    ck = torch.load(model, map_location="cpu", weights_only=True, mmap=True)
    state = ck.get("state_dict", ck.get("model", {})) if isinstance(ck, dict) else {}
    for k, v in state.items() if isinstance(state, dict) else ():
        if k.endswith("class_quality"):
            return v.float().numpy().copy()
    return None


BOX_STORE_COLUMNS = ("image_id", "width", "height", "num_boxes", "boxes", "scores", "labels", "probs",
                     "roi_embedding", "box_var", "gsal_d", "gsal_v")


def write_box_store(table: pa.Table, parquet_path: Path) -> None:
    """The per-box payload of a part's scored pool rows (original view) as an uncompressed
    Arrow IPC file beside it: memory-mapped by `jobs.cycle_data.boxes_loader`,
    so the boxes of a few thousand candidates are read without decoding the whole
    prediction set (a Parquet scan). Named _boxes.<part>.arrow, which Arrow's dataset
    discovery skips. Written before the Parquet part, which marks the chunk done; only
    when the table has per-box columns."""
    if "num_boxes" not in table.column_names:
        return
    t = table
    if "state" in t.column_names:
        t = t.filter(pc.and_(pc.equal(t["state"], "pool"), pc.equal(t["error"], "")))
    t = t.select([c for c in BOX_STORE_COLUMNS if c in table.column_names])
    pq_path = Path(parquet_path)
    # "_" prefix: Arrow's dataset discovery skips it, so the Parquet readers never see it
    path = pq_path.with_name(f"_boxes.{pq_path.stem}.arrow")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t, max_chunksize=4096)
    os.replace(tmp, path)


def write_part(table: pa.Table, out_dir: str) -> pa.Table:
    """Write one block of predictions as a Parquet part (and its box store); return its
    row counts.

    The part's name is a digest of its image ids, so a retried task rewrites the same file
    (atomically) instead of adding a duplicate.
    """
    import hashlib

    ids = np.ascontiguousarray(table["image_id"].to_numpy(), dtype=np.int64)
    path = Path(out_dir) / f"part-{hashlib.sha256(ids.tobytes()).hexdigest()[:20]}.parquet"
    write_box_store(table, path)
    io.write_table(table, path)
    pool_rows = int(pc.sum(pc.equal(table["state"], "pool")).as_py() or 0) if "state" in table.column_names else len(table)
    return pa.table({"rows": [len(table)], "pool_rows": [pool_rows]})
