"""Label efficiency: mAP50 against labeled images for several strategies and seeds.

Every (strategy, seed) is one active-learning loop (jobs.loop, local executor) run as a
Ray task that reserves `cpus_per_run` CPUs; Ray runs as many at once as the node holds.
All strategies of one seed start from the same random seed set.

    python benchmarks/label_efficiency.py --preset cpu-small            # NEU-DET, 2 cores
    python benchmarks/label_efficiency.py --preset gpu --address auto   # a GPU cluster

Writes benchmarks/results/label_efficiency_<dataset>_<preset>.json and a PNG of the
curves beside it; the run directories stay in --workdir for `poolscout report`.

Per strategy: the mean curve, `aulc` (area under the mAP50-vs-labeled-images curve over
its x range, so 1.0 is perfect), `labels_to_reach_random_final` (labeled images at which
the strategy's mean curve first reaches random's final mean mAP50, by linear
interpolation; null if never), the same counted in labeled boxes
(`labels_to_reach_random_final_boxes`: boxes are what annotators pay for, and a strategy
that picks crowded images can save images and no boxes) and the rarest class's recall at
IoU 0.5 at the end.

Variants: a name in VARIANTS runs a strategy with extra settings (bald trains the
detector with box-head dropout; huale_losses trains with the HUALE losses and the
variance head; entropy_pseudo adds pseudo labels, train.pseudo_labels=0.8). `--rare CLASS:FRACTION` keeps only that fraction of the pool images whose
file name starts with CLASS (the others are marked rejected, reason "benchmark
subsample"; the test split is untouched) and reports, per strategy, the class's share
among the instances labeled after the seed set divided by its share in the pool
(`rare_share_ratio`; 1 = no better than random expectation). `--longtail [RATIO]` keeps
1, RATIO, RATIO^2, ... (default 0.5: 1, 1/2, ..., 1/32 for six classes) of the pool images
of the classes in the dataset config's order and reports the last class as the rare one.

    python benchmarks/label_efficiency.py --preset cpu-small \
        --strategies random,entropy,bald,cald,huale,huale_losses,ppal
    python benchmarks/label_efficiency.py --preset cpu-small --rare pitted_surface:0.1 --tag rare_pitted
    python benchmarks/label_efficiency.py --preset cpu-small --longtail --tag longtail \
        --strategies random,entropy,coreset,maxherding,uncertainty_herding,typiclust

Any pool: `--pool` takes a dataset name below (read from --data-root), a YAML file
describing the pool (`images`, `annotations`, optional `format`, `test` split file and
`config` dataset YAML; relative paths are relative to the YAML file), or an initialised
run directory (its manifest, annotations and test split are copied into every loop; images
it already labels are the seed set):

    python benchmarks/label_efficiency.py --pool my_pool.yaml --preset cpu-small --tag mine
    python benchmarks/label_efficiency.py --pool runs/steel --strategies random,entropy

The loops of one seed (and identical training settings) share their cycle 0: it is trained
once and copied (jobs/compare.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {
    "neu_det": {
        "images": "images", "annotations": "annotations", "test": "split_test.txt", "pool": "split_pool.txt",
        "config": "neu_det.yaml",
    },
}

# Generated pools (`--pool NAME`): written under the workdir on first use; the test split is
# the last `test_images` images by name; `rare` is the class whose share the summary reports.
SYNTHETIC = {
    "synthetic_subtle": {
        "generate": {"n_images": 1600, "size": 128, "seed": 0, "class_weights": {"hairline": 0.25},
                     "clean_fraction": 0.3, "max_defects": 2, "contrast": 1.5, "defect_scale": 2.0,
                     "texture": 0.5},
        "test_images": 400, "config": "synthetic_subtle.yaml", "rare": "hairline",
    },
}

PRESETS = {
    # 2-core laptop, no GPU: EfficientNet-Lite0 Faster R-CNN at 160 px (configs/cpu-small.yaml),
    # 100 seed images + 4 rounds of 50 (300 labeled at the end); warm-started rounds train 5
    # epochs, the first 8. Two loops run at once, one thread each.
    "cpu-small": {
        "configs": ["cpu-small.yaml"],
        # (loop.stop_set=0: the stopping signal's extra inference measures nothing here)
        "overrides": ["train.epochs=8", "train.warm_epochs=5", "train.torch_threads=1", "score.torch_threads=1",
                      "score.views=[orig]", "score.batch_size=8", "loop.eval_batch_size=8", "loop.stop_set=0"],
        "seed_size": 100, "budget": 50, "cycles": 4, "cpus_per_run": 1, "gpus_per_run": 0,
        "strategies": ["random", "entropy", "coreset"], "seeds": [0, 1],
    },
    # One GPU per loop: 320 px, 200 + 6 x 100 images, 12 / 6 epochs.
    "gpu": {
        "configs": ["neu_det.yaml"],
        "overrides": ["detector.input_size=320", "train.epochs=12", "train.warm_epochs=6", "train.use_gpu=true",
                      "train.batch_size=8", "score.views=[orig,hflip]", "score.batch_size=32"],
        "seed_size": 200, "budget": 100, "cycles": 6, "cpus_per_run": 4, "gpus_per_run": 1, "threads": 4,
        "strategies": ["random", "entropy", "margin", "coreset", "entropy_coreset"], "seeds": [0, 1, 2],
    },
}


# variant name -> (strategy, extra overrides)
VARIANTS = {
    "bald": ("bald", ["detector.dropout=0.2"]),
    # the seed set picked by coverage of the pool's backbone embeddings instead of at random
    "maxherding_cold": ("maxherding", ["loop.seed_strategy=maxherding"]),
    "coreset_cold": ("coreset", ["loop.seed_strategy=maxherding"]),
    "huale_losses": ("huale", ["detector.box_var_head=true", "train.emphasis_loss=true", "train.eiou_loss=true",
                               "train.aware_loss=true", "train.loss_lambda=0.5"]),
    # auto-labeling: each cycle also trains on the previous model's boxes of confidence >= 0.8
    # on pool images (compare with plain entropy on the same protocol)
    "entropy_pseudo": ("entropy", ["train.pseudo_labels=0.8"]),
}


def variant(name: str) -> tuple[str, list[str]]:
    """(strategy, overrides) of a benchmark entry: a VARIANTS name or a plain strategy."""
    return VARIANTS.get(name, (name, []))


def subsample_classes(run_root: str, fractions: dict[str, float], seed: int = 0) -> dict:
    """For each class prefix, keep that fraction of the pool images whose file name starts
    with it; mark the rest rejected (reason "benchmark subsample"). Idempotent; the same
    images for every run (`seed` fixed), test images untouched."""
    import pyarrow as pa

    from poolscout.engine.core import io
    from poolscout.engine.core.run import RunDir

    run = RunDir(Path(run_root))
    if (run.root / "subsample.json").is_file():
        return json.loads((run.root / "subsample.json").read_text())
    man = io.read_table(run.manifest, columns=["image_id", "uri"])
    pool = set(run.ids_in_state("pool").tolist())
    ids = man["image_id"].to_numpy()
    names = [Path(u).name for u in man["uri"].to_pylist()]
    uris = dict(zip(ids.tolist(), man["uri"].to_pylist()))
    out: dict = {"classes": {}}
    drops = []
    for c, (prefix, fraction) in enumerate(fractions.items()):
        cand = np.array(sorted(int(i) for i, n in zip(ids, names) if n.startswith(prefix) and int(i) in pool), np.int64)
        if len(cand) == 0:
            raise ValueError(f"no pool image name starts with {prefix!r}")
        keep_n = max(1, int(round(fraction * len(cand))))
        keep = np.random.default_rng([seed, c]).choice(cand, keep_n, replace=False)
        drop = np.setdiff1d(cand, keep)
        drops.append((prefix, fraction, drop))
        out["classes"][prefix] = {"fraction": fraction, "pool_images_of_class": int(len(cand)), "kept": int(keep_n),
                                  "dropped": int(len(drop))}
    for prefix, fraction, drop in drops:
        if len(drop) == 0:
            continue
        run.append_rejects(pa.table({"image_id": pa.array(drop, pa.int64()),
                                     "uri": pa.array([uris[int(i)] for i in drop], pa.string()),
                                     "stage": pa.array(["benchmark"] * len(drop), pa.string()),
                                     "reason": pa.array([f"benchmark subsample: keep {fraction:g} of {prefix}"]
                                                        * len(drop), pa.string())}))
        run.set_state(drop, "rejected")
    out["pool_images_kept"] = int(sum(v["kept"] for v in out["classes"].values()))
    io.atomic_write_json(run.root / "subsample.json", out)
    return out


def subsample_class(run_root: str, prefix: str, fraction: float, seed: int = 0) -> dict:
    """One class's version of `subsample_classes` (--rare)."""
    return subsample_classes(run_root, {prefix: fraction}, seed)


