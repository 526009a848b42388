"""Scoring on 1, 2 and 4 local raylets: the same pool, model and stream, more nodes.

Each setting starts a fresh local cluster (ray.cluster_utils.Cluster: a head that holds no
CPU, so every scoring task lands on a worker raylet, plus N worker raylets of `--cpus-per-node`
CPUs each), scores the same NEU-DET pool images with the Ray executor (detector actors:
`score.concurrency` = N, each 0.75 CPU, so that decode and signal tasks fit beside them), and
records images/s, images/s per CPU of the cluster, the driver's peak RSS (sampled every
50 ms) and how many of the machine's cores were busy on average (all processes: Ray's own
daemons, the driver, decode tasks and actors). On this 2-core machine, 4 raylets of 1 CPU oversubscribe the cores: the point is that
the same code spreads over more raylets and the driver's memory stays flat, not the speed-up.
With a GPU (not on this machine), the stream is measured against a plain model forward on
preloaded tensors.

    python benchmarks/score_scaling.py                      # benchmarks/results/score_scaling.json + .png
    python benchmarks/score_scaling.py --images 400 --nodes 1,2,4
    python benchmarks/score_scaling.py --plot-only          # redraw the PNG from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakRSS:
    """The process's resident memory, sampled in a thread: its peak over the `with` block."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def plot(doc: dict, path: Path) -> None:
    """Throughput (with the cores the machine had busy) and the driver's peak memory, from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poolscout.engine.core.io import atomic_savefig

    rows = doc["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["raylets"] for r in rows]
    a.plot(x, [r["images_per_s"] for r in rows], "-o", label="images/s")
    a.plot(x, [r["images_per_s_per_cpu"] for r in rows], "--s", label="images/s per CPU")
    for r in rows:
        if r.get("cores_busy") is not None:
            a.annotate(f"{r['cores_busy']:.1f} cores busy", (r["raylets"], r["images_per_s"]),
                       textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    a.set_xlabel("worker raylets (1 CPU each)")
    a.set_xticks(x)
    a.set_ylim(0, max(r["images_per_s"] for r in rows) * 1.2)
    a.legend(loc="lower left")
    a.grid(alpha=0.3)
    b.plot(x, [r["driver_peak_rss_mb"] for r in rows], "-o")
    b.set_xlabel("worker raylets (1 CPU each)")
    b.set_xticks(x)
    b.set_ylim(0, max(r["driver_peak_rss_mb"] for r in rows) * 1.15)
    b.set_ylabel("driver peak RSS (MB)")
    b.grid(alpha=0.3)
    fig.suptitle(f"scoring {doc['pool_images']} NEU-DET images, cpu-small detector, "
                 f"{doc['machine']['cores']}-core machine", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neu", default=str(REPO.parent / "shared" / "data" / "neu_det"))
    ap.add_argument("--images", type=int, default=400, help="Pool images scored (the first by id).")
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "score_scaling.json"))
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from the results JSON; run nothing.")
    args = ap.parse_args(argv)
    if args.plot_only:
        out = Path(args.out)
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        print(f"-> {out.with_suffix('.png')}")
        return 0
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.score_throughput import make_run, write_model
    from poolscout.engine.core.config import load_config
    from poolscout.jobs.score import score

    neu = Path(args.neu)
    if not neu.is_dir():
        raise SystemExit(f"error: NEU-DET not found at {neu} (see --neu)")
    base = ["score.views=[orig]", "score.batch_size=8", "score.torch_threads=1", "score.num_cpus=0.75",
            "train.epochs=1", "loop.executor=ray"]
    tmp = Path(tempfile.mkdtemp(prefix="score_scaling_"))
    run = make_run(tmp, neu, base)
    cfg = load_config([REPO / "configs" / "neu_det.yaml", REPO / "configs" / "cpu-small.yaml"], base)
    write_model(run, cfg)
    # keep the first --images pool images, mark the rest rejected for this benchmark
    pool = np.sort(run.ids_in_state("pool"))
    if len(pool) > args.images:
        run.set_state(pool[args.images:], "rejected")
    n_pool = len(run.ids_in_state("pool"))
    rows = []
    for n in [int(x) for x in args.nodes.split(",")]:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(n):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            c = load_config([REPO / "configs" / "neu_det.yaml", REPO / "configs" / "cpu-small.yaml"],
                            [*base, f"score.concurrency={n * args.cpus_per_node}"])
            import psutil

            psutil.cpu_percent(None)  # starts the machine-wide CPU-use interval
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                s = score(run, c, progress=False, executor="ray", force=True)
                wall = time.perf_counter() - t0
            busy = psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1)  # cores in use, mean over the run
            cpus = n * args.cpus_per_node
            rows.append({"raylets": n, "cpus": cpus, "images": n_pool, "seconds": round(wall, 2),
                         "images_per_s": round(n_pool / wall, 2), "images_per_s_per_cpu": round(n_pool / wall / cpus, 2),
                         "driver_peak_rss_mb": round(mem.peak / 2**20, 1), "cores_busy": round(busy, 2),
                         "scored": s.get("scored")})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    doc = {"benchmark": "score_scaling", "dataset": "neu_det", "preset": "cpu-small", "pool_images": n_pool,
           "cpus_per_node": args.cpus_per_node, "rows": rows,
           "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
           "gpu": "not measured: this machine has no GPU"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    plot(doc, out.with_suffix(".png"))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
