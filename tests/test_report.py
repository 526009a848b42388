"""engine.report: learning curves, montages, the self-contained HTML report.

Run directories are built by hand (metrics.json, selection.parquet, manifest, annotations,
categories) over a tiny synthetic pool; one run gets a real tiny detector checkpoint."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from poolscout.engine.core import io
from poolscout.engine.evaluation.report import (aulc, curve_series, group_runs, learning_curves, load_run_metrics, montage,
                           run_summary, write_report)
from poolscout.engine.core.run import RunError

N_CYCLES = 2  # cycles 0..2; cycles 0 and 1 have a selection
PICKS = 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Manifest / annotations / categories tables of an 8-image synthetic pool."""
    from poolscout.engine.data.synthetic import generate

    out = tmp_path_factory.mktemp("report_pool")
    info = generate(out, n_images=8, size=64, seed=3)
    coco = json.loads(Path(info["annotations"]).read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    manifest = pa.table({
        "image_id": [im["id"] for im in images],
        "uri": [str(Path(info["images"]) / im["file_name"]) for im in images],
        "width": [im["width"] for im in images], "height": [im["height"] for im in images],
        "source_key": [im["file_name"] for im in images]})
    anns = coco["annotations"]
    annotations = pa.table({
        "image_id": [a["image_id"] for a in anns], "ann_id": [a["id"] for a in anns],
        "category_id": [a["category_id"] for a in anns],
        "x1": [float(a["bbox"][0]) for a in anns], "y1": [float(a["bbox"][1]) for a in anns],
        "x2": [float(a["bbox"][0] + a["bbox"][2]) for a in anns],
        "y2": [float(a["bbox"][1] + a["bbox"][3]) for a in anns]})
    cats = [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    return {"manifest": manifest, "annotations": annotations, "categories": cats,
            "ids": [im["id"] for im in images], "names": info["classes"]}


def _metrics(k: int, strategy: str, seed: int, names: list[str]) -> dict:
    rng = np.random.default_rng([seed, k])
    m50 = 0.2 + 0.15 * k + 0.02 * rng.random()
    per_class = [{"id": i + 1, "name": n, "ap": m50 / 2, "ap50": m50, "recall": 0.5, "recall50": 0.6, "gt": 3}
                 for i, n in enumerate(names)]
    return {
        "cycle": k, "strategy": strategy, "labeled_images": 2 + 2 * k, "labeled_boxes": 5 + 4 * k + seed % 2,
        "new_images": 2 if k else 2, "new_boxes": 4,
        "eval": {"map": m50 / 2, "map50": m50, "map75": None, "mar100": 0.4, "per_class": per_class,
                 "test_images": 4, "seconds": 0.5},
        "acquisition": {"new_class_hist": {names[0]: 2, names[1]: 1}, "pool_prevalence": {n: 0.25 for n in names},
                        "new_share": {names[0]: 0.67, names[1]: 0.33}, "new_over_prevalence": {names[0]: 2.7},
                        "rarest_class": names[3], "rarest_retrieval": None},
        "timings_s": {"train": 1.5, "evaluate": 0.5, "score": None if k == N_CYCLES else 0.7, "select": 0.1,
                      "label": 0.05},
    }


def make_run(root: Path, pool: dict, *, strategy: str, seed: int, model: bool = False,
             loop_json: bool = True) -> Path:
    root.mkdir(parents=True)
    io.write_table(pool["manifest"], root / "manifest.parquet", io.MANIFEST_SCHEMA)
    io.write_table(pool["annotations"], root / "annotations.parquet", io.ANNOTATIONS_SCHEMA)
    io.atomic_write_json(root / "categories.json", pool["categories"])
    (root / "run.yaml").write_text(yaml.safe_dump({"seed": seed, "dataset": {"max_pixels": 1_000_000}}))
    if loop_json:
        io.atomic_write_json(root / "loop.json", {"strategy": strategy, "seed": seed, "cycles": N_CYCLES,
                                                  "budget": PICKS, "status": "done"})
    rng = np.random.default_rng(seed)
    for k in range(N_CYCLES + 1):
        d = root / "cycles" / str(k)
        d.mkdir(parents=True)
        io.atomic_write_json(d / "metrics.json", _metrics(k, strategy, seed, pool["names"]))
        if k < N_CYCLES:
            io.atomic_write_json(d / "select.json", {"strategy": strategy, "selected": PICKS})
            ids = rng.permutation(pool["ids"])[:PICKS + 1]  # one more than the montage shows
            sel = pa.table({"image_id": ids, "rank": np.arange(len(ids)), "score": rng.random(len(ids)),
                            "rationale": [json.dumps({"topk": {"by": "entropy", "rank": int(r)}, "note": "a<b&c"})
                                          for r in range(len(ids))]})
            io.write_table(sel, d / "selection.parquet", io.SELECTION_SCHEMA)
        if model:
            _save_tiny_model(d / "model.pt", len(pool["categories"]))
    return root


def _save_tiny_model(path: Path, num_classes: int) -> None:
    import torch

    from poolscout.engine.core.config import DetectorConfig
    from poolscout.engine.models.detectors import build_detector, save_checkpoint

    cfg = DetectorConfig(name="fasterrcnn_effnet_lite0_fpn", input_size=64, fpn_channels=32,
                         anchor_sizes=(8, 16, 32, 64), backbone_weights=None, score_thresh=0.0, max_boxes=20,
                         rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_detector(cfg, num_classes, load_pretrained=False)
    save_checkpoint(path, model, cfg, num_classes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pool):
    base = tmp_path_factory.mktemp("report_runs")
    return [make_run(base / "ent_s0", pool, strategy="entropy", seed=0, model=True),
            make_run(base / "ent_s1", pool, strategy="entropy", seed=1),
            make_run(base / "rand_s0", pool, strategy="random", seed=0, loop_json=False)]


def test_aulc_hand_cases():
    assert aulc([0, 10, 20], [0, 1, 1]) == pytest.approx(0.75)
    assert aulc([0, 10], [0.5, 0.5]) == pytest.approx(0.5)
    assert aulc([20, 0, 10], [1, 0, 1]) == pytest.approx(0.75)  # sorted by x
    assert aulc([5], [1.0]) is None
    assert aulc([], []) is None
    assert aulc([3, 3], [0, 1]) is None


def test_load_run_metrics(runs):
    r = load_run_metrics(runs[0])
    assert r["name"] == "ent_s0" and r["strategy"] == "entropy" and r["seed"] == 0 and r["status"] == "done"
    assert [m["cycle"] for m in r["cycles"]] == [0, 1, 2]
    r3 = load_run_metrics(runs[2])  # no loop.json: strategy from select.json, seed from run.yaml
    assert r3["strategy"] == "random" and r3["seed"] == 0 and r3["status"] is None


def test_load_run_metrics_names_the_directory(tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(RunError, match="not_a_run"):
        load_run_metrics(empty)
    with pytest.raises(RunError, match="missing_dir"):
        load_run_metrics(tmp_path / "missing_dir")


def test_grouping_mean_and_band(runs):
    loaded = [load_run_metrics(p) for p in runs]
    groups = group_runs(loaded)
    assert list(groups) == ["entropy", "random"] and len(groups["entropy"]) == 2
    series = curve_series(loaded, "map50", "labeled_boxes")
    assert [s["strategy"] for s in series] == ["entropy", "random"]  # two seeds -> one line
    ent = series[0]
    assert ent["n_runs"] == 2 and ent["cycle"] == [0, 1, 2] and "mean" in ent["label"]
    a, b = (np.array([_metric50(r, k) for k in range(3)]) for r in loaded[:2])
    np.testing.assert_allclose(ent["y"], (a + b) / 2)
    np.testing.assert_allclose(ent["std"], np.std(np.stack([a, b]), axis=0, ddof=1))
    np.testing.assert_allclose(ent["x"], [5.5, 9.5, 13.5])  # labeled boxes 5+4k (+1 for the odd seed)
    assert all(lo <= y <= hi for lo, y, hi in zip(ent["lo"], ent["y"], ent["hi"]))
    assert series[1]["std"] == [0.0, 0.0, 0.0]


def _metric50(run: dict, k: int) -> float:
    return run["cycles"][k]["eval"]["map50"]


def test_learning_curves_png(runs, tmp_path):
    loaded = [load_run_metrics(p) for p in runs]
    png = learning_curves(loaded, tmp_path / "c.png")
    assert png == tmp_path / "c.png" and png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.width > 800 and im.height > 600


def test_montage(runs, tmp_path):
    out = montage(runs[0], 0, tmp_path / "m.png", max_images=3, thumb=64)  # with a model
    assert out is not None
    with Image.open(out) as im:
        assert im.width >= 3 * 64 and im.height >= 64
    out2 = montage(runs[1], 1, tmp_path / "m2.png", max_images=12, thumb=48)  # no model: GT only
    assert out2 is not None and out2.stat().st_size > 1000
    assert montage(runs[0], N_CYCLES, tmp_path / "none.png") is None  # last cycle: no selection
    assert not (tmp_path / "none.png").exists()


def test_write_report(runs, tmp_path):
    out = tmp_path / "report"
    index = write_report(runs, out, montage_images=PICKS, progress=False)
    assert index == out / "index.html"
    assert (out / "curves.png").stat().st_size > 10_000
    text = index.read_text()
    assert len(text) > 20_000
    for run in ("ent_s0", "ent_s1", "rand_s0"):
        sec = text.split(f'<h2 id="run-{run}">', 1)[1].split("<h2 ", 1)[0]
        for k in range(N_CYCLES + 1):
            assert f"Cycle {k}<" in sec
        assert sec.count("data:image/png;base64,") == N_CYCLES  # one montage per cycle with a selection
        assert "and 1 more pick " in sec  # PICKS + 1 selected, PICKS shown
        assert "syn_0000" in sec  # file names from the manifest source_key
    for strategy in ("entropy", "random"):
        assert strategy in text
    assert text.count("data:image/png;base64,") == 1 + 3 * N_CYCLES
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|iframe)\b", text, re.I)
    assert "a&lt;b&amp;c" in text  # rationale text is escaped
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["run"]: r for r in summary["runs"]}
    assert set(rows) == {"ent_s0", "ent_s1", "rand_s0"}
    r0 = rows["ent_s0"]
    assert r0["labeled_images"] == 6 and r0["cycles"] == 3 and r0["seed"] == 0
    loaded = load_run_metrics(runs[0])
    xs = [m["labeled_images"] for m in loaded["cycles"]]
    ys = [m["eval"]["map50"] for m in loaded["cycles"]]
    assert r0["aulc_map50"] == pytest.approx(aulc(xs, ys))
    assert run_summary(loaded)["map50"] == pytest.approx(r0["map50"]) == pytest.approx(ys[-1])
    ent = [s for s in summary["strategies"] if s["strategy"] == "entropy"][0]
    assert ent["runs"] == 2 and ent["map50_std"] is not None


def test_html_escapes_names(pool, tmp_path):
    run = make_run(tmp_path / "evil", pool, strategy="<script>alert(1)</script>", seed=7)
    index = write_report([run], tmp_path / "rep", montage_images=2, progress=False)
    text = index.read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Cycle 2<" in text