def longtail_fractions(classes: list[str], ratio: float = 0.5) -> dict[str, float]:
    """Class order -> kept fraction 1, ratio, ratio^2, ... (the long-tail pool)."""
    return {c: float(ratio ** i) for i, c in enumerate(classes)}


def pool_spec(arg: str, data_root: Path) -> dict:
    """--pool: a DATASETS name, a pool YAML, or an initialised run directory -> a spec dict."""
    import yaml

    if arg in DATASETS:
        root = data_root / arg
        if not root.is_dir():
            raise SystemExit(f"error: dataset folder {root} not found (see --data-root)")
        d = DATASETS[arg]
        return {"name": arg, "images": root / d["images"], "annotations": root / d["annotations"],
                "test": root / d["test"], "format": d.get("format"), "config": d.get("config")}
    p = Path(arg)
    if p.is_dir() and (p / "run.yaml").is_file() and (p / "manifest.parquet").is_file():
        return {"name": p.name, "run": p.resolve()}
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        doc = yaml.safe_load(p.read_text()) or {}
        if not isinstance(doc, dict):
            raise SystemExit(f"error: {p}: expected a mapping with images, annotations, test")
        for key in ("images", "test"):
            if key not in doc:
                raise SystemExit(f"error: {p}: missing key {key!r}")
        spec = {"name": doc.get("name", p.stem), "format": doc.get("format"), "config": doc.get("config")}
        for key in ("images", "annotations", "test"):
            if doc.get(key) is not None:
                spec[key] = (p.parent / str(doc[key])).resolve()
        return spec
    raise SystemExit(f"error: --pool {arg!r} is neither a dataset ({', '.join(DATASETS)}), a pool YAML nor a run "
                     f"directory")


