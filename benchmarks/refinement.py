"""Refinement: held-out patch F1 against simulated answers, as in the paper's tables
(methods.md section 9; jobs/refine.py).

For each initial mask (roi, segmentation, random) x feedback mode (a mask update, b
user-refined set, c both) x anchor choice (random, entropy), a refinement session on the
same run answers `--answers` anchors with the simulated expert (truth: Magnetic Tile's
masks; NEU-DET's boxes filled, its only truth) and retrains every 50 answers; after each
retrain, precision / recall / F1 of the defect head on held-out patches (128 per test
image, half defect and half background by the truth). The model before any answer (v0,
trained on the initial masks) is shared by the six sessions of one initial mask.

The "segmentation" start stands in for a pre-trained segmentation model, which we do not
have offline: the truth with each defect component dropped with probability 0.3, grown by
3 px, plus two false 6 px blobs per image (engine.methods.refine.degrade_mask, seeded).

    python benchmarks/refinement.py --dataset magnetic_tile
    python benchmarks/refinement.py --dataset neu_det --max-images 300 --eval-images 60

Writes benchmarks/results/refinement_<dataset>.json and .png. Resumable: each session's
result is kept in --workdir/results/ and not rerun.
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

INITS = ("roi", "segmentation", "random")
MODES = ("a", "b", "c")
ANCHORS = ("random", "entropy")


def prepare(dataset: str, data_root: Path, workdir: Path):
    """The base run: a segmentation run (Magnetic Tile) or a detection run (NEU-DET)."""
    from poolscout.engine.core.config import configs_dir, load_config
    from poolscout.engine.core.run import RunDir

    data = data_root / dataset
    if not data.is_dir():
        raise SystemExit(f"error: {dataset} not found at {data} (see --data-root)")
    run = RunDir(workdir / "base")
    if dataset == "magnetic_tile":
        from poolscout.jobs.segment import init_segmentation

        cfg = load_config([str(configs_dir() / "magnetic_tile.yaml")], [])
        s = init_segmentation(run, images=data / "images", masks=data / "masks", test=data / "split_test.txt",
                              cfg=cfg, progress=False)
    else:
        from poolscout.engine.data.pool import init_run

        cfg = load_config([str(configs_dir() / "neu_det.yaml")], [])
        s = init_run(run, images=data / "images", annotations=data / "annotations", test=data / "split_test.txt",
                     cfg=cfg, progress=False)
    print(f"{dataset}: {json.dumps({k: v for k, v in s.items() if isinstance(v, (int, float))})}", flush=True)
    return run


def write_segmentation_init(run, out: Path, max_images: int, seed: int = 0) -> Path:
    """Degraded truth masks as PNGs at the images' source keys (the "segmentation" start)."""
    from PIL import Image

    from poolscout.engine.core import io
    from poolscout.engine.data.segmentation import mask_path_for
    from poolscout.engine.methods.refine import degrade_mask
    from poolscout.jobs.refine import _load_truth

    if (out / "done.json").is_file():
        return out
    man = io.read_table(run.manifest).sort_by("image_id")
    pool = set(int(i) for i in run.ids_in_state("pool")) | set(int(i) for i in run.ids_in_state("labeled"))
    rows = [(int(i), k, int(w), int(h)) for i, k, w, h in zip(man["image_id"].to_pylist(), man["source_key"].to_pylist(),
                                                             man["width"].to_pylist(), man["height"].to_pylist())
            if int(i) in pool]
    if max_images:
        rows = rows[:max_images]
    truth = _load_truth(run, np.array([r[0] for r in rows], np.int64), {i: (w, h) for i, _, w, h in rows})
    for i, key, w, h in rows:
        m = degrade_mask(truth[i], np.random.default_rng([seed, i]))
        p = mask_path_for(key, out)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m * 255).save(p)
    (out / "done.json").write_text(json.dumps({"images": len(rows)}))
    return out


