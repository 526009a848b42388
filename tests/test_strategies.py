"""Strategy YAML loading and validation; the stage pipeline on toy tables with known answers."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from poolscout.engine.acquisition import strategies as T
from poolscout.engine.core.config import ConfigError
from poolscout.engine.acquisition.selectors import SelectContext
from poolscout.engine.acquisition.signals import SignalSpec

SHIPPED = ["coreset", "entropy", "entropy_coreset", "least_confidence", "margin", "random"]


def ctx(**kw) -> SelectContext:
    return SelectContext(rng=np.random.default_rng(0), **kw)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_strategies_load(name):
    s = T.load_strategy(name)
    assert s.name == name
    assert s.path is not None and s.path.endswith(f"{name}.yaml")
    assert s.description and s.stages
    assert T.load_strategy(s.path) == s  # by path too


def test_list_and_requirements():
    assert set(SHIPPED) <= set(T.list_strategies())
    hy = T.load_strategy("entropy_coreset")
    assert [st.selector for st in hy.stages] == ["retrieve", "coreset"]
    assert hy.stages[0].params == {"by": "entropy:max", "keep": 10}
    assert T.required_signals(hy) == [SignalSpec("entropy", "max")]
    assert T.needs_embedding(hy) and T.needs_embedding(T.load_strategy("coreset"))
    assert not T.needs_embedding(T.load_strategy("margin"))
    assert T.required_signals(T.load_strategy("margin")) == [SignalSpec("margin", "max")]
    assert T.required_signals(T.load_strategy("coreset")) == []


def write(tmp_path, text: str):
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize(
    "text, needle",
    [
        ("stages:\n  - selector: bogus\n", "stages[0].selector: unknown selector 'bogus'"),
        ("stages:\n  - selector: topk\n    by: entropy:max\n    keeep: 2\n", "stages[0].keeep: unknown parameter"),
        ("stages:\n  - selector: topk\n", "selector 'topk' needs parameter 'by'"),
        ("stages:\n  - selector: topk\n    by: foo:max\n", "stages[0].by: signal spec 'foo:max': unknown signal 'foo'"),
        ("stages:\n  - selector: topk\n    by: entropy:max\n    by: margin:max\n", "duplicate key 'by'"),
        ("stages: []\n", "'stages' must be a non-empty list"),
        ("name: x\n", "'stages' must be a non-empty list"),
        ("stages:\n  - by: entropy:max\n", "stages[0]: missing key 'selector'"),
        ("stages:\n  - selector: retrieve\n    by: entropy:max\n", "cannot be the last stage"),
        ("stagez:\n  - selector: coreset\n", "unknown key 'stagez'"),
        ("stages:\n  - selector: coreset\nstages:\n  - selector: coreset\n", "duplicate key 'stages'"),
        ("stages: [\n", "not valid YAML"),
    ],
)
def test_load_errors_name_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        T.load_strategy(str(p))
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_unknown_strategy_name_lists_known():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*entropy_coreset"):
        T.load_strategy("nope")


def toy_table() -> dict[str, np.ndarray]:
    x = np.array([0.1, 5.0, 9.0, 4.9, 20.0, 1.0], dtype=np.float32)
    return {
        "image_id": np.arange(1, 7, dtype=np.int64),
        "entropy_max": np.array([0.9, 0.8, 0.7, 0.95, 0.1, 0.85]),
        "embedding": np.column_stack([x, np.zeros_like(x)]),
    }


def test_two_stage_pipeline_known_answer(tmp_path):
    p = write(tmp_path, """
        name: toy
        stages:
          - selector: retrieve
            by: entropy:max
            keep: 2
          - selector: coreset
        """)
    s = T.load_strategy(str(p))
    # retrieve keeps 2 x 2 = 4: ids 4 (.95), 1 (.9), 6 (.85), 2 (.8) at x = 4.9, .1, 1, 5.
    # Centre at 0: farthest is id 2 (d=5); then distances min(|x|, |x-5|): .1, .1, 1 -> id 6.
    sel = T.select(s, toy_table(), 2, ctx=ctx(labeled_embedding=np.zeros((1, 2), np.float32)))
    np.testing.assert_array_equal(sel.image_id, [2, 6])
    np.testing.assert_allclose(sel.score, [5.0, 1.0])
    assert sel.rationale[0] == {
        "retrieve": {"by": "entropy_max", "direction": "high", "value": 0.8, "rank": 4},
        "coreset": {"distance": 5.0, "rank": 1},
    }
    assert sel.rationale[1]["retrieve"]["rank"] == 3
    assert sel.rationale[1]["coreset"]["distance"] == pytest.approx(1.0)


def test_single_stage_topk_and_budget_rules():
    t = toy_table()
    sel = T.select(T.load_strategy("entropy"), t, 3, ctx=ctx())
    np.testing.assert_array_equal(sel.image_id, [4, 1, 6])
    assert sel.rationale[0] == {"topk": {"by": "entropy_max", "direction": "high", "value": 0.95, "rank": 1}}
    big = T.select(T.load_strategy("entropy"), t, 10, ctx=ctx())
    np.testing.assert_array_equal(big.image_id, [4, 1, 6, 2, 3, 5])
    assert "budget 10 > 6 candidates" in big.rationale[0]["warning"]
    with pytest.raises(ValueError, match="budget"):
        T.select(T.load_strategy("entropy"), t, 0, ctx=ctx())


def test_repeated_selector_gets_indexed_stage_keys(tmp_path):
    p = write(tmp_path, """
        stages:
          - selector: retrieve
            by: entropy:max
            keep: 2
          - selector: retrieve
            by: margin:max
            keep: 1
          - selector: topk
            by: random
        """)
    s = T.load_strategy(str(p))
    assert s.name == "s"  # defaults to the file stem
    t = toy_table()
    t["margin_max"] = np.array([0.5, 0.2, 0.0, 0.1, 0.0, 0.3])
    t["random"] = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # entropy keeps 4 -> {4, 1, 6, 2}; lowest margin keeps 2 -> 4 (.1), 2 (.2); random: 4 (.4), then 2 (.2)
    sel = T.select(s, t, 2, ctx=ctx())
    np.testing.assert_array_equal(sel.image_id, [4, 2])
    assert set(sel.rationale[0]) == {"retrieve_0", "retrieve_1", "topk"}
    assert sel.rationale[0]["retrieve_1"]["value"] == 0.1
    assert sel.rationale[1]["retrieve_0"]["rank"] == 4