def synthetic_spec(name: str, out: Path) -> dict:
    """A SYNTHETIC pool, generated into `out` (a no-op when it is there) -> a spec dict."""
    from poolscout.engine.core import io
    from poolscout.engine.data.synthetic import generate

    d = SYNTHETIC[name]
    pool = generate(out, **d["generate"])
    names = sorted(p.name for p in Path(pool["images"]).iterdir())
    test = out / "test_ids.txt"
    io.atomic_write_bytes(test, "".join(f"{n}\n" for n in names[len(names) - d["test_images"]:]).encode())
    return {"name": name, "images": Path(pool["images"]), "annotations": Path(pool["annotations"]), "test": test,
            "format": "coco", "config": d["config"], "rare": d["rare"]}


def init_loop_run(run_dir: Path, spec: dict, config_files: list[str], overrides: list[str]) -> None:
    """The first run of a group: from the pool spec (init) or a copy of an initialised run."""
    import shutil

    from poolscout.engine.core.config import load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run

    run = RunDir(run_dir)
    if run.exists():
        return
    if "run" in spec:
        run.root.mkdir(parents=True, exist_ok=True)
        for name in ("manifest.parquet", "annotations.parquet", "categories.json", "ledger.parquet",
                     "rejects.parquet"):
            if (spec["run"] / name).is_file():
                shutil.copy2(spec["run"] / name, run.root / name)
        shutil.copy2(spec["run"] / "run.yaml", run.run_yaml)
        run.config(config_files, overrides)  # the settings must load on top of that run's
        return
    init_run(run, images=spec["images"], annotations=spec.get("annotations"), fmt=spec.get("format"),
             test=spec.get("test"), cfg=load_config(config_files, overrides), progress=False)


def _curve(run_dir: Path) -> dict:
    cyc = []
    for p in sorted((run_dir / "cycles").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        m = p / "metrics.json"
        if p.name.isdigit() and m.is_file():
            cyc.append(json.loads(m.read_text()))
    cyc.sort(key=lambda m: m["cycle"])
    ev = [m.get("eval") or {} for m in cyc]
    return {
        "labeled": [m["labeled_images"] for m in cyc],
        "labeled_boxes": [m["labeled_boxes"] for m in cyc],
        "map50": [e.get("map50") for e in ev],
        "map": [e.get("map") for e in ev],
        "per_class_final": (ev[-1].get("per_class") if ev else None),
        "new_over_prevalence": [m.get("acquisition", {}).get("new_over_prevalence") for m in cyc],
        "new_class_hist": [m.get("acquisition", {}).get("new_class_hist") for m in cyc],
        "pool_prevalence": cyc[0].get("acquisition", {}).get("pool_prevalence") if cyc else None,
        "rarest_class": cyc[-1].get("acquisition", {}).get("rarest_class") if cyc else None,
        "seconds": {k: round(sum((m.get("timings_s") or {}).get(k, 0.0) for m in cyc), 1)
                    for k in ("train", "evaluate", "score", "select", "label")},
        "dominant_terms": _dominant_terms(run_dir),
        "pseudo_labels": _pseudo_quality(run_dir),
    }


def _pseudo_quality(run_dir: Path) -> list | None:
    """Auto-labeling loops: per cycle that trained on pseudo labels, how many images and
    boxes, their precision against the simulated oracle's truth (a pseudo box is right when
    a true box of its class overlaps it at IoU >= 0.5; a box on an image with no true box is
    wrong) and the share of the true boxes of those images they found. None without any."""
    import pyarrow.parquet as pq

    from poolscout.kernels.boxes import ragged_max_iou

    files = sorted((run_dir / "cycles").glob("*/pseudo_labels.parquet"), key=lambda f: int(f.parent.name))
    if not files:
        return None
    cols = ["image_id", "category_id", "x1", "y1", "x2", "y2"]

    def ragged(path):  # (image ids sorted, boxes, class ids) of a table
        t = pq.read_table(path, columns=cols).sort_by("image_id")
        return (t["image_id"].to_numpy(), np.stack([t[c].to_numpy() for c in cols[2:]], 1).astype(np.float64),
                t["category_id"].to_numpy())

    t_ids, t_box, t_cls = ragged(run_dir / "annotations.parquet")
    out = []
    for f in files:
        p_ids, p_box, p_cls = ragged(f)
        ids = np.unique(p_ids)
        p_off = np.searchsorted(p_ids, np.append(ids, np.iinfo(np.int64).max))
        lo, hi = np.searchsorted(t_ids, ids, "left"), np.searchsorted(t_ids, ids, "right")
        keep = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)] or [np.zeros(0, np.int64)])
        t_off = np.concatenate([[0], np.cumsum(hi - lo)])
        tb, tc = t_box[keep], t_cls[keep]
        right = int((ragged_max_iou(p_box, p_off, tb, t_off, p_cls, tc)[0] >= 0.5).sum())
        found = int((ragged_max_iou(tb, t_off, p_box, p_off, tc, p_cls)[0] >= 0.5).sum())
        out.append({"cycle": int(f.parent.name), "images": int(len(ids)), "boxes": int(len(p_ids)),
                    "precision50": right / len(p_ids) if len(p_ids) else None,
                    "recall50_on_their_images": found / len(tb) if len(tb) else None})
    return out


