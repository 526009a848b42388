"""`poolscout demo`: what an acquisition engine is for, on a synthetic inspection pool.

The pool looks like an inspection line: half the images are clean parts, the others carry
scratches, inclusions and patches (drawn larger and on a calmer texture than the default
generator, `defect_scale` 2, `texture` 0.5), and one defect type (pits) is rare. Random
selection and the recommended strategy (entropy) each run an active-learning loop over 2
seeds on the embedded Ray (one loop per CPU, each seed's cycle 0 shared), the report is
written, and the last line is the verdict: which strategy won, mAP50 and AULC with their
seed spread, the labels it saved (or not), and how often each picked the rare class.

Settings: configs/demo.yaml plus the defaults below (40 seed images + 2 rounds of 45).
Measured on a 2-core machine without a GPU: 269 s (benchmarks/results/demo.json).
A rerun reuses what is there.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from poolscout.engine.core import io
from poolscout.engine.core.config import configs_dir, load_config
from poolscout.engine.core.run import RunDir

RARE_CLASS = "pit"


def demo_pool(out: Path, *, n_images: int, size: int, seed: int = 0, test_fraction: float = 0.25) -> dict:
    """The synthetic inspection pool and its test split (the last images by name)."""
    from poolscout.engine.data.synthetic import generate

    pool = generate(out, n_images=n_images, size=size, seed=seed, class_weights={RARE_CLASS: 0.2},
                    clean_fraction=0.5, contrast=2.5, max_defects=2, defect_scale=2.0, texture=0.5)
    names = sorted(p.name for p in Path(pool["images"]).iterdir())
    n_test = int(round(n_images * test_fraction))
    test_file = out / "test_ids.txt"
    io.atomic_write_bytes(test_file, "".join(f"{n}\n" for n in names[len(names) - n_test:]).encode())
    return {**pool, "test": test_file, "n_test": n_test}


def demo_verdict(run_dirs: Sequence[Path], reference: str = "random", rare: str = RARE_CLASS) -> dict:
    """The demo's conclusion as data and one line (the last line the demo prints)."""
    from poolscout.engine.evaluation.report import load_run_metrics

    return verdict_line([load_run_metrics(r) for r in run_dirs], reference=reference, rare=rare)


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def verdict_line(runs: Sequence[dict], reference: str = "random", rare: str = RARE_CLASS) -> dict:
    """`demo_verdict` on loaded runs (dicts of `engine.evaluation.report.load_run_metrics`)."""
    import numpy as np

    from poolscout.engine.evaluation.report import rare_share_ratio, verdict

    v = verdict(runs)
    finals: dict[str, dict[int, float]] = {}
    shares: dict[str, list[float]] = {}
    for r in runs:
        last = r["cycles"][-1]
        finals.setdefault(r["strategy"], {})[int(r["seed"] or 0)] = float((last.get("eval") or {}).get("map50", float("nan")))
        ratio = rare_share_ratio(r, rare)
        if ratio is not None:
            shares.setdefault(r["strategy"], []).append(ratio)
    parts = []
    for s in v["strategies"]:
        name = s["strategy"]
        txt = (f"{name} mAP50 {_num(s['map50_mean'])} ± {_num(s['map50_std'] or 0)}, "
               f"AULC {_num(s['aulc_mean'])} ± {_num(s['aulc_std'] or 0)}")
        if shares.get(name):
            txt += f", {rare} share x{np.mean(shares[name]):.2f}"
        parts.append(txt)
    best = v["strategies"][0] if v["strategies"] else None
    ref = next((s for s in v["strategies"] if s["strategy"] == reference), None)
    if best is None or ref is None:
        head = "verdict: no comparison (random missing)"
    elif best["strategy"] == reference:
        head = f"verdict: no strategy beat {reference} on this pool"
    else:
        head = f"verdict: {best['strategy']} beats {reference} (AULC +{best['aulc_mean'] - ref['aulc_mean']:.3f})"
        reach = best.get("reach_images")
        if reach is not None and ref.get("labeled_images_mean"):
            saved = ref["labeled_images_mean"] - reach
            if saved > 0:
                head += (f", reaching {reference}'s final mAP50 with {reach:.0f} labeled images instead of "
                         f"{ref['labeled_images_mean']:.0f} ({saved:.0f} labels saved)")
            else:
                head += (f"; of the cycles measured, the first at {reference}'s final mAP50 is the last "
                         f"({reach:.0f} labeled images), so no labels saved at this granularity")
        else:
            head += f", but never reaches {reference}'s final mAP50 ({ref['map50_mean']:.3f})"
        if best["aulc_std"] is not None and ref["aulc_std"] is not None and \
                best["aulc_mean"] - ref["aulc_mean"] <= max(best["aulc_std"], ref["aulc_std"]):
            head += "; the lead is within the seed spread"
    line = head + ". " + "; ".join(parts) + f" ({len(runs)} loops)"
    return {"line": line, "final_map50": finals, "rare_share_ratio": shares, "report_verdict": v}


