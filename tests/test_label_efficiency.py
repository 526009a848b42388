"""The label-efficiency benchmark's summary arithmetic (the loops themselves are hand-run)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_labels_to_reach_interpolates(bench):
    assert bench.labels_to_reach([100, 200, 300], [0.2, 0.4, 0.6], 0.5) == pytest.approx(250.0)
    assert bench.labels_to_reach([100, 200], [0.5, 0.6], 0.4) == 100.0
    assert bench.labels_to_reach([100, 200], [0.1, 0.2], 0.5) is None


def test_summarise_hand_case(bench):
    def run(m50, rec, boxes=(40, 80, 120)):
        return {"labeled": [10, 20, 30], "labeled_boxes": list(boxes), "map50": m50, "map": [v / 2 for v in m50],
                "per_class_final": [{"name": "rare", "recall50": rec}, {"name": "common", "recall50": 1.0}]}

    results = {"random": {"0": run([0.2, 0.4, 0.6], 0.5), "1": run([0.2, 0.4, 0.4], 0.7)},
               "smart": {"0": run([0.3, 0.5, 0.7], 0.9, boxes=(40, 100, 160))}}
    s = bench.summarise(results, "rare")
    assert s["random"]["final_map50"] == pytest.approx(0.5)
    assert s["random"]["map50_mean"] == pytest.approx([0.2, 0.4, 0.5])
    # trapezoid over [10, 30]: (0.3*10 + 0.45*10) / 20
    assert s["random"]["aulc"] == pytest.approx(0.375)
    assert s["random"]["rarest_class_recall50"] == pytest.approx(0.6)
    # smart reaches random's final 0.5 at 20 labeled images (its second point)
    assert s["smart"]["labels_to_reach_random_final"] == pytest.approx(20.0)
    assert s["random"]["labels_to_reach_random_final"] == pytest.approx(30.0)
    # in boxes: smart's 20 images held 100 boxes, random's 30 images 120
    assert s["smart"]["labels_to_reach_random_final_boxes"] == pytest.approx(100.0)
    assert s["random"]["labels_to_reach_random_final_boxes"] == pytest.approx(120.0)


def test_summarise_rare_class_ap50_and_dominant_term_shares(bench):
    def run(hist, ap, terms):
        return {"labeled": [10, 20], "labeled_boxes": [10, 20], "map50": [0.2, 0.4], "map": [0.1, 0.2],
                "per_class_final": [{"name": "hairline", "recall50": 0.5, "ap50": ap}],
                "new_class_hist": [{"scratch": 9, "hairline": 1}, hist],
                "pool_prevalence": {"scratch": 0.9, "hairline": 0.1}, "dominant_terms": terms}

    results = {"random": {"0": run({"scratch": 9, "hairline": 1}, 0.1, None)},
               "gsal": {"0": run({"scratch": 6, "hairline": 4}, 0.3, {"difficulty": 3, "coverage": 1}),
                        "1": run({"scratch": 8, "hairline": 2}, 0.5, {"difficulty": 1, "coverage": 3})}}
    s = bench.summarise(results, "hairline", "hairline")
    # after the seed set: share 0.4 / 0.1 and 0.2 / 0.1 -> mean 3.0; random 1.0
    assert s["gsal"]["rare_share_ratio"] == pytest.approx(3.0) and s["random"]["rare_share_ratio"] == pytest.approx(1.0)
    assert s["gsal"]["rare_class_ap50"] == pytest.approx(0.4)
    assert s["gsal"]["dominant_term_shares"] == pytest.approx({"coverage": 0.5, "difficulty": 0.5})
    assert "dominant_term_shares" not in s["random"]


def test_synthetic_subtle_pool_spec(bench, tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(bench.SYNTHETIC["synthetic_subtle"], "generate",
                        {**bench.SYNTHETIC["synthetic_subtle"]["generate"], "n_images": 30})
    monkeypatch.setitem(bench.SYNTHETIC["synthetic_subtle"], "test_images", 8)
    spec = bench.synthetic_spec("synthetic_subtle", tmp_path / "pool")
    test = spec["test"].read_text().split()
    assert len(test) == 8 and test == sorted(p.name for p in spec["images"].iterdir())[-8:]
    cats = {c["name"] for c in json.loads(spec["annotations"].read_text())["categories"]}
    assert cats == {"scratch", "inclusion", "patch", "pit", "hairline"} and spec["rare"] == "hairline"
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / spec["config"]).read_text())
    assert cfg["dataset"]["classes"][-1] == "hairline" and cfg["dataset"]["use_supercategories"] is False


def test_longtail_fractions_halve_in_class_order(bench):
    f = bench.longtail_fractions(["a", "b", "c", "d", "e", "f"])
    assert list(f) == ["a", "b", "c", "d", "e", "f"]
    assert list(f.values()) == pytest.approx([1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32])


@pytest.mark.ray
def test_harness_runs_any_pool_and_shares_cycle0(bench, tmp_path, tiny_pool, ray_session):
    """A pool YAML (not NEU-DET) end to end: 2 strategies x 1 seed, cycle 0 trained once."""
    import json

    from tests.conftest import TINY_SETTINGS

    names = sorted(p.name for p in tiny_pool["images"].iterdir())
    (tmp_path / "test.txt").write_text("".join(n + "\n" for n in names[-6:]))
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"name: tinypool\nimages: {tiny_pool['images']}\nannotations: {tiny_pool['annotations']}\n"
                    f"test: test.txt\n")
    out = tmp_path / "result.json"
    sets = [a for s in TINY_SETTINGS for a in ("--set", s)]
    rc = bench.main(["--pool", str(pool), "--preset", "cpu-small", "--strategies", "random,entropy", "--seeds", "3",
                     "--cycles", "1", "--budget", "4", "--seed-size", "6", "--workdir", str(tmp_path / "w"),
                     "--out", str(out), *sets, "--set", "score.views=[orig]"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "tinypool" and set(doc["summary"]) == {"random", "entropy"}
    a, b = tmp_path / "w" / "random_s3", tmp_path / "w" / "entropy_s3"
    assert (a / "cycles/0/model.pt").read_bytes() == (b / "cycles/0/model.pt").read_bytes()
    for r in (a, b):
        assert json.loads((r / "loop.json").read_text())["status"] == "done"
        assert json.loads((r / "cycles/1/metrics.json").read_text())["labeled_images"] == 10
    assert out.with_suffix(".png").stat().st_size > 5_000


def _doc(bench, runs, **changes):
    settings = {"seed_size": 10, "budget": 5, "cycles": 2, "strategies": ["random", "entropy"], "seeds": [0, 1],
                "configs": ["neu_det.yaml"], "overrides": ["train.epochs=8"], "subsample": None, "rare": None,
                "variants": {"random": ["random", []], "entropy": ["entropy", []]}, "cpus_per_run": 1,
                "gpus_per_run": 0}
    settings.update(changes)
    return {"benchmark": "label_efficiency", "dataset": "neu_det", "settings": settings, "runs": runs}


def _loop(m0=0.2, n=3, provenance=True):
    r = {"labeled": [10, 15, 20][:n], "map50": [m0, 0.3, 0.4][:n]}
    if provenance:
        r["provenance"] = {"commit": "abc", "platform": "x"}
    return r


def test_reusable_loops_takes_only_finished_loops_of_the_same_protocol(bench):
    runs = {"random": {"0": _loop(), "1": _loop(n=2)},          # seed 1 stopped after cycle 1
            "entropy": {"0": _loop(provenance=False)}}          # written before provenance existed
    doc = _doc(bench, runs)
    now = {**doc["settings"], "dataset": "neu_det"}
    assert set(bench.reusable_loops(doc, now, ["random", "entropy"], [0, 1])) == {("random", 0)}
    # a strategy not asked for now, or a seed not asked for, is not taken
    assert bench.reusable_loops(doc, now, ["entropy"], [0, 1]) == {}
    assert bench.reusable_loops(doc, now, ["random"], [1]) == {}
    # any protocol difference (training settings, budget, dataset, a strategy's variant) reuses nothing
    assert bench.reusable_loops(doc, {**now, "overrides": ["train.epochs=9"]}, ["random"], [0]) == {}
    assert bench.reusable_loops(doc, {**now, "budget": 6}, ["random"], [0]) == {}
    assert bench.reusable_loops(doc, {**now, "dataset": "other"}, ["random"], [0]) == {}
    other = {**now, "variants": {**now["variants"], "random": ["random", ["train.epochs=3"]]}}
    assert bench.reusable_loops(doc, other, ["random"], [0]) == {}
    assert bench.reusable_loops(None, now, ["random"], [0]) == {}


def test_check_reproduced_compares_cycle0_of_the_same_seed(bench):
    reused = {("random", 0): _loop(0.2), ("entropy", 1): _loop(0.25)}
    fresh = {("coreset", 0): _loop(0.2), ("badge", 0): _loop(0.2)}
    bench.check_reproduced(reused, fresh)
    assert reused[("random", 0)]["provenance"]["cycle0_reproduced"] is True
    assert reused[("entropy", 1)]["provenance"]["cycle0_reproduced"] is None  # no seed-1 loop ran here
    fresh[("badge", 1)] = _loop(0.26)
    bench.check_reproduced(reused, fresh)
    assert reused[("entropy", 1)]["provenance"]["cycle0_reproduced"] is False
    # a cold-start variant's cycle 0 (another seed set) is compared only with its own group
    cold = {("maxherding_cold", 0): _loop(0.3)}
    bench.check_reproduced(cold, fresh)
    assert cold[("maxherding_cold", 0)]["provenance"]["cycle0_reproduced"] is None
    bench.check_reproduced(cold, {**fresh, ("coreset_cold", 0): _loop(0.3)})
    assert cold[("maxherding_cold", 0)]["provenance"]["cycle0_reproduced"] is True
    # with nothing to compare against, an earlier verdict stays
    bench.check_reproduced(cold, {})
    assert cold[("maxherding_cold", 0)]["provenance"]["cycle0_reproduced"] is True
    # reused loops that two different runs wrote are compared with each other
    old, new = _loop(0.235), _loop(0.196)
    new["provenance"].update(commit="def", collected="2026-12-06T20:19:15Z")
    both = {("random", 0): old, ("entropy", 0): new}
    bench.check_reproduced(both, {})
    assert old["provenance"]["cycle0_reproduced"] is False and new["provenance"]["cycle0_reproduced"] is False
    same_run = {("random", 1): _loop(0.2), ("entropy", 1): _loop(0.3)}  # one run: shared cycle 0, not compared
    bench.check_reproduced(same_run, {})
    assert same_run[("random", 1)]["provenance"]["cycle0_reproduced"] is None


def test_git_commit_names_this_checkout(bench):
    c = bench.git_commit()
    assert c is None or (len(c) == 12 and all(ch in "0123456789abcdef" for ch in c))


def test_cpu_model_names_the_processor(bench, tmp_path):
    cpu = bench.cpu_model()
    assert cpu is None or (cpu.strip() and not cpu.startswith(":"))
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx512f avx2\n")
    assert bench.cpu_model(fake) == "Test CPU 9000, avx512f"
    fake.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse avx2\n")
    assert bench.cpu_model(fake) == "Old CPU"


def test_pseudo_quality_against_hand_counted_truth(bench, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(rows):
        cols = ["image_id", "category_id", "x1", "y1", "x2", "y2"]
        return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})

    # truth: image 1 has two boxes of class 1 and 2; image 2 has one; image 3 is clean
    pq.write_table(table([(1, 1, 0, 0, 10, 10), (1, 2, 20, 20, 30, 30), (2, 1, 0, 0, 10, 10)]),
                   tmp_path / "annotations.parquet")
    (tmp_path / "cycles" / "2").mkdir(parents=True)
    pq.write_table(table([(1, 1, 0, 0, 10, 9),      # right: class 1, IoU 0.9
                          (1, 1, 20, 20, 30, 30),   # wrong class on the class-2 box
                          (2, 1, 0, 0, 10, 4),      # IoU 0.4: wrong
                          (3, 2, 5, 5, 9, 9)]),     # clean image: wrong
                   tmp_path / "cycles" / "2" / "pseudo_labels.parquet")
    q = bench._pseudo_quality(tmp_path)
    assert q == [{"cycle": 2, "images": 3, "boxes": 4, "precision50": pytest.approx(0.25),
                  "recall50_on_their_images": pytest.approx(1 / 3)}]
    plain = tmp_path / "plain"  # a loop without auto-labeling
    (plain / "cycles" / "1").mkdir(parents=True)
    assert bench._pseudo_quality(plain) is None
    s = bench.summarise({"entropy_pseudo": {"0": {"labeled": [1, 2], "labeled_boxes": [1, 2], "map50": [0.1, 0.2],
                                                  "map": [0.1, 0.1], "per_class_final": [], "pseudo_labels": q}}}, None)
    assert s["entropy_pseudo"]["pseudo_precision50"] == pytest.approx(0.25)
    assert s["entropy_pseudo"]["pseudo_boxes_per_cycle"] == 4.0


def test_gsal_box_contrast_box_ratios():
    """Box-mean over the image median, on maps at half the image's resolution."""
    spec = importlib.util.spec_from_file_location("gsal_box_contrast", REPO / "benchmarks" / "gsal_box_contrast.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numpy as np

    maps = np.ones((2, 4, 4))
    maps[0, 0:2, 2:4] = 5.0  # D: top-right quarter bright (median stays 1)
    maps[1, 3, 0] = 9.0  # V: one bottom-left cell
    # an 8 x 8 image: box (4, 0, 8, 4) is the top-right map quarter; (0, 6, 2, 8) the one V cell;
    # a box thinner than a map cell still covers one cell
    r = mod.box_ratios(maps, np.array([[4, 0, 8, 4], [0, 6, 2, 8], [5.2, 1.1, 5.4, 1.3]]), 8.0, 8.0)
    np.testing.assert_allclose(r, [[5.0, 1.0], [1.0, 9.0], [5.0, 1.0]])
