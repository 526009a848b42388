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
from poolscout.engine.evaluation.report import (MIN_TEST_INSTANCES, annotate_tile, aulc, class_test_instances,
                                               curve_series, group_runs, learning_curves, load_run_metrics, montage,
                                               rationale_sentence, run_settings, run_summary, signal_words, verdict,
                                               write_report)
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
        **({"stop": {"images": 8, "threshold": 0.9, "agreement": 0.8 + 0.05 * k,
                     "labels_buy_little": 0.8 + 0.05 * k >= 0.9}} if k else {}),
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
    # the stopping signal of each run's last cycle, in the runs table
    last = 0.8 + 0.05 * N_CYCLES
    assert f"{last:.3f}" in text and (("labels now buy little" in text) == (last >= 0.9))
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



def test_report_shows_selection_warnings(pool, tmp_path):
    """select.json's warnings (ties, a budget above the pool) and picks without detections."""
    run = make_run(tmp_path / "tied", pool, strategy="entropy", seed=3)
    io.atomic_write_json(run / "cycles" / "0" / "select.json", {
        "strategy": "entropy", "selected": PICKS, "candidates": 40, "no_detections": 4,
        "warnings": ["4 of 4 picks are tied (most at 0): ties are ordered by image id, not by the model <&>"]})
    text = write_report([run], tmp_path / "rep", montage_images=2, progress=False).read_text()
    assert "Warning: 4 of 4 picks are tied (most at 0): ties are ordered by image id, not by the model &lt;&amp;&gt;" \
        in text
    assert "4 of these picks had no detections" in text


# --------------------------------------------------------------------------- rationale sentences
def _one_line_no_json(text: str) -> None:
    assert "\n" not in text and "{" not in text and "}" not in text and '"' not in text


@pytest.mark.parametrize("rationale, rank, score, pool_size, expected", [
    ({"topk": {"by": "entropy_max", "direction": "high", "value": 1.2134, "rank": 3}}, 3, 1.2134, 150,
     "rank 3: max box entropy 1.21 (top 2% of the pool)"),
    ({"topk": {"by": "margin_max", "direction": "low", "value": 0.02, "rank": 1}}, 1, 0.02, None,
     "rank 1: min box margin 0.02"),
    ({"topk": {"by": "random", "direction": "high", "value": 0.77, "rank": 2}}, 2, 0.77, 100, "rank 2: random pick"),
    ({"retrieve": {"by": "entropy_max", "direction": "high", "value": 0.93, "rank": 7},
      "coreset": {"distance": 0.41, "rank": 2}}, 2, 0.41, 500,
     "rank 2: retrieve kept it (max box entropy 0.93, ranked 7th, top 2% of the pool), then coreset picked it at "
     "distance 0.41 from its nearest labeled or earlier-picked image"),
    ({"retrieve": {"by": "cald", "direction": "low", "value": 0.12, "rank": 4},
      "cald_rerank": {"js": 0.083, "rank": 1}}, 1, 0.083, 1000,
     "rank 1: retrieve kept it (CALD consistency 0.12, ranked 4th, top 0.4% of the pool), then cald_rerank picked "
     "it: its predicted class mix differs from the labeled set's (JS divergence 0.083)"),
    ({"weighted_l2": {"l": 0.87, "rank": 1, "terms": {"huale_sa": 0.4, "huale_cd": 0.21, "huale_or": 0.01},
                      "dropped": ["huale_lc"]}}, 1, 0.87, 10,
     "rank 1: weighted_l2 picked it with combined score 0.87, mostly from HUALE semantic affinity 0.4 and HUALE "
     "category diversity 0.21 (HUALE localization uncertainty ignored: no spread)"),
    ({"retrieve": {"by": "dcus", "direction": "high", "value": 2.1, "rank": 9},
      "ccms": {"cluster_size": 12, "mean_distance_in_cluster": 0.31}}, 1, 12.0, 400,
     "rank 1: retrieve kept it (DCUS uncertainty 2.10, ranked 9th, top 3% of the pool), then ccms picked it as the "
     "medoid of a cluster of 12 similar candidates, mean distance 0.31 to the others"),
])
def test_rationale_sentence_shipped_selectors(rationale, rank, score, pool_size, expected):
    text = rationale_sentence(rationale, rank, score, pool_size=pool_size)
    assert text == expected
    _one_line_no_json(text)
    assert rationale_sentence(json.dumps(rationale), rank, score, pool_size=pool_size) == expected  # parquet JSON


