"""`poolscout demo`: a synthetic defect pool, one loop per strategy on the embedded Ray, a report.

Sized for a 2-core laptop without a GPU: 200 images of 128 px, a 20-image seed set,
4 rounds of 20, the EfficientNet-Lite0 Faster R-CNN preset of configs/demo.yaml.
Rerunning it resumes (or skips) what is already there.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from poolscout.engine.core.config import configs_dir, load_config
from poolscout.engine.core.run import RunDir


def run_demo(out: Path, *, n_images: int = 200, size: int = 128, cycles: int = 4, budget: int = 20,
             seed_size: int = 20, strategies: list[str] = ("random", "entropy"), seed: int = 0,
             test_fraction: float = 0.25, configs: list = (), overrides: list = (), address: str | None = None,
             executor: str = "ray", progress: bool = True, log: Callable[[str], None] = print) -> Path:
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.evaluation.report import write_report
    from poolscout.engine.acquisition.strategies import load_strategy
    from poolscout.engine.data.synthetic import generate
    from poolscout.jobs.loop import loop_config, run_loop

    if not strategies:
        raise ValueError("--strategies: give at least one strategy")
    for s in strategies:
        load_strategy(s)  # unknown names fail before any work
    n_test = int(round(n_images * test_fraction))
    if n_images - n_test < seed_size + cycles * budget:
        raise ValueError(f"the pool ({n_images} images, {n_test} for test) is too small for a seed set of "
                         f"{seed_size} and {cycles} rounds of {budget}")
    out = Path(out)
    t0 = time.time()
    log(f"[demo] synthetic pool: {n_images} images of {size} px -> {out / 'pool'}")
    # One rare class ("pit", a quarter of the others' weight) makes the acquisition
    # diagnostics (rare-class retrieval) worth reading.
    pool = generate(out / "pool", n_images=n_images, size=size, seed=seed, class_weights={"pit": 0.25})
    names = sorted(p.name for p in Path(pool["images"]).iterdir())
    test_file = out / "pool" / "test_ids.txt"
    test_file.write_text("".join(f"{n}\n" for n in names[len(names) - n_test:]))
    cfg_files = [configs_dir() / "demo.yaml", *configs]
    runs = []
    for strat in strategies:
        run = RunDir(out / "runs" / strat)
        ov = [*overrides, f"seed={seed}", f"select.strategy={strat}", f"select.budget={budget}",
              f"loop.cycles={cycles}", f"loop.seed_size={seed_size}", f"loop.executor={executor}"]
        if address:
            ov.append(f"ray.address={address}")
        if not run.exists():
            init_run(run, images=pool["images"], annotations=pool["annotations"], test=test_file,
                     cfg=load_config(cfg_files, ov))
        cfg = loop_config(run, [], []) if (run.root / "loop.json").is_file() else run.config(cfg_files, ov)
        log(f"[demo] {strat}: {cycles} rounds of {budget} images on top of a seed set of {seed_size}")
        state = run_loop(run, cfg, progress=progress, log=log)
        if state["status"] != "done":
            raise RuntimeError(f"{run.root}: the loop stopped with status {state['status']}")
        runs.append(run.root)
    index = write_report(runs, out / "report", progress=progress)
    log(f"[demo] finished in {time.time() - t0:.0f} s; open {index}")
    return index
