"""The bad-input corpus (tests/corpus_cases.py) through `init`, `import` and the config.

One test id per kind. What every kind must give is in corpus_cases.py; the checks common
to all of them are here:

* an error is one line, of the expected type (a ValueError the CLI prints without a
  traceback), naming the file and the field or key; an init that fails leaves no
  initialised run, an import that fails changes nothing;
* a successful init has consistent tables: |manifest| = |ledger| = pool + labeled + test +
  rejected, and the rejected ledger rows are exactly the rows of rejects.parquet.

Probe findings covered (the kinds carry them in ``defects``):

* 4: non-UTF-8 file names (on disk, or a COCO ``file_name`` with a lone surrogate);
* 5: tracebacks during init (huge numbers, non-scalar ids, deep JSON, VOC size inf /
  1e400, unknown XML encoding, YAML python tags, Latin-1 classes.txt / id files);
* 6: tracebacks or wrong messages during import of answers;
* 14: one image-reference rule for COCO, VOC and YOLO (backslashes, absolute paths inside
  the root, ``..`` escapes);
* 15: a COCO file without a ``categories`` list.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, ConfigError, load_config
from poolscout.engine.core.run import RunDir
from poolscout.engine.data.oracle import OracleError, answers_cycle, import_answers, read_answers
from poolscout.engine.data.pool import image_id_for, init_run
from tests import corpus_cases as C
from tests.conftest_data import write_png

KINDS = {k.category: [] for k in C.ALL}
for _k in C.ALL:
    KINDS[_k.category].append(_k)


@pytest.fixture(autouse=True)
def _no_git(monkeypatch):
    """init_run asks git for the code version (a subprocess per run): not what is tested here."""
    monkeypatch.setattr("poolscout.engine.data.pool.code_version", lambda: "corpus")


def _ids(kinds):
    return [k.name for k in kinds]


def _one_line(e: BaseException, kind: C.Kind) -> str:
    assert isinstance(e, kind.exc), f"{type(e).__name__} instead of {kind.exc.__name__}: {e}"
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    for m in kind.match:
        assert m in msg, f"{m!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- init
def _check_run(run: RunDir) -> dict[int, str]:
    """The tables of an initialised run agree; returns image_id -> reject reason."""
    man = io.read_table(run.manifest)
    led = io.read_table(run.ledger)
    rej = io.read_table(run.rejects)
    assert rej.schema == io.REJECTS_SCHEMA
    states = led["state"].to_pylist()
    n = {s: states.count(s) for s in ("pool", "labeled", "test", "rejected")}
    assert len(man) == len(led) == sum(n.values()), (len(man), n)
    assert man["image_id"].to_pylist() == led["image_id"].to_pylist()
    assert len(set(man["image_id"].to_pylist())) == len(man)
    assert man["image_id"].to_pylist() == [image_id_for(k) for k in man["source_key"].to_pylist()]
    rejected = {i for i, s in zip(led["image_id"].to_pylist(), states) if s == "rejected"}
    assert rejected == set(rej["image_id"].to_pylist()) and len(rej) == n["rejected"]
    ann = io.read_table(run.annotations)
    assert set(ann["image_id"].to_pylist()) <= set(man["image_id"].to_pylist()) - rejected
    return dict(zip(rej["image_id"].to_pylist(), rej["reason"].to_pylist()))


@pytest.mark.parametrize("kind", KINDS["init"], ids=_ids(KINDS["init"]))
def test_init_corpus(kind: C.Kind, tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    args = kind.write(case)
    cfg = load_config([], args.pop("settings", []))
    run = RunDir(tmp_path / "run")
    if kind.expect == "error":
        with pytest.raises(Exception) as e:
            init_run(run, cfg=cfg, progress=False, **args)
        _one_line(e.value, kind)
        assert not run.run_yaml.exists()
    else:
        init_run(run, cfg=cfg, progress=False, **args)
        reasons = _check_run(run)
        if kind.expect == "reject":
            assert kind.key is None or image_id_for(kind.key) in reasons, (kind.key, reasons)
            rows = [reasons[image_id_for(kind.key)]] if kind.key is not None else list(reasons.values())
            assert any(all(m in r for m in kind.match) for r in rows), (kind.match, rows)
        else:
            iid = image_id_for(kind.key)
            assert iid not in reasons, reasons
            man = io.read_table(run.manifest)
            assert iid in man["image_id"].to_pylist()
            ann = io.read_table(run.annotations)
            assert ann["image_id"].to_pylist().count(iid) == kind.boxes
    if kind.absent:
        assert not (case / kind.absent).exists(), "the input ran code"


# --------------------------------------------------------------------------- import
@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, C.ImportContext]:
    """images a, b, c (64x48), GT box on a; cycle 0 selected a and b."""
    import json

    tmp = tmp_path_factory.mktemp("corpus_import")
    root = tmp / "imgs"
    for n in ("a.png", "b.png", "c.png"):
        write_png(root / n, C.IW, C.IH)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(("a.png", "b.png", "c.png"), 1)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}],
            "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "dent"}]}
    (tmp / "gt.json").write_text(json.dumps(coco))
    run = RunDir(tmp / "run")
    init_run(run, images=root, annotations=tmp / "gt.json", cfg=Config(), progress=False)
    man = io.read_table(run.manifest)
    ids = dict(zip(man["source_key"].to_pylist(), man["image_id"].to_pylist()))
    uris = dict(zip(man["source_key"].to_pylist(), man["uri"].to_pylist()))
    sel = pa.table({"image_id": pa.array([ids["a.png"], ids["b.png"]], pa.int64()),
                    "rank": pa.array([1, 2], pa.int32()), "score": pa.array([1.0, 0.5], pa.float64()),
                    "rationale": ["{}", "{}"]}, schema=io.SELECTION_SCHEMA)
    io.write_table(sel, run.selection_path(0), io.SELECTION_SCHEMA)
    io.atomic_write_json(run.cycle_dir(0) / "select.json", {"cycle": 0, "strategy": "entropy", "selected": 2})
    return run.root, C.ImportContext(ids, uris, run.read_categories())


def _import(run: RunDir, path: Path, fmt) -> dict:
    """What `poolscout import` does."""
    answers = read_answers(path, fmt, manifest=io.read_table(run.manifest), categories=run.read_categories())
    k = answers_cycle(run, answers)
    return import_answers(run, answers, int(k), source=str(path))


def test_import_corpus_base_run_takes_a_good_answer(base_run, tmp_path):
    root, ctx = base_run
    run = RunDir(shutil.copytree(root, tmp_path / "run"))
    args = C.answers(C.acoco())(tmp_path, ctx)
    assert _import(run, args["path"], None)["imported"] == 1
    args = C.answers(C.als(C.rect(), key="b.png"), name="ls.json")(tmp_path, ctx)
    assert _import(run, args["path"], None)["imported"] == 1


@pytest.mark.parametrize("kind", KINDS["import"], ids=_ids(KINDS["import"]))
def test_import_corpus(kind: C.Kind, base_run, tmp_path):
    root, ctx = base_run
    run = RunDir(shutil.copytree(root, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run.root.glob("*.parquet")}
    args = kind.write(tmp_path, ctx)
    if kind.expect == "ok":
        assert _import(run, args["path"], args.get("fmt"))["imported"] >= 1
        orc = io.read_table(run.root / "oracle.parquet")
        assert all(s.encode("utf-8") for s in orc["source"].to_pylist())
        return
    with pytest.raises(Exception) as e:
        _import(run, args["path"], args.get("fmt"))
    assert isinstance(e.value, OracleError) or kind.exc is not ValueError, type(e.value)
    _one_line(e.value, kind)
    assert {p.name: p.read_bytes() for p in run.root.glob("*.parquet")} == before


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kind", KINDS["config"], ids=_ids(KINDS["config"]))
def test_config_corpus(kind: C.Kind, tmp_path):
    args = kind.write(tmp_path)
    with pytest.raises(Exception) as e:
        load_config(args["paths"], args["overrides"])
    assert isinstance(e.value, ConfigError), type(e.value)
    _one_line(e.value, kind)


# --------------------------------------------------------------------------- the corpus itself
def test_corpus_size_and_coverage():
    names = [k.id for k in C.ALL]
    assert len(names) == len(set(names)), "kind names repeat"
    assert len(C.ALL) >= 90
    assert {k.category for k in C.ALL} == {"init", "import", "config"}
    assert {k.expect for k in C.ALL} == {"error", "reject", "ok"}
    covered = {d for k in C.ALL for d in k.defects}
    assert covered >= {4, 5, 6, 14, 15}
    # every init format and the folder-only pool have kinds
    prefixes = {k.name.split("_")[0] for k in KINDS["init"]}
    assert {"folder", "coco", "voc", "yolo"} <= prefixes
    assert all(k.match or k.expect == "ok" for k in C.ALL)
