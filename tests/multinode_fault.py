"""A node lost mid-scoring, on a two-node local Ray cluster (ray.cluster_utils.Cluster).

Run by tests/test_chaos.py in a subprocess (a process joins one Ray cluster; the test
session's own Ray stays apart): `python tests/multinode_fault.py WORKDIR` prints one JSON
line starting with RESULT: what the test checks. The head holds 1 CPU, the worker node 2; the pool is scored
once undisturbed, then again with the worker node removed as soon as the first part is
written; both scorings are followed by the same selection.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def main(workdir: str) -> None:
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from poolscout.engine.core import io
    from poolscout.engine.core.config import load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select
    from poolscout.jobs.train import train
    from tests.conftest import TINY_SETTINGS

    root = Path(workdir)
    pool = generate(root / "pool", n_images=96, size=64, seed=13)
    ov = [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig]",
          "score.batch_size=4", "score.decode_batch_size=4", "score.num_cpus=0.5", "score.concurrency=2",
          "select.strategy=entropy"]
    cfg = load_config([], ov)
    run = RunDir(root / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.1, cfg=cfg, progress=False)
    train(run, cfg, progress=False, executor="local")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        score(run, cfg, progress=False, executor="ray")
        ref_scores = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
        select(run, cfg, budget=8)
        ref_sel = io.read_table(run.selection_path(0)).to_pydict()

        removed = {}

        def remove_when_started():
            t0 = time.time()
            while time.time() - t0 < 300:
                parts = list(run.cycle_dir(0).glob(".predictions.partial-*/part-*.parquet"))
                if parts:
                    removed["parts_then"] = len(parts)
                    cluster.remove_node(worker)
                    removed["at"] = round(time.time() - t0, 2)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=remove_when_started, daemon=True)
        t.start()
        score(run, cfg, progress=False, executor="ray", force=True)
        t.join()
        alive = [n for n in ray.nodes() if n["Alive"]]
        got = io.read_table(run.scores_path(0)).sort_by("image_id").to_pydict()
        select(run, cfg, budget=8)
        sel = io.read_table(run.selection_path(0)).to_pydict()
        n_pool = len(run.ids_in_state("pool"))
        same_scores = got["image_id"] == ref_scores["image_id"] and all(
            np.allclose(np.asarray(got[c], float), np.asarray(v, float), rtol=1e-5, atol=1e-6, equal_nan=True)
            for c, v in ref_scores.items() if c != "image_id")
        print("RESULT " + json.dumps({
            "removed": removed, "alive_nodes": len(alive), "pool": n_pool, "scored": len(got["image_id"]),
            "unique": len(set(got["image_id"])), "same_scores": bool(same_scores),
            "same_selection": sel["image_id"] == ref_sel["image_id"]}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1])