def run_demo(out: Path, *, n_images: int = 320, size: int = 128, cycles: int = 2, budget: int = 45,
             seed_size: int = 40, strategies: Sequence[str] = ("random", "entropy"), seeds: Sequence[int] = (0, 1),
             configs: Sequence[str] = (), overrides: Sequence[str] = (), address: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns {"report": index.html, "verdict": line, "seconds", ...}."""
    from poolscout.engine.acquisition.strategies import load_strategy
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.evaluation.report import write_report
    from poolscout.jobs.compare import compare
    from poolscout.jobs.ray_env import connect

    if not strategies:
        raise ValueError("--strategies: give at least one strategy")
    for s in strategies:
        load_strategy(s)  # unknown names fail before any work
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    out = Path(out)
    n_test = int(round(n_images * 0.25))
    if n_images - n_test < seed_size + cycles * budget:
        raise ValueError(f"the pool ({n_images} images, {n_test} for test) is too small for a seed set of "
                         f"{seed_size} and {cycles} rounds of {budget}")
    t0 = time.time()
    info = connect(address, log_dir=out / "logs")
    pool = demo_pool(out / "pool", n_images=n_images, size=size)
    log(f"[demo] inspection pool: {n_images} images of {size} px (half clean, '{RARE_CLASS}' rare), "
        f"{pool['n_test']} held out for test -> {out / 'pool'}")
    cfg_files = [str(configs_dir() / "demo.yaml"), *map(str, configs)]
    runs: dict[tuple[str, int], RunDir] = {}
    ovs: dict[tuple[str, int], list] = {}
    for seed in seeds:
        for i, strat in enumerate(strategies):
            key = (strat, int(seed))
            runs[key] = RunDir(out / "runs" / f"{strat}-s{seed}")
            ovs[key] = [*overrides, f"seed={seed}", f"select.strategy={strat}", f"select.budget={budget}",
                        f"loop.seed_size={seed_size}"]
            if i == 0 and not runs[key].exists():
                init_run(runs[key], images=pool["images"], annotations=pool["annotations"], test=pool["test"],
                         cfg=load_config(cfg_files, ovs[key]), progress=False)
    log(f"[demo] {len(runs)} loops ({', '.join(strategies)} x seeds {', '.join(map(str, seeds))}): a seed set of "
        f"{seed_size}, then {cycles} rounds of {budget}; {int(info['cpus'])} at a time; Ray's logs: {out / 'logs'}")
    res = compare(runs, config_files=cfg_files, overrides=ovs, cycles=cycles, progress=progress,
                  log=lambda m: log(m.replace("[compare]", "[demo]")))
    bad = [f"{k[0]} seed {k[1]}: {r['status']}" for k, r in res.items() if r["status"] != "done"]
    if bad:
        raise RuntimeError("loops did not finish: " + "; ".join(bad))
    # in a Ray worker that has torch imported already (the driver has not): ~10 s less
    import ray

    index = ray.get(ray.remote(num_cpus=1, max_retries=0)(write_report).remote(
        [r.root for r in runs.values()], out / "report", progress=False))
    v = demo_verdict([r.root for r in runs.values()], reference=strategies[0] if "random" not in strategies
                     else "random")
    seconds = round(time.time() - t0, 1)
    summary = {"seconds": seconds, "report": str(index), "verdict": v["line"],
               "final_map50": {s: {str(k): x for k, x in d.items()} for s, d in v["final_map50"].items()},
               "rare_share_ratio": v["rare_share_ratio"], "n_images": n_images, "size": size, "cycles": cycles,
               "budget": budget, "seed_size": seed_size, "strategies": list(strategies), "seeds": list(seeds)}
    io.atomic_write_json(out / "demo.json", summary)
    log(f"[demo] finished in {seconds:.0f} s; report: {index}")
    return summary  # the caller prints summary["verdict"] as the last line


__all__ = ["demo_pool", "demo_verdict", "run_demo", "verdict_line", "RARE_CLASS"]
