"""`poolscout tune`: the space file, strategy parameters and settings, and a tiny search
with Ray Tune (ASHA) on the labeled part of a run, checked on the other split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from poolscout.engine.acquisition.strategies import load_strategy, parse_strategy
from poolscout.engine.core.config import ConfigError, load_config
from poolscout.jobs.tune import apply_params, check_space, default_params, load_space, setting_overrides
from tests.conftest import TINY_SETTINGS

HUALE = {"name": "huale", "stages": [{"selector": "retrieve", "by": "entropy:max", "keep": 2},
                                     {"selector": "weighted_l2", "signals": ["huale_sa", "huale_cd"],
                                      "weights": [1.0, 1.0]}]}


def _space(tmp_path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_spaces_load_and_apply_to_their_strategies():
    cfg = load_config()
    for name in ("huale", "uncertainty_herding", "entropy"):
        sp = load_space(name)
        assert sp["strategy"] == name and sp["params"]
        data = yaml.safe_load(Path(load_strategy(name).path).read_text())
        check_space(cfg, data, sp)  # every path resolves and every value is a valid setting
        defaults = default_params(data, sp, cfg)
        assert defaults["select.mix_random"] == 0.0
        mid = {k: (args[0] if d == "choice" else (args[0] + args[1]) / 2 if d != "randint" else args[0])
               for k, (d, args) in sp["params"].items()}
        parse_strategy(apply_params(data, mid), name)
        load_config([], setting_overrides(mid))


def test_apply_params_sets_stage_parameters_and_leaves_settings_to_overrides():
    params = {"stages.1.weights.1": 0.25, "stages.0.keep": 3, "select.mix_random": 0.2, "select.quota": "uniform"}
    out = apply_params(HUALE, params)
    assert out["stages"][1]["weights"] == [1.0, 0.25] and out["stages"][0]["keep"] == 3
    assert "select" not in out and "mix_random" not in json.dumps(out)
    assert HUALE["stages"][1]["weights"] == [1.0, 1.0]  # the input is not modified
    assert setting_overrides(params) == ["select.mix_random=0.2", "select.quota=uniform"]
    cfg = load_config([], setting_overrides(params))
    assert cfg.select.mix_random == 0.2 and cfg.select.quota == "uniform"
    assert default_params(HUALE, {"params": {"stages.1.weights.0": None, "select.quota": None}}, load_config()) == \
        {"stages.1.weights.0": 1.0, "select.quota": "none"}


@pytest.mark.parametrize("params,needle", [
    ({"stages.5.keep": 1}, "has 2 stages"),
    ({"stages.1.weights.7": 1.0}, "has 2 elements"),
    ({"stages.0.by.0": 1.0}, "is not a list"),
    ({"stages.x.keep": 1.0}, "expected stages.<i>.<param>"),
    ({"stages.1.nonsense": 1.0}, "unknown parameter"),
])
def test_apply_params_errors_name_the_path(params, needle):
    with pytest.raises(ConfigError) as e:
        apply_params(HUALE, params)
    assert needle in str(e.value)


@pytest.mark.parametrize("params,needle", [
    ({"select.mix_random": {"uniform": [0.0, 1.0]}}, "select.mix_random"),  # 1.0 is out of [0, 1)
    ({"select.quota": {"choice": ["none", "rarest"]}}, "select.quota"),
    ({"select.nonsense": {"uniform": [0.0, 0.5]}}, "nonsense"),
    ({"stages.3.keep": {"choice": [2]}}, "has 2 stages"),
])
def test_check_space_refuses_bad_paths_and_values_before_any_trial(params, needle):
    sp = {"params": {k: next(iter(v.items())) for k, v in params.items()}}
    with pytest.raises(ConfigError) as e:
        check_space(load_config(), HUALE, sp)
    assert needle in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("params: {select.mix_random: {normal: [0, 1]}}", "unknown distribution 'normal'"),
    ("params: {select.mix_random: {uniform: [1, 0]}}", "low < high"),
    ("params: {select.mix_random: {loguniform: [0, 1]}}", "low must be > 0"),
    ("params: {}", "non-empty 'params'"),
    ("params: {select.mix_random: 0.3}", "expected one of"),
    ("strategy: huale\nparams: {select.mix_random: {uniform: [0, 1]}}\nextra: 1", "unknown key 'extra'"),
])
def test_space_errors_name_file_and_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, text))
    assert needle in str(e.value) and "space.yaml" in str(e.value)


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
    space = _space(tmp_path, "strategy: entropy\nparams: {select.mix_random: {uniform: [0.0, 0.6]}}")
    lines = []
    doc = tune(run, cfg, strategy="entropy", space=space, trials=2, cycles=2, budget=3, seed_size=3, seed=1,
               progress=False, log=lines.append)

    root = run.root / "tune" / "entropy"
    assert json.loads((root / "tune.json").read_text()) == json.loads(json.dumps(doc))
    assert len(doc["trials"]) == 2
    shares = [t["params"]["select.mix_random"] for t in doc["trials"]]
    assert len(set(shares)) == 2 and all(0.0 <= s <= 0.6 for s in shares)
    for t in doc["trials"]:
        assert 1 <= t["cycles_run"] <= 2 and t["error"] is None
        assert len(t["curve"]["map50"]) == t["cycles_run"] + 1
        assert t["curve"]["labeled"][:2] == [3, 6]  # the shared seed set, then one round of 3
    full = [t for t in doc["trials"] if t["cycles_run"] == 2]
    assert doc["aulc"]["best_a"] == max(t["aulc"] for t in full)
    best = load_strategy(doc["best_strategy_file"])
    assert best.name == "entropy_tuned" and best.stages == load_strategy("entropy").stages
    best_cfg = load_config([doc["best_settings_file"]])
    assert best_cfg.select.mix_random == pytest.approx(doc["best_params"]["select.mix_random"])
    assert doc["use"] == f"--strategy {doc['best_strategy_file']} --config {doc['best_settings_file']}"
    # the check on split B ran with the best settings, and the defaults with none
    pinned = json.loads((root / "split_b" / "best" / "loop.json").read_text())["config"]
    assert pinned["select"]["mix_random"] == pytest.approx(doc["best_params"]["select.mix_random"])
    assert json.loads((root / "split_b" / "defaults" / "loop.json").read_text())["config"]["select"]["mix_random"] == 0
    picks = io.read_table(RunDir(root / "split_b" / "best").selection_path(1)).column("rationale").to_pylist()
    assert any("mix_random" in r for r in picks) == (round(3 * doc["best_params"]["select.mix_random"]) > 0)
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
