"""`poolscout cycle`: train -> score -> select -> export for the current cycle."""
from __future__ import annotations

import time
from typing import Callable

from engine import io
from engine.config import Config
from engine.run import RunDir


def run_cycle(run: RunDir, cfg: Config, *, strategy: str | None = None, budget: int | None = None,
              fmt: str = "all", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    from jobs.export import export
    from jobs.score import score
    from jobs.select import select
    from jobs.train import train

    run.require()
    k = run.current_cycle()
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


if __name__ == "__main__":  # python -m jobs.cycle RUN_DIR [options] (also under `ray job submit`)
    import sys

    from jobs.cli import main

    main(["cycle", *sys.argv[1:]])
