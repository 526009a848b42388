"""The detection acquisition methods through the real jobs: train (with box-head dropout,
the variance head and the HUALE losses) -> score (the views and MC passes the strategy
needs) -> select, on a tiny synthetic pool with the local executor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from poolscout.engine.core import io
from poolscout.engine.core.config import load_config
from poolscout.engine.data.pool import init_run
from poolscout.engine.core.run import RunDir
from tests.conftest import TINY_SETTINGS

HUALE_TRAIN = ["detector.dropout=0.2", "detector.box_var_head=true", "train.emphasis_loss=true",
               "train.eiou_loss=true", "train.aware_loss=true", "train.loss_lambda=0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pool):
    from poolscout.jobs.train import train

    root = tmp_path_factory.mktemp("detection_e2e")
    files = [Path(__file__).parents[1] / "configs" / "demo.yaml"]
    overrides = [*TINY_SETTINGS, *HUALE_TRAIN, "loop.executor=local", "score.mc_passes=3"]
    run = RunDir(root / "run")
    init_run(run, images=tiny_pool["images"], annotations=tiny_pool["annotations"], seed_fraction=0.4,
             cfg=load_config(files, overrides))
    cfg = run.config(files, overrides)
    train(run, cfg, progress=False, executor="local")
    return run, files, overrides


@pytest.mark.parametrize("strategy", ["bald", "cald", "huale", "ppal"])
def test_strategy_scores_and_selects(trained, strategy):
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    cfg = run.config(files, [*overrides, f"select.strategy={strategy}"])
    summary = score(run, cfg, progress=False, executor="local")
    assert summary["scored"] == len(run.ids_in_state("pool"))
    names = pads.dataset(str(run.predictions_dir(0)), format="parquet").schema.names
    if strategy == "cald":
        assert {"hflip_num_boxes", "cutout_num_boxes", "resize_num_boxes", "rotate_num_boxes"} <= set(names)
        assert "hflip_roi_embedding" not in names  # roi embeddings: original view only
    if strategy == "bald":
        assert "mc_probs" in names and "hflip_mc_probs" not in names
    if strategy == "huale":
        assert "box_var" in names and "hflip_num_boxes" in names
    scores = io.read_table(run.scores_path(0))
    want_col = {"bald": "bald_max", "cald": "cald", "huale": "huale_lc", "ppal": "dcus"}[strategy]
    assert want_col in scores.column_names
    v = scores[want_col].to_numpy(zero_copy_only=False)
    assert np.isfinite(v).all()
    res = select(run, cfg, budget=3)
    assert res["selected"] == 3
    sel = io.read_table(run.selection_path(0)).to_pydict()
    assert set(sel["image_id"]) <= set(run.ids_in_state("pool").tolist())
    rat = [json.loads(r) for r in sel["rationale"]]
    last = {"bald": "topk", "cald": "cald_rerank", "huale": "weighted_l2", "ppal": "ccms"}[strategy]
    assert all(last in r for r in rat)
    if strategy == "huale":  # the variance head feeds the LC metric
        assert "huale_lc" not in rat[0]["weighted_l2"]["dropped"]


def test_class_quality_reaches_dcus(trained):
    from poolscout.jobs.score import model_class_quality

    run, _, _ = trained
    q = model_class_quality(run.model_path(0))
    assert q is not None and q.shape == (run.num_classes(),)
    assert (q >= 0).all() and (q <= 1).all() and q.max() > 0


@pytest.mark.parametrize("strategy", ["maxherding", "uncertainty_herding"])
def test_herding_through_the_jobs(trained, strategy):
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    cfg = run.config(files, [*overrides, f"select.strategy={strategy}"])
    score(run, cfg, progress=False, executor="local")
    res = select(run, cfg, budget=3)
    assert res["selected"] == 3
    sel = io.read_table(run.selection_path(0)).to_pydict()
    assert set(sel["image_id"]) <= set(run.ids_in_state("pool").tolist()) and len(set(sel["image_id"])) == 3
    rat = [json.loads(r)["maxherding"] for r in sel["rationale"]]
    assert [r["rank"] for r in rat] == [1, 2, 3] and rat[0]["path"] == "dense"
    assert rat[0]["gain"] >= rat[1]["gain"] >= rat[2]["gain"] > 0  # submodular: gains shrink
    assert ("weighted_by" in rat[0]) == (strategy == "uncertainty_herding")


def test_typiclust_through_the_jobs(trained):
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    cfg = run.config(files, [*overrides, "select.strategy=typiclust"])
    score(run, cfg, progress=False, executor="local")
    assert select(run, cfg, budget=3)["selected"] == 3
    sel = io.read_table(run.selection_path(0)).to_pydict()
    assert len(set(sel["image_id"])) == 3 and set(sel["image_id"]) <= set(run.ids_in_state("pool").tolist())
    assert [json.loads(r)["typiclust"]["rank"] for r in sel["rationale"]] == [1, 2, 3]


@pytest.mark.parametrize("strategy,key", [("probcover", "probcover"), ("cluster_margin", "cluster_margin"),
                                          ("badge", "badge")])
def test_coverage_and_gradient_strategies_through_the_jobs(trained, strategy, key):
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    cfg = run.config(files, [*overrides, f"select.strategy={strategy}"])
    score(run, cfg, progress=False, executor="local")
    assert select(run, cfg, budget=3)["selected"] == 3
    sel = io.read_table(run.selection_path(0)).to_pydict()
    assert len(set(sel["image_id"])) == 3 and set(sel["image_id"]) <= set(run.ids_in_state("pool").tolist())
    assert [json.loads(r)[key]["rank"] for r in sel["rationale"]] == [1, 2, 3]


def test_batch_queries_of_a_scored_cycle(trained, tmp_path):
    """Many (strategy, budget, filter) questions from one load: equal to `select`, filters
    respected, answers saved by name beside the cycle, selection.parquet untouched."""
    import pyarrow.compute as pc
    from click.testing import CliRunner

    from poolscout.engine.models import predictions as P
    from poolscout.jobs.cli import cli
    from poolscout.jobs.query import QuerySession, read_batch
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    cfg = run.config(files, [*overrides, "select.strategy=entropy"])
    score(run, cfg, progress=False, executor="local")
    s = QuerySession(run, cfg)
    # the derived filter columns agree with the stored predictions
    fields = s.image_fields()
    preds = P.from_arrow(pads.dataset(str(run.predictions_dir(0)), format="parquet").to_table(
        filter=pc.field("state") == "pool"), views=["orig"], fields=["scores", "labels"])
    names = [c["name"] for c in run.read_categories()]
    for row in range(len(preds["image_id"])):
        a, b = preds["offsets"][row], preds["offsets"][row + 1]
        i = int(np.flatnonzero(fields["image_id"].to_numpy() == preds["image_id"][row])[0])
        if b == a:
            assert fields["class"][i].as_py() == "" and np.isnan(fields["score_max"][i].as_py())
        else:
            top = a + int(np.argmax(preds["scores"][a:b]))
            assert fields["score_max"][i].as_py() == pytest.approx(float(preds["scores"][top]))
            assert fields["class"][i].as_py() == names[int(preds["labels"][top]) - 1]
    # equal to select, for a scalar, a coverage and a box strategy
    for strat in ("entropy", "maxherding", "badge"):
        t, summ = s.ask(strat, 4)
        select(run, run.config(files, [*overrides, f"select.strategy={strat}"]), budget=4)
        assert t["image_id"].to_pylist() == io.read_table(run.selection_path(0))["image_id"].to_pylist()
        assert summ["candidates"] == len(run.ids_in_state("pool"))
    # a filter keeps only matching candidates
    cls = fields["class"].to_pylist()
    common = max(set(c for c in cls if c), key=cls.count)
    t, summ = s.ask("entropy", 3, where=f"class == '{common}' and num_boxes >= 1")
    allowed = set(fields.filter(pc.equal(fields["class"], common))["image_id"].to_pylist())
    assert summ["candidates"] == len(allowed) and set(t["image_id"].to_pylist()) <= allowed
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        s.ask("entropy", 3, where="colour == 'red'")
    with pytest.raises(ValueError, match="class == 1"):  # a type mismatch: one line, no traceback
        s.ask("entropy", 3, where="class == 1")
    # images without detections (score_max missing) match no comparison, a negated one neither
    detected = int(pc.sum(pc.greater(fields["num_boxes"], 0)).as_py())
    assert len(s.candidates("score_max != -1")) == len(s.candidates("not (score_max < -1)")) == detected
    # a batch file through the CLI: saved beside the cycle, selection.parquet untouched
    before = run.selection_path(0).read_bytes()
    batch = tmp_path / "q.yaml"
    batch.write_text("- {strategy: entropy, budget: 2}\n"
                     f"- {{strategy: uncertainty_herding, budget: 3, where: \"class != '{common}'\", name: others}}\n"
                     "- {strategy: typiclust, budget: 2}\n")
    assert [q["name"] for q in read_batch(batch)] == ["entropy_b2", "others", "typiclust_b2"]
    cfg_args = [a for f in files for a in ("--config", str(f))] + [a for o in overrides for a in ("--set", o)]
    res = CliRunner().invoke(cli, ["query", str(run.root), "--batch", str(batch), "--quiet", *cfg_args])
    assert res.exit_code == 0, res.output
    assert "3 queries in" in res.output and "others: uncertainty_herding picked 3" in res.output
    qdir = run.cycle_dir(0) / "queries"
    assert sorted(p.name for p in qdir.glob("*.parquet")) == ["entropy_b2.parquet", "others.parquet",
                                                              "typiclust_b2.parquet"]
    others = io.read_table(qdir / "others.parquet")["image_id"].to_pylist()
    assert not set(others) & allowed
    assert json.loads((qdir / "others.json").read_text())["where"] == f"class != '{common}'"
    assert run.selection_path(0).read_bytes() == before
    # bad batch files name the entry and the key
    batch.write_text("- {strategy: entropy, budget: 0}\n")
    res = CliRunner().invoke(cli, ["query", str(run.root), "--batch", str(batch), *cfg_args])
    assert res.exit_code == 2 and "queries[0].budget" in res.output


def test_select_on_backbone_embeddings_with_quotas_and_a_random_share(trained):
    """select.embedding: backbone embeds the pool first (cached), then coverage runs on it;
    the stage options change the pick as they say."""
    from poolscout.jobs.embed import cache_dir
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    ov = [*overrides, "select.strategy=maxherding", "select.embedding=backbone", "embed.input_size=64"]
    cfg = run.config(files, ov)
    score(run, cfg, progress=False, executor="local")
    res = select(run, cfg, budget=4)
    assert res["selected"] == 4 and res["embedding"] == "backbone"
    assert any(cache_dir(run).glob("part-*.parquet"))
    cfg = run.config(files, [*ov, "select.quota=uniform", "select.mix_random=0.25"])
    res = select(run, cfg, budget=4)
    rat = [json.loads(r) for r in io.read_table(run.selection_path(0))["rationale"].to_pylist()]
    assert res["quota"] == "uniform" and sum("mix_random" in r for r in rat) == 1
    assert all("quota" in r for r in rat[:3]) and "mix_random" in rat[3]


def test_box_store_reads_the_same_rows_as_the_parquet_scan(trained, tmp_path):
    """The memory-mapped box store beside the prediction parts gives exactly what a
    filtered Parquet scan gives, in the asked order, for all fields or a few."""
    import shutil

    from poolscout.jobs.score import score
    from poolscout.jobs.select import boxes_loader

    run, files, overrides = trained
    score(run, run.config(files, [*overrides, "select.strategy=entropy"]), progress=False, executor="local")
    d = run.predictions_dir(0)
    stores = sorted(d.glob("_boxes.part-*.arrow"))
    assert stores and len(stores) == len(list(d.glob("part-*.parquet")))
    pool = np.sort(run.ids_in_state("pool"))
    ask = np.random.default_rng(0).permutation(pool)[: max(3, len(pool) // 2)]
    fast = boxes_loader(run, 0)(ask)
    fast_probs = boxes_loader(run, 0, ("probs",))(ask)
    saved = tmp_path / "stores"
    saved.mkdir()
    for p in stores:
        shutil.move(str(p), saved / p.name)
    try:
        slow = boxes_loader(run, 0)(ask)
    finally:
        for p in saved.iterdir():
            shutil.move(str(p), d / p.name)
    assert set(fast) == set(slow) and "roi_embedding" in fast
    for key in slow:
        np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)
    assert np.array_equal(fast["image_id"], ask)
    assert "roi_embedding" not in fast_probs and np.array_equal(fast_probs["probs"], slow["probs"])
    with pytest.raises(Exception, match="expected one prediction row"):
        boxes_loader(run, 0)(np.array([10**9]))


GSAL_TINY = ["gsal.resolution=16", "gsal.seeds=2", "gsal.steps=2", "gsal.train_batch_size=4",
             "gsal.checkpoint_every=2", "gsal.batch_size=8"]


def test_gsal_trains_a_diffusion_model_scores_and_selects(trained):
    """diffusion train (resumed) -> score with the diffusion stage -> gsal and its ablations."""
    from poolscout.jobs.diffusion import train_diffusion
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select

    run, files, overrides = trained
    ov = [*overrides, *GSAL_TINY, "select.strategy=gsal", "score.signals=[entropy:max,gsal_d:max,gsal_v:mean,"
                                                            "gsal_g:max,gsal_g_image]"]
    cfg = run.config(files, ov)
    with pytest.raises(Exception, match="diffusion train"):  # no model yet: says how to get one
        score(run, cfg, progress=False, executor="local")
    s1 = train_diffusion(run, cfg, steps=2, progress=False, executor="local", log=lambda m: None)
    s2 = train_diffusion(run, cfg, steps=4, progress=False, executor="local", log=lambda m: None)
    assert s1["steps"] == 2 and s2["steps"] == 4 and s2["trained_steps"] == 2  # resumed, not restarted
    assert (run.root / "diffusion" / "model" / "config.json").is_file()
    summary = score(run, cfg, progress=False, executor="local")
    assert {"gsal_d_max", "gsal_v_mean", "gsal_g_max", "gsal_g_image"} <= set(summary["signals"])
    sc = io.read_table(run.scores_path(0)).to_pydict()
    # gsal_g is z-scored over the pool when scoring ends: the image values centre on 0
    gi = np.asarray(sc["gsal_g_image"])
    assert np.isfinite(gi).all() and abs(gi.mean()) < 1e-6
    # the stored per-box D_b / V_b equal the pooling of maps recomputed here for one image
    t = pads.dataset(str(run.predictions_dir(0))).to_table(
        columns=["image_id", "state", "num_boxes", "gsal_d", "gsal_v", "gsal_d_image"]).to_pylist()
    row = next(r for r in t if r["state"] == "pool" and r["num_boxes"] > 0)
    assert len(row["gsal_d"]) == row["num_boxes"] and np.isfinite(row["gsal_d_image"])
    assert select(run, cfg, budget=3)["selected"] == 3
    sel = io.read_table(run.selection_path(0)).to_pydict()
    rat = [json.loads(r)["gsal"] for r in sel["rationale"]]
    assert [r["rank"] for r in rat] == [1, 2, 3]
    assert all(r["dominant"] in ("difficulty", "coverage", "none") for r in rat)
    assert any(r["path"] is not None and len(r["path"]) == 3 for r in rat)
    # dataset.use_supercategories=false hides the annotations' super-categories from selectors
    from poolscout.jobs.query import QuerySession

    seen = QuerySession(run, cfg)._categories()
    hidden = QuerySession(run, run.config(files, [*ov, "dataset.use_supercategories=false"]))._categories()
    assert all(c.get("supercategory") for c in seen)
    assert [c["name"] for c in hidden] == [c["name"] for c in seen] and not any("supercategory" in c for c in hidden)
    for name in ("gsal_difficulty", "gsal_coverage"):
        c2 = run.config(files, [*ov, f"select.strategy={name}"])
        score(run, c2, progress=False, executor="local")  # same model, same signals: kept
        assert select(run, c2, budget=2)["selected"] == 2
    # the maps are cached per (model, settings): a forced rescoring reads them, computes none
    maps_dir = next((run.root / "diffusion" / "maps").iterdir())
    parts = sorted(maps_dir.glob("part-*.arrow"))
    before = io.read_table(run.scores_path(0)).to_pydict()
    score(run, cfg, progress=False, executor="local", force=True)
    assert sorted(maps_dir.glob("part-*.arrow")) == parts
    after = io.read_table(run.scores_path(0)).to_pydict()
    for col in ("gsal_d_max", "gsal_v_mean", "gsal_g_max", "gsal_g_image"):
        np.testing.assert_array_equal(after[col], before[col])
    # the same models: kept; another diffusion model (trained on): scored again
    assert score(run, cfg, progress=False, executor="local").get("skipped") is True
    train_diffusion(run, cfg, steps=6, progress=False, executor="local", log=lambda m: None)
    # warm_maps fills the new model's cache for every pool and labeled image, once ...
    from poolscout.jobs.score import warm_maps

    w = warm_maps(run, cfg, progress=False)
    n_images = len(run.ids_in_state("pool")) + len(run.ids_in_state("labeled"))
    assert w["images"] == w["computed"] == n_images
    assert warm_maps(run, cfg, progress=False)["computed"] == 0
    warmed = sorted(Path(w["cache"]).glob("part-*.arrow"))
    # ... so that scoring with the new model computes no map of its own
    assert not score(run, cfg, progress=False, executor="local").get("skipped")
    assert len(list((run.root / "diffusion" / "maps").iterdir())) == 2  # a new cache for the new model
    assert sorted(Path(w["cache"]).glob("part-*.arrow")) == warmed
