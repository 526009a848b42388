"""benchmarks/pixel_efficiency.py: its summary arithmetic (the loops are hand-run)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pixel_efficiency", REPO / "benchmarks" / "pixel_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_by_hand(bench, tmp_path):
    def run(mious, cracks):
        return {"rounds": [{"labeled_pixels": 100 * (i + 1),
                            "labeled_per_class": {"background": 100 * (i + 1) - c, "crack": c},
                            "eval": {"miou": m, "per_class_iou": {"background": 0.9, "crack": None},
                                     "pixel_accuracy": 0.8 + 0.05 * i}}
                           for i, (m, c) in enumerate(zip(mious, cracks))], "seconds": 1.0}

    runs = {"two_stage": {"0": run([0.2, 0.4, 0.6], [1, 3, 6]), "1": run([0.2, 0.2, 0.4], [0, 2, 3])}}
    summary = bench.summarise(runs)
    s = summary["two_stage"]
    assert s["defect_pixels_mean"] == pytest.approx([0.5, 2.5, 4.5])
    assert s["final_labeled_per_class"] == {"background": pytest.approx(295.5), "crack": pytest.approx(4.5)}
    assert s["final_pixel_accuracy"] == pytest.approx(0.9)
    assert s["labeled_pixels"] == [100, 200, 300] and s["miou_mean"] == pytest.approx([0.2, 0.3, 0.5])
    # trapezoid over [100, 300]: (0.25 * 100 + 0.4 * 100) / 200
    assert s["aulc"] == pytest.approx(0.325) and s["final_miou"] == pytest.approx(0.5)
    assert s["final_per_class_iou"] == {"background": pytest.approx(0.9), "crack": 0.0}
    assert bench.base_overrides(bench.argparse.Namespace(
        rounds=4, budget=100, candidates=1000, local_budget=20, keep=0.5, noises=5, eval_max_side=256,
        resolution=64))[0] == "segment.rounds=4"
    doc = {"settings": {"budget": 100, "rounds": 2, "seeds": "0,1"}, "summary": summary, "runs": runs,
           "feature_ceiling": {"labels": 50000, "all_background_miou": 0.15, "miou": {"sqrt": 0.19, "none": 0.17}}}
    bench.replot(doc, tmp_path / "p.json")
    assert (tmp_path / "p.png").stat().st_size > 10_000
