"""The active-learning loop: resume after SIGKILL, model-free strategies, status, human oracle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_SETTINGS

LOOP_SETTINGS = [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig,hflip]",
                 "loop.executor=local", "loop.seed_size=6", "loop.cycles=2", "select.budget=4", "seed=5"]


def _init(tmp_path: Path, tiny_pool: dict, name: str, extra: list[str] = (), labeled: Path | None = None):
    from poolscout.engine.core.config import load_config
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.core.run import RunDir

    names = sorted(p.name for p in Path(tiny_pool["images"]).iterdir())
    test = tmp_path / "test_ids.txt"
    test.write_text("".join(n + "\n" for n in names[-6:]))
    run = RunDir(tmp_path / name)
    init_run(run, images=tiny_pool["images"], annotations=tiny_pool["annotations"], test=test, labeled=labeled,
             cfg=load_config([], [*LOOP_SETTINGS, *extra]))
    return run


def _loop(run, crash: str | None = None, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("POOLSCOUT_CRASH_AT", None)
    if crash:
        env["POOLSCOUT_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "poolscout.jobs", "run", str(run.root), "--quiet", *[a for s in extra for a in ("--set", s)]]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _strip(d):
    """Metrics without wall-clock fields."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("seconds", "timings_s")}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _outcome(run) -> dict:
    from poolscout.engine.core import io

    led = io.read_table(run.ledger).sort_by("image_id").to_pydict()
    out = {"ledger": led}
    for k in range(3):
        c = run.cycle_dir(k)
        if (c / "selection.parquet").is_file():
            out[f"sel{k}"] = io.read_table(c / "selection.parquet").to_pydict()
        out[f"metrics{k}"] = _strip(json.loads((c / "metrics.json").read_text()))
    return out


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_pool):
    ref = _init(tmp_path, tiny_pool, "ref")
    res = _loop(ref)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _outcome(ref)
    assert json.loads((ref.root / "loop.json").read_text())["status"] == "done"
    # 6 seed + 2 rounds of 4 labeled; 3 evaluations
    assert sum(s == "labeled" for s in expected["ledger"]["state"]) == 14
    assert expected["metrics2"]["labeled_images"] == 14

    run = _init(tmp_path, tiny_pool, "crashy")
    # One run killed again and again: at each kind of stage boundary, before and after,
    # and half way through scoring; each restart resumes where the last one died.
    points = ["0:seed:after", "0:train:after", "0:evaluate:before", "0:score:mid", "0:score:after",
              "0:select:after", "0:label:before", "1:train:before", "1:score:mid", "1:label:after",
              "2:train:after", "2:evaluate:after"]
    for p in points:
        res = _loop(run, crash=p)
        assert res.returncode == -9, f"expected a SIGKILL at {p}, got rc {res.returncode}: {res.stderr[-2000:]}"
        state = json.loads((run.root / "loop.json").read_text())
        assert state["status"] == "running"
    res = _loop(run)
    assert res.returncode == 0, res.stderr[-3000:]
    # the mid-scoring kill left parts that the restart reused (and then cleaned up)
    assert not list(run.cycle_dir(0).glob(".predictions.partial-*"))
    got = _outcome(run)
    assert got["ledger"] == expected["ledger"]
    for k in (0, 1):
        assert got[f"sel{k}"] == expected[f"sel{k}"], f"selection of cycle {k} differs"
    for k in (0, 1, 2):
        assert got[f"metrics{k}"] == expected[f"metrics{k}"], f"metrics of cycle {k} differ"


def test_random_strategy_skips_scoring_and_status_reports(tmp_path, tiny_pool, torch_threads):
    from poolscout.engine.core.run import RunDir
    from poolscout.jobs.loop import loop_config, run_loop, status

    run = _init(tmp_path, tiny_pool, "rand", ["select.strategy=random", "loop.cycles=1"])
    cfg = loop_config(run)
    state = run_loop(run, cfg, progress=False, log=lambda m: None)
    assert state["status"] == "done"
    assert not run.scores_path(0).exists()  # random needs no model signal
    sel = run.selection_path(0)
    assert sel.is_file()
    st = status(RunDir(run.root))
    assert st["status"] == "done" and st["strategy"] == "random"
    assert [c["cycle"] for c in st["cycles"]] == [0, 1]
    assert st["cycles"][1]["labeled_images"] == 10
    assert 0.0 <= st["cycles"][1]["map50"] <= 1.0
    # the stopping signal: a fixed stop set drawn from the pool once, consecutive models
    # compared on it from cycle 1 on
    ss = json.loads((run.root / "stop_set.json").read_text())
    assert ss["size"] == len(ss["image_id"]) > 0
    assert st["cycles"][0]["agreement"] is None and 0.0 <= st["cycles"][1]["agreement"] <= 1.0
    m1 = json.loads((run.cycle_dir(1) / "metrics.json").read_text())
    assert m1["stop"]["images"] == ss["size"] and m1["stop"]["threshold"] == 0.9
    assert m1["stop"]["labels_buy_little"] == (m1["stop"]["agreement"] >= 0.9) == st["stop"]["labels_buy_little"]
    m = json.loads((run.cycle_dir(0) / "metrics.json").read_text())
    assert set(m["timings_s"]) == {"train", "evaluate", "select", "label"}
    assert m["new_images"] == 6 and m["labeled_images"] == 6
    # a resumed loop cannot change what it selects
    from poolscout.engine.core.config import ConfigError

    with pytest.raises(ConfigError, match="select"):
        run_loop(run, loop_config(run, overrides=["select.strategy=entropy"]), progress=False, log=lambda m: None)
    # but it can be extended by more cycles
    state = run_loop(run, loop_config(run, overrides=["loop.cycles=2"]), progress=False, log=lambda m: None)
    assert state["status"] == "done" and (run.cycle_dir(2) / "metrics.json").is_file()


