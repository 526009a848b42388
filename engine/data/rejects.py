"""Second chances for rejected images: `poolscout score --retry-rejects`.

Init's rejects are final for the loop (the ledger says `rejected`); failures at scoring or
training time are per cycle (cycles/<k>/rejects.parquet) and retried by the next scoring on
their own. When the cause of an init reject is gone (a file copied again, a folder made
readable), `retry_rejects` re-runs init's scan and matching over the run's recorded inputs
and moves every rejected image that now passes back to the pool, with its size and its
annotations, and drops its reject row. Nothing else in the run changes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError


def retry_rejects(run: RunDir, cfg: Config, *, progress: bool = True) -> dict:
    """Re-probe the run's rejected images; those that pass now rejoin the pool.

    Returns:
        {"retried": rejected images looked at, "restored": moved back to the pool,
         "still_rejected": the rest}.

    Raises:
        RunError: the run has no recorded images root (initialised by an old version).
    """
    from poolscout.engine.data.pool import build_pool

    run.require()
    led = run.read_ledger()
    rejected = led.filter(pc.equal(led["state"], "rejected"))["image_id"].to_numpy()
    if len(rejected) == 0:
        return {"retried": 0, "restored": 0, "still_rejected": 0}
    fp = run.fingerprint()
    root = fp.get("images_root")
    if not root:
        raise RunError(f"{run.run_yaml}: fingerprint.images_root is missing; re-initialise the run")
    ann = fp.get("annotations")
    tables = build_pool(Path(root), Path(ann) if ann else None, fp.get("format"), cfg.dataset, progress=progress)
    still = set(tables.rejects["image_id"].to_numpy().tolist())
    known = set(tables.manifest["image_id"].to_numpy().tolist())
    back = np.array(sorted(int(i) for i in rejected if int(i) in known and int(i) not in still), dtype=np.int64)
    if len(back):
        ids = pa.array(back)
        man = io.read_table(run.manifest)
        fresh = tables.manifest.filter(pc.is_in(tables.manifest["image_id"], ids))
        man = pa.concat_tables([man.filter(pc.invert(pc.is_in(man["image_id"], ids))), fresh]).sort_by("image_id")
        anns = io.read_table(run.annotations)
        new = tables.annotations.filter(pc.is_in(tables.annotations["image_id"], ids))
        start = int(pc.max(anns["ann_id"]).as_py() or 0) + 1 if anns.num_rows else 1
        new = new.set_column(new.schema.get_field_index("ann_id"), "ann_id",
                             pa.array(np.arange(start, start + new.num_rows, dtype=np.int64)))
        anns = pa.concat_tables([anns.filter(pc.invert(pc.is_in(anns["image_id"], ids))), new.cast(anns.schema)])
        rej = io.read_table(run.rejects) if run.rejects.is_file() else None
        # annotations, manifest and rejects first; the ledger last makes it count
        io.write_table(anns, run.annotations, io.ANNOTATIONS_SCHEMA)
        io.write_table(man, run.manifest, io.MANIFEST_SCHEMA)
        if rej is not None:
            io.write_table(rej.filter(pc.invert(pc.is_in(rej["image_id"], ids))), run.rejects, io.REJECTS_SCHEMA)
        run.set_state(back, "pool")
    return {"retried": int(len(rejected)), "restored": int(len(back)), "still_rejected": int(len(rejected) - len(back))}


__all__ = ["retry_rejects"]
