"""A run directory is the whole state of a project (docs/design.md, "Data model")."""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, ConfigError, build_config, load_yaml


class RunError(RuntimeError):
    """The run directory is missing something a command needs; the message says what."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    # --- paths -------------------------------------------------------------
    @property
    def run_yaml(self) -> Path:
        return self.root / "run.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations.parquet"

    @property
    def categories(self) -> Path:
        return self.root / "categories.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.parquet"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.parquet"

    def cycle_dir(self, k: int) -> Path:
        return self.root / "cycles" / str(int(k))

    def model_path(self, k: int) -> Path:
        return self.cycle_dir(k) / "model.pt"

    def predictions_dir(self, k: int) -> Path:
        return self.cycle_dir(k) / "predictions"

    def scores_path(self, k: int) -> Path:
        return self.cycle_dir(k) / "scores.parquet"

    def selection_path(self, k: int) -> Path:
        return self.cycle_dir(k) / "selection.parquet"

    def export_dir(self, k: int) -> Path:
        return self.cycle_dir(k) / "export"

    # --- state -------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_yaml.is_file() and self.manifest.is_file() and self.ledger.is_file()

    def require(self) -> None:
        if not self.exists():
            raise RunError(f"{self.root} is not an initialised run (no run.yaml / manifest / ledger); "
                           f"run `poolscout init {self.root} --images DIR ...` first")

    def config(self, extra_files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
        """run.yaml, then extra YAML files, then key=value overrides."""
        self.require()
        layers = [(str(self.run_yaml), load_yaml(self.run_yaml))]
        layers += [(str(p), load_yaml(p)) for p in extra_files]
        return build_config(layers, overrides)

    def fingerprint(self) -> dict:
        data = load_yaml(self.run_yaml)
        return dict(data.get("fingerprint") or {})

    def write_config(self, cfg: Config, fingerprint: dict) -> None:
        data = cfg.to_dict()
        data["fingerprint"] = fingerprint
        io.atomic_write_text(self.run_yaml, yaml.safe_dump(data, sort_keys=False))

    def read_categories(self) -> list[dict]:
        if not self.categories.is_file():
            raise RunError(f"{self.categories} is missing")
        return json.loads(self.categories.read_text())

    def num_classes(self) -> int:
        return len(self.read_categories())

    def read_ledger(self) -> pa.Table:
        return io.read_table(self.ledger)

    def ids_in_state(self, state: str) -> np.ndarray:
        led = io.read_table(self.ledger, columns=["image_id", "state"])
        return led.filter(pc.equal(led["state"], state))["image_id"].to_numpy()

    def current_cycle(self) -> int:
        """Cycle k = the highest cycle at which images were labeled (0 for the seed set)."""
        led = io.read_table(self.ledger, columns=["state", "cycle"])
        lab = led.filter(pc.equal(led["state"], "labeled"))["cycle"]
        if len(lab) == 0:
            return 0
        return int(pc.max(lab).as_py())

    def latest_model(self, upto: int | None = None) -> tuple[int, Path] | None:
        """The newest cycles/<k>/model.pt with k <= upto."""
        root = self.root / "cycles"
        if not root.is_dir():
            return None
        ks = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        for k in ks:
            if (upto is None or k <= upto) and self.model_path(k).is_file():
                return k, self.model_path(k)
        return None

    def append_rejects(self, rows: pa.Table) -> None:
        """Add reject rows (deduplicated on image_id + stage) atomically."""
        rows = rows.select(io.REJECTS_SCHEMA.names).cast(io.REJECTS_SCHEMA)
        if self.rejects.is_file():
            old = io.read_table(self.rejects)
            keep = old.filter(pc.invert(pc.is_in(old["image_id"], rows["image_id"])))
            rows = pa.concat_tables([keep, rows])
        io.write_table(rows, self.rejects, io.REJECTS_SCHEMA)

    def cycle_rejects_path(self, k: int) -> Path:
        return self.cycle_dir(k) / "rejects.parquet"

    def write_cycle_rejects(self, k: int, stage: str, rows: pa.Table | None) -> None:
        """Replace stage `stage`'s rows of cycles/<k>/rejects.parquet (images that failed at
        that stage in this cycle: they keep their ledger state and are tried again); other
        stages' rows stay. The file is removed when nothing is left."""
        path = self.cycle_rejects_path(k)
        keep = None
        if path.is_file():
            old = io.read_table(path)
            keep = old.filter(pc.not_equal(old["stage"], stage))
        parts = [t for t in (keep, rows.select(io.REJECTS_SCHEMA.names).cast(io.REJECTS_SCHEMA)
                             if rows is not None else None) if t is not None and t.num_rows]
        if not parts:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_table(pa.concat_tables(parts).sort_by([("stage", "ascending"), ("image_id", "ascending")]),
                       path, io.REJECTS_SCHEMA)

    def set_state(self, image_ids: np.ndarray, state: str, cycle: int | None = None,
                  selected_by: str | None = None) -> None:
        if state not in io.STATES:
            raise ValueError(f"unknown state {state!r}")
        led = io.read_table(self.ledger)
        mask = pc.is_in(led["image_id"], pa.array(np.asarray(image_ids, dtype=np.int64))).to_numpy(zero_copy_only=False)
        states = np.array(led["state"].to_pylist(), dtype=object)
        states[mask] = state
        cycles = led["cycle"].to_numpy().copy()
        if cycle is not None:
            cycles[mask] = cycle
        sel = np.array(led["selected_by"].to_pylist(), dtype=object)
        if selected_by is not None:
            sel[mask] = selected_by
        new = pa.table({"image_id": led["image_id"], "state": pa.array(states.tolist(), pa.string()),
                        "cycle": pa.array(cycles, pa.int32()), "selected_by": pa.array(sel.tolist(), pa.string())})
        io.write_table(new, self.ledger, io.LEDGER_SCHEMA)


def code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from poolscout.engine import __version__

    return __version__


def table_hash(table: pa.Table, columns: list[str]) -> str:
    """A stable digest of some columns (the pool fingerprint)."""
    h = hashlib.sha256()
    for c in columns:
        col = table.column(c).combine_chunks()
        for buf in col.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()[:16]


__all__ = ["RunDir", "RunError", "ConfigError", "code_version", "table_hash"]
