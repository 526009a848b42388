"""`poolscout tune`: Ray Tune over a strategy's weights, by simulated loops on the labeled
part of a run.

The run's labeled images (they have ground truth) are split in two halves, A and B, each
with its own held-out test quarter. A search space (YAML) names the strategy parameters to
tune and their distributions. On split A, every trial is one simulated loop (a seed set,
then `cycles` rounds of `budget`, the simulated oracle revealing the truth) with its
parameters; all trials start from the same cycle-0 model (trained once, `compare.share_cycle0`).
After each round a trial reports mAP50 and the AULC of mAP50 so far; ASHA stops the poor
ones after `grace` rounds. The best trial that ran every round becomes a strategy file, and
the defaults and the best are then run on split B, which the search never saw: the verdict
compares them there.

Space file (`configs/tune/<strategy>.yaml` or any path)::

    strategy: huale                 # optional: the strategy this space belongs to
    params:                         # <path>: {<distribution>: args}
      stages.1.weights.0: {uniform: [0.0, 2.0]}
      stages.0.keep: {choice: [2, 3, 4]}
      select.mix_random: {uniform: [0.0, 0.3]}
      select.quota: {choice: [none, uniform]}

Paths `stages.<i>.<parameter>` and `stages.<i>.<parameter>.<j>` (an element of a list
parameter) set the strategy's stages; any other path is a setting (`--set` key), e.g. the
stage options every strategy has: `select.mix_random` (a random share of each batch) and
`select.quota` (class-aware budget targets). Distributions: uniform [lo, hi], loguniform
[lo, hi], randint [lo, hi) and choice [values]. Every trial's strategy and settings are
validated like a strategy file and `--set` values.

Outputs in `RUN/tune/<strategy>/` (or --out): `tune.json` (the search: every trial's
parameters and curve, where ASHA stopped it; the best; defaults and best on both splits),
`best_<strategy>.yaml` (the strategy with the best stage parameters: `--strategy PATH`) and
`best_<strategy>.settings.yaml` (the best settings: `--config PATH`), the split runs and Ray
Tune's folder.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from poolscout.engine.core import io
from poolscout.engine.core.config import Config, ConfigError
from poolscout.engine.core.run import RunDir

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
_TABLES = ("manifest.parquet", "annotations.parquet", "categories.json", "rejects.parquet", "run.yaml")


# --- the search space --------------------------------------------------------------------

def load_space(path: str | Path) -> dict:
    """Read and check a space file; returns {"strategy": str | None, "params": {path: (dist, args)}}."""
    from poolscout.engine.core.config import configs_dir, load_yaml

    p = Path(path)
    if not p.is_file() and p.suffix not in (".yaml", ".yml") and "/" not in str(path):
        p = configs_dir() / "tune" / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"tune space file not found: {path}")
    doc = load_yaml(p)  # errors name the file: bad YAML, not UTF-8, not a mapping
    if not isinstance(doc.get("params"), dict) or not doc["params"]:
        raise ConfigError(f"{p}: expected a mapping with a non-empty 'params' mapping")
    for key in doc:
        if key not in ("strategy", "params", "description"):
            raise ConfigError(f"{p}: unknown key {key!r} (known: strategy, params, description)")
    params = {}
    for name, spec in doc["params"].items():
        where = f"{p}: params.{name}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {dist!r} (known: {', '.join(DISTRIBUTIONS)})")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{dist}: expected a list")
        if dist != "choice":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    or not args[0] < args[1]:
                raise ConfigError(f"{where}.{dist}: expected [low, high] numbers with low < high, got {args!r}")
            if dist == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}.loguniform: low must be > 0, got {args[0]!r}")
        params[str(name)] = (dist, list(args))
    strategy = doc.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise ConfigError(f"{p}: strategy must be a name, got {strategy!r}")
    return {"strategy": strategy, "params": params, "path": str(p)}


def _walk(data: dict, path: str):
    """(container, key) of a dotted path in a strategy mapping."""
    parts = path.split(".")
    if len(parts) not in (3, 4) or parts[0] != "stages" or not parts[1].isdigit():
        raise ConfigError(f"tune: parameter path {path!r}: expected stages.<i>.<param> or stages.<i>.<param>.<j>")
    stages = data.get("stages") or []
    i = int(parts[1])
    if i >= len(stages):
        raise ConfigError(f"tune: parameter path {path!r}: the strategy has {len(stages)} stages")
    stage = stages[i]
    if len(parts) == 3:
        return stage, parts[2]
    if not parts[3].isdigit():
        raise ConfigError(f"tune: parameter path {path!r}: the last part must be a list index")
    lst = stage.get(parts[2])
    if not isinstance(lst, list):
        raise ConfigError(f"tune: parameter path {path!r}: stages[{i}].{parts[2]} is not a list in the strategy "
                          "(write its default list into the strategy file first)")
    j = int(parts[3])
    if j >= len(lst):
        raise ConfigError(f"tune: parameter path {path!r}: stages[{i}].{parts[2]} has {len(lst)} elements")
    return lst, j


def is_setting(path: str) -> bool:
    """Whether a space path is a setting (a `--set` key) rather than a strategy stage parameter."""
    return not path.startswith("stages.")


def apply_params(strategy_data: dict, params: dict[str, Any]) -> dict:
    """A copy of a strategy mapping with the stage parameters set (validated as a strategy);
    settings (`is_setting`) are left to `setting_overrides`."""
    from poolscout.engine.acquisition.strategies import parse_strategy

    out = copy.deepcopy(strategy_data)
    for path, value in params.items():
        if is_setting(path):
            continue
        holder, key = _walk(out, path)
        if isinstance(value, np.generic):
            value = value.item()
        holder[key] = value
    parse_strategy(out, "tuned strategy")  # raises ConfigError naming the parameter
    return out


def setting_overrides(params: dict[str, Any]) -> list[str]:
    """`key=value` overrides of the settings among the parameters."""
    out = []
    for path, value in params.items():
        if is_setting(path):
            value = value.item() if isinstance(value, np.generic) else value
            out.append(f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def check_space(cfg: Config, strategy_data: dict, space: dict) -> None:
    """Refuse a space whose paths or values cannot work, before any trial runs: every stage
    path must resolve in the strategy, and every setting must take the space's values (its
    choices, or the bounds of a range) as a `--set` would (ConfigError naming the key)."""
    from poolscout.engine.core.config import build_config

    for path, (dist, args) in space["params"].items():
        values = args if dist == "choice" else [args[0], args[1] - 1 if dist == "randint" else args[1]]
        for v in values:
            if is_setting(path):
                build_config([], setting_overrides({path: v}), base=cfg)
            else:
                apply_params(strategy_data, {path: v})


def default_params(strategy_data: dict, space: dict, cfg: Config | None = None) -> dict:
    """The current values at the space's paths: the strategy's (None where it relies on the
    selector's default) and, for settings, `cfg`'s."""
    out = {}
    for path in space["params"]:
        if is_setting(path):
            v: Any = cfg
            for part in path.split("."):
                v = getattr(v, part, None) if v is not None else None
            out[path] = v
            continue
        holder, key = _walk(strategy_data, path)
        out[path] = holder.get(key) if isinstance(holder, dict) else holder[key]
    return out


def _tune_space(space: dict) -> dict:
    from ray import tune

    make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1])), "choice": lambda a: tune.choice(a)}
    return {path: make[dist](args) for path, (dist, args) in space["params"].items()}


# --- split runs ------------------------------------------------------------------------------

def make_split_run(parent: RunDir, dst: RunDir, pool_ids: np.ndarray, test_ids: np.ndarray) -> None:
    """A run over a subset of the parent's images: its pool and test ids keep those states,
    every other image is out (state "rejected"). Tables are copied, images are not."""
    if dst.exists():
        return
    import pyarrow as pa

    tmp = dst.root.with_name(f".{dst.root.name}.making")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _TABLES:
        if (parent.root / name).is_file():
            shutil.copy2(parent.root / name, tmp / name)
    led = parent.read_ledger()
    ids = led["image_id"].to_numpy()
    state = np.full(len(ids), "rejected", dtype=object)
    state[np.isin(ids, pool_ids)] = "pool"
    state[np.isin(ids, test_ids)] = "test"
    table = pa.table({"image_id": led["image_id"], "state": pa.array(state.tolist(), pa.string()),
                      "cycle": pa.array(np.full(len(ids), -1, np.int32)),
                      "selected_by": pa.array([""] * len(ids), pa.string())})
    io.write_table(table, tmp / "ledger.parquet", io.LEDGER_SCHEMA)
    tmp.rename(dst.root)


def split_labeled(parent: RunDir, seed: int, test_fraction: float) -> dict[str, dict[str, np.ndarray]]:
    """The parent's labeled images in two halves A and B, each {"pool", "test"}."""
    ids = np.sort(parent.ids_in_state("labeled").astype(np.int64))
    if len(ids) < 16:
        raise ValueError(f"{parent.root}: tune needs at least 16 labeled images to simulate on, the run has {len(ids)}")
    perm = np.random.default_rng([seed, 7]).permutation(ids)
    out = {}
    for name, part in (("a", perm[: len(perm) // 2]), ("b", perm[len(perm) // 2:])):
        n_test = max(2, int(round(test_fraction * len(part))))
        out[name] = {"test": np.sort(part[:n_test]), "pool": np.sort(part[n_test:])}
    return out


def read_curve(run: RunDir) -> dict:
    """labeled images and mAP50 per evaluated cycle, and their AULC."""
    from poolscout.engine.evaluation.report import aulc

    lab, m50 = [], []
    k = 0
    while (run.cycle_dir(k) / "metrics.json").is_file():
        m = json.loads((run.cycle_dir(k) / "metrics.json").read_text())
        ev = m.get("eval") or {}
        if ev.get("map50") is None:
            break
        lab.append(m.get("labeled_images"))
        m50.append(ev["map50"])
        k += 1
    a = aulc(lab, m50) if len(lab) >= 2 else (m50[0] if m50 else None)
    return {"labeled": lab, "map50": m50, "aulc": a}


def _write_strategy(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


# --- one trial (a Ray Tune function trainable) ----------------------------------------------

def _trial(config: dict, *, base: str, root: str, strategy_data: dict, files: list, overrides: list, cycles: int,
           threads: int) -> None:
    from ray import tune

    from poolscout.jobs.compare import loop_task, share_cycle0

    trial_id = tune.get_context().get_trial_id()
    run = RunDir(Path(root) / f"trial_{trial_id}")
    share_cycle0(RunDir(Path(base)), run)
    strat = _write_strategy(run.root / "strategy.yaml", apply_params(strategy_data, config))
    ov = [*overrides, *setting_overrides(config), f"select.strategy={strat}"]
    for k in range(1, cycles + 1):
        loop_task(str(run.root), files, ov, k, threads=threads)
        c = read_curve(run)
        tune.report({"cycle": k, "map50": c["map50"][-1], "aulc": c["aulc"], "labeled": c["labeled"][-1]})


class _Progress:
    """A Tune callback: one console line per trial result, a tqdm bar over trials."""

    def __new__(cls, total: int, cycles: int, log: Callable[[str], None], progress: bool):
        from ray.tune import Callback
        from tqdm.auto import tqdm

        class P(Callback):
            def __init__(self):
                self.bar = tqdm(total=total, desc="tune: trials", unit="trial", disable=not progress)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                log(f"[tune] trial {trial.trial_id} cycle {result.get('cycle')}: mAP50 {result.get('map50', 0):.3f}, "
                    f"AULC {result.get('aulc', 0):.3f}")

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.bar.update(1)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.bar.update(1)
                log(f"[tune] trial {trial.trial_id} failed: see its folder under the Ray Tune results")

        return P()


# --- the search ------------------------------------------------------------------------------

def tune(run: RunDir, cfg: Config, *, strategy: str, space: str | Path | dict, trials: int = 8, cycles: int = 3,
         budget: int | None = None, seed_size: int | None = None, test_fraction: float = 0.25, grace: int = 1,
         seed: int = 0, out: str | Path | None = None, threads: int = 1, config_files: list | tuple = (),
         extra_overrides: list | tuple = (), progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Search `strategy`'s parameters over `space` by simulated loops on the run's labeled
    images (split A), then run the defaults and the best on split B. Returns tune.json's content.

    Needs a connected Ray (`jobs.ray_env.connect`). Resumable in part: the split runs and
    the cycle-0 models are kept; a finished search (tune.json) is returned as is.
    `config_files` / `extra_overrides` (the CLI's --config / --set) apply to every simulated loop.
    """
    import ray
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from poolscout.engine.acquisition.strategies import load_strategy
    from poolscout.jobs.compare import loop_task, share_cycle0

    run.require()
    if trials < 1 or cycles < 1:
        raise ValueError(f"tune: trials and cycles must be >= 1, got {trials} and {cycles}")
    if not 1 <= grace <= cycles:
        raise ValueError(f"tune: grace must be in [1, cycles], got {grace}")
    sp = space if isinstance(space, dict) else load_space(space)
    base_strategy = load_strategy(strategy)
    if sp.get("strategy") and sp["strategy"] != base_strategy.name:
        raise ConfigError(f"tune: the space {sp.get('path')} is for strategy {sp['strategy']!r}, not "
                          f"{base_strategy.name!r}")
    strategy_data = yaml.safe_load(Path(base_strategy.path).read_text())
    strategy_data.setdefault("name", base_strategy.name)
    check_space(cfg, strategy_data, sp)
    defaults = default_params(strategy_data, sp, cfg)
    root = Path(out) if out is not None else run.root / "tune" / base_strategy.name
    root = root.expanduser().resolve()
    done = root / "tune.json"
    if done.is_file():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    splits = split_labeled(run, seed, test_fraction)
    n_pool = len(splits["a"]["pool"])
    seed_size = int(seed_size) if seed_size else max(2, int(round(0.15 * n_pool)))
    budget = int(budget) if budget else max(1, int(round(0.15 * n_pool)))
    if seed_size + cycles * budget >= min(len(s["pool"]) for s in splits.values()):
        raise ValueError(f"tune: seed {seed_size} + {cycles} x {budget} labels would use up a split's pool of "
                         f"{min(len(s['pool']) for s in splits.values())} images; lower --budget or --cycles")
    overrides = [f"loop.seed_size={seed_size}", f"select.budget={budget}", "loop.oracle=simulated",
                 "loop.seed_strategy=random", "loop.stop_set=0", f"seed={seed}", *extra_overrides]
    files = [str(Path(f).resolve()) for f in config_files]
    bases = {}
    for name, s in splits.items():
        r = RunDir(root / f"split_{name}" / "base")
        make_split_run(run, r, s["pool"], s["test"])
        bases[name] = r
    log(f"[tune] {base_strategy.name}: {len(sp['params'])} parameters, {trials} trials x {cycles} cycles of "
        f"{budget} after a seed of {seed_size}, on {n_pool} + {len(splits['a']['test'])} test images "
        f"(split A; split B {len(splits['b']['pool'])} + {len(splits['b']['test'])} for the check)")

    task = ray.remote(num_cpus=threads, max_retries=0)(loop_task)
    default_file = _write_strategy(root / "defaults.yaml", strategy_data)
    # cycle 0 of both splits (strategy-independent: the seed set and its model)
    ray.get([task.remote(str(b.root), files, [*overrides, f"select.strategy={default_file}"], 0, threads)
             for b in bases.values()])
    log(f"[tune] cycle 0 on both splits: mAP50 A {read_curve(bases['a'])['map50'][0]:.3f}, "
        f"B {read_curve(bases['b'])['map50'][0]:.3f} ({time.time() - t0:.0f} s)")

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    trainable = rt.with_resources(
        rt.with_parameters(_trial, base=str(bases["a"].root), root=str(root / "split_a"),
                           strategy_data=strategy_data, files=files, overrides=overrides, cycles=cycles,
                           threads=threads),
        {"cpu": threads})
    scheduler = ASHAScheduler(time_attr="cycle", max_t=cycles, grace_period=grace, reduction_factor=2)
    bar = _Progress(trials, cycles, log, progress)
    tuner = rt.Tuner(
        trainable, param_space=_tune_space(sp),
        tune_config=rt.TuneConfig(metric="aulc", mode="max", num_samples=trials, scheduler=scheduler,
                                  search_alg=BasicVariantGenerator(random_state=seed),
                                  max_concurrent_trials=slots),
        run_config=rt.RunConfig(storage_path=str(root / "ray_tune"), name="search", verbose=0,
                                callbacks=[bar]))
    # Ray Tune prints its own tables and hints on stdout: they go to tune/<strategy>/tune-console.log
    with open(root / "tune-console.log", "a", encoding="utf-8") as tlog, contextlib.redirect_stdout(tlog):
        grid = tuner.fit()
    bar.bar.close()

    rows = []
    for res in grid:
        trial_dir = root / "split_a" / f"trial_{res.metrics.get('trial_id')}" if res.metrics else None
        curve = read_curve(RunDir(trial_dir)) if trial_dir is not None and trial_dir.is_dir() else None
        rows.append({"trial": (res.metrics or {}).get("trial_id"), "params": _plain(res.config),
                     "cycles_run": (res.metrics or {}).get("cycle", 0),
                     "stopped_by_asha": bool(res.metrics) and res.metrics.get("cycle", 0) < cycles and res.error is None,
                     "error": str(res.error) if res.error else None, "curve": curve,
                     "aulc": curve["aulc"] if curve else None})
    full = [r for r in rows if r["cycles_run"] == cycles and r["aulc"] is not None]
    if not full:
        raise RuntimeError(f"tune: no trial ran all {cycles} cycles; see {root / 'ray_tune'}")
    best = max(full, key=lambda r: r["aulc"])
    best_data = apply_params(strategy_data, best["params"])
    best_data["name"] = f"{base_strategy.name}_tuned"
    best_data["description"] = (f"{base_strategy.name} with weights from `poolscout tune` ({trials} trials x {cycles} "
                                f"cycles of {budget}; AULC {best['aulc']:.3f} on the tuning split). "
                                + str(strategy_data.get("description", "")))[:2000]
    best_file = _write_strategy(root / f"best_{base_strategy.name}.yaml", best_data)
    best_settings = setting_overrides(best["params"])
    settings_file = root / f"best_{base_strategy.name}.settings.yaml"
    nested: dict = {}
    for path, value in best["params"].items():
        if is_setting(path):
            *head, last = path.split(".")
            d = nested
            for part in head:
                d = d.setdefault(part, {})
            d[last] = value
    io.atomic_write_text(settings_file, yaml.safe_dump(nested, sort_keys=False) if nested else "{}\n")

    # the check: defaults on A (the search's reference) and B, the best on B (never tuned on)
    checks = {("defaults", "a"): (default_file, []), ("defaults", "b"): (default_file, []),
              ("best", "b"): (best_file, best_settings)}
    refs = {}
    for (who, split), (f, extra) in checks.items():
        r = RunDir(root / f"split_{split}" / who)
        share_cycle0(bases[split], r)
        refs[(who, split)] = task.remote(str(r.root), files, [*overrides, *extra, f"select.strategy={f}"], cycles,
                                         threads)
    ray.get(list(refs.values()))
    curves = {f"{who}_{split}": read_curve(RunDir(root / f"split_{split}" / who)) for who, split in checks}
    delta_b = curves["best_b"]["aulc"] - curves["defaults_b"]["aulc"]
    verdict = (f"tuned {base_strategy.name} {'beats' if delta_b > 0 else 'does not beat'} its defaults on the held-out "
               f"split B: AULC {curves['best_b']['aulc']:.3f} vs {curves['defaults_b']['aulc']:.3f} "
               f"({delta_b:+.3f}); on the tuning split A {best['aulc']:.3f} vs {curves['defaults_a']['aulc']:.3f}")
    doc = {
        "strategy": base_strategy.name, "space": {k: {d: a} for k, (d, a) in sp["params"].items()},
        "space_file": sp.get("path"), "defaults": _plain(defaults), "best_params": best["params"],
        "best_trial": best["trial"], "best_strategy_file": str(best_file),
        "best_settings_file": str(settings_file), "best_settings": best_settings,
        "use": f"--strategy {best_file}" + (f" --config {settings_file}" if best_settings else ""),
        "aulc": {"best_a": best["aulc"], "defaults_a": curves["defaults_a"]["aulc"],
                 "best_b": curves["best_b"]["aulc"], "defaults_b": curves["defaults_b"]["aulc"]},
        "curves": {"best_a": best["curve"], **curves},
        "verdict": verdict,
        "settings": {"trials": trials, "cycles": cycles, "budget": budget, "seed_size": seed_size, "grace": grace,
                     "scheduler": "ASHA (time_attr cycle, reduction factor 2)", "objective": "AULC of mAP50",
                     "test_fraction": test_fraction, "seed": seed, "threads_per_trial": threads,
                     "concurrent_trials": slots},
        "splits": {k: {"pool": len(v["pool"]), "test": len(v["test"])} for k, v in splits.items()},
        "trials": sorted(rows, key=lambda r: -(r["aulc"] if r["aulc"] is not None else -math.inf)),
        "seconds": round(time.time() - t0, 1),
    }
    io.atomic_write_json(done, doc)
    log(f"[tune] {verdict}; run the best with {doc['use']} ({doc['seconds']:.0f} s)")
    return doc


def _plain(d: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in (d or {}).items()}


__all__ = ["apply_params", "check_space", "default_params", "is_setting", "load_space", "make_split_run",
           "read_curve", "setting_overrides", "split_labeled", "tune"]