def _dominant_terms(run_dir: Path) -> dict | None:
    """GSAL loops: how many picks (all cycles) were dominated by difficulty / coverage."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for f in sorted((run_dir / "cycles").glob("*/selection.parquet")):
        for r in pq.read_table(f, columns=["rationale"])["rationale"].to_pylist():
            try:
                g = json.loads(r).get("gsal") if r else None
            except (ValueError, AttributeError):
                g = None
            if isinstance(g, dict):
                counts[str(g.get("dominant"))] = counts.get(str(g.get("dominant")), 0) + 1
    return counts or None


def labels_to_reach(x, y, target: float) -> float | None:
    """First x where the piecewise-linear curve (x, y) reaches target; None if never."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return None
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= target:
            t = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + t * (x[i] - x[i - 1]))
    return None


def share_ratio(curve: dict, cls: str) -> float | None:
    """Share of `cls` among the instances labeled after the seed set (cycles >= 1) divided
    by its share of the pool's instances at the start; None when undefined."""
    hists = [h for h in (curve.get("new_class_hist") or [])[1:] if h]
    prev = (curve.get("pool_prevalence") or {}).get(cls)
    total = sum(sum(h.values()) for h in hists)
    if not hists or not prev or total == 0:
        return None
    return sum(h.get(cls, 0) for h in hists) / total / prev


def summarise(results: dict, rarest: str | None, rare_class: str | None = None) -> dict:
    from poolscout.engine.evaluation.report import aulc

    out = {}
    rand_final = None
    if "random" in results:
        rand_final = float(np.mean([r["map50"][-1] for r in results["random"].values()]))
    for strat, per_seed in results.items():
        x = np.mean([r["labeled"] for r in per_seed.values()], 0)
        xb = np.mean([r["labeled_boxes"] for r in per_seed.values()], 0)
        y50 = np.mean([r["map50"] for r in per_seed.values()], 0)
        y = np.mean([r["map"] for r in per_seed.values()], 0)
        rec = []
        for r in per_seed.values():
            for c in r["per_class_final"] or []:
                if c["name"] == rarest and c.get("recall50") is not None:
                    rec.append(c["recall50"])
        out[strat] = {
            "labeled": x.tolist(), "map50_mean": y50.tolist(), "map_mean": y.tolist(),
            "map50_std": np.std([r["map50"] for r in per_seed.values()], 0).tolist(),
            "final_map50": float(y50[-1]), "final_map": float(y[-1]),
            "aulc": aulc(x, y50),
            "labels_to_reach_random_final": labels_to_reach(x, y50, rand_final) if rand_final is not None else None,
            "labeled_boxes": xb.tolist(),
            "labels_to_reach_random_final_boxes": (labels_to_reach(xb, y50, rand_final)
                                                   if rand_final is not None else None),
            "rarest_class": rarest,
            "rarest_class_recall50": float(np.mean(rec)) if rec else None,
        }
        if rare_class is not None:
            ratios = [share_ratio(r, rare_class) for r in per_seed.values()]
            ratios = [x for x in ratios if x is not None]
            out[strat]["rare_class"] = rare_class
            out[strat]["rare_share_ratio"] = float(np.mean(ratios)) if ratios else None
            out[strat]["rare_share_ratio_per_seed"] = ratios
            rec = [c.get("recall50") for r in per_seed.values() for c in (r["per_class_final"] or [])
                   if c["name"] == rare_class and c.get("recall50") is not None]
            out[strat]["rare_class_recall50"] = float(np.mean(rec)) if rec else None
            ap = [c.get("ap50") for r in per_seed.values() for c in (r["per_class_final"] or [])
                  if c["name"] == rare_class and c.get("ap50") is not None]
            out[strat]["rare_class_ap50"] = float(np.mean(ap)) if ap else None
        terms: dict[str, int] = {}
        for r in per_seed.values():
            for t, n in (r.get("dominant_terms") or {}).items():
                terms[t] = terms.get(t, 0) + int(n)
        pl = [c for r in per_seed.values() for c in (r.get("pseudo_labels") or [])]
        if pl:  # auto-labeling: pseudo boxes per cycle and their precision (all cycles and seeds)
            prec = [c["precision50"] for c in pl if c.get("precision50") is not None]
            rec = [c["recall50_on_their_images"] for c in pl if c.get("recall50_on_their_images") is not None]
            out[strat]["pseudo_boxes_per_cycle"] = float(np.mean([c["boxes"] for c in pl]))
            out[strat]["pseudo_images_per_cycle"] = float(np.mean([c["images"] for c in pl]))
            out[strat]["pseudo_precision50"] = float(np.mean(prec)) if prec else None
            out[strat]["pseudo_recall50_on_their_images"] = float(np.mean(rec)) if rec else None
        if terms:  # GSAL: the share of picks whose rationale each term dominated (all seeds)
            total = sum(terms.values())
            out[strat]["dominant_term_shares"] = {t: n / total for t, n in sorted(terms.items())}
    return out


