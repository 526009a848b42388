"""The demo's verdict line on hand-made runs (the demo itself is measured in benchmarks/)."""
from __future__ import annotations

from pathlib import Path

import pytest

from poolscout.jobs.demo import verdict_line


def _run(strategy: str, seed: int, map50: list[float], images=(40, 85, 130), picks=None) -> dict:
    cycles = [{"cycle": k, "labeled_images": x, "eval": {"map50": y}} for k, (x, y) in enumerate(zip(images, map50))]
    cycles[0]["acquisition"] = {"pool_prevalence": {"pit": 0.1, "scratch": 0.9}}
    for k, hist in enumerate(picks or [], start=1):
        cycles[k]["acquisition"] = {"new_class_hist": hist}
    return {"name": f"{strategy}-s{seed}", "path": Path("/nonexistent"), "strategy": strategy, "seed": seed,
            "status": "done", "cycles": cycles}


def test_winner_with_labels_saved_and_rare_share():
    v = verdict_line([_run("random", 0, [0.3, 0.4, 0.5], picks=[{"pit": 1, "scratch": 9}] * 2),
                      _run("random", 1, [0.3, 0.42, 0.52], picks=[{"pit": 1, "scratch": 9}] * 2),
                      _run("entropy", 0, [0.3, 0.55, 0.6], picks=[{"pit": 3, "scratch": 7}] * 2),
                      _run("entropy", 1, [0.3, 0.53, 0.62], picks=[{"pit": 2, "scratch": 8}] * 2)])
    line = v["line"]
    assert line.startswith("verdict: entropy beats random (AULC +")
    # random's final mean is 0.51; entropy's mean curve passes it at cycle 1 (85 labels)
    assert "reaching random's final mAP50 with 85 labeled images instead of 130 (45 labels saved)" in line
    assert "within the seed spread" not in line
    assert "entropy mAP50 0.610 ± 0.014" in line and "pit share x2.50" in line and "pit share x1.00" in line
    assert v["final_map50"] == {"random": {0: 0.5, 1: 0.52}, "entropy": {0: 0.6, 1: 0.62}}
    assert line.endswith("(4 loops)")


def test_winner_that_reaches_only_at_the_last_cycle_saves_nothing():
    line = verdict_line([_run("random", 0, [0.3, 0.4, 0.5]), _run("entropy", 0, [0.3, 0.45, 0.6])])["line"]
    assert line.startswith("verdict: entropy beats random")
    assert "first at random's final mAP50 is the last (130 labeled images), so no labels saved" in line
    assert "labels saved)" not in line


def test_no_winner_within_spread_and_missing_reference():
    lose = verdict_line([_run("random", 0, [0.3, 0.5, 0.6]), _run("entropy", 0, [0.3, 0.4, 0.45])])["line"]
    assert lose.startswith("verdict: no strategy beat random on this pool.")
    close = verdict_line([_run("random", 0, [0.3, 0.4, 0.5]), _run("random", 1, [0.3, 0.3, 0.3]),
                          _run("entropy", 0, [0.3, 0.45, 0.5]), _run("entropy", 1, [0.3, 0.32, 0.35])])["line"]
    assert close.startswith("verdict: entropy beats random") and "the lead is within the seed spread" in close
    assert verdict_line([_run("entropy", 0, [0.3, 0.4, 0.5])])["line"].startswith(
        "verdict: no comparison (random missing)")


def test_reference_can_be_another_strategy():
    line = verdict_line([_run("coreset", 0, [0.3, 0.4, 0.5]), _run("entropy", 0, [0.3, 0.45, 0.55])],
                        reference="coreset")["line"]
    assert line.startswith("verdict: entropy beats coreset")


@pytest.mark.parametrize("bad", [[], [_run("random", 0, [0.3])]])
def test_degenerate_inputs_do_not_crash(bad):
    assert verdict_line(bad)["line"].startswith("verdict:")
