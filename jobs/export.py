"""`poolscout export`: the selected batch for annotators (COCO, Label Studio, CVAT, CSV)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir, RunError

# format -> file in cycles/<k>/export/ (label_studio also writes label_studio_config.xml there)
FORMATS = {"coco": "coco.json", "label_studio": "label_studio.json", "cvat": "cvat.xml", "csv": "selection.csv"}


def selected_predictions(run: RunDir, k: int, ids: np.ndarray) -> dict[str, np.ndarray] | None:
    """Canonical orig-view predictions of the given ids (filter pushed into the Parquet scan)."""
    from poolscout.engine.models import predictions as P

    d = run.predictions_dir(k)
    if not d.is_dir():
        return None
    ds = pads.dataset(str(d), format="parquet")
    cols = [c for c in ["image_id", "width", "height", "num_boxes", "boxes", "scores", "labels", "probs"]
            if c in ds.schema.names]
    t = ds.to_table(columns=cols, filter=pc.field("image_id").isin(pa.array(ids, pa.int64())))
    return P.from_arrow(t, views=["orig"], fields=["boxes", "scores", "labels", "probs"],
                        num_classes=run.num_classes())


def export(run: RunDir, cfg: Config, *, fmt: str | None = None, cycle: int | None = None,
           image_root_url: str | None = None) -> dict:
    """Write cycle k's selection in `fmt` ("coco", "label_studio", "cvat", "csv" or "all").

    Label Studio image references follow engine.data.export.image_ref: `image_root_url`
    (default: export.image_root_url) when set, else /data/local-files/?d=<path relative to
    export.local_files_root, or to the run's images folder when that is empty>.
    """
    from poolscout.engine.data import export as E

    run.require()
    k = run.current_cycle() if cycle is None else cycle
    fmt = fmt or cfg.export.format
    fmts = list(FORMATS) if fmt == "all" else [fmt]
    for f in fmts:
        if f not in FORMATS:
            raise ValueError(f"unknown export format {f!r}; known: {', '.join(FORMATS)}, all")
    root_url = cfg.export.image_root_url if image_root_url is None else image_root_url
    sp = run.selection_path(k)
    if not sp.is_file():
        raise RunError(f"{sp} is missing: run `poolscout select {run.root} --strategy NAME --budget N` first")
    sel = io.read_table(sp)
    manifest = io.read_table(run.manifest)
    cats = run.read_categories()
    preds = selected_predictions(run, k, sel["image_id"].to_numpy())
    out: dict = {"cycle": k, "files": {}}
    for f in fmts:
        path = run.export_dir(k) / FORMATS[f]
        if f == "coco":
            info = E.export_coco(path, sel, manifest, preds, cats, min_score=cfg.export.min_score)
        elif f == "label_studio":
            info = E.export_label_studio(path, sel, manifest, preds, cats, min_score=cfg.export.min_score,
                                         model_version=f"poolscout-cycle-{k}", image_root_url=root_url,
                                         local_files_root=cfg.export.local_files_root)
        elif f == "cvat":
            info = E.export_cvat(path, sel, manifest, preds, cats, min_score=cfg.export.min_score,
                                 task_name=f"{run.root.name} cycle {k}")
        else:
            info = E.export_csv(path, sel, manifest)
        out["files"][f] = {"path": str(path), **(info or {})}
    return out