def plot(summary: dict, results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = (("map50", "labeled"), ("map50", "labeled_boxes"), ("map", "labeled"))
    for ax, (key, xkey) in zip(axes, panels):
        for i, (strat, s) in enumerate(summary.items()):
            ys = np.array([r[key] for r in results[strat].values()], float)
            x = np.array(s[xkey], float)  # labels, the mean over seeds
            c = "k" if strat == "random" else f"C{i % 10}"  # the reference stands out
            style = "-o" if i < 10 else "--s"
            label = f"{strat} (AULC {s['aulc']:.3f})" if (key, xkey) == ("map50", "labeled") else strat
            ax.plot(x, ys.mean(0), style, color=c, label=label, ms=4, lw=2.2 if strat == "random" else 1.4)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=c, alpha=0.12)
        ax.set_xlabel({"labeled": "labeled images", "labeled_boxes": "labeled boxes (what annotators pay for)"}[xkey])
        ax.set_ylabel({"map50": "mAP@0.5", "map": "mAP@[.5:.95]"}[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from poolscout.engine.core.io import atomic_savefig

    atomic_savefig(fig, path)


# Settings that must match for finished loops of an earlier run of the benchmark (possibly
# on another machine, in an earlier session) to be reused instead of rerun.
PROTOCOL_KEYS = ("seed_size", "budget", "cycles", "configs", "overrides", "subsample", "rare", "cpus_per_run",
                 "gpus_per_run")


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name and whether it has AVX-512: CPU kernels differ between machines, so
    the same seeded training can end elsewhere (cycle0_reproduced says whether it did)."""
    try:
        info = Path(cpuinfo).read_text()
    except OSError:
        return platform.processor() or None
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    return f"{name or 'unknown'}{', avx512f' if ' avx512f' in info else ''}"


def reusable_loops(doc: dict | None, settings: dict, strategies: list[str], seeds: list[int]) -> dict:
    """Finished loops of an earlier results document that this run may take as they are.

    A loop is reused when the earlier run's protocol (PROTOCOL_KEYS, the dataset and the
    strategy's variant) equals this one's, its curve has every cycle, and it carries a
    provenance (the commit and machine that ran it): results written before provenance
    was recorded are never reused. Returns (strategy, seed) -> the stored loop.
    """
    if not doc or doc.get("benchmark") != "label_efficiency":
        return {}
    old = doc.get("settings") or {}
    if doc.get("dataset") != settings["dataset"] or any(old.get(k) != settings[k] for k in PROTOCOL_KEYS):
        return {}
    out = {}
    for strat in strategies:
        if (old.get("variants") or {}).get(strat) != settings["variants"][strat]:
            continue
        for seed in seeds:
            r = (doc.get("runs") or {}).get(strat, {}).get(str(seed))
            if r and r.get("provenance") and len(r.get("labeled") or []) == settings["cycles"] + 1 \
                    and None not in r.get("map50", [None]):
                out[(strat, seed)] = r
    return out


def _run_key(loop: dict) -> tuple:
    """Which run of the benchmark wrote a loop: its commit and when it was collected."""
    p = loop.get("provenance") or {}
    return p.get("commit"), p.get("collected") or p.get("finished")


def check_reproduced(reused: dict, fresh: dict) -> None:
    """Mark each reused loop with whether the cycle 0 of every other run's loop of the same
    seed and cycle-0 group (the variant's extra settings: a cold-start variant picks another
    seed set) got the same mAP50 exactly: this run's fresh loops and reused loops that another
    run wrote (same code and machine behaviour; seeded CPU training differs across CPU models).
    With no such loop an earlier verdict stays (None if there was none)."""
    for (strat, seed), r in reused.items():
        group = variant(strat)[1]
        same = [v for (s2, sd2), v in fresh.items() if sd2 == seed and variant(s2)[1] == group]
        same += [v for (s2, sd2), v in reused.items()
                 if sd2 == seed and variant(s2)[1] == group and _run_key(v) != _run_key(r)]
        new = [v["map50"][0] for v in same if v.get("map50")]
        if new:
            r["provenance"]["cycle0_reproduced"] = bool(all(abs(m - r["map50"][0]) < 1e-9 for m in new))
        else:
            r["provenance"].setdefault("cycle0_reproduced", None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", "--dataset", dest="pool", default="neu_det",
                    help=f"A dataset name ({', '.join(DATASETS)}, read from --data-root), a generated pool "
                         f"({', '.join(SYNTHETIC)}, written under the workdir), a pool YAML "
                         f"(images, annotations, format, test, config) or an initialised run directory.")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                    help="Folder holding the named datasets (default ../shared/data).")
    ap.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument("--strategies", default=None, help="Comma list (default: the preset's).")
    ap.add_argument("--seeds", default=None, help="Comma list of seeds (default: the preset's).")
    ap.add_argument("--cycles", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--seed-size", type=int, default=None)
    ap.add_argument("--diffusion-steps", type=int, default=None,
                    help="GSAL strategies: training steps of the pool's diffusion model (default gsal.train_steps)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="Extra config override (repeatable).")
    ap.add_argument("--workdir", default=None, help="Run directories (default benchmarks/runs/<dataset>_<preset>).")
    ap.add_argument("--out", default=None, help="Results JSON (default benchmarks/results/label_efficiency_...).")
    ap.add_argument("--tag", default="", help="Suffix for the results file name (variants).")
    ap.add_argument("--address", default=None, help="Ray cluster (default: embedded local Ray).")
    ap.add_argument("--longtail", nargs="?", type=float, const=0.5, default=None, metavar="RATIO",
                    help="Long-tail pool: keep 1, RATIO, RATIO^2, ... (default 0.5) of the pool images of the "
                         "dataset's classes in its config's class order; the last class is the rare one.")
    ap.add_argument("--rare", default=None, metavar="CLASS:FRACTION",
                    help="Keep only FRACTION of the pool images of CLASS (file-name prefix), e.g. pitted_surface:0.1.")
    ap.add_argument("--rare-class", default=None, metavar="CLASS",
                    help="Report the share ratio and AP50 of CLASS without subsampling the pool (a generated "
                         "pool's rare class is the default).")
    ap.add_argument("--no-reuse", action="store_true",
                    help="Rerun every loop, even those the results file already holds from the same protocol.")
    ap.add_argument("--collect", action="store_true",
                    help="Run nothing: write the results file from the loops finished so far in --workdir (and "
                         "those reused from it), marked incomplete, so that a later run goes on from there.")
    args = ap.parse_args(argv)
    from poolscout.engine.core.config import configs_dir
    from poolscout.engine.core.run import RunDir

    rare = None
    if args.rare:
        cls, _, frac = args.rare.partition(":")
        try:
            rare = (cls, float(frac))
        except ValueError:
            ap.error(f"--rare must be CLASS:FRACTION, got {args.rare!r}")
        if not cls or not 0 < rare[1] <= 1:
            ap.error(f"--rare must be CLASS:FRACTION with 0 < FRACTION <= 1, got {args.rare!r}")
    if args.longtail is not None and (rare is not None or not 0 < args.longtail <= 1):
        ap.error("--longtail takes a ratio in (0, 1] and excludes --rare")

    preset = PRESETS[args.preset]
    if args.pool in SYNTHETIC:
        name = f"label_efficiency_{args.pool}_{args.preset}{('_' + args.tag) if args.tag else ''}"
        spec = synthetic_spec(args.pool, Path(args.workdir or REPO / "benchmarks" / "runs" / name) / "pool")
    else:
        spec = pool_spec(args.pool, Path(args.data_root))
    if (args.rare_class or spec.get("rare")) and rare is None and args.longtail is None:
        rare = (args.rare_class or spec["rare"], 1.0)  # reported, not subsampled
    fractions = None
    if rare is not None and rare[1] < 1.0:
        fractions = {rare[0]: rare[1]}
    elif args.longtail is not None:
        import yaml

        if not spec.get("config"):
            ap.error("--longtail needs a dataset config with dataset.classes")
        classes = yaml.safe_load((configs_dir() / spec["config"]).read_text())["dataset"]["classes"]
        fractions = longtail_fractions(classes, args.longtail)
        rare = (classes[-1], fractions[classes[-1]])
    strategies = args.strategies.split(",") if args.strategies else preset["strategies"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    cycles = args.cycles if args.cycles is not None else preset["cycles"]
    budget = args.budget if args.budget is not None else preset["budget"]
    seed_size = args.seed_size if args.seed_size is not None else preset["seed_size"]
    name = f"label_efficiency_{spec['name']}_{args.preset}{('_' + args.tag) if args.tag else ''}"
    workdir = Path(args.workdir or REPO / "benchmarks" / "runs" / name)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"{name}.json")
    files = ([str(configs_dir() / spec["config"])] if spec.get("config") else []) + \
        [str(configs_dir() / c) for c in preset["configs"]]
    base = [*preset["overrides"], f"select.budget={budget}", f"loop.seed_size={seed_size}", *args.extra]
    # GSAL: one diffusion model for the pool, trained before the loops, and one map cache
    # shared by every loop (an image's maps do not depend on the loop); set for all runs so
    # that the gsal loops share cycle 0 with the others
    gsal = any(variant(s)[0].startswith("gsal") for s in strategies)
    diffusion = Path(args.workdir or REPO / "benchmarks" / "runs" / name) / "diffusion"
    if gsal:
        # one torch thread per diffusion actor: loops run side by side, one CPU each, and two
        # threads on a busy core spin (measured here: a UNet pass 15x slower)
        base += [f"gsal.model={diffusion / 'model'}", f"gsal.maps_dir={diffusion / 'maps'}", "gsal.threads=1"]

    settings = {"seed_size": seed_size, "budget": budget, "cycles": cycles, "strategies": strategies,
                "seeds": seeds, "configs": [Path(f).name for f in files], "overrides": base,
                "variants": {s: list(variant(s)) for s in strategies}, "rare": list(rare) if rare else None,
                "subsample": fractions, "cpus_per_run": preset["cpus_per_run"], "gpus_per_run": preset["gpus_per_run"]}
    earlier = None
    if out.is_file() and not args.no_reuse:
        try:
            earlier = json.loads(out.read_text())
        except ValueError:
            earlier = None
    reused = reusable_loops(earlier, {**settings, "dataset": spec["name"]}, strategies, seeds)
    for (strat, seed), r in reused.items():  # fields added since: from the loop's run directory, if still here
        d = workdir / f"{strat}_s{seed}"
        if (d / "cycles").is_dir() and (c := _curve(d))["map50"] == r["map50"]:
            r.update({k: v for k, v in c.items() if k not in r})
    if reused:
        print(f"reusing {len(reused)} finished loops from {out} "
              f"({', '.join(f'{k[0]} seed {k[1]}' for k in sorted(reused))}); --no-reuse reruns them", flush=True)
    cpu = cpu_model()
    provenance = {"commit": git_commit(), "platform": platform.platform(), "cpu": cpu}

    from poolscout.jobs.ray_env import connect

    info = {"cpus": None, "gpus": None} if args.collect else connect(args.address, log_dir=workdir / "logs")
    runs, ovs = {}, {}
    for seed in seeds:
        for strat in strategies:
            if (strat, seed) in reused:
                continue
            strategy, extra = variant(strat)
            runs[(strat, seed)] = RunDir(workdir / f"{strat}_s{seed}")
            ovs[(strat, seed)] = [*base, *extra, f"seed={seed}", f"select.strategy={strategy}"]
    t0 = time.time()
    fresh: dict = {}
    if args.collect:  # the loops that finished in the workdir so far
        for key, run in runs.items():
            if (run.root / "cycles").is_dir():
                c = _curve(run.root)
                if len(c["labeled"]) == cycles + 1 and None not in c["map50"]:
                    fresh[key] = {**c, "loop_seconds": None}
    elif runs:
        # the diffusion model and its map cache are needed only when a GSAL loop is still to run
        # (a benchmark that reuses its finished GSAL loops does not train a model for the others)
        need_maps = any(variant(k[0])[0].startswith("gsal") for k in runs)
        fresh = run_loops(args, spec, files, runs, ovs, fractions, need_maps, diffusion, workdir, info, cycles,
                          preset, t0)
    wall = time.time() - t0
    for r in fresh.values():
        r["provenance"] = {**provenance, "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    check_reproduced(reused, fresh)

    loops = {**reused, **fresh}
    missing = [f"{s} seed {d}" for d in seeds for s in strategies if (s, d) not in loops]
    results: dict = {}
    for strat in strategies:  # in the order asked for (the plot's legend and colours)
        for seed in seeds:
            if (strat, seed) in loops:
                results.setdefault(strat, {})[str(seed)] = loops[(strat, seed)]
    if not results:
        print("no finished loops yet: nothing written")
        return 1
    rarest = next(iter(next(iter(results.values())).values()))["rarest_class"]
    summary = summarise(results, rarest, rare[0] if rare else None)
    for strat, s in summary.items():
        s["seeds_done"] = sorted(int(k) for k in results[strat])
    doc = {
        "benchmark": "label_efficiency", "dataset": spec["name"], "pool": str(args.pool), "preset": args.preset,
        "complete": not missing, "missing": missing,
        "settings": settings,
        "machine": {"cpus": info["cpus"], "gpus": info["gpus"], "platform": platform.platform(), "cpu": cpu},
        "wall_seconds": round(wall, 1) + (float((earlier or {}).get("wall_seconds") or 0) if reused else 0.0),
        "summary": summary,
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    plot(summary, results, out.with_suffix(".png"),
         f"{spec['name']} / {args.preset}: {seed_size} seed + {cycles} x {budget}, seeds {seeds}"
         + (f" (incomplete: {len(missing)} loops missing)" if missing else ""))
    print(f"wall {wall / 60:.1f} min -> {out}" + (f"; still missing: {', '.join(missing)}" if missing else ""))
    for strat, s in summary.items():
        print(f"  {strat:16s} final mAP50 {s['final_map50']:.3f}  mAP {s['final_map']:.3f}  AULC {s['aulc']:.3f}  "
              f"to-reach-random {s['labels_to_reach_random_final']} images / {s['labels_to_reach_random_final_boxes']} boxes  {rarest} recall50 {s['rarest_class_recall50']}"
              + (f"  {rare[0]} share ratio {s['rare_share_ratio']} AP50 {s['rare_class_ap50']}" if rare else "")
              + (f"  dominant {s['dominant_term_shares']}" if s.get("dominant_term_shares") else "")
              + (f"  pseudo {s['pseudo_boxes_per_cycle']:.0f} boxes/cycle, precision50 {s['pseudo_precision50']:.3f}"
                 if s.get("pseudo_precision50") is not None else "")
              + (f"  (seeds {s['seeds_done']})" if len(s["seeds_done"]) < len(seeds) else ""))
    return 0


def run_loops(args, spec, files, runs, ovs, fractions, gsal, diffusion, workdir, info, cycles, preset, t0) -> dict:
    """Initialise the first run of each cycle-0 group, train GSAL's diffusion model if
    needed, and run every loop; returns (strategy, seed) -> its curve."""
    from poolscout.jobs.compare import compare

    # the first run of every group that shares a cycle 0 (same seed and training settings)
    # (on a resumed benchmark, a run that already exists: the others were copied from it)
    def started(key) -> int:
        root = runs[key].root
        return 0 if (root / "subsample.json").is_file() else (1 if root.exists() else 2)

    firsts: dict = {}
    for key, ov in ovs.items():
        group = (key[1], tuple(sorted(o for o in ov if not o.startswith("select.strategy="))))
        if group not in firsts or started(key) < started(firsts[group]):
            firsts[group] = key
    for key in firsts.values():
        init_loop_run(runs[key].root, spec, files, ovs[key])  # no-op for an existing run
        if fractions is not None:
            subsample_classes(str(runs[key].root), fractions)  # before cycle 0, so shared too
    if gsal and not (diffusion / "train.json").is_file():
        from poolscout.jobs.diffusion import train_diffusion

        key = next(iter(firsts.values()))
        print(f"training the pool's diffusion model in {diffusion / 'model'} ...", flush=True)
        s = train_diffusion(runs[key], runs[key].config(files, ovs[key]), steps=args.diffusion_steps,
                            executor="local", out=diffusion / "model", progress=False)
        print(f"diffusion model: {s['steps']} steps in {s['seconds']:.0f} s", flush=True)
    if gsal:  # every loop's first scoring then reads the maps instead of computing them side by side
        from poolscout.jobs.score import warm_maps

        # the maps' noise is drawn from the run's seed, so each seed has its own cache
        for key in {k[1]: k for k in firsts.values()}.values():
            w = warm_maps(runs[key], runs[key].config(files, [o for o in ovs[key] if o != "gsal.threads=1"]))
            print(f"map cache (seed {key[1]}): {w['computed']} of {w['images']} images computed in "
                  f"{w['seconds']:.0f} s", flush=True)
    print(f"{len(runs)} loops on {info['cpus']:.0f} CPUs / {info['gpus']:.0f} GPUs; logs in {workdir}/*/loop.log",
          flush=True)
    res = compare(runs, config_files=files, overrides=ovs, cycles=cycles, cpus_per_run=preset["cpus_per_run"],
                  gpus_per_run=preset["gpus_per_run"], threads=preset.get("threads", 1),
                  log=lambda m: print(f"{m} ({time.time() - t0:.0f} s elapsed)", flush=True))
    return {key: {**_curve(Path(r["run"])), "loop_seconds": r["seconds"]} for key, r in res.items()}

if __name__ == "__main__":
    sys.exit(main())
