"""Hardening of what poolscout writes and reads: CSV formula injection, literal plot labels,
hostile checkpoints, the train stage's completion marker, durable and readable run files."""
from __future__ import annotations

import csv
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from poolscout.engine.core import io


# --------------------------------------------------------------------------- (10) CSV injection
def _manifest(uris: list[str], keys: list[str]) -> pa.Table:
    n = len(uris)
    return pa.table({"image_id": pa.array(range(1, n + 1), pa.int64()), "uri": uris,
                     "width": pa.array([10] * n, pa.int32()), "height": pa.array([10] * n, pa.int32()),
                     "source_key": keys}, schema=io.MANIFEST_SCHEMA)


def _selection(scores: list[float]) -> pa.Table:
    n = len(scores)
    return pa.table({"image_id": pa.array(range(1, n + 1), pa.int64()), "rank": pa.array(range(n), pa.int32()),
                     "score": pa.array(scores, pa.float64()), "rationale": ["{}"] * n},
                    schema=io.SELECTION_SCHEMA)


def test_csv_export_escapes_formula_cells(tmp_path):
    from poolscout.engine.data import export as E

    keys = ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "plain.jpg",
            "a=b.jpg"]
    uris = [f"/d/{k}" for k in keys[:-2]] + ["=cmd|' /C calc'!A0", "s3://b/a=b.jpg"]
    scores = [-0.5, 1.0, -1e-3, 0.0, 2.5, -7.0, 0.25, -0.0]
    path = tmp_path / "sel.csv"
    E.export_csv(path, _selection(scores), _manifest(uris, keys))
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "rank", "score", "uri", "source_key"]
    body = rows[1:]
    assert [r[4] for r in body] == ["'" + k for k in keys[:6]] + ["plain.jpg", "a=b.jpg"]
    assert [r[3] for r in body] == uris[:6] + ["'=cmd|' /C calc'!A0", "s3://b/a=b.jpg"]
    # numbers stay numbers: a negative score is not text and is not escaped
    assert [float(r[2]) for r in body] == scores
    assert body[0][2] == "-0.5"
    assert [int(r[0]) for r in body] == list(range(1, 9))


# --------------------------------------------------------------------------- (11) literal labels
def _tiny_run(root: Path, strategy: str) -> Path:
    for k in range(3):
        d = root / "cycles" / str(k)
        d.mkdir(parents=True)
        io.atomic_write_json(d / "metrics.json", {
            "cycle": k, "strategy": strategy, "labeled_images": 2 + 2 * k, "labeled_boxes": 5 + 4 * k,
            "eval": {"map": 0.1 + 0.05 * k, "map50": 0.2 + 0.1 * k, "per_class": []}})
    io.atomic_write_json(root / "loop.json", {"strategy": strategy, "seed": 0, "status": "done"})
    return root


NASTY = ["a$\\foo$b", "x_y^z\\w", "$a_b^c$", "odd$one", "p\\$q$r$"]


@pytest.mark.parametrize("name", NASTY)
def test_report_plots_labels_literally(tmp_path, name, monkeypatch):
    import matplotlib.pyplot as plt

    from poolscout.engine.evaluation.report import write_report

    figs = []
    real_close = plt.close

    def keep(fig=None):  # look at the figure's texts before it is closed
        figs.append(fig)
        return real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    runs = [_tiny_run(tmp_path / name, strategy=f"s{name}"), _tiny_run(tmp_path / "r2", strategy="random")]
    index = write_report(runs, tmp_path / "rep", montage_images=0, progress=False)
    assert index.is_file() and (tmp_path / "rep" / "curves.png").is_file()
    texts = [t for f in figs if f is not None for t in f.findobj(lambda o: hasattr(o, "get_parse_math"))]
    shown = [t.get_text() for t in texts]
    assert any(name in s for s in shown), shown  # the run name is in a legend, as written
    for t in texts:  # whatever holds a "$" is drawn as plain text, not as mathtext
        if "$" in t.get_text():
            assert not t.get_parse_math(), t.get_text()


# --------------------------------------------------------------------------- (12) hostile checkpoints
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo x > {self.marker}",))


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "executed"
    files = {}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        p = tmp_path / f"evil{proto}.pt"
        p.write_bytes(pickle.dumps(_Evil(marker), protocol=proto))  # builds bytes; runs nothing
        files[f"pickle{proto}"] = p
    # the same payload inside a torch zip (torch.save pickles it, without calling os.system)
    import torch

    p = tmp_path / "evilzip.pt"
    torch.save({"state_dict": _Evil(marker)}, p)
    files["torch_zip"] = p
    p = tmp_path / "other.zip.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not a torch file")
    files["zip"] = p
    p = tmp_path / "random.pt"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    files["random"] = p
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    files["empty"] = p
    return files