def run_session(run, name: str, init: str, mode: str, anchors: str, args, init_masks: Path | None,
                v0: Path | None) -> dict:
    import shutil

    from poolscout.jobs.refine import RefineSession

    sdir = run.root / f"refine-{name}"
    if v0 is not None and not (sdir / "models" / "v0.pt").is_file():
        (sdir / "models").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(v0, sdir / "models" / "v0.pt")
    t0 = time.time()
    s = RefineSession(run, name=name, init=init, mode=mode, anchors=anchors, retrain_every=args.retrain_every,
                      steps=args.steps, per_image=args.per_image, max_images=args.max_images,
                      eval_images=args.eval_images, init_masks=str(init_masks) if init_masks else None, seed=args.seed)
    ev0 = s.evaluate()
    curve = [{"answers": 0, **{k: ev0.get(k) for k in ("f1", "precision", "recall")}}]
    done = len(s.answers())
    if done < args.answers:
        s.simulate(args.answers - done, shift=True,
                   on_retrain=lambda r: print(f"  {name}: {r['answers_used']} answers, F1 {r['f1']:.3f}", flush=True))
    for e in s.answers_log.retrains():
        curve.append({"answers": e["answers_used"], "f1": e["f1"], "precision": e.get("precision"),
                      "recall": e.get("recall"), "seconds": e["seconds"]})
    gain = (curve[-1]["f1"] or 0) - (curve[0]["f1"] or 0)
    return {"init": init, "mode": mode, "anchors": anchors, "curve": curve,
            "final_f1": curve[-1]["f1"], "f1_gain": gain,
            "answers_per_f1_point": (curve[-1]["answers"] / (100 * gain)) if gain > 0 else None,
            "patches": int(len(s.patches)), "eval_patches": int(len(s.eval_labels)) if s.eval_labels is not None else 0,
            "seconds": round(time.time() - t0, 1), "v0_path": str(s.dir / "models" / "v0.pt")}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, init in zip(axes, INITS):
        for i, mode in enumerate(MODES):
            for anchors, style in (("entropy", "-o"), ("random", "--s")):
                r = results.get(f"{init}_{mode}_{anchors}")
                if not r:
                    continue
                x = [c["answers"] for c in r["curve"]]
                y = [c["f1"] for c in r["curve"]]
                ax.plot(x, y, style, color=f"C{i}", ms=4, label=f"mode {mode}, {anchors} anchors")
        ax.set_title(f"initial mask: {init}")
        ax.set_xlabel("simulated answers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out patch F1")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from poolscout.engine.core.io import atomic_savefig

    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["magnetic_tile", "neu_det"], default="magnetic_tile")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workdir", default=None, help="Default benchmarks/runs/refinement_<dataset>.")
    ap.add_argument("--out", default=None, help="Default benchmarks/results/refinement_<dataset>.json.")
    ap.add_argument("--answers", type=int, default=200, help="Simulated answers per session (retrain every 50).")
    ap.add_argument("--retrain-every", type=int, default=50)
    ap.add_argument("--steps", type=int, default=150, help="Training steps (batches of 128) per retrain.")
    ap.add_argument("--per-image", type=int, default=32, help="Patch centres per pool image.")
    ap.add_argument("--max-images", type=int, default=0, help="Pool images used (0: all).")
    ap.add_argument("--eval-images", type=int, default=0, help="Held-out test images (0: all).")
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--anchors", default=",".join(ANCHORS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or REPO / "benchmarks" / "runs" / f"refinement_{args.dataset}")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"refinement_{args.dataset}.json")
    (workdir / "results").mkdir(parents=True, exist_ok=True)
    run = prepare(args.dataset, Path(args.data_root), workdir)
    t0 = time.time()
    results = {}
    for init in args.inits.split(","):
        masks = write_segmentation_init(run, workdir / "init_segmentation", args.max_images, args.seed) \
            if init == "segmentation" else None
        v0 = None
        for mode in args.modes.split(","):
            for anchors in args.anchors.split(","):
                name = f"{init}_{mode}_{anchors}"
                f = workdir / "results" / f"{name}.json"
                if f.is_file():
                    results[name] = json.loads(f.read_text())
                else:
                    print(f"{name} ...", flush=True)
                    results[name] = run_session(run, name, init, mode, anchors, args, masks, v0)
                    f.write_text(json.dumps(results[name], indent=1))
                v0 = v0 or Path(results[name]["v0_path"])
    summary = {name: {k: r[k] for k in ("final_f1", "f1_gain", "answers_per_f1_point")} | {"f1_v0": r["curve"][0]["f1"]}
               for name, r in results.items()}
    doc = {"benchmark": "refinement", "dataset": args.dataset,
           "settings": {k: getattr(args, k) for k in ("answers", "retrain_every", "steps", "per_image", "max_images",
                                                       "eval_images", "threads", "seed")},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "wall_seconds": round(time.time() - t0, 1), "summary": summary, "runs": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    plot(results, out.with_suffix(".png"), f"refinement on {args.dataset}: simulated expert, retrain every "
                                           f"{args.retrain_every} answers")
    print(f"-> {out}")
    for name, s in summary.items():
        print(f"  {name:28s} F1 {s['f1_v0']:.3f} -> {s['final_f1']:.3f}  answers per F1 point "
              f"{s['answers_per_f1_point']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
