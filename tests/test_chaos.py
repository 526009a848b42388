"""Chaos: detector actors killed while the pool is scored on local Ray; every pool image is
scored exactly once and the scores equal an undisturbed run's."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import load_config
from poolscout.engine.core.run import RunDir
from tests.conftest import TINY_SETTINGS

psutil = pytest.importorskip("psutil")


def _detector_actors() -> list:
    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        try:
            if "DetectorStage" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_scoring_survives_killed_detector_actors(tmp_path, ray_session):
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.score import score
    from poolscout.jobs.train import train

    pool = generate(tmp_path / "pool", n_images=300, size=64, seed=11)
    cfg = load_config([], [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig]",
                           "score.concurrency=2", "score.num_cpus=0.5", "score.batch_size=4"])
    run = RunDir(tmp_path / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.1, cfg=cfg, progress=False)
    train(run, cfg, progress=False)
    n_pool = len(run.ids_in_state("pool"))
    calm = score(run, cfg, progress=False, executor="ray")
    reference = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
    assert calm["scored"] == n_pool

    kills: list[int] = []
    stop = threading.Event()

    def killer():
        rng = np.random.default_rng(0)
        while not stop.wait(3.0):
            actors = _detector_actors()
            if actors:
                victim = actors[int(rng.integers(len(actors)))]
                try:
                    victim.send_signal(signal.SIGKILL)
                    kills.append(victim.pid)
                except psutil.Error:
                    pass

    t = threading.Thread(target=killer, daemon=True)
    t0 = time.time()
    t.start()
    try:
        rough = score(run, cfg, progress=False, executor="ray", force=True)
    finally:
        stop.set()
        t.join()
    assert kills, f"no detector actor was killed in {time.time() - t0:.0f} s: the test checked nothing"
    assert rough["scored"] == n_pool and rough.get("failed", 0) == 0
    got = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
    assert got["image_id"] == reference["image_id"]  # each pool image exactly once
    assert len(set(got["image_id"])) == n_pool
    for col, ref in reference.items():
        if col != "image_id":
            np.testing.assert_allclose(np.asarray(got[col], float), np.asarray(ref, float), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)


@pytest.mark.ray
def test_a_driver_killed_mid_scoring_on_ray_resumes_from_the_parts_written(tmp_path, ray_session):
    """Under the Ray executor, the driver SIGKILLed half way through the pool: the next
    `poolscout score` keeps the parts already written (same files, untouched) and scores only
    the rest; every pool image ends up scored exactly once, as an undisturbed run scores it."""
    import os
    import subprocess
    import sys

    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.score import score
    from poolscout.jobs.train import train
    from tests.conftest import REPO

    pool = generate(tmp_path / "pool", n_images=72, size=64, seed=12)
    ov = [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig]",
          "score.batch_size=4", "score.decode_batch_size=4", "loop.executor=ray"]
    cfg = load_config([], ov)
    run = RunDir(tmp_path / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.1, cfg=cfg, progress=False)
    train(run, cfg, progress=False, executor="local")
    n_pool = len(run.ids_in_state("pool"))

    def job(crash: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)
        env.pop("POOLSCOUT_CRASH_AT", None)
        if crash:
            env["POOLSCOUT_CRASH_AT"] = crash
        cmd = [sys.executable, "-m", "poolscout.jobs", "score", str(run.root), "--quiet",
               *[a for s in ov for a in ("--set", s)]]
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)

    res = job("0:score:mid")
    assert res.returncode == -9, res.stderr[-3000:]
    partial = next(run.cycle_dir(0).glob(".predictions.partial-*"))
    before = {f.name: f.stat().st_mtime_ns for f in partial.glob("part-*.parquet")}
    assert before, "the killed driver left no finished part: nothing to resume from"
    res = job(None)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {f.name: f.stat().st_mtime_ns for f in run.predictions_dir(0).glob("part-*.parquet")}
    assert all(after.get(name) == t for name, t in before.items())  # kept, not rescored
    assert len(after) > len(before)  # and the rest was scored
    got = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
    assert len(got["image_id"]) == len(set(got["image_id"])) == n_pool  # each pool image exactly once
    # the same scores as an undisturbed scoring
    score(run, cfg, progress=False, executor="ray", force=True)
    ref = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
    assert got["image_id"] == ref["image_id"]
    for col, v in ref.items():
        if col != "image_id":
            np.testing.assert_allclose(np.asarray(got[col], float), np.asarray(v, float), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_lost_mid_scoring_changes_nothing(tmp_path):
    """Two raylets (head 1 CPU, worker 2 CPUs); the worker node is removed once the first
    part is written: scoring completes on the head, every pool image is scored exactly once,
    and the scores and the selection equal the undisturbed run's."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_fault.py"), str(tmp_path)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result line: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["removed"].get("at") is not None, "the worker node was never removed: the test checked nothing"
    assert out["alive_nodes"] == 1
    assert out["scored"] == out["unique"] == out["pool"]
    assert out["same_scores"] and out["same_selection"]


@pytest.mark.ray
def test_ray_train_resumes_a_killed_training_from_its_last_epoch_checkpoint(tmp_path, ray_session, monkeypatch):
    """The Ray Train worker dies right after epoch 1's checkpoint: FailureConfig restarts it,
    the new worker loads that checkpoint and trains epochs 2 and 3 only."""
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.train import train

    pool = generate(tmp_path / "pool", n_images=24, size=64, seed=14)
    cfg = load_config([], [*TINY_SETTINGS, "train.torch_threads=1", "train.backend=ray_train", "train.epochs=3",
                           "train.cpus_per_worker=1"])
    run = RunDir(tmp_path / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.5, cfg=cfg, progress=False)
    monkeypatch.setenv("POOLSCOUT_CRASH_AT", "0:train:epoch0")
    s = train(run, cfg, progress=False, executor="ray")
    hist = s["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # every epoch once: epoch 0 came from the checkpoint
    assert hist[-1].get("resumed_at_epoch") == 1
    assert run.model_path(0).is_file() and not (run.root / "ray_train").exists()