def test_rationale_sentence_coreset_first_picks_and_repeated_stages():
    far = {"retrieve": {"by": "entropy_max", "direction": "high", "value": 0.9, "rank": 1},
           "coreset": {"distance": None, "rank": 1, "init": "farthest_from_mean", "distance_to_mean": 6.75}}
    assert rationale_sentence(far, 1, float("inf")).endswith(
        "then coreset picked it first, as the candidate farthest from the pool mean (distance 6.75)")
    rnd = rationale_sentence({"coreset": {"distance": None, "rank": 1, "init": "random"}}, 1, float("inf"))
    assert rnd == "rank 1: coreset picked it first, at random (no labeled images to measure distances from)"
    alone = rationale_sentence({"ccms": {"cluster_size": 1, "mean_distance_in_cluster": 0.0}}, 4, 1.0)
    assert alone == "rank 4: ccms picked it as a cluster of its own (no similar candidate)"
    # a selector used twice is keyed "<selector>_<i>" (strategies._stage_keys)
    two = rationale_sentence({"retrieve_0": {"by": "entropy_max", "direction": "high", "value": 0.9, "rank": 2},
                              "retrieve_1": {"by": "margin_max", "direction": "low", "value": 0.1, "rank": 1},
                              "topk": {"by": "bald", "direction": "high", "value": 0.3, "rank": 1}}, 1, 0.3)
    assert two == ("rank 1: retrieve_0 kept it (max box entropy 0.9, ranked 2nd), then retrieve_1 kept it "
                   "(min box margin 0.1, ranked 1st of the kept), then topk picked it (BALD disagreement 0.3, "
                   "ranked 1st of the kept)")
    _one_line_no_json(two)


def test_rationale_sentence_warning_note_and_fallback():
    w = rationale_sentence({"topk": {"by": "entropy_max", "direction": "high", "value": 0.95, "rank": 1},
                            "warning": "budget 10 > 6 candidates: took all of them"}, 1, 0.95, pool_size=6)
    assert w == ("rank 1: max box entropy 0.95 (top 17% of the pool); "
                 "warning: budget 10 > 6 candidates: took all of them")
    n = rationale_sentence({"topk": {"by": "entropy_max", "direction": "high", "value": 0.95, "rank": 5},
                            "note": "no detections: scored as the pool maximum"}, 5, 0.95)
    assert n.endswith("; note: no detections: scored as the pool maximum")
    unknown = rationale_sentence({"mystery": {"alpha": 1, "beta": [1, 2], "sub": {"x": 0.5}, "rank": 2},
                                  "other": 3, "note": "hand-picked"}, 5, 0.5)
    assert unknown == "rank 5: mystery: alpha 1, beta (1, 2), sub (x 0.5), ranked 2nd, then other 3; note: hand-picked"
    _one_line_no_json(unknown)
    assert rationale_sentence({}, 5, 0.123456) == "rank 5: score 0.1235"
    assert rationale_sentence(None, 2, None) == "rank 2: score –"
    assert rationale_sentence("not json {", 2, 0.1) == "rank 2: score 0.1; note: not json {"  # shown verbatim
    missing = rationale_sentence({"topk": {"by": "hflip_entropy_topk_mean_3", "direction": "high", "value": None,
                                           "rank": 2}}, 2, float("nan"))
    assert missing == "rank 2: box entropy averaged over the 3 most informative boxes (flipped view): no value"


def test_signal_words():
    assert signal_words("entropy_max") == "max box entropy"
    assert signal_words("margin_max", "low") == "min box margin"  # "max" = the most informative box
    assert signal_words("least_confidence_mean") == "mean box least-confidence"
    assert signal_words("hflip_entropy_sum") == "total box entropy (flipped view)"
    assert signal_words("huale_sa") == "HUALE semantic affinity"
    assert signal_words("my_custom_column") == "my_custom_column"  # unknown: unchanged
    assert signal_words("entropy_weird") == "entropy_weird"


