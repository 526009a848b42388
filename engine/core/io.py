"""Atomic file writes and the Parquet schemas of a run directory (docs/design.md).

Every table is written to a temporary file in the destination folder, fsynced, and moved
into place with `os.replace`, then the folder is fsynced, so a crash (power loss included)
leaves either the old file or the new one, never half of one. Files get the mode a plain
open() would give them, 0666 & ~umask.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_key", pa.string()),
    ]
)
ANNOTATIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("category_id", pa.int32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)
LEDGER_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("state", pa.string()),  # pool | labeled | test | rejected
        ("cycle", pa.int32()),
        ("selected_by", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
SELECTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("rank", pa.int32()),
        ("score", pa.float64()),
        ("rationale", pa.string()),  # JSON
    ]
)
STATES = ("pool", "labeled", "test", "rejected")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(old)
    return old


def _tmp_in(path: Path) -> Path:
    """An empty temp file beside `path` with the mode a plain open() would give it.

    mkstemp creates 0600 files; the final file gets 0666 & ~umask instead (0644 under the
    usual umask 022), so exports and tables are readable by others as ordinary files are.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and FUSE mounts) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    """fsync the finished temp file, move it into place, fsync the folder: after a crash
    (power loss included) `path` is the old file or the whole new one."""
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temp file written by someone else (torch.save, a copy) into place as
    the atomic writers here do: mode 0666 & ~umask, fsynced, renamed, folder fsynced."""
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, 0o666 & ~_umask())
    _replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_savefig(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as a PNG atomically (a hidden temp file beside it, then a
    rename: a reader never sees half a picture) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema | None = None) -> None:
    """Write one Parquet file atomically, cast to `schema` when given."""
    path = Path(path)
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    tmp = _tmp_in(path)
    try:
        pq.write_table(table, tmp)
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return pq.read_table(path, columns=columns)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
