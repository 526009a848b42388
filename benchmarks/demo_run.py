"""Measure `poolscout demo` as a user runs it: wall time, console lines, the verdict.

    python benchmarks/demo_run.py [--out DIR] [-- extra demo options]

Runs the console script in a fresh process (a fresh output folder unless --keep), captures
everything it prints (stdout and stderr together, as a terminal would show them; a
progress bar's carriage-return updates count as one line), and writes
benchmarks/results/demo.json: seconds, console_lines, the lines that are not poolscout's
own, final mAP50 per strategy and seed, and the verdict line.
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
OURS = ("[demo]", "verdict:", "loops:", "report:")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/poolscout-demo-bench", help="The demo's output folder.")
    ap.add_argument("--keep", action="store_true", help="Reuse the output folder (a rerun) instead of a fresh one.")
    ap.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    ap.add_argument("extra", nargs="*", help="Extra `poolscout demo` options (after --).")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("poolscout")
    cmd = [str(exe) if exe.is_file() else "poolscout", "demo", "--out", str(out), *args.extra]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    seconds = time.time() - t0
    text = proc.stdout
    (out / "console.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "console.txt").write_text(text)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    # what a terminal shows of a line rewritten with \r is its last state
    shown = [ln.split("\r")[-1].strip() or ln.strip() for ln in lines]
    foreign = [ln for ln in shown if not ln.startswith(OURS)]
    if proc.returncode != 0:
        print(text[-4000:], file=sys.stderr)
        print(f"demo failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    demo = json.loads((out / "demo.json").read_text())
    doc = {
        "command": " ".join(["poolscout", *cmd[1:]]),
        "seconds": round(seconds, 1),
        "console_lines": len(lines),
        "lines_not_poolscout": foreign,
        "final_map50": demo["final_map50"],
        "rare_share_ratio": demo["rare_share_ratio"],
        "verdict": demo["verdict"],
        "settings": {k: demo[k] for k in ("n_images", "size", "cycles", "budget", "seed_size", "strategies", "seeds")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    res = Path(args.result)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{seconds:.0f} s, {len(lines)} console lines ({len(foreign)} not poolscout's) -> {res}")
    print(demo["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