def test_kcenter_seed_set_is_deterministic(tmp_path, tiny_pool, torch_threads):
    from poolscout.jobs.loop import seed_set

    picks = []
    for name in ("a", "b"):
        run = _init(tmp_path, tiny_pool, name, ["loop.seed_strategy=kcenter"])
        res = seed_set(run, run.config(), progress=False)
        assert res["method"] == "kcenter" and res["images"] == 6
        picks.append(np.sort(run.ids_in_state("labeled")))
    assert np.array_equal(picks[0], picks[1])
    assert len(np.unique(picks[0])) == 6


def test_loop_errors_are_clear(tmp_path, tiny_pool):
    from poolscout.engine.core.config import ConfigError
    from poolscout.engine.core.run import RunError
    from poolscout.jobs.loop import run_loop

    run = _init(tmp_path, tiny_pool, "bad", ["loop.seed_size=0"])
    with pytest.raises(RunError, match="seed_size"):
        run_loop(run, run.config(), progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="seed_strategy"):  # refused when the config loads
        _init(tmp_path, tiny_pool, "bad2", ["loop.seed_strategy=magic"])


def test_pinned_settings_accept_new_keys_at_their_default():
    from poolscout.jobs.loop import _same_settings

    # a key the pinned settings lack (a newer version added it) is fine at its default
    assert _same_settings({"a": 1}, {"a": 1, "b": 2}, {"a": 0, "b": 2})
    assert _same_settings({"s": {"a": 1}}, {"s": {"a": 1, "b": False}}, {"s": {"a": 0, "b": False}})
    assert not _same_settings({"a": 1}, {"a": 1, "b": 3}, {"a": 0, "b": 2})
    assert not _same_settings({"s": {"a": 1}}, {"s": {"a": 1, "b": True}}, {"s": {"b": False}})
    assert not _same_settings({"a": 1}, {"a": 2, "b": 2}, {"b": 2})
    assert not _same_settings({"a": 1, "c": 1}, {"a": 1}, {})


def test_evaluation_honours_its_thread_setting(tmp_path, tiny_pool, monkeypatch):
    """loop.eval_threads (else score.torch_threads) holds while evaluating, and is restored after."""
    import torch

    from poolscout.jobs.loop import evaluate

    run = _init(tmp_path, tiny_pool, "threads")
    seen = []
    monkeypatch.setattr("poolscout.engine.models.detectors.load_checkpoint",
                        lambda path: (None, {"detector": {"input_size": 64}}))
    monkeypatch.setattr("poolscout.engine.evaluation.metrics.evaluate_model",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or {"map50": 0.0})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # (no stop set: the stub model cannot predict)
        evaluate(run, run.config(overrides=["loop.eval_threads=1", "loop.stop_set=0"]), 0, progress=False)
        evaluate(run, run.config(overrides=["loop.eval_threads=0", "score.torch_threads=1", "loop.stop_set=0"]), 0,
                 progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_pseudo_labels_train_on_confident_pool_detections(tmp_path, tiny_pool, torch_threads):
    """train.pseudo_labels: cycle 1 also trains on cycle 0's confident boxes on pool images,
    kept in their own file, never in the ledger or the annotations."""
    from poolscout.engine.core import io
    from poolscout.jobs.loop import loop_config, run_loop

    run = _init(tmp_path, tiny_pool, "pseudo", ["select.strategy=entropy", "loop.cycles=1",
                                                "train.pseudo_labels=0.01", "train.pseudo_max_images=3"])
    ann_before = io.read_table(run.annotations)
    state = run_loop(run, loop_config(run), progress=False, log=lambda m: None)
    assert state["status"] == "done"
    assert not (run.cycle_dir(0) / "pseudo_labels.parquet").exists()  # nothing to learn from at cycle 0
    p = io.read_table(run.cycle_dir(1) / "pseudo_labels.parquet")
    t = json.loads((run.cycle_dir(1) / "train.json").read_text())
    ids = set(p["image_id"].to_pylist())
    assert 1 <= t["pseudo_labels"]["images"] == len(ids) <= 3 and t["pseudo_labels"]["boxes"] == p.num_rows
    assert t["pseudo_labels"]["threshold"] == 0.01 and (p["score"].to_numpy() >= 0.01).all()
    # pseudo-labeled images are pool images, and stay so: the ledger and annotations are untouched
    assert ids <= set(run.ids_in_state("pool").tolist())
    assert io.read_table(run.annotations).equals(ann_before)
    assert t["labeled"] == int((np.asarray(run.read_ledger()["state"].to_pylist()) == "labeled").sum())
