"""Compare strategies on one pool: one active-learning loop per (strategy, seed), run as Ray
tasks (local executor inside each), with each seed's cycle 0 computed once and shared.

Loops of one seed whose settings differ only in select.strategy start from the same seed
set and train the identical cycle-0 detector; the first one runs cycle 0 (seed set, train,
evaluate) and the others start from a copy of it. (A variant that trains differently, e.g.
with dropout, is its own group.) The demo and benchmarks/label_efficiency.py use this.

The driver holds no pool data: it submits tasks, polls the run directories for finished
evaluations (one progress bar over all loops) and returns each loop's final state.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from poolscout.engine.core.run import RunDir

# What cycle 0 leaves that another strategy of the same seed can reuse as is.
_SHARED_ROOT = ("run.yaml", "manifest.parquet", "annotations.parquet", "categories.json", "ledger.parquet",
                "rejects.parquet", "seed.json", "oracle.parquet")
_SHARED_CYCLE0 = ("model.pt", "eval.json", "train.json", "timings.json")


def _rewind_ledger(path: Path) -> None:
    """The ledger as cycle 0 left it: images labeled later (ledger cycle > 0, the answers to
    cycle 0's selection and after) go back to the pool. A loop that has run on (a resumed
    benchmark whose first run of a group finished first) must not hand its later labels to
    the loops that share its cycle 0."""
    import numpy as np
    import pyarrow as pa

    from poolscout.engine.core import io

    led = io.read_table(path)
    later = np.asarray(pa.compute.and_(pa.compute.equal(led["state"], "labeled"),
                                       pa.compute.greater(led["cycle"], 0)).to_numpy(zero_copy_only=False), bool)
    if not later.any():
        return
    cols = led.to_pydict()
    for i in np.flatnonzero(later):
        cols["state"][i], cols["cycle"][i], cols["selected_by"][i] = "pool", -1, ""
    io.write_table(pa.table(cols, schema=led.schema), path, led.schema)


def share_cycle0(src: RunDir, dst: RunDir) -> bool:
    """Copy src's pool tables, seed set and cycle-0 model + evaluation into a fresh dst
    (its ledger rewound to cycle 0's, should src have run on).

    Returns False (and copies nothing) when dst already exists or src has no evaluated
    cycle 0. loop.json is not copied: dst's loop pins its own strategy.
    """
    if dst.exists() or not (src.cycle_dir(0) / "eval.json").is_file():
        return False
    tmp = dst.root.with_name(f".{dst.root.name}.sharing")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cycles" / "0").mkdir(parents=True)
    for name in _SHARED_ROOT:
        if (src.root / name).is_file():
            shutil.copy2(src.root / name, tmp / name)
    _rewind_ledger(tmp / "ledger.parquet")
    for name in _SHARED_CYCLE0:
        if (src.cycle_dir(0) / name).is_file():
            shutil.copy2(src.cycle_dir(0) / name, tmp / "cycles" / "0" / name)
    tmp.rename(dst.root)  # all or nothing
    return True


def loop_task(run_dir: str, config_files: Sequence[str], overrides: Sequence[str], cycles: int,
              threads: int = 1) -> dict:
    """Run (or resume) one loop to `cycles` in this process (a Ray task); returns its state."""
    import torch

    from poolscout.jobs.loop import loop_config, run_loop

    if threads:
        torch.set_num_threads(threads)
    run = RunDir(Path(run_dir))
    ov = [*overrides, f"loop.cycles={cycles}", "loop.executor=local"]
    if threads:
        ov += [f"train.torch_threads={threads}", f"score.torch_threads={threads}"]
    if (run.root / "loop.json").is_file():
        cfg = loop_config(run, [], [f"loop.cycles={cycles}"])
    else:
        cfg = run.config(list(config_files), ov)
    t0 = time.time()
    with open(run.root / "loop.log", "a", encoding="utf-8") as logf:
        state = run_loop(run, cfg, progress=False, log=lambda m: (logf.write(m + "\n"), logf.flush()))
    return {"run": str(run.root), "status": state.get("status"), "seconds": round(time.time() - t0, 1)}


class LongestFirst:
    """The driver's queue of loop tasks: Ray gets one task per free slot, the longest first.

    Handing Ray every task at once lets it start them in submission order; with 4 loops on
    2 slots the two long ones could end up in sequence, the last running alone on a
    half-idle machine. Ranks (see `loop_rank`): cycle-0 jobs first (other loops wait on
    them), then loops that score the pool, then model-free ones (random); FIFO within a rank.
    """

    def __init__(self, slots: float):
        self.slots = slots
        self._heap: list = []
        self._n = 0

    def add(self, item, rank: int) -> None:
        import heapq

        heapq.heappush(self._heap, (rank, self._n, item))
        self._n += 1

    def take(self, running: int) -> list:
        """The items to start now, given how many tasks are running."""
        import heapq

        out = []
        while self._heap and running + len(out) < self.slots:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def __len__(self) -> int:
        return len(self._heap)


def loop_rank(phase: str, strategy: str) -> int:
    """0 for a cycle-0 job, 1 for a loop that scores the pool, 2 for a model-free loop."""
    return 0 if phase == "cycle0" else (1 if _scores_pool(strategy) else 2)


def _scores_pool(strategy: str) -> bool:
    """Whether a loop of this strategy scores the pool each cycle (the longer loops)."""
    from poolscout.engine.acquisition.strategies import load_strategy

    try:
        return load_strategy(strategy).needs.model
    except ValueError:
        return True  # the loop itself reports the bad strategy


def cluster_slots(cpus_per_run: float, gpus_per_run: float) -> float:
    """How many loop tasks the connected Ray cluster runs at once."""
    import ray

    total = ray.cluster_resources()
    n = total.get("CPU", 1) / cpus_per_run if cpus_per_run > 0 else float("inf")
    if gpus_per_run > 0:
        n = min(n, total.get("GPU", 0) / gpus_per_run)
    return max(1.0, n)  # inf: nothing limits it


def _new_evaluations(runs: dict, seen: set) -> list[tuple[tuple[str, int], int, dict]]:
    """(key, cycle, eval.json + labeled count) of evaluations that appeared since the last call."""
    import json

    out = []
    for key, run in runs.items():
        for path in sorted(run.root.glob("cycles/*/eval.json"), key=lambda q: int(q.parent.name)):
            if (key, path) in seen:
                continue
            try:
                ev = json.loads(path.read_text())
                tr = json.loads((path.parent / "train.json").read_text()) if (path.parent / "train.json").is_file() \
                    else {}
            except (OSError, ValueError):
                continue  # being written; next poll
            seen.add((key, path))
            out.append((key, int(path.parent.name), {**ev, "labeled": tr.get("labeled")}))
    return out


def compare(runs: dict[tuple[str, int], RunDir], *, config_files: Sequence[str], overrides: dict[tuple[str, int], list],
            cycles: int, cpus_per_run: float = 1, gpus_per_run: float = 0, threads: int = 1,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[tuple[str, int], dict]:
    """Run every (strategy, seed) loop to `cycles`, sharing each seed's cycle 0.

    Args:
        runs: (strategy, seed) -> an initialised run directory (only the first strategy of
            each seed needs to exist; the others are made from its cycle 0).
        config_files / overrides: settings of each loop (overrides per (strategy, seed)).
        cpus_per_run / gpus_per_run: what each loop task reserves; Ray runs as many at once
            as the cluster holds.

    Returns:
        (strategy, seed) -> {"run", "status", "seconds"}.
    """
    import ray

    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(loop_task)
    groups: dict[tuple, list[tuple[str, int]]] = {}  # loops with an identical cycle 0
    for key in runs:
        same = tuple(sorted(o for o in overrides[key] if not str(o).startswith("select.strategy=")))
        groups.setdefault((key[1], same), []).append(key)
    group_of = {key: g for g, keys in groups.items() for key in keys}
    pending: dict = {}
    results: dict[tuple[str, int], dict] = {}
    queue = LongestFirst(cluster_slots(cpus_per_run, gpus_per_run))

    def submit(key, n_cycles, phase):
        queue.add((key, n_cycles, phase), loop_rank(phase, key[0]))

    def pump():
        for key, n_cycles, phase in queue.take(len(pending)):
            ref = task.remote(str(runs[key].root), list(config_files), list(overrides[key]), n_cycles, threads)
            pending[ref] = (key, phase)

    for keys in groups.values():
        if len(keys) > 1 and not all(runs[k].exists() for k in keys[1:]):
            submit(keys[0], 0, "cycle0")  # cycle 0 once, then share it
        else:
            for k in keys:
                submit(k, cycles, "loop")
    total = len(runs) * (cycles + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="loops: cycles evaluated", unit="cycle", leave=False, dynamic_ncols=True)
    seen: set = set()
    shared: set = set()  # (key, cycle 0) copies: reported once, for the loop that trained it
    pump()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for key, k, ev in _new_evaluations(runs, seen):
            if bar is not None:
                bar.update(1)
                bar.clear()
            if (key, k) in shared:
                continue
            m = ev.get("map50")
            log(f"[compare] {key[0]} seed {key[1]} cycle {k}: mAP50 "
                + (f"{m:.3f}" if isinstance(m, (int, float)) else "-")
                + (f" with {ev['labeled']} labeled images" if ev.get("labeled") is not None else ""))
        for ref in done:
            key, phase = pending.pop(ref)
            res = ray.get(ref)
            strat, seed = key
            if phase == "cycle0":
                for other in groups[group_of[key]]:
                    if other != key and share_cycle0(runs[key], runs[other]):
                        shared.add((other, 0))
                    submit(other, cycles, "loop")
                continue
            results[key] = res
            if res["status"] != "done":
                log(f"[compare] {strat} seed {seed}: {res['status']} after {res['seconds']:.0f} s")
        pump()
    if bar is not None:
        bar.close()
    return results


__all__ = ["LongestFirst", "cluster_slots", "compare", "loop_rank", "loop_task", "share_cycle0"]
