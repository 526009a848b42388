"""engine.oracle: the simulated GT oracle, reading COCO / Label Studio answers, importing them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from poolscout.engine.data import export as E
from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.data.oracle import (
    ORACLE_SCHEMA,
    Answers,
    OracleError,
    answer_digest,
    answers_cycle,
    batch_status,
    import_answers,
    read_answers,
    simulated_label,
)
from poolscout.engine.data.pool import init_run
from poolscout.engine.core.run import RunDir

STRATEGY = "entropy"
SIZE = 64


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from poolscout.engine.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("oracle_pool"), n_images=12, size=SIZE, seed=3)


@pytest.fixture
def run(tmp_path, pool) -> RunDir:
    """12 synthetic images: 2 test, 10 pool; cycle 0 selects 4 pool images (3 with GT boxes, then 1 more)."""
    test = tmp_path / "test.txt"
    test.write_text("syn_00010\nsyn_00011\n")
    r = RunDir(tmp_path / "run")
    init_run(r, images=pool["images"], annotations=pool["annotations"], test=test, cfg=Config())
    led = io.read_table(r.ledger)
    pool_ids = [i for i, s in zip(led["image_id"].to_pylist(), led["state"].to_pylist()) if s == "pool"]
    assert len(pool_ids) == 10
    ann_ids = set(io.read_table(r.annotations)["image_id"].to_pylist())
    with_gt = [i for i in pool_ids if i in ann_ids]
    picks = with_gt[:3] + [i for i in pool_ids if i not in with_gt[:3]][:1]
    write_selection(r, 0, picks)
    return r


def write_selection(run: RunDir, k: int, ids: list[int], strategy: str = STRATEGY) -> None:
    sel = pa.table({"image_id": pa.array(ids, pa.int64()), "rank": pa.array(range(1, len(ids) + 1), pa.int32()),
                    "score": pa.array(np.linspace(1, 0.5, len(ids)), pa.float64()),
                    "rationale": ["{}"] * len(ids)}, schema=io.SELECTION_SCHEMA)
    io.write_table(sel, run.selection_path(k), io.SELECTION_SCHEMA)
    io.atomic_write_json(run.cycle_dir(k) / "select.json", {"cycle": k, "strategy": strategy, "selected": len(ids)})


def selected(run: RunDir, k: int = 0) -> list[int]:
    return io.read_table(run.selection_path(k)).sort_by("rank")["image_id"].to_pylist()


def manifest(run: RunDir) -> pa.Table:
    return io.read_table(run.manifest)


def key_of(run: RunDir, image_id: int) -> str:
    m = manifest(run)
    return dict(zip(m["image_id"].to_pylist(), m["source_key"].to_pylist()))[image_id]


def gt(run: RunDir, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    a = io.read_table(run.annotations)
    a = a.filter(pa.compute.equal(a["image_id"], image_id))
    b = np.column_stack([a[c].to_numpy() for c in ("x1", "y1", "x2", "y2")]).astype(np.float32).reshape(-1, 4)
    return b, a["category_id"].to_numpy().astype(np.int32)


def gt_preds(run: RunDir, ids: list[int]) -> dict[str, np.ndarray]:
    """A canonical prediction batch whose boxes are the GT of `ids` (score 1)."""
    boxes, labels, off = [], [], [0]
    for i in ids:
        b, c = gt(run, i)
        boxes.append(b)
        labels.append(c)
        off.append(off[-1] + len(c))
    return {"image_id": np.array(ids, np.int64), "offsets": np.array(off, np.int64),
            "boxes": np.concatenate(boxes).reshape(-1, 4), "scores": np.ones(off[-1], np.float32),
            "labels": np.concatenate(labels).astype(np.int64)}


def read(run: RunDir, path, fmt=None) -> Answers:
    return read_answers(path, fmt, manifest=manifest(run), categories=run.read_categories())


def state_of(run: RunDir) -> dict[int, tuple[str, int, str]]:
    led = io.read_table(run.ledger)
    return {r["image_id"]: (r["state"], r["cycle"], r["selected_by"]) for r in led.to_pylist()}


def snapshot(run: RunDir) -> dict[str, bytes]:
    out = {}
    for p in (run.ledger, run.annotations, run.root / "oracle.parquet"):
        out[p.name] = p.read_bytes() if p.is_file() else b""
    return out


def coco_file(run: RunDir, path: Path, answers: dict[int, list[tuple]], *, categories=None, id_of=None,
              file_name=None) -> Path:
    """A hand-made COCO answer file: answers = {image_id: [(category_id, x, y, w, h), ...]}."""
    m = manifest(run)
    size = {i: (w, h) for i, w, h in zip(m["image_id"].to_pylist(), m["width"].to_pylist(), m["height"].to_pylist())}
    images, anns = [], []
    for n, (i, boxes) in enumerate(answers.items(), 1):
        cid = id_of(i) if id_of else n
        fn = file_name(i) if file_name else key_of(run, i)
        images.append({"id": cid, "file_name": fn, "width": size[i][0], "height": size[i][1]})
        for c, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": cid, "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    doc = {"images": images, "annotations": anns,
           "categories": categories if categories is not None else run.read_categories()}
    path.write_text(json.dumps(doc))
    return path


def ls_file(run: RunDir, path: Path, answers: dict[int, list[tuple]], **value_extra) -> Path:
    """A hand-made Label Studio export: answers = {image_id: [(label, x%, y%, w%, h%), ...]}."""
    tasks = []
    for t, (i, boxes) in enumerate(answers.items(), 1):
        res = [{"id": f"r{j}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": SIZE, "original_height": SIZE,
                "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [lab],
                          **value_extra}}
               for j, (lab, x, y, w, h) in enumerate(boxes)]
        tasks.append({"id": 1000 + t, "data": {"image": f"/data/upload/1/x-{t}.png", "image_id": i},
                      "annotations": [{"id": t, "was_cancelled": False, "result": res}], "predictions": []})
    path.write_text(json.dumps(tasks))
    return path


def accept_predictions(path: Path) -> None:
    """What Label Studio exports after annotators accept the pre-annotations unchanged."""
    tasks = json.loads(path.read_text())
    for t in tasks:
        t["annotations"] = [{"id": t["id"], "was_cancelled": False, "result": t["predictions"][0]["result"]}]
        t["id"] = 5000 + t["data"]["poolscout_rank"]  # Label Studio numbers tasks itself
    path.write_text(json.dumps(tasks))


# --------------------------------------------------------------------------- simulated
def test_simulated_label_reveals_gt_and_is_idempotent(run):
    ids = selected(run)
    before = state_of(run)
    ann_before = run.annotations.read_bytes()
    res = simulated_label(run, 0)
    n_boxes = sum(len(gt(run, i)[1]) for i in ids)
    assert res == {"images": 4, "boxes": n_boxes, "newly_labeled": 4} and n_boxes > 0
    after = state_of(run)
    for i in ids:
        assert after[i] == ("labeled", 1, STRATEGY)
    assert {i: v for i, v in after.items() if i not in ids} == {i: v for i, v in before.items() if i not in ids}
    assert run.annotations.read_bytes() == ann_before
    assert batch_status(run, 0) == {"selected": 4, "labeled": 4, "missing_ids": []}
    led_bytes, mtime = run.ledger.read_bytes(), run.ledger.stat().st_mtime_ns
    assert simulated_label(run, 0) == {"images": 4, "boxes": n_boxes, "newly_labeled": 0}
    assert run.ledger.read_bytes() == led_bytes and run.ledger.stat().st_mtime_ns == mtime
    assert not (run.root / "oracle.parquet").exists()


def test_simulated_label_needs_a_selection(run):
    with pytest.raises(OracleError, match=r"cycles/3/selection.parquet is missing"):
        simulated_label(run, 3)
    with pytest.raises(OracleError, match=r"cycles/3/selection.parquet is missing"):
        batch_status(run, 3)
    (run.cycle_dir(0) / "select.json").unlink()
    with pytest.raises(OracleError, match=r"select.json is missing"):
        simulated_label(run, 0)


def test_simulated_label_refuses_a_test_image_in_the_selection(run):
    test_id = [i for i, v in state_of(run).items() if v[0] == "test"][0]
    write_selection(run, 1, [test_id])
    with pytest.raises(OracleError, match=rf"image {test_id} \(syn_0001[01].png\) is in the test split"):
        simulated_label(run, 1)


# --------------------------------------------------------------------------- round trips
def test_coco_round_trip_and_idempotent_import(run, tmp_path):
    ids = selected(run)
    sel = io.read_table(run.selection_path(0))
    path = tmp_path / "export" / "coco.json"
    E.export_coco(path, sel, manifest(run), gt_preds(run, ids), run.read_categories(), min_score=0.5)
    gts = {i: gt(run, i) for i in ids}
    ans = read(run, path)
    assert ans.fmt == "coco" and sorted(ans) == sorted(ids)
    for i in ids:
        np.testing.assert_array_equal(ans[i][0], gts[i][0])  # exact: xywh round-trips in float64
        np.testing.assert_array_equal(ans[i][1], gts[i][1])
        assert ans[i][0].dtype == np.float32 and ans[i][1].dtype == np.int32
    res = import_answers(run, ans, 0, source=str(path))
    assert res == {"imported": 4, "unchanged": 0, "selected": 4, "labeled_in_batch": 4, "missing": 0}
    st = state_of(run)
    assert all(st[i] == ("labeled", 1, STRATEGY) for i in ids)
    for i in ids:  # the answer equals the GT: same content, new ann_ids
        b, c = gt(run, i)
        assert answer_digest(b, c) == answer_digest(*gts[i])
    a = io.read_table(run.annotations)
    assert a.schema == io.ANNOTATIONS_SCHEMA and len(set(a["ann_id"].to_pylist())) == len(a)
    orc = io.read_table(run.root / "oracle.parquet")
    assert orc.schema == ORACLE_SCHEMA
    assert sorted(orc["image_id"].to_pylist()) == sorted(ids)
    assert set(orc["cycle"].to_pylist()) == {0} and set(orc["source"].to_pylist()) == {str(path)}
    assert orc["boxes"].to_pylist() == [len(gts[i][1]) for i in orc["image_id"].to_pylist()]
    # the same answers again: nothing changes, not even a rewrite
    snap = snapshot(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.root.glob("*.parquet")}
    res2 = import_answers(run, read(run, path), 0, source=str(path))
    assert res2 == {"imported": 0, "unchanged": 4, "selected": 4, "labeled_in_batch": 4, "missing": 0}
    assert snapshot(run) == snap
    assert {p: p.stat().st_mtime_ns for p in run.root.glob("*.parquet")} == mtimes


def test_label_studio_round_trip(run, tmp_path):
    ids = selected(run)
    sel = io.read_table(run.selection_path(0))
    path = tmp_path / "label_studio.json"
    E.export_label_studio(path, sel, manifest(run), gt_preds(run, ids), run.read_categories(), min_score=0.5)
    # the raw export holds only model predictions: not answers
    with pytest.raises(OracleError, match=r"label_studio.json: none of its 4 tasks has an annotation"):
        read(run, path)
    accept_predictions(path)
    ans = read(run, path)
    assert ans.fmt == "label_studio" and sorted(ans) == sorted(ids) and ans.unanswered == 0
    for i in ids:
        b, c = gt(run, i)
        np.testing.assert_allclose(ans[i][0], b, atol=1e-4)
        np.testing.assert_array_equal(ans[i][1], c)
    res = import_answers(run, ans, 0, source=str(path))
    assert res["imported"] == 4 and res["missing"] == 0
    assert all(state_of(run)[i] == ("labeled", 1, STRATEGY) for i in ids)
    snap = snapshot(run)
    assert import_answers(run, read(run, path, "label_studio"), 0, source=str(path))["imported"] == 0
    assert snapshot(run) == snap


def test_label_studio_matches_by_image_path_and_skips_unanswered(run, tmp_path):
    ids = selected(run)
    m = manifest(run)
    uri = dict(zip(m["image_id"].to_pylist(), m["uri"].to_pylist()))
    tasks = [
        {"id": 1, "data": {"image": uri[ids[0]]},  # the manifest uri as export_label_studio writes it
         "annotations": [{"result": [], "was_cancelled": False}]},
        {"id": 2, "data": {"image": f"/data/local-files/?d=pool/images/{key_of(run, ids[1])}"},
         "annotations": [{"result": [], "was_cancelled": False}]},
        {"id": 3, "data": {"image": "file://" + uri[ids[2]]}, "annotations": [{"result": [], "was_cancelled": True}]},
        {"id": 4, "data": {"image": uri[ids[3]]}, "annotations": []},
    ]
    p = tmp_path / "ls.json"
    p.write_text(json.dumps(tasks))
    ans = read(run, p)
    assert sorted(ans) == sorted(ids[:2]) and ans.unanswered == 2
    assert all(len(ans[i][1]) == 0 for i in ans)


# --------------------------------------------------------------------------- batches
def test_partial_batches(run, tmp_path):
    ids = selected(run)
    p1 = coco_file(run, tmp_path / "part1.json", {ids[0]: [(1, 2, 3, 10, 12)], ids[2]: []})
    res = import_answers(run, read(run, p1), 0, source=str(p1))
    assert res == {"imported": 2, "unchanged": 0, "selected": 4, "labeled_in_batch": 2, "missing": 2}
    assert batch_status(run, 0) == {"selected": 4, "labeled": 2, "missing_ids": [ids[1], ids[3]]}
    assert state_of(run)[ids[1]] == ("pool", -1, "")
    p2 = coco_file(run, tmp_path / "part2.json", {ids[1]: [(2, 0, 0, 5, 5)], ids[3]: [(3, 1, 1, 4, 4)],
                                                  ids[0]: [(1, 2, 3, 10, 12)]})
    res = import_answers(run, read(run, p2), 0, source=str(p2))
    assert res == {"imported": 2, "unchanged": 1, "selected": 4, "labeled_in_batch": 4, "missing": 0}
    assert batch_status(run, 0) == {"selected": 4, "labeled": 4, "missing_ids": []}
    orc = io.read_table(run.root / "oracle.parquet").to_pylist()
    assert {r["image_id"]: Path(r["source"]).name for r in orc} == {
        ids[0]: "part1.json", ids[2]: "part1.json", ids[1]: "part2.json", ids[3]: "part2.json"}


def test_human_answer_replaces_gt_and_zero_boxes_are_an_answer(run, tmp_path):
    ids = selected(run)
    assert len(gt(run, ids[0])[1]) > 0 and len(gt(run, ids[1])[1]) > 0
    others = io.read_table(run.annotations).filter(
        pa.compute.invert(pa.compute.is_in(io.read_table(run.annotations)["image_id"], pa.array(ids[:2]))))
    max_ann = max(io.read_table(run.annotations)["ann_id"].to_pylist())
    p = coco_file(run, tmp_path / "a.json", {ids[0]: [], ids[1]: [(4, 10.5, 20, 30, 8)]})
    import_answers(run, read(run, p), 0, source=str(p))
    b0, c0 = gt(run, ids[0])
    assert len(c0) == 0 and state_of(run)[ids[0]] == ("labeled", 1, STRATEGY)
    b1, c1 = gt(run, ids[1])
    assert b1.tolist() == [[10.5, 20.0, 40.5, 28.0]] and c1.tolist() == [4]
    a = io.read_table(run.annotations)
    assert a.filter(pa.compute.equal(a["image_id"], ids[1]))["ann_id"].to_pylist() == [max_ann + 1]
    # the other images' rows are untouched
    rest = a.filter(pa.compute.invert(pa.compute.is_in(a["image_id"], pa.array(ids[:2]))))
    assert rest.equals(others)


def test_import_after_simulated_label_replaces_the_revealed_gt(run, tmp_path):
    ids = selected(run)
    simulated_label(run, 0)
    p = coco_file(run, tmp_path / "a.json", {ids[0]: [(2, 1, 1, 9, 9)]})
    res = import_answers(run, read(run, p), 0, source=str(p))
    assert res["imported"] == 1 and res["labeled_in_batch"] == 4
    assert gt(run, ids[0])[1].tolist() == [2]


def test_conflicting_second_answer_is_refused(run, tmp_path):
    ids = selected(run)
    p1 = coco_file(run, tmp_path / "first.json", {ids[0]: [(1, 2, 3, 10, 12)], ids[1]: []})
    import_answers(run, read(run, p1), 0, source=str(p1))
    snap = snapshot(run)
    # same boxes in another order / another file: unchanged, not a conflict
    p_same = coco_file(run, tmp_path / "same.json", {ids[1]: [], ids[0]: [(1, 2, 3, 10, 12)]})
    assert import_answers(run, read(run, p_same), 0, source=str(p_same))["unchanged"] == 2
    p2 = coco_file(run, tmp_path / "second.json", {ids[0]: [(1, 2, 3, 10, 13)], ids[2]: []})
    key = key_of(run, ids[0])
    with pytest.raises(OracleError, match=rf"second.json: 1 image\(s\) already have a different answer: "
                                          rf"image {ids[0]} \({key}\).*imported before from .*first.json"):
        import_answers(run, read(run, p2), 0, source=str(p2))
    assert snapshot(run) == snap  # nothing was written, not even the good image


def test_answers_outside_the_selection_are_refused(run, tmp_path):
    st = state_of(run)
    ids = selected(run)
    test_id = [i for i, v in st.items() if v[0] == "test"][0]
    p = coco_file(run, tmp_path / "t.json", {ids[0]: [], test_id: []})
    snap = snapshot(run)
    with pytest.raises(OracleError, match=rf"t.json: 1 answered image\(s\) are not in cycle 0's selection: "
                                          rf"image {test_id} \(syn_0001[01].png.*not in the current selection at "
                                          rf"all: in the test split"):
        import_answers(run, read(run, p), 0, source=str(p))
    unselected = [i for i, v in st.items() if v[0] == "pool" and i not in ids][0]
    p = coco_file(run, tmp_path / "u.json", {unselected: []})
    with pytest.raises(OracleError, match=rf"image {unselected} .*in the pool"):
        import_answers(run, read(run, p), 0, source=str(p))
    # in another cycle's selection
    write_selection(run, 1, [unselected])
    with pytest.raises(OracleError, match=rf"image {unselected} .*it is in cycle 1's selection"):
        import_answers(run, read(run, p), 0, source=str(p))
    assert snapshot(run) == snap


# --------------------------------------------------------------------------- bad files
def test_unknown_image_and_category(run, tmp_path):
    ids = selected(run)
    p = coco_file(run, tmp_path / "img.json", {ids[0]: []}, file_name=lambda i: "nope/missing.png")
    with pytest.raises(OracleError, match=r"img.json: images\[0\] \(id 1, file_name 'nope/missing.png'\): "
                                          r"unknown image"):
        read(run, p)
    cats = run.read_categories() + [{"id": 9, "name": "rust"}]
    p = coco_file(run, tmp_path / "cat.json", {ids[0]: [(9, 1, 1, 5, 5)]}, categories=cats)
    with pytest.raises(OracleError, match=rf"cat.json: annotation id 1 \(image {ids[0]} .*\) category_id 9: "
                                          r"unknown category 'rust'"):
        read(run, p)
    p = coco_file(run, tmp_path / "cat2.json", {ids[0]: [(7, 1, 1, 5, 5)]})
    with pytest.raises(OracleError, match=r"cat2.json: annotation id 1 .* category_id: unknown category 7"):
        read(run, p)
    p = ls_file(run, tmp_path / "ls.json", {ids[0]: [("rust", 1, 1, 10, 10)]})
    with pytest.raises(OracleError, match=r"ls.json: tasks\[0\] \(id 1001\).* result\[0\] \(id 'r0'\) "
                                          r"value.rectanglelabels: unknown category 'rust'"):
        read(run, p)
    p = ls_file(run, tmp_path / "ls2.json", {123: [("scratch", 1, 1, 10, 10)]})
    with pytest.raises(OracleError, match=r"ls2.json: tasks\[0\] \(id 1001\) data.image_id: unknown image 123"):
        read(run, p)


def test_coco_category_ids_map_by_name(run, tmp_path):
    ids = selected(run)
    ours = {c["name"]: c["id"] for c in run.read_categories()}
    cats = [{"id": 100 + c["id"], "name": c["name"]} for c in run.read_categories()]
    p = coco_file(run, tmp_path / "c.json", {ids[0]: [(100 + ours["pit"], 1, 1, 5, 5)]}, categories=cats)
    assert read(run, p)[ids[0]][1].tolist() == [ours["pit"]]


def test_image_references(run, tmp_path):
    ids = selected(run)
    m = manifest(run)
    uri = dict(zip(m["image_id"].to_pylist(), m["uri"].to_pylist()))
    forms = {ids[0]: uri[ids[0]], ids[1]: "file://" + uri[ids[1]], ids[2]: "C:\\data\\" + key_of(run, ids[2]),
             ids[3]: "./" + key_of(run, ids[3])}
    p = coco_file(run, tmp_path / "f.json", {i: [] for i in ids}, file_name=forms.get)
    assert sorted(read(run, p)) == sorted(ids)
    # an export-style id equal to our image_id, with a file_name the manifest does not know
    p = coco_file(run, tmp_path / "i.json", {ids[0]: []}, id_of=lambda i: i, file_name=lambda i: "renamed.png")
    assert list(read(run, p)) == [ids[0]]
    # file_name and id disagree
    p = coco_file(run, tmp_path / "d.json", {ids[0]: []}, id_of=lambda i: ids[1])
    with pytest.raises(OracleError, match=rf"d.json: .*file_name is image {ids[0]} .* but the id is image {ids[1]}"):
        read(run, p)
    # one image answered twice
    doc = json.loads(coco_file(run, tmp_path / "x.json", {ids[0]: []}).read_text())
    doc["images"].append(dict(doc["images"][0], id=2))
    (tmp_path / "x.json").write_text(json.dumps(doc))
    with pytest.raises(OracleError, match=rf"x.json: images\[1\].*image {ids[0]} .* is answered twice"):
        read(run, tmp_path / "x.json")


def test_boxes_outside_the_image(run, tmp_path):
    ids = selected(run)
    p = coco_file(run, tmp_path / "in.json", {ids[0]: [(1, -1.5, 0, 10, 65.5)]})  # within 2 px: clipped
    assert read(run, p)[ids[0]][0].tolist() == [[0.0, 0.0, 8.5, 64.0]]
    p = coco_file(run, tmp_path / "out.json", {ids[0]: [(1, 50, 0, 20, 10)]})
    with pytest.raises(OracleError, match=rf"out.json: annotation id 1 \(image {ids[0]} .*\) bbox: x2 70 > image "
                                          r"width 64 \(box outside the image beyond the 2 px tolerance\)"):
        read(run, p)
    p = ls_file(run, tmp_path / "ls.json", {ids[0]: [("scratch", 90, 10, 20, 10)]})
    with pytest.raises(OracleError, match=r"ls.json: tasks\[0\].*result\[0\].* value: x2 70.4 > image width 64"):
        read(run, p)
    p = ls_file(run, tmp_path / "ls_ok.json", {ids[0]: [("scratch", 25, 50, 50, 25)]})
    assert read(run, p)[ids[0]][0].tolist() == [[16.0, 32.0, 48.0, 48.0]]


def test_bad_box_values(run, tmp_path):
    ids = selected(run)
    p = coco_file(run, tmp_path / "nan.json", {ids[0]: [(1, 1, 1, 5, 5)]})
    p.write_text(p.read_text().replace("[1, 1, 5, 5]", "[1, NaN, 5, 5]"))
    with pytest.raises(OracleError, match=r"nan.json: annotation id 1 .* bbox: y is nan"):
        read(run, p)
    p = coco_file(run, tmp_path / "neg.json", {ids[0]: [(1, 10, 10, -3, 5)]})
    with pytest.raises(OracleError, match=r"neg.json: annotation id 1 .* bbox: negative width -3"):
        read(run, p)
    p = coco_file(run, tmp_path / "short.json", {ids[0]: [(1, 10, 10, 3, 5)]})
    p.write_text(p.read_text().replace("[10, 10, 3, 5]", "[10, 10, 3]"))
    with pytest.raises(OracleError, match=r"short.json: annotation id 1 .* bbox: expected \[x, y, width, height\]"):
        read(run, p)
    p = ls_file(run, tmp_path / "lsneg.json", {ids[0]: [("scratch", 10, 10, 5, -5)]})
    with pytest.raises(OracleError, match=r"lsneg.json: .*value: negative height -5"):
        read(run, p)
    # several problems: one message naming them all
    p = coco_file(run, tmp_path / "many.json", {ids[0]: [(1, 10, 10, -3, 5), (7, 1, 1, 2, 2)]})
    with pytest.raises(OracleError, match=r"many.json: 2 problems: .*negative width.*unknown category 7"):
        read(run, p)


def test_rotated_label_studio_box_is_refused(run, tmp_path):
    ids = selected(run)
    p = ls_file(run, tmp_path / "rot.json", {ids[0]: [("scratch", 10, 10, 20, 20)]}, rotation=15)
    with pytest.raises(OracleError, match=r"rot.json: tasks\[0\] \(id 1001\).* result\[0\] \(id 'r0'\) "
                                          r"value.rotation: 15; only unrotated boxes"):
        read(run, p)


def test_label_studio_other_region_types(run, tmp_path):
    ids = selected(run)
    p = ls_file(run, tmp_path / "ok.json", {ids[0]: [("scratch", 10, 10, 20, 20)]})
    tasks = json.loads(p.read_text())
    res = tasks[0]["annotations"][0]["result"]
    res.append({"type": "choices", "value": {"choices": ["good"]}})
    p.write_text(json.dumps(tasks))
    assert len(read(run, p)[ids[0]][1]) == 1
    res.append({"id": "poly", "type": "polygonlabels", "value": {"points": [[1, 1], [2, 2], [1, 3]]}})
    p.write_text(json.dumps(tasks))
    with pytest.raises(OracleError, match=r"ok.json: .*result\[2\] \(id 'poly'\) type: 'polygonlabels' regions "
                                          r"are not supported"):
        read(run, p)


def test_malformed_files(run, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(OracleError, match=r"bad.json: not valid JSON"):
        read(run, p)
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(OracleError, match=r"bad.json: neither a COCO file .* nor a Label Studio export"):
        read(run, p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(OracleError, match=r"bad.json: neither"):
        read(run, p)
    p.write_text("{}")
    with pytest.raises(OracleError, match=r"bad.json: not a Label Studio export"):
        read(run, p, "label_studio")
    p.write_text(json.dumps({"images": [{"file_name": "a.png"}]}))
    with pytest.raises(OracleError, match=r"bad.json: images\[0\] is not an object with an 'id'"):
        read(run, p)
    p.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 5, "category_id": 1,
                                                            "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(OracleError, match=r"bad.json: annotation id 1 image_id: unknown image id 5"):
        read(run, p)
    p.write_text(json.dumps([{"id": 1, "data": {"image_id": 1}, "annotations": "x"}]))
    with pytest.raises(OracleError, match=r"bad.json: tasks\[0\] \(id 1\): 'annotations' must be a list"):
        read(run, p)
    with pytest.raises(OracleError, match=r"missing.json: file not found"):
        read(run, tmp_path / "missing.json")
    with pytest.raises(OracleError, match=r"unknown answer format 'csv'"):
        read(run, p, "csv")


def test_import_plain_mapping(run):
    ids = selected(run)
    res = import_answers(run, {ids[0]: (np.array([[1, 2, 30, 40]], np.float32), np.array([2], np.int32)),
                               ids[1]: (np.zeros((0, 4)), np.zeros(0, np.int32))}, 0, source="api")
    assert res["imported"] == 2 and gt(run, ids[0])[0].tolist() == [[1, 2, 30, 40]]
    with pytest.raises(OracleError, match=rf"api: image {ids[2]} .* box 0: unknown category 99"):
        import_answers(run, {ids[2]: (np.array([[1, 2, 3, 4]]), np.array([99]))}, 0, source="api")


# --------------------------------------------------------------------------- finding the cycle
def _cli_import(run: RunDir, path: Path, *extra):
    from click.testing import CliRunner

    from poolscout.jobs.cli import cli

    return CliRunner().invoke(cli, ["import", str(run.root), "--labels", str(path), *map(str, extra)])


def test_import_finds_the_cycle_and_reimport_after_the_loop_moved_on_is_a_no_op(run, tmp_path):
    ids = selected(run)
    path = coco_file(run, tmp_path / "answers.json", {i: [(1, 2, 3, 10, 12)] for i in ids})
    assert answers_cycle(run, read(run, path)) == 0
    r = _cli_import(run, path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"cycle": 0, "imported": 4, "unchanged": 0, "selected": 4,
                                    "labeled_in_batch": 4, "missing": 0}
    # the loop moves on: loop.json says cycle 1, which has no selection yet (the user's report)
    io.atomic_write_json(run.root / "loop.json", {"cycle": 1, "status": "running"})
    snap = snapshot(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.root.glob("*.parquet")}
    r = _cli_import(run, path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"cycle": 0, "imported": 0, "unchanged": 4, "selected": 4,
                                    "labeled_in_batch": 4, "missing": 0}
    # ... and after cycle 1 selected other images: still cycle 0, still nothing written
    others = [i for i, v in state_of(run).items() if v[0] == "pool"][:2]
    write_selection(run, 1, others)
    r = _cli_import(run, path)
    assert r.exit_code == 0 and json.loads(r.stdout)["cycle"] == 0 and json.loads(r.stdout)["unchanged"] == 4
    assert snapshot(run) == snap
    assert {p: p.stat().st_mtime_ns for p in run.root.glob("*.parquet")} == mtimes
    # an explicit --cycle still wins (and is checked)
    r = _cli_import(run, path, "--cycle", 1)
    assert r.exit_code == 2 and "not in cycle 1's selection" in r.stderr
    # the next batch's answers find cycle 1 by themselves
    p1 = coco_file(run, tmp_path / "next.json", {others[0]: []})
    r = _cli_import(run, p1)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cycle"] == 1 and json.loads(r.stdout)["imported"] == 1
    assert state_of(run)[others[0]] == ("labeled", 2, STRATEGY)


def test_answers_in_no_selection_or_spanning_cycles_are_one_line_errors(run, tmp_path):
    ids = selected(run)
    st = state_of(run)
    test_id = [i for i, v in st.items() if v[0] == "test"][0]
    unselected = [i for i, v in st.items() if v[0] == "pool" and i not in ids]
    p = coco_file(run, tmp_path / "none.json", {ids[0]: [], test_id: []})
    snap = snapshot(run)
    r = _cli_import(run, p)
    assert r.exit_code == 2
    msg = r.stderr.strip()
    assert "\n" not in msg and "none.json" in msg
    assert re.search(rf"1 answered image\(s\) are in no cycle's selection: image {test_id} "
                     rf"\(syn_0001[01].png\), images\[1\].*\(in the test split\)", msg), msg
    write_selection(run, 1, unselected[:1])
    p = coco_file(run, tmp_path / "span.json", {ids[0]: [], unselected[0]: []})
    r = _cli_import(run, p)
    assert r.exit_code == 2
    msg = r.stderr.strip()
    assert "\n" not in msg and "span.json" in msg
    assert "span the selections of cycles 0, 1" in msg
    assert re.search(rf"image {ids[0]} \(.*\) in cycle 0", msg) and re.search(rf"image {unselected[0]} \(.*\) in "
                                                                                rf"cycle 1", msg), msg
    assert snapshot(run) == snap
    # the same image in two cycles' selections: the cycle where it can still be labeled
    write_selection(run, 2, [ids[0]])
    with pytest.raises(OracleError, match=r"x: the answered images are in the selections of cycles 0, 2 alike"):
        answers_cycle(run, {ids[0]: (np.zeros((0, 4)), np.zeros(0, np.int32))}, "x")
    import_answers(run, {ids[0]: (np.zeros((0, 4)), np.zeros(0, np.int32))}, 0, source="api")
    assert answers_cycle(run, {ids[0]: (np.zeros((0, 4)), np.zeros(0, np.int32))}, "x") == 0
    assert answers_cycle(run, {}) is None


def test_label_studio_round_trip_with_an_image_server(run, tmp_path):
    """Tasks exported with --image-root-url come back matched by their (quoted) image URL."""
    ids = selected(run)
    sel = io.read_table(run.selection_path(0))
    path = tmp_path / "ls.json"
    E.export_label_studio(path, sel, manifest(run), gt_preds(run, ids), run.read_categories(), min_score=0.5,
                          image_root_url="https://img.example.org/pool")
    tasks = json.loads(path.read_text())
    assert all(t["data"]["image"] == f"https://img.example.org/pool/{key_of(run, t['id'])}" for t in tasks)
    accept_predictions(path)
    tasks = json.loads(path.read_text())
    for t in tasks:
        del t["data"]["image_id"]  # only the URL names the image
    path.write_text(json.dumps(tasks))
    ans = read(run, path)
    assert sorted(ans) == sorted(ids)
    for i in ids:
        np.testing.assert_allclose(ans[i][0], gt(run, i)[0], atol=1e-4)


def test_cli_export_all_then_import_label_studio_answers(run, tmp_path, pool):
    """`poolscout export --format all` (CVAT and the LS config included, image references from
    --image-root-url / export.local_files_root), then the LS answers back without --cycle."""
    from click.testing import CliRunner

    from poolscout.jobs.cli import cli

    ids = selected(run)
    r = CliRunner().invoke(cli, ["export", str(run.root), "--format", "all", "--cycle", "0"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert sorted(files) == ["coco", "csv", "cvat", "label_studio"]
    out = run.export_dir(0)
    assert sorted(p.name for p in out.iterdir()) == ["coco.json", "cvat.xml", "label_studio.json",
                                                     "label_studio_config.xml", "selection.csv"]
    assert files["label_studio"]["config"] == str(out / "label_studio_config.xml")
    tasks = json.loads((out / "label_studio.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d={key_of(run, i)}" for i in ids]
    import xml.etree.ElementTree as ET

    cvat = ET.parse(out / "cvat.xml").getroot()
    assert sorted(im.get("name") for im in cvat.findall("image")) == sorted(key_of(run, i) for i in ids)

    r = CliRunner().invoke(cli, ["export", str(run.root), "--format", "label_studio", "--cycle", "0",
                                 "--image-root-url", "https://h/x/"])
    assert r.exit_code == 0, r.output
    tasks = json.loads((out / "label_studio.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"https://h/x/{key_of(run, i)}" for i in ids]
    root = Path(pool["images"]).resolve().parent
    r = CliRunner().invoke(cli, ["export", str(run.root), "--format", "label_studio", "--cycle", "0",
                                 "--set", f"export.local_files_root={root}"])
    assert r.exit_code == 0, r.output
    tasks = json.loads((out / "label_studio.json").read_text())
    sub = Path(pool["images"]).resolve().name
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d={sub}/{key_of(run, i)}" for i in ids]

    # annotators answer in Label Studio; its export comes back with the local-files references
    for t in tasks:
        t["annotations"] = [{"id": 1, "result": [], "was_cancelled": False}]
        del t["data"]["image_id"]
    ans = tmp_path / "project-1-at-2026.json"
    ans.write_text(json.dumps(tasks))
    r = _cli_import(run, ans)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cycle"] == 0 and json.loads(r.stdout)["imported"] == 4