@pytest.mark.parametrize("which", ["load_checkpoint", "_load_file_state_dict"])
def test_hostile_checkpoints_give_one_line_errors(tmp_path, which, monkeypatch):
    import torch

    from poolscout.engine.models import detectors

    fn = getattr(detectors, which)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    marker = tmp_path / "executed"
    for kind, path in _hostile_files(tmp_path).items():
        with pytest.raises(ValueError) as ei:
            fn(path)
        msg = str(ei.value)
        assert str(path) in msg, (kind, msg)
        assert "\n" not in msg, (kind, msg)
        assert "weights_only" not in msg and "trusted source" not in msg, (kind, msg)
        if which == "load_checkpoint":
            assert "not a poolscout checkpoint" in msg, (kind, msg)
        else:
            assert "not a plain tensor file" in msg, (kind, msg)
        assert ei.value.__cause__ is None and ei.value.__suppress_context__, kind
    assert not marker.exists(), "the pickle's os.system ran"
    assert calls and all(w is True for w in calls), calls  # never retried with weights_only=False


# --------------------------------------------------------------------------- (13) train marker
def test_loop_rerun_restores_missing_train_json(tmp_path, tiny_pool):
    import torch

    from tests.test_loop import _init, _loop, _strip

    run = _init(tmp_path, tiny_pool, "run", ["loop.cycles=1"])
    res = _loop(run)
    assert res.returncode == 0, res.stderr[-3000:]
    c0 = run.cycle_dir(0)
    train0 = json.loads((c0 / "train.json").read_text())
    metrics0 = json.loads((c0 / "metrics.json").read_text())
    model0 = torch.load(c0 / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    # as if killed between model.pt and train.json
    (c0 / "train.json").unlink()
    t = json.loads((c0 / "timings.json").read_text())
    del t["train"]
    io.atomic_write_json(c0 / "timings.json", t)
    m = dict(metrics0, timings_s={k: v for k, v in metrics0["timings_s"].items() if k != "train"})
    io.atomic_write_json(c0 / "metrics.json", m)

    res = _loop(run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (c0 / "train.json").is_file()
    again = json.loads((c0 / "train.json").read_text())
    assert _strip(again) == _strip(train0)
    assert "train" in json.loads((c0 / "timings.json").read_text())
    metrics1 = json.loads((c0 / "metrics.json").read_text())
    assert "train" in metrics1["timings_s"]
    assert _strip(metrics1) == _strip(metrics0)
    model1 = torch.load(c0 / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(model1) == set(model0)
    for k in model0:
        assert torch.equal(model0[k], model1[k]), k
    assert json.loads((run.root / "loop.json").read_text())["status"] == "done"


def test_train_without_train_json_is_not_finished(tmp_path, tiny_pool, torch_threads):
    from poolscout.jobs.loop import _marker
    from poolscout.jobs.train import train

    from tests.test_loop import _init

    run = _init(tmp_path, tiny_pool, "t", ["loop.cycles=0"])
    cfg = run.config()
    from poolscout.jobs.loop import seed_set

    seed_set(run, cfg, progress=False)
    old = os.umask(0o022)
    try:
        train(run, cfg, cycle=0, progress=False, executor="local")
    finally:
        os.umask(old)
    for name in ("model.pt", "train.json"):  # (18) not mkstemp's 0600
        assert stat.S_IMODE((run.cycle_dir(0) / name).stat().st_mode) == 0o644, name
    assert _marker(run, 0, "train").name == "train.json"
    (run.cycle_dir(0) / "train.json").unlink()
    res = train(run, cfg, cycle=0, progress=False, executor="local")
    assert "skipped" not in res and (run.cycle_dir(0) / "train.json").is_file()
    assert "skipped" in train(run, cfg, cycle=0, progress=False, executor="local")


# --------------------------------------------------------------------------- (18) durable, readable files
def _table() -> pa.Table:
    return pa.table({"image_id": pa.array([1, 2], pa.int64()), "state": ["pool", "test"],
                     "cycle": pa.array([0, 0], pa.int32()), "selected_by": ["", ""]}, schema=io.LEDGER_SCHEMA)


def test_run_files_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_table(_table(), tmp_path / "ledger.parquet", io.LEDGER_SCHEMA)
        io.atomic_write_json(tmp_path / "x.json", {"a": 1})
        io.atomic_write_text(tmp_path / "t.txt", "hi")
    finally:
        os.umask(old)
    for name in ("ledger.parquet", "x.json", "t.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert os.umask(old) == old  # the writers left the process umask alone
    os.umask(old)


def test_atomic_writes_fsync_file_and_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        synced.append(target)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    io.write_table(_table(), tmp_path / "ledger.parquet", io.LEDGER_SCHEMA)
    parquet = list(synced)
    synced.clear()
    io.atomic_write_json(tmp_path / "x.json", {"a": 1})
    js = list(synced)
    assert parquet and js
    assert any(".ledger.parquet." in s for s in parquet), parquet  # the temp file, before the rename
    assert any(".x.json." in s for s in js), js
    if os.name == "posix":  # and the folder, after it
        assert str(tmp_path) in parquet and str(tmp_path) in js, (parquet, js)
    assert io.read_table(tmp_path / "ledger.parquet").equals(_table())
    assert not list(tmp_path.glob(".*.tmp"))
