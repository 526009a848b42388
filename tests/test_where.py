"""The --where filter language: what it keeps, and what it refuses (it never runs code)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from poolscout.engine.acquisition.where import WhereError, apply_where, parse_where


@pytest.fixture
def table():
    return pa.table({"image_id": [1, 2, 3, 4], "class": ["scratch", "crazing", "scratch", ""],
                     "score_max": [0.3, 0.2, 0.9, np.nan], "num_boxes": [1, 2, 3, 0],
                     "flag": [True, False, True, None]})


@pytest.mark.parametrize("text,ids", [
    ("class == 'scratch' and score_max < 0.5", [1]),
    ("num_boxes >= 2", [2, 3]),
    ("class in ['crazing', 'scratch'] or num_boxes == 0", [1, 2, 3, 4]),
    ("class not in [\"scratch\"]", [2, 4]),
    ("0.2 < score_max <= 0.9", [1, 3]),  # chained comparison; NaN never matches
    ("'scratch' == class", [1, 3]),
    ("score_max < -1", []),
    ("(num_boxes == 1 or num_boxes == 3) and not class == 'crazing'", [1, 3]),
    ("score_max >= 0.3 and score_max == score_max", [1, 3]),
    # a missing value (NaN score of an image without boxes) matches no comparison, negated too
    ("score_max != 0.3", [2, 3]),
    ("not (score_max < 0.5)", [3]),
    ("not score_max >= 0.5", [1, 2]),
    ("score_max not in [0.3]", [2, 3]),
    ("flag == true", [1, 3]),
    ("false == flag", [2]),
])
def test_filters_keep_the_matching_rows(table, text, ids):
    assert apply_where(table, text)["image_id"].to_pylist() == ids


def test_parse_reports_the_columns_it_reads(table):
    _, used = parse_where("class == 'a' and score_max < 1", table.column_names)
    assert used == {"class", "score_max"}


@pytest.mark.parametrize("text,msg", [
    ("__import__('os').system('true')", "is not a comparison"),
    ("colour == 'red'", "unknown column 'colour'; known: class, flag, image_id, num_boxes, score_max"),
    ("score_max + 1 > 2", "needs a column on one side"),
    ("class ==", "not a valid expression"),
    ("score_max < [1]", "expected a number"),
    ("class in []", "non-empty list"),
    ("num_boxes is 1", "not supported"),
    ("lambda: 1", "not a valid expression"),
    ("", "non-empty expression"),
    ("x" * 3000, "at most"),
    ("class == 1", "class == 1"),  # a type mismatch is reported, not raised raw
    ("num_boxes", "num_boxes"),  # a column that is not a condition
    ("class in ['scratch', 1]", "class in"),
    ("num_boxes > 99999999999999999999999", "num_boxes >"),
])
def test_bad_filters_are_refused_with_the_reason(table, text, msg):
    with pytest.raises(WhereError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_where(table, text)


def test_not_in_keeps_a_null_value_out():
    t = pa.table({"image_id": [1, 2, 3], "class": ["scratch", None, "crazing"]})
    assert apply_where(t, "class not in ['scratch']")["image_id"].to_pylist() == [3]
