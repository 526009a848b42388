"""Measure `poolscout tune` as a user runs it, on the demo's synthetic inspection pool.

    python benchmarks/tune_search.py [--strategy huale] [--trials 8] [--cycles 3]

Builds the demo pool (320 images of 128 px; `jobs.demo.demo_pool`), initialises a run with
the demo preset (configs/demo.yaml) and 90% of the images labeled (the "labeled part" tune
simulates on), then runs `poolscout tune RUN --strategy S --space S` in a fresh process and
times it. Writes benchmarks/results/tune_<strategy>.json (tune.json plus the command, wall
seconds and machine) and tune_<strategy>.png (every trial's AULC on the tuning split, and the
defaults' and the best's learning curves on both splits).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poolscout.engine.core import io

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    trials = [t for t in doc["trials"] if t["aulc"] is not None]
    colors = ["tab:green" if t["trial"] == doc["best_trial"] else
              ("tab:gray" if t["cycles_run"] < doc["settings"]["cycles"] else "tab:blue") for t in trials]
    ax0.bar(range(len(trials)), [t["aulc"] for t in trials], color=colors)
    ax0.axhline(doc["aulc"]["defaults_a"], color="k", ls="--", label=f"defaults {doc['aulc']['defaults_a']:.3f}")
    ax0.set_xticks(range(len(trials)), [f"{t['trial'][-5:]}\n{t['cycles_run']} cyc" for t in trials], fontsize=7)
    ax0.set_ylabel("AULC of mAP50 (split A, so far)")
    ax0.set_title("trials on the tuning split (grey: stopped by ASHA, green: best)", fontsize=9)
    ax0.legend(fontsize=8)
    for key, style in (("defaults_a", ("k", "--")), ("best_a", ("tab:green", "--")),
                       ("defaults_b", ("k", "-")), ("best_b", ("tab:green", "-"))):
        c = doc["curves"][key]
        who, split = key.split("_")
        ax1.plot(c["labeled"], c["map50"], color=style[0], ls=style[1], marker="o",
                 label=f"{who} on split {split.upper()}: AULC {c['aulc']:.3f}")
    ax1.set_xlabel("labeled images")
    ax1.set_ylabel("mAP50 (the split's test images)")
    ax1.set_title(doc["verdict"][:95], fontsize=8)
    ax1.legend(fontsize=8)
    fig.suptitle(f"poolscout tune {doc['strategy']}: {doc['settings']['trials']} trials x "
                 f"{doc['settings']['cycles']} cycles of {doc['settings']['budget']}, {doc['wall_seconds']:.0f} s "
                 f"on {doc['machine']['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    io.atomic_savefig(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="huale")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--labeled-fraction", type=float, default=0.9)
    ap.add_argument("--workdir", default="/tmp/poolscout-tune-bench")
    ap.add_argument("--keep", action="store_true", help="Reuse the work folder (resume) instead of a fresh one.")
    ap.add_argument("extra", nargs="*", help="Extra `poolscout tune` options (after --).")
    args = ap.parse_args(argv)

    from poolscout.jobs.demo import demo_pool

    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    pool = demo_pool(work / "pool", n_images=args.images, size=args.size, seed=0)
    exe = Path(sys.executable).with_name("poolscout")
    ps = str(exe) if exe.is_file() else "poolscout"
    run = work / "run"
    if not (run / "run.yaml").is_file():
        subprocess.run([ps, "init", str(run), "--images", str(pool["images"]), "--annotations",
                        str(pool["annotations"]), "--seed-fraction", str(args.labeled_fraction),
                        "--config", str(REPO / "configs" / "demo.yaml")], check=True)
    cmd = [ps, "tune", str(run), "--strategy", args.strategy, "--space", args.strategy, "--trials",
           str(args.trials), "--cycles", str(args.cycles), *args.extra]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    seconds = time.time() - t0
    (work / "console.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        return proc.returncode
    doc = json.loads((run / "tune" / args.strategy / "tune.json").read_text())
    doc = {"command": " ".join(["poolscout", *cmd[1:]]).replace(str(work), "WORK"),
           "pool": f"demo pool: {args.images} images of {args.size} px, {args.labeled_fraction:.0%} labeled "
                   "(the part tune simulates on)",
           "wall_seconds": round(seconds, 1),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           **doc}
    out = REPO / "benchmarks" / "results"
    (out / f"tune_{args.strategy}.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out / f"tune_{args.strategy}.png")
    print(f"{doc['verdict']}; wall {seconds:.0f} s -> {out / f'tune_{args.strategy}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
