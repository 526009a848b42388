"""Backbone embeddings (ImageNet EfficientNet-Lite0, no training): cached per run and
incremental, the same through Ray Data and locally, a cold start by coverage on them, and
the stage options (class quotas, a random share) any strategy can use."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_loop import _init

FAST = ["embed.input_size=64", "embed.batch_size=8"]


def test_embeddings_are_cached_incremental_and_unit_norm(tmp_path, tiny_pool, torch_threads):
    from poolscout.jobs.embed import cache_dir, cached_ids, embed_backbone, load_backbone

    run = _init(tmp_path, tiny_pool, "e", FAST)
    cfg = run.config()
    pool = np.sort(run.ids_in_state("pool"))
    first = embed_backbone(run, cfg, states=("pool",), progress=False)
    assert first["embedded"] == len(pool) and first["failed"] == 0 and first["dtype"] == "float16"
    emb = load_backbone(run, pool[::-1])
    assert emb.shape == (len(pool), 1280) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    assert np.array_equal(load_backbone(run, pool[::-1][:3]), emb[:3])  # any order, any subset
    # the same images again: nothing to do; the labeled ones: only those
    assert embed_backbone(run, cfg, states=("pool",), progress=False)["embedded"] == 0
    n_parts = len(list(cache_dir(run).glob("part-*.parquet")))
    test_ids = run.ids_in_state("test")
    again = embed_backbone(run, cfg, states=("pool", "test"), progress=False)
    assert again["embedded"] == len(test_ids) and again["cached"] == len(pool)
    assert len(list(cache_dir(run).glob("part-*.parquet"))) > n_parts
    assert set(cached_ids(run).tolist()) == set(pool.tolist()) | set(test_ids.tolist())
    # float32 vectors: other settings start the cache over, and agree with float16 to its precision
    cfg32 = run.config([], ["embed.dtype=float32"])
    assert embed_backbone(run, cfg32, states=("pool",), progress=False)["embedded"] == len(pool)
    e32 = load_backbone(run, pool[::-1])
    np.testing.assert_allclose(e32, emb, atol=2e-3)
    assert json.loads((cache_dir(run) / "embed.json").read_text())["dtype"] == "float32"
    from poolscout.engine.core.run import RunError

    with pytest.raises(RunError, match="no backbone embedding for 1 of 1 images"):
        load_backbone(run, np.array([10**9]))


@pytest.mark.ray
def test_ray_data_stream_matches_the_local_path(tmp_path, tiny_pool, ray_session, torch_threads):
    from poolscout.jobs.embed import embed_backbone, load_backbone

    a = _init(tmp_path, tiny_pool, "local", FAST)
    b = _init(tmp_path, tiny_pool, "ray", FAST)
    pool = np.sort(a.ids_in_state("pool"))
    embed_backbone(a, a.config(), states=("pool",), executor="local", progress=False)
    res = embed_backbone(b, b.config(), states=("pool",), executor="ray", progress=False)
    assert res["embedded"] == len(pool) and res["failed"] == 0
    np.testing.assert_allclose(load_backbone(b, pool), load_backbone(a, pool), atol=1e-3)


@pytest.mark.parametrize("how", ["maxherding", "typiclust", "kcenter"])
def test_cold_start_seed_by_coverage_on_backbone_embeddings(tmp_path, tiny_pool, torch_threads, how):
    from poolscout.jobs.loop import seed_set

    picks = []
    for name in ("a", "b"):
        run = _init(tmp_path, tiny_pool, f"{how}_{name}", [*FAST, f"loop.seed_strategy={how}"])
        res = seed_set(run, run.config(), progress=False)
        assert res["method"] == how and res["images"] == 6 and res["embedding"] == "backbone"
        assert json.loads((run.root / "seed.json").read_text())["embedding_dim"] == 1280
        picks.append(np.sort(run.ids_in_state("labeled")))
    assert np.array_equal(picks[0], picks[1]) and len(np.unique(picks[0])) == 6


def _strategy(text: str):
    import yaml

    from poolscout.engine.acquisition.strategies import parse_strategy

    return parse_strategy(yaml.safe_load(text), "test", default_name="t")


def test_uniform_class_quotas_give_rare_classes_a_floor():
    from poolscout.engine.acquisition.selectors import SelectContext
    from poolscout.jobs.query import pick

    # 12 candidates: 8 "common", 3 "rare", 1 "" (no detection); entropy favours common ones
    ids = np.arange(100, 112)
    ent = np.array([9, 8, 7, 6, 5, 4, 3, 2, 0.3, 0.2, 0.1, 10.0])
    cls = np.array(["common"] * 8 + ["rare"] * 3 + [""], dtype=object)
    table = {"image_id": ids, "entropy_max": ent}
    st = _strategy("stages: [{selector: topk, by: 'entropy:max'}]")
    plain = pick(st, table, 4, ctx=SelectContext())
    assert plain.image_id.tolist() == [111, 100, 101, 102]  # no rare image at all
    q = pick(st, table, 4, ctx=SelectContext(), quota="uniform", classes=cls)
    # budget 4 over 2 classes: 2 each, the rarest class first, by entropy within it
    assert q.image_id.tolist() == [108, 109, 100, 101]
    assert [r["quota"]["class"] for r in q.rationale] == ["rare", "rare", "common", "common"]
    # a class with fewer candidates than its quota gives them all; the leftover goes to the rest
    q = pick(st, table, 9, ctx=SelectContext(), quota="uniform", classes=cls)
    assert q.image_id.tolist()[:3] == [108, 109, 110] and len(set(q.image_id.tolist())) == 9
    assert q.rationale[-1]["quota"] == {"class": None, "leftover": True}
    assert 111 in q.image_id.tolist()  # the no-detection image competes in the leftover
    with pytest.raises(ValueError, match="predicted class"):
        pick(st, table, 4, ctx=SelectContext(), quota="uniform")


def test_mix_random_draws_a_share_from_what_the_strategy_left():
    from poolscout.engine.acquisition.selectors import SelectContext
    from poolscout.jobs.query import pick

    ids = np.arange(50)
    table = {"image_id": ids, "entropy_max": ids.astype(float)}
    st = _strategy("stages: [{selector: topk, by: 'entropy:max'}]")
    a = pick(st, table, 10, ctx=SelectContext(rng=np.random.default_rng(3)), mix_random=0.3)
    b = pick(st, table, 10, ctx=SelectContext(rng=np.random.default_rng(3)), mix_random=0.3)
    assert a.image_id.tolist() == b.image_id.tolist()
    assert a.image_id.tolist()[:7] == [49, 48, 47, 46, 45, 44, 43]  # the strategy's 7 first
    rand = a.image_id[7:]
    assert len(set(rand.tolist())) == 3 and rand.max() < 43 and np.isnan(a.score[7:]).all()
    assert a.rationale[7]["mix_random"] == {"draw": 1, "of": 3, "share": 0.3}
    other = pick(st, table, 10, ctx=SelectContext(rng=np.random.default_rng(4)), mix_random=0.3)
    assert other.image_id.tolist()[:7] == a.image_id.tolist()[:7]
