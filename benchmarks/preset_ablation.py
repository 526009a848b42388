"""What each speed choice of the cpu-small preset costs in mAP (NEU-DET).

Trains the detector from the ImageNet backbone on one fixed set of labeled images (by
default the 300 images random sampling had labeled at the end of the label-efficiency
benchmark, seed 0) under variants of the preset, evaluates each on the 360 test images
with pycocotools, and records time per image-step. Variants run as Ray tasks, one CPU
and one torch thread each, as the label-efficiency loops do.

    python benchmarks/preset_ablation.py      # -> benchmarks/results/preset_ablation_neu_det.json
    python benchmarks/preset_ablation.py --group losses --seeds 0,1
                                              # -> benchmarks/results/loss_ablation_neu_det.json
    python benchmarks/preset_ablation.py --group losses --seeds 0,1 --variants eiou_w10 --merge
                                              # adds one variant to that file

`--group losses` trains the same images with HUALE's training losses (methods.md section 3,
item 4) switched on one at a time and all together, to see which of them moves mAP.

The warm-start choice is measured against the same images: `base` trains 8 epochs cold
on the final 300 images; the label-efficiency loop reached its final model by warm
starts (8 epochs on 100, then 5 per round); both numbers are in the results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "base": [],
    # torchvision's defaults for proposals and ROI samples
    "full_proposals": ["detector.rpn_pre_nms_top_n_train=2000", "detector.rpn_post_nms_top_n_train=2000",
                       "detector.rpn_pre_nms_top_n_test=1000", "detector.rpn_post_nms_top_n_test=1000",
                       "detector.rpn_batch_size_per_image=256", "detector.box_batch_size_per_image=512"],
    "trainable_stem": ["detector.freeze_stem=false"],
    "input_200": ["detector.input_size=200"],  # NEU-DET's native size
    "input_128": ["detector.input_size=128"],
}

LOSS_VARIANTS = {
    "base": [],
    "emphasis": ["train.emphasis_loss=true"],
    "eiou": ["train.eiou_loss=true"],
    "eiou_w10": ["train.eiou_loss=true", "train.eiou_weight=10"],
    "aware": ["detector.box_var_head=true", "train.aware_loss=true"],
    "lambda_0.5": ["train.loss_lambda=0.5"],
    "all": ["detector.box_var_head=true", "train.emphasis_loss=true", "train.eiou_loss=true",
            "train.aware_loss=true", "train.loss_lambda=0.5"],
}
GROUPS = {"preset": (VARIANTS, "preset_ablation_neu_det.json"), "losses": (LOSS_VARIANTS, "loss_ablation_neu_det.json")}


def train_eval(run_dir: str, ids: list[int], files: list[str], overrides: list[str]) -> dict:
    import torch

    from poolscout.engine.core.config import load_config
    from poolscout.engine.evaluation.metrics import evaluate_model
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.core import io
    from poolscout.engine.models.training import fit_detector

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    torch.set_num_threads(1)
    run = RunDir(Path(run_dir))
    cfg = load_config(files, overrides)
    d = cfg.to_dict()
    spec = {"train": d["train"], "detector": d["detector"], "seed": cfg.seed, "manifest": str(run.manifest),
            "annotations": str(run.annotations), "labeled_ids": ids, "num_classes": run.num_classes(),
            "max_pixels": cfg.dataset.max_pixels, "warm_start": None}
    t0 = time.time()
    model, hist = fit_detector(spec, progress=False, log=lambda *a: None)
    train_s = time.time() - t0
    test = np.sort(run.ids_in_state("test"))
    man = io.read_table(run.manifest, columns=["image_id", "uri", "width", "height"])
    man = man.filter(pc.is_in(man["image_id"], pa.array(test))).sort_by("image_id")
    ev = evaluate_model(model, man, io.read_table(run.annotations), run.read_categories(),
                        input_size=cfg.detector.input_size, batch_size=8)
    steps = sum(h["images"] for h in hist)
    return {"map50": ev["map50"], "map": ev["map"], "train_seconds": round(train_s, 1),
            "ms_per_image_step": round(1000 * train_s / steps, 1), "eval_seconds": round(ev["seconds"], 1),
            "eval_ms_per_image": round(1000 * ev["seconds"] / max(1, ev["test_images"]), 1),
            "final_loss": hist[-1]["loss"], "overrides": overrides}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop-run", default=str(REPO / "benchmarks/runs/label_efficiency_neu_det_cpu-small/random_s0"),
                    help="Run directory whose labeled images to train on (its ledger and test split).")
    ap.add_argument("--group", choices=sorted(GROUPS), default="preset",
                    help="preset: the speed choices of cpu-small; losses: HUALE's training losses.")
    ap.add_argument("--variants", default=None, help="Comma-separated subset of the group's variants.")
    ap.add_argument("--seeds", default="0", help="Comma-separated training seeds; each variant runs once per seed.")
    ap.add_argument("--out", default=None, help="Result JSON (default benchmarks/results/<group's file>).")
    ap.add_argument("--merge", action="store_true",
                    help="Keep the variants already in --out that this run does not train (same seeds and images).")
    args = ap.parse_args(argv)
    table, default_out = GROUPS[args.group]
    names = args.variants.split(",") if args.variants else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"--variants: unknown {unknown} for group {args.group}; choose from {sorted(table)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(args.out) if args.out else REPO / "benchmarks/results" / default_out

    import numpy as np
    import ray

    from poolscout.engine.core.config import configs_dir
    from poolscout.engine.core.run import RunDir
    from poolscout.jobs.ray_env import connect

    run = RunDir(Path(args.loop_run))
    run.require()
    ids = sorted(int(i) for i in run.ids_in_state("labeled"))
    files = [str(configs_dir() / "neu_det.yaml"), str(configs_dir() / "cpu-small.yaml")]
    base = ["train.epochs=8", "train.torch_threads=1"]
    connect(quiet=True)
    task = ray.remote(num_cpus=1, max_retries=0)(train_eval)
    t0 = time.time()
    refs = {(n, s): task.remote(str(run.root), ids, files, [*base, f"seed={s}", *table[n]])
            for n in names for s in seeds}
    runs = {}
    for (n, s), r in refs.items():
        runs[(n, s)] = res = ray.get(r)
        print(f"{n:16s} seed {s}  mAP50 {res['map50']:.3f} mAP {res['map']:.3f} "
              f"{res['ms_per_image_step']:.0f} ms/image-step", flush=True)
    if len(seeds) == 1:  # the single-seed layout of the committed preset results
        results = {n: runs[(n, seeds[0])] for n in names}
    else:
        results = {}
        for n in names:
            per = [runs[(n, s)] for s in seeds]
            m50 = [r["map50"] for r in per]
            results[n] = {"map50": float(np.mean(m50)), "map50_std": float(np.std(m50)),
                          "map": float(np.mean([r["map"] for r in per])),
                          "ms_per_image_step": float(np.mean([r["ms_per_image_step"] for r in per])),
                          "overrides": table[n], "per_seed": {str(s): runs[(n, s)] for s in seeds}}
            print(f"{n:16s} mean mAP50 {results[n]['map50']:.3f} +- {results[n]['map50_std']:.3f}", flush=True)
    loop_final = None
    mpath = sorted((run.root / "cycles").glob("*/metrics.json"), key=lambda p: int(p.parent.name))
    if mpath:
        m = json.loads(mpath[-1].read_text())
        loop_final = {"map50": m["eval"]["map50"], "map": m["eval"]["map"], "labeled_images": m["labeled_images"],
                      "train_seconds_all_cycles": round(sum(json.loads(p.read_text())["timings_s"].get("train", 0)
                                                            for p in mpath), 1)}
    doc = {"benchmark": f"{args.group}_ablation",
           "dataset": "neu_det", "labeled_images": len(ids), "seeds": seeds,
           "source_run": str(run.root.relative_to(REPO)) if run.root.is_relative_to(REPO) else str(run.root),
           "settings": {"configs": [Path(f).name for f in files], "overrides": base, "threads_per_variant": 1},
           "wall_seconds": round(time.time() - t0, 1), "variants": results,
           "warm_started_loop_final": loop_final}
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        if old.get("seeds", [0]) != seeds or old.get("source_run") != doc["source_run"]:
            raise SystemExit(f"--merge: {out} has seeds {old.get('seeds', [0])} from {old.get('source_run')}; "
                             f"this run has seeds {seeds} from {doc['source_run']}")
        doc["variants"] = {**old["variants"], **results}
        doc["wall_seconds"] = round(old.get("wall_seconds", 0) + doc["wall_seconds"], 1)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
