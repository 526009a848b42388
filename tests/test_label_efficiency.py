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
    def run(m50, rec):
        return {"labeled": [10, 20, 30], "map50": m50, "map": [v / 2 for v in m50],
                "per_class_final": [{"name": "rare", "recall50": rec}, {"name": "common", "recall50": 1.0}]}

    results = {"random": {"0": run([0.2, 0.4, 0.6], 0.5), "1": run([0.2, 0.4, 0.4], 0.7)},
               "smart": {"0": run([0.3, 0.5, 0.7], 0.9)}}
    s = bench.summarise(results, "rare")
    assert s["random"]["final_map50"] == pytest.approx(0.5)
    assert s["random"]["map50_mean"] == pytest.approx([0.2, 0.4, 0.5])
    # trapezoid over [10, 30]: (0.3*10 + 0.45*10) / 20
    assert s["random"]["aulc"] == pytest.approx(0.375)
    assert s["random"]["rarest_class_recall50"] == pytest.approx(0.6)
    # smart reaches random's final 0.5 at 20 labeled images (its second point)
    assert s["smart"]["labels_to_reach_random_final"] == pytest.approx(20.0)
    assert s["random"]["labels_to_reach_random_final"] == pytest.approx(30.0)
