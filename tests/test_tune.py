"""`poolscout tune`: the space file, strategy parameters, random_share, and a tiny search
with Ray Tune (ASHA) on the labeled part of a run, checked on the other split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from poolscout.engine.acquisition.selectors import SelectContext
from poolscout.engine.acquisition.strategies import load_strategy, parse_strategy, select
from poolscout.engine.core.config import ConfigError
from poolscout.jobs.tune import apply_params, default_params, load_space
from tests.conftest import TINY_SETTINGS

HUALE = {"name": "huale", "stages": [{"selector": "retrieve", "by": "entropy:max", "keep": 2},
                                     {"selector": "weighted_l2", "signals": ["huale_sa", "huale_cd"],
                                      "weights": [1.0, 1.0]}]}


def _space(tmp_path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_spaces_load_and_apply_to_their_strategies():
    for name in ("huale", "uncertainty_herding", "entropy"):
        sp = load_space(name)
        assert sp["strategy"] == name and sp["params"]
        data = yaml.safe_load(Path(load_strategy(name).path).read_text())
        defaults = default_params(data, sp)
        assert defaults.get("random_share") == 0.0
        # every path resolves, and mid-range values give a valid strategy
        mid = {k: (args[0] if d == "choice" else (args[0] + args[1]) / 2 if d != "randint" else args[0])
               for k, (d, args) in sp["params"].items()}
        parse_strategy(apply_params(data, mid), name)


def test_apply_params_sets_list_elements_and_top_level_share():
    out = apply_params(HUALE, {"stages.1.weights.1": 0.25, "stages.0.keep": 3, "random_share": 0.2})
    assert out["stages"][1]["weights"] == [1.0, 0.25] and out["stages"][0]["keep"] == 3
    assert out["random_share"] == 0.2
    assert HUALE["stages"][1]["weights"] == [1.0, 1.0]  # the input is not modified
    assert default_params(HUALE, {"params": {"stages.1.weights.0": None, "random_share": None}}) == \
        {"stages.1.weights.0": 1.0, "random_share": 0.0}


@pytest.mark.parametrize("params,needle", [
    ({"stages.5.keep": 1}, "has 2 stages"),
    ({"stages.1.weights.7": 1.0}, "has 2 elements"),
    ({"stages.0.by.0": 1.0}, "is not a list"),
    ({"weights": 1.0}, "expected random_share"),
    ({"stages.1.nonsense": 1.0}, "unknown parameter"),
    ({"random_share": 1.5}, "random_share must be a number in [0, 1)"),
])
def test_apply_params_errors_name_the_path(params, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        apply_params(HUALE, params)


@pytest.mark.parametrize("text,needle", [
    ("params: {random_share: {normal: [0, 1]}}", "unknown distribution 'normal'"),
    ("params: {random_share: {uniform: [1, 0]}}", "low < high"),
    ("params: {random_share: {loguniform: [0, 1]}}", "low must be > 0"),
    ("params: {}", "non-empty 'params'"),
    ("params: {random_share: 0.3}", "expected one of"),
    ("strategy: huale\nparams: {random_share: {uniform: [0, 1]}}\nextra: 1", "unknown key 'extra'"),
])
def test_space_errors_name_file_and_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, text))
    assert needle in str(e.value) and "space.yaml" in str(e.value)


def test_random_share_keeps_the_top_and_draws_the_rest_uniformly():
    strat = parse_strategy({"name": "t", "random_share": 0.5,
                            "stages": [{"selector": "topk", "by": "entropy:max"}]}, "t")
    ids = np.arange(100, 120, dtype=np.int64)
    table = {"image_id": ids, "entropy_max": np.linspace(0.0, 1.0, 20)}
    sel = select(strat, table, 6, ctx=SelectContext(rng=np.random.default_rng(3)))
    got = np.asarray(sel.image_id)
    assert len(got) == len(set(got.tolist())) == 6
    assert got[:3].tolist() == [119, 118, 117]  # the stage's 3 (budget - round(0.5 x 6))
    assert set(got[3:].tolist()) <= set(ids[:17].tolist())  # 3 more, from what the stage left
    assert all("random_share" in r for r in sel.rationale[3:]) and np.isnan(sel.score[3:]).all()
    # another generator draws other images; without the share it is the plain top 6
    other = select(strat, table, 6, ctx=SelectContext(rng=np.random.default_rng(4)))
    assert set(np.asarray(other.image_id)[3:].tolist()) != set(got[3:].tolist())
    plain = parse_strategy({"name": "t", "stages": [{"selector": "topk", "by": "entropy:max"}]}, "t")
    assert np.asarray(select(plain, table, 6, ctx=SelectContext()).image_id).tolist() == list(range(119, 113, -1))


@pytest.mark.ray
def test_tune_searches_on_split_a_and_checks_on_split_b(tmp_path, ray_session):
    """2 trials x 2 cycles on a 48-image pool: every trial's curve and parameters are kept,
    the best becomes a strategy file that loads, defaults and best ran on the other split."""
    from poolscout.engine.core import io
    from poolscout.engine.core.config import load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.tune import tune

    pool = generate(tmp_path / "pool", n_images=48, size=64, seed=21)
    cfg = load_config([], [*TINY_SETTINGS, "score.views=[orig]", "score.batch_size=8", "train.backend=in_process"])
    run = RunDir(tmp_path / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.9, cfg=cfg, progress=False)
    labeled = set(run.ids_in_state("labeled").tolist())
    space = _space(tmp_path, "strategy: entropy\nparams: {random_share: {uniform: [0.0, 0.6]}}")
    lines = []
    doc = tune(run, cfg, strategy="entropy", space=space, trials=2, cycles=2, budget=3, seed_size=3, seed=1,
               progress=False, log=lines.append)

    root = run.root / "tune" / "entropy"
    assert json.loads((root / "tune.json").read_text()) == json.loads(json.dumps(doc))
    assert len(doc["trials"]) == 2
    shares = [t["params"]["random_share"] for t in doc["trials"]]
    assert len(set(shares)) == 2 and all(0.0 <= s <= 0.6 for s in shares)
    for t in doc["trials"]:
        assert 1 <= t["cycles_run"] <= 2 and t["error"] is None
        assert len(t["curve"]["map50"]) == t["cycles_run"] + 1
        assert t["curve"]["labeled"][:2] == [3, 6]  # the shared seed set, then one round of 3
    full = [t for t in doc["trials"] if t["cycles_run"] == 2]
    assert doc["aulc"]["best_a"] == max(t["aulc"] for t in full)
    best = load_strategy(doc["best_strategy_file"])
    assert best.name == "entropy_tuned" and best.random_share == pytest.approx(doc["best_params"]["random_share"])
    for key in ("defaults_a", "defaults_b", "best_b"):
        c = doc["curves"][key]
        assert c["labeled"] == [3, 6, 9] and all(0.0 <= m <= 1.0 for m in c["map50"]), (key, c)
        assert doc["aulc"][key] == pytest.approx(c["aulc"])
    # both splits share cycle 0 within themselves, and come from the parent's labeled images only
    a, b = (RunDir(root / f"split_{s}" / "base") for s in "ab")
    ids_a = set(a.ids_in_state("pool").tolist()) | set(a.ids_in_state("labeled").tolist()) | \
        set(a.ids_in_state("test").tolist())
    ids_b = set(b.ids_in_state("pool").tolist()) | set(b.ids_in_state("labeled").tolist()) | \
        set(b.ids_in_state("test").tolist())
    assert ids_a and ids_b and not ids_a & ids_b and ids_a | ids_b == labeled
    assert io.read_table(run.ledger).num_rows == 48  # the parent run is untouched
    assert doc["curves"]["defaults_a"]["map50"][0] == doc["curves"]["best_a"]["map50"][0]
    assert doc["curves"]["defaults_b"]["map50"][0] == doc["curves"]["best_b"]["map50"][0]
    assert any(ln.startswith("[tune] trial ") for ln in lines) and "held-out split B" in doc["verdict"]
    # a second call returns the finished search without running anything
    assert tune(run, cfg, strategy="entropy", space=space, trials=2, cycles=2, budget=3, seed_size=3, seed=1,
                progress=False, log=lines.append) == doc
