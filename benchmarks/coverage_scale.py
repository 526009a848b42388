"""Coverage selectors at scale: exact k-center greedy (core-set), MaxHerding, scikit-activeml.

Parts (run separately with --parts; each merges its keys into the existing JSON):

* kcenter: N = 1,000,000 x 128 float32, B = 1000, on seeded data sets (a Gaussian mixture of
  1000 blobs in 50 groups, the headline; a flat mixture of 1000 blobs; a plain Gaussian).
  Times the bounded selector path (`coreset.kcenter_greedy(bounds=True)`, clustering
  included), a plain float32 NumPy loop (||x||^2 - 2 x.c + ||c||^2, running minimum, argmax)
  and once the exact plain Numba greedy (`bounds=False`, the selector's unbounded path, the
  reference), all from the same first centre; then the same with 1000 labeled centres.
  `kcenter_same_picks`: the bounded picks (and scores) equal the reference's; the NumPy
  loop's agreement is reported on its own (float32 rounding may reorder near-ties).
* maxherding: the `maxherding` selector (kNN graph) against the exact dense greedy
  (objective ratio sparse / dense at 5k and 20k) and its time and peak memory at
  --herding-sizes.
* sklearn: scikit-activeml's core-set (and MaxHerding, if the installed version has it)
  in a subprocess of a separate interpreter (--skactiveml-python), with a timeout.

    python benchmarks/coverage_scale.py --parts kcenter
    python benchmarks/coverage_scale.py --parts maxherding --herding-sizes 20000
    python benchmarks/coverage_scale.py --parts sklearn --skactiveml-python /tmp/skal/bin/python

Timings are the minimum of --repeats runs (wall clock; the process CPU time of that run is
recorded too, since the machine may be shared); `os.getloadavg()` is recorded at the start
and end of each part. Peak memory is the largest RSS above the RSS at the start of a call,
sampled every 5 ms (psutil); memory the allocator had already retained from an earlier
run is not counted again, so small figures are lower bounds (the bounded path also reports
the exact size of its layout, `layout_mb`, and each part the process peak, ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "coverage_scale.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kcenter", help="comma list of kcenter, maxherding, sklearn")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS / OpenMP / FAISS threads (default 1: the machine is shared)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--numpy-repeats", type=int, default=3, help="NumPy loop runs on the headline data set")
    ap.add_argument("--numpy-repeats-other", type=int, default=1, help="NumPy loop runs on the other data sets")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--labeled", type=int, default=1000)
    ap.add_argument("--datasets", default="mixture,flat_mixture,gaussian",
                    help="kcenter data sets; the first gives the headline keys")
    ap.add_argument("--reference-datasets", default="mixture,flat_mixture,gaussian",
                    help="data sets on which the slow plain Numba reference runs (picks check)")
    ap.add_argument("--herding-sizes", default="20000,200000,1000000")
    ap.add_argument("--herding-ratio-sizes", default="5000,20000")
    ap.add_argument("--herding-budget", type=int, default=100)
    ap.add_argument("--herding-d", type=int, default=64)
    ap.add_argument("--skactiveml-python", default="/tmp/skal/bin/python")
    ap.add_argument("--sklearn-sizes", default="20000,100000,1000000")
    ap.add_argument("--sklearn-ours-herding-max", type=int, default=20000,
                    help="largest size at which the poolscout maxherding selector is timed in this part")
    ap.add_argument("--sklearn-budget", type=int, default=100)
    ap.add_argument("--sklearn-timeout", type=float, default=900.0)
    ap.add_argument("--sklearn-ours-only", action="store_true",
                    help="only (re)time the poolscout selectors of the sklearn part")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / faiss load their thread pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- helpers


def mixture(n: int, d: int, seed: int, *, blobs: int = 1000, groups: int = 0, spread: float = 0.35,
            scale: float = 0.1) -> np.ndarray:
    """Seeded Gaussian mixture, (n, d) float32, generated in chunks.

    Blob centres ~ N(0, I) (flat), or group centre + spread * N(0, I) with `groups` group
    centres ~ N(0, I) (hierarchical: near and far blobs, as in real embedding spaces). Blob
    weights ~ lognormal(0, 0.5); points = centre + sigma * N(0, I), sigma = scale *
    lognormal(0, 0.25) per blob. The first n rows and any further rows come from the same
    mixture (labeled centres are drawn as extra rows).
    """
    rng = np.random.default_rng(seed)
    if groups:
        gc = rng.standard_normal((groups, d), dtype=np.float32)
        centres = gc[rng.integers(groups, size=blobs)] + spread * rng.standard_normal((blobs, d), dtype=np.float32)
    else:
        centres = rng.standard_normal((blobs, d), dtype=np.float32)
    w = rng.lognormal(0.0, 0.5, blobs)
    lab = rng.choice(blobs, size=n, p=w / w.sum())
    sig = (scale * rng.lognormal(0.0, 0.25, blobs)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 65536):
        lb = lab[a : a + 65536]
        x[a : a + 65536] = centres[lb] + sig[lb, None] * rng.standard_normal((len(lb), d), dtype=np.float32)
    return x


def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 65536):
        x[a : a + 65536] = rng.standard_normal((min(65536, n - a), d), dtype=np.float32)
    return x


DATASETS = {
    "mixture": dict(kind="mixture", blobs=1000, groups=50, spread=0.35, scale=0.1,
                    note="1000 Gaussian blobs (sigma 0.1 x lognormal) around 50 group centres (spread 0.35)"),
    "flat_mixture": dict(kind="mixture", blobs=1000, groups=0, scale=0.1,
                         note="1000 Gaussian blobs (sigma 0.1 x lognormal), centres N(0, I): all blobs "
                              "nearly equidistant, the hard case for triangle-inequality bounds"),
    "gaussian": dict(kind="gaussian", note="one N(0, I) cloud, no cluster structure"),
}


def make_data(name: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    spec = dict(DATASETS[name])
    spec.pop("note")
    if spec.pop("kind") == "gaussian":
        return gaussian(n, d, seed)
    return mixture(n, d, seed, **spec)


class PeakRSS:
    """Largest RSS above the RSS at entry, sampled every `period` seconds in a thread."""

    def __init__(self, period: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.period = period

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(self.period)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mb = (self.peak - self.base) / 2**20


def timed(fn, repeats: int) -> tuple[object, dict]:
    """Run fn() `repeats` times; the result and timing of the fastest run (wall)."""
    best = None
    runs = []
    for _ in range(max(1, repeats)):
        with PeakRSS() as mem:
            c0, w0 = time.process_time(), time.perf_counter()
            res = fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        runs.append({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": mem.mb})
        if best is None or wall < best[1]["wall_s"]:
            best = (res, runs[-1])
    info = dict(best[1])
    info["all_wall_s"] = [r["wall_s"] for r in runs]
    return best[0], info


def numpy_kcenter(x: np.ndarray, budget: int, *, first_row: int | None = None, labeled: np.ndarray | None = None,
                  chunk: int = 65536) -> np.ndarray:
    """Plain float32 NumPy k-center greedy: ||x||^2 - 2 x.c + ||c||^2 with a running minimum."""
    n = len(x)
    xn = np.einsum("ij,ij->i", x, x)
    if labeled is None:
        md = np.full(n, np.inf, dtype=np.float32)
        nxt = int(first_row)
    else:
        md = np.empty(n, dtype=np.float32)
        ln = np.einsum("ij,ij->i", labeled, labeled)
        for a in range(0, n, chunk):
            g = x[a : a + chunk] @ labeled.T
            g *= -2.0
            g += xn[a : a + chunk, None]
            g += ln[None, :]
            md[a : a + chunk] = g.min(axis=1)
        nxt = int(np.argmax(md))
    rows = np.empty(budget, dtype=np.int64)
    tmp = np.empty(n, dtype=np.float32)
    for t in range(budget):
        rows[t] = nxt
        md[nxt] = -np.inf
        if t + 1 == budget:
            break
        c = x[nxt]
        np.matmul(x, c, out=tmp)
        tmp *= -2.0
        tmp += xn
        tmp += np.float32(c @ c)
        np.minimum(md, tmp, out=md)
        nxt = int(np.argmax(md))
    return rows


def prefix_match(a: np.ndarray, b: np.ndarray) -> int:
    neq = np.flatnonzero(np.asarray(a) != np.asarray(b))
    return int(neq[0]) if len(neq) else int(min(len(a), len(b)))


# --------------------------------------------------------------------------- parts


def part_kcenter(args) -> dict:
    import faiss

    from poolscout.engine.methods import coreset as C

    faiss.omp_set_num_threads(args.threads)
    n, d, b, nl = args.n, args.d, args.budget, args.labeled
    # compile / load the Numba kernels outside the timings
    C.kcenter_greedy(mixture(5000, d, 99), 20, bounds=True)
    C.kcenter_greedy(mixture(5000, d, 99), 20, labeled=mixture(10, d, 98), bounds=True)
    C.kcenter_greedy(mixture(500, d, 99), 5, bounds=False)
    names = [s for s in args.datasets.split(",") if s]
    ref_names = set(s for s in args.reference_datasets.split(",") if s)
    out: dict = {"kcenter_setup": {"n": n, "d": d, "budget": b, "labeled": nl, "repeats": args.repeats,
                                   "numpy_repeats": args.numpy_repeats,
                                   "numpy_repeats_other": args.numpy_repeats_other, "threads": args.threads,
                                   "first_centre": "farthest from the mean (the selector's default), the same for "
                                                   "every method"}}
    per: dict = {}
    for name in names:
        t0 = time.perf_counter()
        full = make_data(name, n + nl, d, seed=0)
        x = full[:n]
        lab = np.ascontiguousarray(full[n:])
        print(f"[kcenter] {name}: data {time.perf_counter() - t0:.1f}s", flush=True)
        rec: dict = {"note": DATASETS[name]["note"], "load_start": os.getloadavg()}
        for variant, labeled in (("unlabeled", None), ("labeled", lab)):
            r: dict = {}
            res, info = timed(lambda: C.kcenter_greedy(x, b, labeled=labeled, bounds=True), args.repeats)
            st = {k: v for k, v in res.stats.items() if k != "per_step"}
            per_step = res.stats["per_step"]
            r["bounded"] = {**info, "stats": st,
                            "clusters_swept_per_step_mean": float(per_step[:, 1].mean()),
                            "blocks_swept_fraction_by_100_steps": [
                                float(per_step[i : i + 100, 2].mean() / st["blocks"])
                                for i in range(0, len(per_step), 100)]}
            print(f"[kcenter] {name}/{variant}: bounded {info['all_wall_s']} {st}", flush=True)
            first_row = int(res.rows[0])
            npr, ninfo = timed(lambda: numpy_kcenter(x, b, first_row=first_row if labeled is None else None,
                                                     labeled=labeled),
                               args.numpy_repeats if name == names[0] else args.numpy_repeats_other)
            r["numpy"] = ninfo
            print(f"[kcenter] {name}/{variant}: numpy {ninfo['all_wall_s']}", flush=True)
            if name in ref_names:
                ref, rinfo = timed(lambda: C.kcenter_greedy(x, b, labeled=labeled, bounds=False), 1)
                r["plain_numba"] = rinfo
                r["same_picks"] = bool(np.array_equal(res.rows, ref.rows))
                r["same_scores"] = bool(np.array_equal(res.score, ref.score))
                r["numpy_same_picks"] = bool(np.array_equal(npr, ref.rows))
                r["numpy_matching_prefix"] = prefix_match(npr, ref.rows)
                print(f"[kcenter] {name}/{variant}: plain numba {rinfo['wall_s']:.1f}s same={r['same_picks']} "
                      f"numpy_same={r['numpy_same_picks']} prefix={r['numpy_matching_prefix']}", flush=True)
            rec[variant] = r
        rec["load_end"] = os.getloadavg()
        per[name] = rec
        full = x = lab = res = ref = npr = None  # free before the next data set
    # data sets not rerun now keep their earlier records (each carries its own loads / code date)
    prev = json.loads(args.out.read_text()).get("kcenter_datasets", {}) if args.out.exists() else {}
    for rec in per.values():
        rec["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["kcenter_datasets"] = {**prev, **per}
    head = per[names[0]]
    u, lb = head["unlabeled"], head["labeled"]
    out.update({
        "kcenter_dataset": names[0],
        "kcenter_1m_b1000_s": u["bounded"]["wall_s"],
        "kcenter_1m_b1000_cpu_s": u["bounded"]["cpu_s"],
        "kcenter_1m_numpy_s": u["numpy"]["wall_s"],
        "kcenter_1m_plain_numba_s": u.get("plain_numba", {}).get("wall_s"),
        "kcenter_same_picks": bool(u.get("same_picks") and lb.get("same_picks") and u.get("same_scores")
                                   and lb.get("same_scores")),
        "kcenter_numpy_same_picks": bool(u.get("numpy_same_picks") and lb.get("numpy_same_picks")),
        "kcenter_1m_b1000_labeled_s": lb["bounded"]["wall_s"],
        "kcenter_1m_b1000_labeled_cpu_s": lb["bounded"]["cpu_s"],
        "kcenter_1m_numpy_labeled_s": lb["numpy"]["wall_s"],
        "kcenter_1m_plain_numba_labeled_s": lb.get("plain_numba", {}).get("wall_s"),
        "kcenter_labeled_init_s": lb["bounded"]["stats"]["labeled_init_s"],
        "kcenter_cluster_s": u["bounded"]["stats"]["cluster_s"],
        "kcenter_layout_s": u["bounded"]["stats"]["layout_s"],
        "kcenter_clusters": u["bounded"]["stats"]["clusters"],
        "kcenter_clusters_swept_per_step": u["bounded"]["clusters_swept_per_step_mean"],
        "kcenter_blocks_swept_fraction": u["bounded"]["stats"]["mean_fraction_swept"],
        "kcenter_peak_rss_mb": u["bounded"]["peak_rss_mb"],
        "kcenter_numpy_peak_rss_mb": u["numpy"]["peak_rss_mb"],
        "kcenter_same_picks_all_datasets": bool(all(
            rec[v].get("same_picks", True) and rec[v].get("same_scores", True)
            for rec in out["kcenter_datasets"].values() for v in ("unlabeled", "labeled"))),
    })
    return out


def dense_herding_chunked(kmat: np.ndarray, budget: int, chunk: int = 2048) -> tuple[np.ndarray, float]:
    """`herding.herding_dense` (w = 1, no labeled points) with the gains computed in column
    chunks, so that only K itself is N x N. Returns (picks, objective)."""
    n = len(kmat)
    c = np.zeros(n)
    avail = np.ones(n, dtype=bool)
    rows = []
    for _ in range(min(budget, n)):
        g = np.empty(n)
        for a in range(0, n, chunk):
            g[a : a + chunk] = np.maximum(0.0, kmat[:, a : a + chunk] - c[:, None]).sum(axis=0) / n
        g[~avail] = -np.inf
        j = int(np.argmax(g))
        rows.append(j)
        c = np.maximum(c, kmat[:, j])
        avail[j] = False
    return np.asarray(rows, dtype=np.int64), float(c.sum() / n)


def part_maxherding(args) -> dict:
    import faiss

    from poolscout.engine.acquisition.selectors import SelectContext
    from poolscout.engine.methods import herding as H

    faiss.omp_set_num_threads(args.threads)
    out: dict = {"maxherding_setup": {"budget": args.herding_budget, "d": args.herding_d, "neighbours": 20,
                                      "data": DATASETS["mixture"]["note"], "load_start": os.getloadavg()}}
    b = args.herding_budget

    def run(x):
        t = {"image_id": np.arange(len(x)), "embedding": x}
        return H.maxherding(t, b, ctx=SelectContext(rng=np.random.default_rng(0)), neighbours=20)

    for n in [int(s) for s in args.herding_ratio_sizes.split(",") if s]:
        x = make_data("mixture", n, args.herding_d, seed=1)
        sel = run(x)
        h = float(sel.rationale[0]["maxherding"]["h"])
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        u = x / np.where(nrm > 0, nrm, 1.0)  # the selector's L2-normalised rows
        kmat = np.empty((n, n))  # N x N float64 (3.2 GB at 20k), filled in row chunks
        for a in range(0, n, 2048):
            kmat[a : a + 2048] = H.kernel_values(faiss.pairwise_distances(u[a : a + 2048], u), "rbf", h)
        rows, dense_obj = dense_herding_chunked(kmat, b)
        if n <= 5000:  # the chunked reference is herding_dense
            ref = H.herding_dense(kmat, b)
            assert np.array_equal(ref.rows, rows) and abs(ref.objective - dense_obj) < 1e-12
        sparse_obj = float(kmat[:, np.asarray(sel.image_id)].max(axis=1).mean())
        key = f"{n // 1000}k"
        out[f"maxherding_objective_ratio_{key}"] = sparse_obj / dense_obj
        out[f"maxherding_objective_{key}"] = {"sparse": sparse_obj, "dense": dense_obj, "h": h,
                                              "same_picks": int(np.intersect1d(rows, sel.image_id).size)}
        print(f"[maxherding] ratio {key}: {sparse_obj / dense_obj:.5f}", flush=True)
        del kmat
    for n in [int(s) for s in args.herding_sizes.split(",") if s]:
        x = make_data("mixture", n, args.herding_d, seed=2)
        _, info = timed(lambda: run(x), 1 if n >= 200_000 else args.repeats)
        key = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"
        out[f"maxherding_{key}_s"] = info["wall_s"]
        out[f"maxherding_{key}"] = info
        print(f"[maxherding] {key}: {info}", flush=True)
    out["maxherding_setup"]["load_end"] = os.getloadavg()
    return out


SKAL_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    import skactiveml, skactiveml.pool as P
    from skactiveml.utils import MISSING_LABEL
    path, b, which = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    x = np.load(path).astype(np.float64)
    y = np.full(len(x), MISSING_LABEL)
    qs = getattr(P, which)(random_state=0)
    t = time.perf_counter()
    idx = qs.query(X=x, y=y, batch_size=b)
    print(json.dumps({"wall_s": time.perf_counter() - t, "picked": int(len(idx))}))
''')


def part_sklearn(args) -> dict:
    """scikit-activeml CoreSet / MaxHerding in a subprocess of their own interpreter, and the
    poolscout selectors on the same data (saved to a temporary .npy) in this process."""
    import psutil

    from poolscout.engine.acquisition.selectors import SelectContext
    from poolscout.engine.methods import coreset as C
    from poolscout.engine.methods import herding as H

    py = args.skactiveml_python
    b = args.sklearn_budget
    # load the Numba kernels / FAISS outside the timings
    warm = make_data("mixture", 3000, 64, seed=9)
    wt = {"image_id": np.arange(3000), "embedding": warm}
    C.coreset(wt, 5, ctx=SelectContext(), bounds=True)
    C.coreset(wt, 5, ctx=SelectContext(), bounds=False)
    H.maxherding(wt, 5, ctx=SelectContext(), neighbours=20)
    out: dict = {"sklearn_setup": {"python": py, "budget": b, "timeout_s": args.sklearn_timeout,
                                   "data": DATASETS["mixture"]["note"] + ", d = 64 (float64 for scikit-activeml)",
                                   "load_start": os.getloadavg()}}
    if not py or not Path(py).exists():
        out["sklearn_note"] = f"skipped: no scikit-activeml interpreter at {py!r} (see --skactiveml-python)"
        return out
    probe = subprocess.run([py, "-c", "import skactiveml, skactiveml.pool as P; print(skactiveml.__version__); "
                                      "print(','.join(n for n in dir(P) if not n.startswith('_')))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        out["sklearn_note"] = f"skipped: scikit-activeml does not import: {probe.stderr.strip()[-400:]}"
        return out
    version, names = probe.stdout.strip().splitlines()[:2]
    names = names.split(",")
    out["sklearn_setup"]["skactiveml_version"] = version
    classes = {"coreset": "CoreSet", "maxherding": "MaxHerding"}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "skal_query.py"
        script.write_text(SKAL_SCRIPT)
        done = {k: False for k in classes}
        for n in [int(s) for s in args.sklearn_sizes.split(",") if s]:
            x = make_data("mixture", n, 64, seed=3)
            np.save(Path(tmp) / "x.npy", x)
            tag = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"
            for key, cls in classes.items():
                if args.sklearn_ours_only:
                    break
                k = f"sklearn_{key}_{tag}_s"
                if cls not in names:
                    out[f"sklearn_{key}_note"] = f"scikit-activeml {version} has no skactiveml.pool.{cls}"
                    continue
                if done[key]:
                    continue  # a smaller size already failed or timed out
                # MaxHerding builds the dense N x N float64 kernel: do not let it swap the machine
                need = 8.0 * n * n * (2 if key == "maxherding" else 0) + 8.0 * b * n + 16.0 * n * 64
                if need > 0.6 * psutil.virtual_memory().available:
                    out[k] = None
                    out[k.replace("_s", "_note")] = f"skipped: needs about {need / 2**30:.0f} GiB"
                    done[key] = True
                    continue
                try:
                    p = subprocess.run([py, str(script), str(Path(tmp) / "x.npy"), str(b), cls],
                                       capture_output=True, text=True, timeout=args.sklearn_timeout)
                except subprocess.TimeoutExpired:
                    out[k] = None
                    out[k.replace("_s", "_note")] = f"timed out after {args.sklearn_timeout:.0f} s"
                    done[key] = True
                    print(f"[sklearn] {k}: timeout", flush=True)
                    continue
                if p.returncode != 0:
                    out[k] = None
                    out[k.replace("_s", "_note")] = f"failed (rc {p.returncode}): {p.stderr.strip()[-600:]}"
                    done[key] = True
                    print(f"[sklearn] {k}: failed {p.stderr.strip()[-300:]}", flush=True)
                    continue
                out[k] = json.loads(p.stdout.strip().splitlines()[-1])["wall_s"]
                print(f"[sklearn] {k}: {out[k]:.2f}s", flush=True)
            # poolscout on the same data, same budget
            t = {"image_id": np.arange(n), "embedding": x}
            ctx = SelectContext(rng=np.random.default_rng(0))
            _, info = timed(lambda: C.coreset(t, b, ctx=ctx), 1)
            out[f"ours_coreset_{tag}_s"] = info["wall_s"]
            if n <= args.sklearn_ours_herding_max:
                _, info = timed(lambda: H.maxherding(t, b, ctx=ctx, neighbours=20), 1)
                out[f"ours_maxherding_{tag}_s"] = info["wall_s"]
            print(f"[sklearn] ours {tag}: " + str({k: v for k, v in out.items() if k.startswith("ours_")}),
                  flush=True)
    out["sklearn_setup"]["load_end"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------- output


def write_json(path: Path, update: dict) -> dict:
    """Merge `update` into the JSON at `path` (if any) and write it atomically."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    per = data.get("kcenter_datasets", {})
    labels, series = [], {"bounded (new)": [], "NumPy float32": [], "plain Numba (reference)": []}
    for name, rec in per.items():
        for v in ("unlabeled", "labeled"):
            if v not in rec:
                continue
            labels.append(f"{name}\n{v}")
            series["bounded (new)"].append(rec[v]["bounded"]["wall_s"])
            series["NumPy float32"].append(rec[v]["numpy"]["wall_s"])
            series["plain Numba (reference)"].append(rec[v].get("plain_numba", {}).get("wall_s", np.nan))
    if labels:
        pos = np.arange(len(labels))
        for i, (k, vals) in enumerate(series.items()):
            ax.bar(pos + (i - 1) * 0.27, vals, 0.27, label=k)
        ax.set_xticks(pos, labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        s = data.get("kcenter_setup", {})
        ax.set_title(f"k-center greedy, N={s.get('n')} x {s.get('d')}, B={s.get('budget')}", fontsize=9)
        ax.axhline(5.0, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    ax = axes[1]
    pts = []
    for k, v in data.items():
        if k.startswith("maxherding_") and k.endswith("_s") and isinstance(v, (int, float)):
            pts.append(("maxherding " + k[len("maxherding_"):-2], v, "MaxHerding (poolscout)"))
        if k.startswith("sklearn_") and k.endswith("_s") and isinstance(v, (int, float)):
            pts.append(("skal " + k[len("sklearn_"):-2], v, "scikit-activeml"))
        if k.startswith("ours_") and k.endswith("_s") and isinstance(v, (int, float)):
            pts.append((k[len("ours_"):-2], v, "poolscout"))
    if pts:
        ax.bar(range(len(pts)), [p[1] for p in pts], color=["C0" if "poolscout" in p[2] else "C3" for p in pts])
        ax.set_xticks(range(len(pts)), [p[0] for p in pts], fontsize=7, rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title("poolscout selectors (blue) and scikit-activeml (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"kcenter", "maxherding", "sklearn"}
    if unknown:
        raise SystemExit(f"unknown parts: {sorted(unknown)}")
    env = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__}}
    for part in parts:
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        res = {"kcenter": part_kcenter, "maxherding": part_maxherding, "sklearn": part_sklearn}[part](args)
        import resource

        res[f"{part}_run"] = {"load_start": load0, "load_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        data = write_json(args.out, {**env, **res})
        plot(data, args.out.with_suffix(".png"))
        print(f"[{part}] done in {time.perf_counter() - t0:.0f}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main(ARGS)