# --------------------------------------------------------------------------- montage labels
def test_annotate_tile_keeps_labels_inside():
    size = 64
    bg = (90, 90, 90)
    tile = Image.new("RGB", (size, size), bg)
    gt = [("scratch", [44.0, 50.0, 64.0, 64.0]),  # touches the right and bottom edges
          ("pit", [0.0, 0.0, 10.0, 10.0]),  # touches the top-left corner: no room above
          ("a_very_long_class_name_for_a_tiny_tile", [20.0, 30.0, 30.0, 40.0])]  # wider than the tile
    preds = [("scratch", 0.87, [46.0, 52.0, 70.0, 70.0])]  # runs past the edge
    labels = annotate_tile(tile, gt, preds)
    assert [x["kind"] for x in labels] == ["gt", "gt", "gt", "pred"]
    assert labels[0]["text"] == "scratch" and labels[1]["text"] == "pit"
    assert labels[2]["text"].startswith("a_very") and labels[2]["text"].endswith("…")
    assert labels[3]["text"] == "scratch 0.87"
    arr = np.asarray(tile)
    for lab in labels:
        x0, y0, x1, y1 = lab["rect"]
        assert 0 <= x0 <= x1 <= size - 1 and 0 <= y0 <= y1 <= size - 1, lab
        assert x1 - x0 >= 4 and y1 - y0 >= 4  # a real, visible label
        patch = arr[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
        color = (0, 200, 0) if lab["kind"] == "gt" else (230, 30, 30)
        assert (patch == color).all(axis=1).mean() > 0.3  # the label's fill is there
        assert not (patch == bg).all(axis=1).any()  # nothing of the background shows through
    # the GT label of the edge box sits above it, near its top-left, clamped at the right edge
    x0, y0, x1, y1 = labels[0]["rect"]
    assert y1 < 50 and x1 == size - 1 and x0 <= 44
    assert labels[1]["rect"][1] == 0  # no room above the corner box: inside it, at the top
    # the prediction's label goes below its box, which has no room below: inside, at the bottom
    assert labels[3]["rect"][3] == size - 1


def test_montage_labels_have_class_names(runs, pool, tmp_path):
    names = set(pool["names"])
    got: list[str] = []
    assert montage(runs[1], 0, tmp_path / "gt.png", max_images=3, thumb=96, labels_out=got) is not None
    assert got and set(got) <= names  # no model: ground-truth labels only, by class name
    preds: list[str] = []
    montage(runs[0], 0, tmp_path / "pred.png", max_images=2, thumb=96, labels_out=preds, score_thresh=0.0,
            max_preds=3)
    scored = [t for t in preds if re.fullmatch(r"(\S+) (\d\.\d\d)", t)]
    assert scored and all(t.rsplit(" ", 1)[0] in names for t in scored)
    assert len(scored) <= 2 * 3  # at most max_preds detections per tile


# --------------------------------------------------------------------------- verdict, counts, settings
def _hand_run(name: str, strategy: str, map50: list[float], images: list[int] | None = None) -> dict:
    images = images or [10 * (k + 1) for k in range(len(map50))]
    return {"name": name, "path": Path("/nonexistent") / name, "strategy": strategy, "seed": 0, "status": "done",
            "cycles": [{"cycle": k, "labeled_images": x, "eval": {"map50": y}}
                       for k, (x, y) in enumerate(zip(images, map50))]}


def test_verdict_best_reach_and_spread():
    runs_ = [_hand_run("r0", "random", [0.1, 0.2, 0.3]), _hand_run("r1", "random", [0.1, 0.22, 0.32]),
             _hand_run("e0", "entropy", [0.1, 0.32, 0.4]), _hand_run("e1", "entropy", [0.1, 0.3, 0.42]),
             _hand_run("c0", "coreset", [0.05, 0.1, 0.2])]
    v = verdict(runs_, class_counts={"r0": {"scratch": 40, "pit": 3, "patch": 0}, "e0": {"pit": 5}})
    assert v["best"] == "entropy"
    assert v["headline"].startswith("Best strategy by AULC: entropy (")
    assert "over random" in v["headline"]
    rows = {r["strategy"]: r for r in v["strategies"]}
    assert [r["strategy"] for r in v["strategies"]] == ["entropy", "random", "coreset"]  # best AULC first
    e_aulc = [aulc([10, 20, 30], y) for y in ([0.1, 0.32, 0.4], [0.1, 0.3, 0.42])]
    assert rows["entropy"]["aulc_mean"] == pytest.approx(np.mean(e_aulc))
    assert rows["entropy"]["aulc_std"] == pytest.approx(np.std(e_aulc, ddof=1))
    assert rows["entropy"]["map50_mean"] == pytest.approx(0.41) and rows["entropy"]["seeds"] == 2
    assert rows["entropy"]["map50_std"] == pytest.approx(np.std([0.4, 0.42], ddof=1))
    # random's final mAP50 is 0.31 (mean of 0.30 and 0.32); entropy's mean curve is at 0.31 at cycle 1
    assert v["random_final_map50"] == pytest.approx(0.31)
    assert rows["entropy"]["reach_images"] == 20 and rows["entropy"]["reach"] == "20 labels (cycle 1)"
    assert rows["coreset"]["reach"].startswith("never") and rows["coreset"]["reach_images"] is None
    assert rows["random"]["reach"] == "reference: 30 labels"
    text = " ".join(v["lines"])
    assert "Labels to reach random's final mAP50 (0.310 at 30 labeled images): entropy 20 labels (cycle 1)" in text
    assert v["few_test_instances"] == {"pit": 3, "patch": 0}  # the smallest count over runs
    warn = [x for x in v["lines"] if x.startswith("Warning:")]
    assert len(warn) == 1 and f"fewer than {MIN_TEST_INSTANCES} test instances" in warn[0]
    assert "pit (3)" in warn[0] and "patch (0: AP undefined)" in warn[0] and "scratch" not in warn[0]


def test_verdict_no_winner_no_random_single_seed():
    lose = verdict([_hand_run("r", "random", [0.1, 0.3]), _hand_run("e", "entropy", [0.1, 0.2])], class_counts={})
    assert lose["headline"].startswith("No strategy beats random: random's AULC")
    assert lose["few_test_instances"] == {} and not any(x.startswith("Warning:") for x in lose["lines"])
    assert {r["strategy"]: r["reach"] for r in lose["strategies"]}["entropy"].startswith("never")
    norand = verdict([_hand_run("e", "entropy", [0.1, 0.3]), _hand_run("c", "coreset", [0.1, 0.2])],
                     class_counts={})
    assert norand["best"] == "entropy" and "random is not in the report" in norand["headline"]
    assert all(r["reach"] == "random not in the report" for r in norand["strategies"])
    single = verdict([_hand_run("r", "random", [0.1, 0.2]), _hand_run("e", "entropy", [0.1, 0.3])], class_counts={})
    assert single["headline"].startswith("Best strategy by AULC: entropy (0.200 (1 seed)), +0.050 over random")
    assert any("single seed" in x for x in single["lines"])
    close = verdict([_hand_run("r0", "random", [0.1, 0.2]), _hand_run("r1", "random", [0.1, 0.3]),
                     _hand_run("e0", "entropy", [0.1, 0.26]), _hand_run("e1", "entropy", [0.1, 0.25])],
                    class_counts={})
    assert close["best"] == "entropy" and any("not a clear win" in x for x in close["lines"])


def test_class_test_instances_from_metrics_and_ledger(runs, pool, tmp_path):
    assert class_test_instances(runs[0]) == {n: 3 for n in pool["names"]}  # metrics.json per_class "gt"
    root = make_run(tmp_path / "ledger_run", pool, strategy="random", seed=0)
    for k in range(N_CYCLES + 1):  # metrics without per-class counts
        p = root / "cycles" / str(k) / "metrics.json"
        m = json.loads(p.read_text())
        m["eval"].pop("per_class")
        io.atomic_write_json(p, m)
    test_ids = pool["ids"][:3]
    ledger = pa.table({"image_id": pool["ids"], "state": ["test" if i in test_ids else "pool" for i in pool["ids"]],
                       "cycle": [0] * len(pool["ids"]), "selected_by": [""] * len(pool["ids"])})
    io.write_table(ledger, root / "ledger.parquet", io.LEDGER_SCHEMA)
    ann = pool["annotations"].to_pylist()
    names = {c["id"]: c["name"] for c in pool["categories"]}
    expected = {n: 0 for n in names.values()}
    for a in ann:
        if a["image_id"] in test_ids:
            expected[names[a["category_id"]]] += 1
    assert class_test_instances(root) == expected
    assert sum(expected.values()) > 0


def test_run_settings(runs, pool, tmp_path):
    s = run_settings(load_run_metrics(runs[0]))
    t = s["table"]
    assert s["source"].startswith("run.yaml")
    assert t["detector"] == "fasterrcnn_effnet_lite0_fpn" and t["input size"] == 160  # defaults fill the gaps
    assert t["strategy"] == "entropy" and t["budget"] == PICKS and t["cycles"] == N_CYCLES and t["seed"] == 0
    assert s["config"]["dataset"]["max_pixels"] == 1_000_000
    root = make_run(tmp_path / "pinned", pool, strategy="entropy", seed=4)
    loop = json.loads((root / "loop.json").read_text())
    loop["config"] = {"seed": 4, "detector": {"input_size": 96}, "train": {"epochs": 3, "lr": 0.02},
                      "select": {"strategy": "entropy", "budget": PICKS}, "loop": {"cycles": 2, "seed_size": 6}}
    io.atomic_write_json(root / "loop.json", loop)
    s2 = run_settings(root)
    assert s2["source"].startswith("loop.json")
    assert {k: s2["table"][k] for k in ("input size", "epochs", "lr", "seed size", "seed")} == {
        "input size": 96, "epochs": 3, "lr": 0.02, "seed size": 6, "seed": 4}


# --------------------------------------------------------------------------- the page
def _hashed_pool(pool: dict) -> dict:
    """The same pool with 19-digit image ids (as the engine's content hashes) in every table."""
    ids = {i: 7_000_000_000_000_000_000 + 104_729 * i for i in pool["ids"]}
    man = pool["manifest"].to_pydict()
    man["image_id"] = [ids[i] for i in man["image_id"]]
    ann = pool["annotations"].to_pydict()
    ann["image_id"] = [ids[i] for i in ann["image_id"]]
    return {**pool, "manifest": pa.table(man), "annotations": pa.table(ann), "ids": [ids[i] for i in pool["ids"]]}


def test_report_reads_top_down_with_file_names_and_settings(pool, tmp_path):
    hp = _hashed_pool(pool)
    a = make_run(tmp_path / "ent", hp, strategy="entropy", seed=0)
    b = make_run(tmp_path / "rnd", hp, strategy="random", seed=1)
    (a / "run.yaml").write_text(yaml.safe_dump({"seed": 0, "dataset": {"name": "<b>steel</b>", "max_pixels": 10**6},
                                                "train": {"lr": 0.005}}))
    index = write_report([a, b], tmp_path / "rep", montage_images=PICKS, progress=False)
    text = index.read_text()
    body = text.split("</style>", 1)[1]
    # verdict first, then the curves, then the settings, then the per-cycle tables
    pos = [body.index(x) for x in ('<h2 id="verdict">', '<p class="headline">', '<h2 id="curves">',
                                   '<h2 id="settings">', '<h2 id="run-ent">', "Cycle 0<")]
    assert pos == sorted(pos)
    verdict_html = body[pos[0]:pos[2]]
    assert "AULC" in verdict_html and "random" in verdict_html
    assert f"fewer than {MIN_TEST_INSTANCES} test instances" in verdict_html  # fixture classes have 3 test boxes
    assert "labels to reach random&#x27;s final mAP50" in verdict_html
    # file names, never the hash ids
    for i in hp["ids"]:
        assert str(i) not in text
    assert re.search(r"<td class=\"l\">syn_\d+\.png</td>", body)
    # one sentence per pick, no JSON
    picks = body.split('<th class="l">why it was picked</th>', 1)[1].split("</table>", 1)[0]
    assert "rank 0: picked by box entropy; note: a&lt;b&amp;c" in picks
    assert "{" not in picks and "&quot;" not in picks
    # settings: a compact table per run and the full YAML, escaped, in <details>
    settings = body[pos[3]:pos[4]]
    assert settings.count("<details>") == 2 and "fasterrcnn_effnet_lite0_fpn" in settings
    assert '<span class="diff">0.005</span>' in settings  # lr differs between the runs
    assert "&lt;b&gt;steel&lt;/b&gt;" in settings and "<b>steel" not in text
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["verdict"]["headline"] in html_unescape(text)
    assert {s["run"]: s["lr"] for s in summary["settings"]} == {"ent": 0.005, "rnd": 0.01}


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)
