"""`poolscout cycle`: train -> score -> select -> export for the current cycle."""
from __future__ import annotations

import time
from typing import Callable

from poolscout.engine.core import io
from poolscout.engine.core.config import Config
from poolscout.engine.core.run import RunDir


def run_cycle(run: RunDir, cfg: Config, *, strategy: str | None = None, budget: int | None = None,
              fmt: str = "all", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    from poolscout.jobs.export import export
    from poolscout.jobs.score import score
    from poolscout.jobs.select import select
    from poolscout.jobs.train import train

    run.require()
    k = run.current_cycle()
    if strategy is not None:  # scoring warms the caches of the strategy this cycle selects with
        import dataclasses

        cfg = cfg.replace(select=dataclasses.replace(cfg.select, strategy=strategy))
    timings: dict[str, float] = {}
    out: dict = {"cycle": k}
    for name, fn in (
        ("train", lambda: train(run, cfg, cycle=k, progress=progress)),
        ("score", lambda: score(run, cfg, cycle=k, progress=progress)),
        ("select", lambda: select(run, cfg, strategy=strategy, budget=budget, cycle=k)),
        ("export", lambda: export(run, cfg, fmt=fmt, cycle=k)),
    ):
        log(f"[cycle {k}] {name} ...")
        t0 = time.time()
        res = fn()
        timings[name] = round(time.time() - t0, 2)
        log(f"[cycle {k}] {name} done in {timings[name]:.1f} s")
        out[name] = {kk: v for kk, v in res.items() if kk != "history"}
    out["timings_s"] = timings
    io.atomic_write_json(run.cycle_dir(k) / "cycle.json", out)
    return out
