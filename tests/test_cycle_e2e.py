"""End to end on real local Ray: init -> train -> score -> select -> export, plus the
chunking-invariance and row-accounting guarantees of the scoring stream."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from poolscout.engine.core import io
from poolscout.engine.core.run import RunDir
from poolscout.jobs.cli import cli
from tests.conftest import TINY_SETTINGS
from tests.conftest_data import corrupt_png_pixels as _corrupt_png

pytestmark = pytest.mark.ray


def _invoke(args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _sets(extra=()):
    out = []
    for s in [*TINY_SETTINGS, *extra]:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pool, ray_session):
    root = tmp_path_factory.mktemp("e2e")
    images = root / "images"
    shutil.copytree(tiny_pool["images"], images)
    first = sorted(images.glob("*.png"))[-1]
    _corrupt_png(first, images / "zz_corrupt.png")
    run = root / "run"
    _invoke(["init", run, "--images", images, "--annotations", tiny_pool["annotations"],
             "--seed-fraction", "0.25", "--config", Path(__file__).parents[1] / "configs" / "demo.yaml",
             *_sets(["score.views=[orig,hflip]", "score.empty_value=pool_max"])])
    return RunDir(run)


def test_cycle_end_to_end(run_dir):
    run = run_dir
    # the Ray Train path (one worker on the embedded Ray would otherwise train in-process)
    res = _invoke(["cycle", run.root, "--strategy", "entropy", "--budget", "5", "--quiet",
                   "--set", "train.backend=ray_train"])
    summary = json.loads(res.stdout)
    assert summary["cycle"] == 0
    assert json.loads((run.cycle_dir(0) / "train.json").read_text())["executor"] == "ray"
    # model: a real state_dict, loadable without unpickling arbitrary objects
    import torch

    ckpt = torch.load(run.model_path(0), map_location="cpu", weights_only=True)
    assert ckpt["num_classes"] == 4 and len(ckpt["state_dict"]) > 50
    # accounting: every pool row ends scored or failed; a failure at scoring is this cycle's
    # (cycles/0/rejects.parquet): the image stays in the pool for the next scoring
    led = run.read_ledger().to_pydict()
    pool_before = summary["score"]["pool"]
    scores = io.read_table(run.scores_path(0))
    fails = io.read_table(run.cycle_dir(0) / "rejects.parquet").to_pydict()
    assert fails["stage"] == ["score"] and summary["score"]["failed"] == 1
    assert len(scores) + len(fails["image_id"]) == pool_before
    assert "zz_corrupt" in fails["uri"][0]
    state = dict(zip(led["image_id"], led["state"]))
    assert state[fails["image_id"][0]] == "pool" and led["state"].count("rejected") == 0
    assert fails["image_id"][0] not in set(io.read_table(run.selection_path(0))["image_id"].to_pylist())
    # selection: budget rows, ranked, all from the pool, with a JSON rationale
    sel = io.read_table(run.selection_path(0)).to_pydict()
    assert sel["rank"] == [1, 2, 3, 4, 5]
    pool_ids = set(run.ids_in_state("pool").tolist())
    assert set(sel["image_id"]) <= pool_ids
    assert all(isinstance(json.loads(r), dict) for r in sel["rationale"])
    # entropy picks are the top-5 by entropy_max
    s = scores.to_pydict()
    top = sorted(zip(s["entropy_max"], s["image_id"]), key=lambda t: (-t[0], t[1]))[:5]
    assert sel["image_id"] == [i for _, i in top]
    # exports: COCO loads with pycocotools, Label Studio and CSV have one entry per pick
    from pycocotools.coco import COCO

    coco = COCO(str(run.export_dir(0) / "coco.json"))
    assert sorted(coco.getImgIds()) == sorted(sel["image_id"])
    ls = json.loads((run.export_dir(0) / "label_studio.json").read_text())
    assert len(ls) == 5
    csv_rows = (run.export_dir(0) / "selection.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 6


def test_stages_know_their_state(run_dir):
    """A finished cycle is not rescored without --force; status sees stages run by hand."""
    from poolscout.jobs.loop import status

    run = run_dir
    if not run.scores_path(0).is_file():
        pytest.skip("needs the end-to-end test's scores")
    before = run.scores_path(0).stat().st_mtime_ns
    res = _invoke(["score", run.root, "--cycle", "0", "--quiet"])
    out = json.loads(res.stdout)
    assert out["skipped"] is True and run.scores_path(0).stat().st_mtime_ns == before
    st = status(run)
    assert st["status"] == "stages run by hand" and st["cycle"] == 0 and st["strategy"] == "entropy"
    assert {"train", "score", "select", "export"} <= set(st["cycles"][0]["stages"])
    text = _invoke(["status", run.root]).stdout
    assert "stages run by hand (last: cycle 0 export)" in text


def test_scoring_is_chunking_invariant(run_dir):
    """Scores and selection do not depend on batch size or the number of blocks."""
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run = run_dir
    if not run.model_path(0).is_file():
        pytest.skip("needs the end-to-end test's model")
    results = []
    for bs, blocks in ((1, 1), (3, 4), (8, 2)):
        cfg = run.config(overrides=[f"score.batch_size={bs}", f"score.decode_batch_size={bs}"])
        score(run, cfg, cycle=0, blocks=blocks, progress=False, force=True)
        select(run, cfg, strategy="entropy", budget=5, cycle=0)
        results.append((io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict(),
                        io.read_table(run.selection_path(0))["image_id"].to_pylist()))
    base_scores, base_sel = results[0]
    for sc, sel in results[1:]:
        assert sc["image_id"] == base_scores["image_id"]
        for col in base_scores:
            if col == "image_id":
                continue
            np.testing.assert_allclose(sc[col], base_scores[col], rtol=1e-5, atol=1e-5, err_msg=col)
        assert sel == base_sel


def test_predictions_follow_the_contract(run_dir):
    from poolscout.engine.models import predictions as P

    run = run_dir
    if not run.predictions_dir(0).is_dir():
        pytest.skip("needs the end-to-end test's predictions")
    t = pq.ParquetDataset(str(run.predictions_dir(0))).read()
    b = P.from_arrow(t, num_classes=4)
    assert set(P.views_in(b)) == {"orig", "hflip"}
    assert b["probs"].shape[1] == 5
    if len(b["probs"]):
        np.testing.assert_allclose(b["probs"].sum(1), 1.0, atol=1e-4)
        assert (b["boxes"][:, 2] <= b["width"].max() + 1e-3).all()
    # labeled images carry an embedding (core-set centres) but no boxes
    states = np.array(t["state"].to_pylist())
    lab = states == "labeled"
    assert lab.any() and (np.diff(b["offsets"])[lab] == 0).all()
    assert np.abs(b["embedding"][lab]).sum() > 0


def test_coreset_and_hybrid_strategies_select_from_pool(run_dir):
    from poolscout.jobs.select import select

    run = run_dir
    if not run.scores_path(0).is_file():
        pytest.skip("needs the end-to-end test's scores")
    cfg = run.config()
    pool = set(run.ids_in_state("pool").tolist())
    for strat in ("coreset", "entropy_coreset", "random", "margin"):
        s = select(run, cfg, strategy=strat, budget=4, cycle=0)
        ids = io.read_table(run.selection_path(0))["image_id"].to_pylist()
        assert s["selected"] == 4 and len(set(ids)) == 4 and set(ids) <= pool, strat


def test_warm_queries_auto_warms_only_a_strategy_that_keeps_a_cache():
    import dataclasses

    from poolscout.engine.core.config import Config
    from poolscout.jobs.score import warm_strategies

    def cfg(strategy, warm=("auto",)):
        c = Config()
        return c.replace(select=dataclasses.replace(c.select, strategy=strategy),
                         score=dataclasses.replace(c.score, warm_queries=warm))

    assert warm_strategies(cfg("entropy")) == []
    assert warm_strategies(cfg("coreset")) == []
    for name in ("maxherding", "uncertainty_herding", "probcover"):
        assert warm_strategies(cfg(name)) == [name]
    assert warm_strategies(cfg("no_such_strategy")) == []
    assert warm_strategies(cfg("entropy", ("probcover", "auto"))) == ["probcover"]
    assert warm_strategies(cfg("probcover", ("probcover", "auto"))) == ["probcover"]
    assert warm_strategies(cfg("maxherding", ())) == []


def test_scoring_builds_the_knn_graph_that_queries_then_reuse(run_dir, tmp_path):
    """score.warm_queries runs after scoring (default "auto": the run's strategy, if it keeps a
    kNN graph; the fixture's entropy does not, so nothing was warmed); a strategy on the
    sparse path gets its kNN graph built then, and the first query reads it instead of
    searching."""
    import dataclasses

    from poolscout.jobs.query import QuerySession
    from poolscout.jobs.score import warm_queries

    run = run_dir
    if not run.scores_path(0).is_file():
        pytest.skip("needs the end-to-end test's scores")
    warm = json.loads((run.cycle_dir(0) / "score.json").read_text())["warm"]
    assert run.config().select.strategy == "entropy" and warm == {}, warm
    sparse = tmp_path / "herd_sparse.yaml"
    sparse.write_text("name: herd_sparse\nstages:\n  - selector: maxherding\n    dense_below: 0\n")
    cfg = run.config()
    cfg = cfg.replace(score=dataclasses.replace(cfg.score, warm_queries=(str(sparse), "no_such_strategy")))
    cache = run.cycle_dir(0) / "cache"
    old = set(cache.glob("knn-*.npz"))
    out = warm_queries(run, cfg, 0)
    assert "seconds" in out[str(sparse)] and "no_such_strategy" in out["no_such_strategy"]["error"]
    new = set(cache.glob("knn-*.npz")) - old
    assert len(new) == 1
    (graph,) = new
    stamp = graph.stat().st_mtime_ns
    table, _ = QuerySession(run, cfg, 0).ask(str(sparse), 3)
    assert table.num_rows == 3
    assert json.loads(table["rationale"][0].as_py())["maxherding"]["path"].startswith("knn")
    assert graph.stat().st_mtime_ns == stamp and set(cache.glob("knn-*.npz")) - old == new


def test_query_says_when_picks_come_from_the_empty_rule(run_dir, tmp_path):
    """A model that detects nothing: every entropy pick is tied at the fill value and says so."""
    from poolscout.jobs import api

    run = run_dir
    if not run.scores_path(0).is_file():
        pytest.skip("needs the end-to-end test's scores")
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    rd = RunDir(copy)
    sc = io.read_table(rd.scores_path(0))
    import pyarrow as pa

    cols = {c: sc[c] for c in sc.column_names}
    cols["num_boxes"] = pa.array(np.zeros(len(sc), np.int32))
    cols["entropy_max"] = pa.array(np.zeros(len(sc)))
    io.write_table(pa.table(cols), rd.scores_path(0))
    before = sorted(p.name for p in rd.cycle_dir(0).iterdir())
    picks = api.query(copy, strategy="entropy", budget=4, cycle=0)
    summary = api.summary_of(picks)
    assert len(picks) == 4 and summary["no_detections"] == 4
    assert any(w.startswith("4 of 4 picks are tied") and "no detections" in w for w in summary["warnings"])
    for r in picks["rationale"].to_pylist():
        assert json.loads(r)["note"].startswith("no detections: scored as the pool maximum")
    assert all(isinstance(f, str) and f for f in picks["file"].to_pylist())
    assert sorted(p.name for p in rd.cycle_dir(0).iterdir()) == before  # query writes nothing
    big = api.query(copy, strategy="random", budget=100_000, cycle=0)
    assert any(w.startswith("budget 100000 >") for w in api.summary_of(big)["warnings"])


def test_gsal_on_ray_train_and_ray_data_matches_the_local_executor(run_dir, tmp_path):
    """The diffusion model trained as a Ray Train job; the diffusion stage as Ray Data actors,
    at two chunkings, gives the local executor's D / V values (chunking invariance)."""
    from poolscout.jobs.diffusion import train_diffusion
    from poolscout.jobs.score import score

    if not run_dir.model_path(0).is_file():
        pytest.skip("needs the end-to-end test's model")
    copy = tmp_path / "run"
    shutil.copytree(run_dir.root, copy)
    run = RunDir(copy)
    gs = ["gsal.resolution=16", "gsal.seeds=2", "gsal.steps=2", "gsal.train_batch_size=4", "gsal.batch_size=3",
          "gsal.cache_maps=false",  # every chunking computes its own maps
          "score.signals=[gsal_d:max,gsal_v:mean,gsal_g:max,gsal_g_image]"]
    cfg = run.config(overrides=[*gs, "train.backend=ray_train"])
    s = train_diffusion(run, cfg, steps=2, progress=False, executor="ray", overrides=gs, log=lambda m: None)
    assert s["executor"] == "ray" and s["steps"] == 2
    results = []
    for bs, blocks, ex in ((2, 3, "ray"), (5, 1, "ray"), (4, None, "local")):
        c = run.config(overrides=[*gs, f"score.batch_size={bs}", f"score.decode_batch_size={bs}"])
        score(run, c, cycle=0, blocks=blocks, progress=False, force=True, executor=ex)
        results.append(io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict())
    for other in results[1:]:
        assert other["image_id"] == results[0]["image_id"]
        for col in ("gsal_d_max", "gsal_v_mean", "gsal_g_max", "gsal_g_image"):
            np.testing.assert_allclose(other[col], results[0][col], rtol=1e-4, atol=1e-5, err_msg=col)
    assert np.isfinite(results[0]["gsal_g_image"]).all()
