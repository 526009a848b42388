"""engine.acquisition.checks: notes on picks scored by the empty-image rule, tie and budget warnings."""
from __future__ import annotations

import numpy as np
import pytest

from poolscout.engine.acquisition.checks import (empty_note, note_empty, parse_empty_rule,
                                                  selection_warnings)


def test_parse_empty_rule():
    assert parse_empty_rule("pool_max") == "pool_max"
    assert parse_empty_rule("0.5") == 0.5
    assert parse_empty_rule(2) == 2.0


def test_empty_note_names_the_rule():
    assert empty_note("pool_max") == "no detections: scored as the pool maximum (score.empty_value: pool_max)"
    assert "pool minimum" in empty_note("pool_min")
    assert empty_note(0.0).startswith("no detections: scored as 0 ")


def test_note_empty_only_on_empty_picks():
    rat = [{"topk": {"rank": 1}}, {"topk": {"rank": 2}}, {"topk": {"rank": 3}}]
    out = note_empty(rat, np.array([True, False, True]), "pool_max")
    assert [("note" in r) for r in out] == [True, False, True]
    assert out[1] == rat[1] and "note" not in rat[0]  # copies; the input is untouched
    with pytest.raises(ValueError, match="rows"):
        note_empty(rat, np.array([True]), "pool_max")


def test_no_warning_for_a_clean_batch():
    assert selection_warnings(np.array([0.9, 0.8, 0.7, 0.7]), budget=4, candidates=100) == []


def test_tied_batch_warns_with_count_and_value():
    # 3 of 4 picks share 1.5: more than half are tied
    w = selection_warnings(np.array([1.5, 1.5, 1.5, 0.2]), budget=4, candidates=100,
                           empty=np.array([True, True, False, False]))
    assert len(w) == 1
    assert w[0].startswith("3 of 4 picks are tied (most at 1.5)")
    assert "2 of them have no detections" in w[0]


def test_exactly_half_tied_is_not_a_warning():
    assert selection_warnings(np.array([1.0, 1.0, 0.5, 0.2]), budget=4, candidates=10) == []


def test_budget_above_pool_warns():
    w = selection_warnings(np.arange(3, dtype=float), budget=5000, candidates=3)
    assert w == ["budget 5000 > 3 pool images: selected all of them"]
