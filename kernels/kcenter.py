"""k-center greedy update kernels: Numba with a plain-NumPy reference twin.

One greedy step of k-center (docs/methods.md §7) lowers every candidate's squared
distance to its nearest centre with the distance to the newly chosen centre, then picks
the farthest candidate. The two functions below do exactly that in one pass over the
embedding, never materialising a distance matrix.

Picked candidates are marked with `-inf` in `min_d2` so that `minimum` keeps them there
and `argmax` never returns them again.
"""
from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency of the project, but keep the reference usable without it
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None


def update_argmax_numpy(x: np.ndarray, centre: np.ndarray, min_d2: np.ndarray) -> int:
    """Reference twin of `update_argmax` (same arithmetic, vectorised).

    Args:
        x: (N, d) float32 candidate embeddings.
        centre: (d,) float32 the new centre.
        min_d2: (N,) float64 squared distance to the nearest centre so far; updated in place.

    Returns:
        The row with the largest updated `min_d2` (lowest row on ties).
    """
    diff = x.astype(np.float64) - centre.astype(np.float64)[None, :]
    d2 = np.einsum("ij,ij->i", diff, diff)
    np.minimum(min_d2, d2, out=min_d2)
    return int(np.argmax(min_d2))


def _update_argmax_py(x, centre, min_d2):  # pragma: no cover - compiled below
    n, d = x.shape
    best = -1
    best_v = -np.inf
    for i in range(n):
        s = 0.0
        for j in range(d):
            t = np.float64(x[i, j]) - np.float64(centre[j])
            s += t * t
        if s < min_d2[i]:
            min_d2[i] = s
        if min_d2[i] > best_v:
            best_v = min_d2[i]
            best = i
    return best


update_argmax = njit(cache=True, nogil=True)(_update_argmax_py) if njit is not None else update_argmax_numpy
update_argmax.__doc__ = """Lower `min_d2` with the squared distances to `centre`, return the new farthest row.

Args:
    x: (N, d) float32 C-contiguous candidate embeddings.
    centre: (d,) float32 the new centre.
    min_d2: (N,) float64, updated in place (picked rows hold -inf).

Returns:
    int, the row of the largest `min_d2` after the update (lowest row on ties; -1 if N = 0).

References:
    Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
    Approach", ICLR 2018.
"""


# --------------------------------------------------------------------------- bounded k-center
#
# The bounded greedy (engine/methods/coreset.py, `bounds=True`) keeps the candidates in a
# cluster-major "blocked" layout: slots 0..S-1, LANES slots to a block, each cluster owning a
# run of whole blocks (the last one padded). A block of LANES points is stored transposed,
# `xf[(blk * d + j) * LANES + lane]`, so that the per-point sums below run LANES points side
# by side (LLVM's loop vectoriser turns them into SIMD code) while every point keeps the
# arithmetic of `update_argmax`: sum over j = 0..d-1, in order, of (float64(x_j) - float64(c_j))^2.
# Distances are therefore bitwise those of `update_argmax`, and skipping a block is exact as
# long as no distance in it can fall below the block's current maximum (the triangle
# inequality on distances to the cluster centroid, with a rounding margin `delta`).
#
# Padding slots have row -1 and min_d2 = -inf, so they are never lowered and never picked.

LANES = 32


def blocked_d2_numpy(xf: np.ndarray, d: int, centres: np.ndarray, blk_centre: np.ndarray,
                     out: np.ndarray) -> None:
    """Reference twin of `blocked_d2` (same arithmetic: float64, summed over j in order).

    Args:
        xf: (nblocks * d * LANES,) float32 blocked embeddings.
        d: embedding dimension.
        centres: (K, d) float64 (a float32 centre converted exactly).
        blk_centre: (nblocks,) int64, the row of `centres` each block is measured against.
        out: (nblocks * LANES,) float64, written with the squared distances.
    """
    nb = len(blk_centre)
    xs = np.asarray(xf).reshape(nb, d, LANES)
    c = np.asarray(centres, dtype=np.float64)[np.asarray(blk_centre)]  # (nb, d)
    s = np.zeros((nb, LANES))
    for j in range(d):
        t = xs[:, j, :].astype(np.float64) - c[:, j][:, None]
        s += t * t
    out[:] = s.reshape(-1)


def _blocked_d2_py(xf, d, centres, blk_centre, out):  # pragma: no cover - compiled below
    nb = blk_centre.shape[0]
    acc = np.empty(LANES)
    for blk in range(nb):
        g = blk_centre[blk]
        base = blk * d * LANES
        for k in range(LANES):
            acc[k] = 0.0
        for j in range(d):
            cj = centres[g, j]
            o = base + j * LANES
            for k in range(LANES):
                t = np.float64(xf[o + k]) - cj
                acc[k] += t * t
        for k in range(LANES):
            out[blk * LANES + k] = acc[k]


def gather_blocks_numpy(x: np.ndarray, rows: np.ndarray, xf: np.ndarray) -> None:
    """Reference twin of `gather_blocks`: slot s gets row `rows[s]` of x (zeros where -1)."""
    d = x.shape[1]
    nb = len(rows) // LANES
    full = np.zeros((len(rows), d), dtype=np.float32)
    ok = rows >= 0
    full[ok] = x[rows[ok]]
    xf[:] = full.reshape(nb, LANES, d).transpose(0, 2, 1).reshape(-1)


def _gather_blocks_py(x, rows, xf):  # pragma: no cover - compiled below
    d = x.shape[1]
    for s in range(rows.shape[0]):
        r = rows[s]
        base = (s // LANES) * d * LANES + s % LANES
        if r < 0:
            for j in range(d):
                xf[base + j * LANES] = 0.0
        else:
            for j in range(d):
                xf[base + j * LANES] = x[r, j]


def _better(v, r, best_v, best_r):
    """(v, row r) ranks above (best_v, best_r): larger value, then lower row; -inf never ranks."""
    if r < 0 or not v > -np.inf:
        return False
    return v > best_v or (v == best_v and (best_r < 0 or r < best_r))


def _far(dc, lo, hi, m2, delta):
    """True when no point whose centroid distance lies in [lo, hi] can be closer than
    sqrt(m2) to a centre at centroid distance dc (so a block / cluster with maximum m2 keeps
    all its values). `delta` covers the rounding of every distance involved."""
    if not m2 > -np.inf:
        return True  # only picked / padding slots: nothing to lower
    lb = max(dc - hi, lo - dc) - delta * (dc + hi)
    if not lb > 0.0:
        return False
    return lb * lb * (1.0 - 2.0 * delta) >= m2


def _block_max_py(blk, rows, min_d2, b_max, b_slot):  # pragma: no cover - compiled below
    bv = -np.inf
    bs = -1
    br = -1
    for k in range(LANES):
        s = blk * LANES + k
        v = min_d2[s]
        r = rows[s]
        if _better(v, r, bv, br):
            bv = v
            bs = s
            br = r
    b_max[blk] = bv
    b_slot[blk] = bs


def _cluster_max_py(g, c_b0, rows, b_max, b_slot, c_max, c_slot):  # pragma: no cover - compiled below
    bv = -np.inf
    bs = -1
    br = -1
    for blk in range(c_b0[g], c_b0[g + 1]):
        s = b_slot[blk]
        if s < 0:
            continue
        v = b_max[blk]
        r = rows[s]
        if _better(v, r, bv, br):
            bv = v
            bs = s
            br = r
    c_max[g] = bv
    c_slot[g] = bs


def _refresh_maxima_py(c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot):  # pragma: no cover
    for blk in range(b_max.shape[0]):
        _block_max(blk, rows, min_d2, b_max, b_slot)
    for g in range(c_max.shape[0]):
        _cluster_max(g, c_b0, rows, b_max, b_slot, c_max, c_slot)


def _global_argmax_py(rows, c_max, c_slot):  # pragma: no cover - compiled below
    bv = -np.inf
    bs = -1
    br = -1
    for g in range(c_max.shape[0]):
        s = c_slot[g]
        if s < 0:
            continue
        if _better(c_max[g], rows[s], bv, br):
            bv = c_max[g]
            bs = s
            br = rows[s]
    return bs


def _bounded_update_argmax_py(xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot,
                              c_max, c_slot, centre, pick, delta):  # pragma: no cover - compiled below
    ng = c_max.shape[0]
    pick_blk = -1
    if pick >= 0:
        min_d2[pick] = -np.inf
        pick_blk = pick // LANES
    # distance of the centre to every cluster centroid (vectorised over clusters)
    dcm = np.zeros(ng)
    for j in range(d):
        cj = np.float64(centre[j])
        o = j * ng
        for g in range(ng):
            t = cj - mu_t[o + g]
            dcm[g] += t * t
    for g in range(ng):
        dcm[g] = np.sqrt(dcm[g])
    acc = np.empty(LANES)
    n_blocks = 0
    n_clusters = 0
    for g in range(ng):
        b0 = c_b0[g]
        b1 = c_b0[g + 1]
        forced = b0 <= pick_blk < b1
        if not forced and _far(dcm[g], c_lo[g], c_hi[g], c_max[g], delta):
            continue
        n_clusters += 1
        changed = forced
        for blk in range(b0, b1):
            if blk != pick_blk and _far(dcm[g], b_lo[blk], b_hi[blk], b_max[blk], delta):
                continue
            n_blocks += 1
            base = blk * d * LANES
            for k in range(LANES):
                acc[k] = 0.0
            for j in range(d):
                cj = np.float64(centre[j])
                o = base + j * LANES
                for k in range(LANES):
                    t = np.float64(xf[o + k]) - cj
                    acc[k] += t * t
            lowered = blk == pick_blk
            for k in range(LANES):
                s = blk * LANES + k
                if acc[k] < min_d2[s]:
                    min_d2[s] = acc[k]
                    lowered = True
            if lowered:
                _block_max(blk, rows, min_d2, b_max, b_slot)
                changed = True
        if changed:
            _cluster_max(g, c_b0, rows, b_max, b_slot, c_max, c_slot)
    return _global_argmax(rows, c_max, c_slot), n_blocks, n_clusters


def _bounded_greedy_py(xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max, c_slot,
                       first, budget, delta, out_slot, out_d2, counts):  # pragma: no cover - compiled below
    centre = np.empty(d, dtype=np.float32)
    nxt = first
    done = 0
    for t in range(budget):
        s = nxt
        out_slot[t] = s
        out_d2[t] = min_d2[s]
        done = t + 1
        if t + 1 == budget:
            min_d2[s] = -np.inf
            break
        base = (s // LANES) * d * LANES + s % LANES
        for j in range(d):
            centre[j] = xf[base + j * LANES]
        nxt, nb, nc = _bounded_update_argmax(xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max,
                                             b_slot, c_max, c_slot, centre, s, delta)
        counts[t, 0] = nb
        counts[t, 1] = nc
        if nxt < 0:
            break
    return done


# --- plain-NumPy twins of the bounded kernels (same arithmetic, same tie rules) ---------------
def _maxima_numpy(vals: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> tuple[float, int]:
    """The best (value, slot) among `slots`: largest value, then lowest row; (-inf, -1) if none."""
    v = vals[slots]
    ok = (rows[slots] >= 0) & (v > -np.inf)
    if not ok.any():
        return -np.inf, -1
    top = v[ok].max()
    cand = slots[ok][v[ok] == top]
    return float(top), int(cand[np.argmin(rows[cand])])


def refresh_maxima_numpy(c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot) -> None:
    """Reference twin of `refresh_maxima`: every block's and cluster's (max min_d2, its slot)."""
    for blk in range(len(b_max)):
        b_max[blk], b_slot[blk] = _maxima_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
    for g in range(len(c_max)):
        bl = np.arange(c_b0[g], c_b0[g + 1])
        bl = bl[b_slot[bl] >= 0]
        if len(bl) == 0:
            c_max[g], c_slot[g] = -np.inf, -1
            continue
        # the best block maximum, ties to the lowest row
        key = np.full(len(min_d2), -np.inf)
        key[b_slot[bl]] = b_max[bl]
        c_max[g], c_slot[g] = _maxima_numpy(key, rows, b_slot[bl])


def _far_numpy(dc, lo, hi, m2, delta):
    with np.errstate(invalid="ignore", over="ignore"):
        lb = np.maximum(dc - hi, lo - dc) - delta * (dc + hi)
        return ~(m2 > -np.inf) | ((lb > 0.0) & (lb * lb * (1.0 - 2.0 * delta) >= m2))


def bounded_update_argmax_numpy(xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot,
                                c_max, c_slot, centre, pick, delta) -> tuple[int, int, int]:
    """Reference twin of `bounded_update_argmax` (vectorised; same distances, same skips)."""
    ng = len(c_max)
    nb = len(b_max)
    pick_blk = -1
    if pick >= 0:
        min_d2[pick] = -np.inf
        pick_blk = pick // LANES
    mu = np.asarray(mu_t).reshape(d, ng)
    dcm = np.zeros(ng)
    for j in range(d):
        t = np.float64(centre[j]) - mu[j]
        dcm += t * t
    dcm = np.sqrt(dcm)
    blk_cluster = np.repeat(np.arange(ng), np.diff(c_b0))
    c_far = _far_numpy(dcm, c_lo, c_hi, c_max, delta)
    if pick_blk >= 0:
        c_far[blk_cluster[pick_blk]] = False
    b_far = c_far[blk_cluster] | _far_numpy(dcm[blk_cluster], b_lo, b_hi, b_max, delta)
    if pick_blk >= 0:
        b_far[pick_blk] = False
    todo = np.flatnonzero(~b_far)
    xs = np.asarray(xf).reshape(nb, d, LANES)[todo]
    s = np.zeros((len(todo), LANES))
    for j in range(d):
        t = xs[:, j, :].astype(np.float64) - np.float64(centre[j])
        s += t * t
    sl = (todo[:, None] * LANES + np.arange(LANES)[None, :]).reshape(-1)
    cur = min_d2[sl]
    min_d2[sl] = np.where(s.reshape(-1) < cur, s.reshape(-1), cur)
    for blk in todo:
        b_max[blk], b_slot[blk] = _maxima_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
    for g in np.unique(blk_cluster[todo]):
        bl = np.arange(c_b0[g], c_b0[g + 1])
        bl = bl[b_slot[bl] >= 0]
        key = np.full(len(min_d2), -np.inf)
        key[b_slot[bl]] = b_max[bl]
        c_max[g], c_slot[g] = _maxima_numpy(key, rows, b_slot[bl]) if len(bl) else (-np.inf, -1)
    ok = np.flatnonzero(c_slot >= 0)
    key = np.full(len(min_d2), -np.inf)
    key[c_slot[ok]] = c_max[ok]
    return _maxima_numpy(key, rows, c_slot[ok])[1], len(todo), int((~c_far).sum())


def bounded_greedy_numpy(xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max, c_slot,
                         first, budget, delta, out_slot, out_d2, counts) -> int:
    """Reference twin of `bounded_greedy`: the same loop over `bounded_update_argmax_numpy`."""
    nxt = int(first)
    done = 0
    for t in range(int(budget)):
        s = nxt
        out_slot[t] = s
        out_d2[t] = min_d2[s]
        done = t + 1
        if t + 1 == budget:
            min_d2[s] = -np.inf
            break
        base = (s // LANES) * d * LANES + s % LANES
        centre = np.asarray(xf[base : base + d * LANES : LANES], dtype=np.float32)
        nxt, counts[t, 0], counts[t, 1] = bounded_update_argmax_numpy(
            xf, d, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max, c_slot, centre, s, delta)
        if nxt < 0:
            break
    return done


def rounding_margin(d: int) -> float:
    """The relative margin `delta` of the bounded kernels for dimension d: far above the
    rounding of a float64 sum of d squares (about d * 2**-53) and of the bound arithmetic."""
    return 1e-9 + 8.0 * (int(d) + 8) * 2.0 ** -53


if njit is not None:
    _jit = njit(cache=True, nogil=True)
    _better = _jit(_better)
    _far = _jit(_far)
    _block_max = _jit(_block_max_py)
    _cluster_max = _jit(_cluster_max_py)
    _global_argmax = _jit(_global_argmax_py)
    _bounded_update_argmax = _jit(_bounded_update_argmax_py)
    blocked_d2 = _jit(_blocked_d2_py)
    gather_blocks = _jit(_gather_blocks_py)
    refresh_maxima = _jit(_refresh_maxima_py)
    bounded_update_argmax = _bounded_update_argmax
    bounded_greedy = _jit(_bounded_greedy_py)
else:  # pragma: no cover
    blocked_d2 = blocked_d2_numpy
    gather_blocks = gather_blocks_numpy
    refresh_maxima = refresh_maxima_numpy
    bounded_update_argmax = bounded_update_argmax_numpy
    bounded_greedy = bounded_greedy_numpy

blocked_d2.__doc__ = """Squared distances of every slot of a blocked layout to one centre per block.

Args:
    xf: (nblocks * d * LANES,) float32, block `blk` holding `xf[(blk * d + j) * LANES + lane]`.
    d: embedding dimension.
    centres: (K, d) float64.
    blk_centre: (nblocks,) int64 row of `centres` for each block.
    out: (nblocks * LANES,) float64, written: float64 sums over j in order, bitwise equal to
        the distances `update_argmax` computes for the same point and (float32) centre.
"""
gather_blocks.__doc__ = """Fill the blocked layout `xf` (see `blocked_d2`): slot s <- row `rows[s]` of x (N, d)
float32, zeros for padding slots (`rows[s] == -1`)."""
refresh_maxima.__doc__ = """Recompute every block's and cluster's maximum of `min_d2` and its slot.

Args:
    c_b0: (G + 1,) int64, cluster g owns blocks c_b0[g] .. c_b0[g + 1] - 1.
    rows: (S,) int64 original row of each slot (-1: padding).
    min_d2: (S,) float64 squared distance to the nearest centre (-inf: picked or padding).
    b_max, b_slot: (nblocks,) written: the block maximum and its slot (ties to the lowest
        row; -inf, -1 when the block holds only -inf).
    c_max, c_slot: (G,) written likewise per cluster.
"""
bounded_update_argmax.__doc__ = """One exact k-center greedy step on the blocked layout, skipping what cannot change.

Marks `pick` (a slot, or -1) as picked, lowers `min_d2` with the squared distances to
`centre` wherever they are smaller, and returns the slot of the new farthest point, exactly
as `update_argmax` would on the unpermuted data (ties to the lowest original row). A cluster
g (centroid mu_g, member centroid distances in [c_lo, c_hi]) or a block (in [b_lo, b_hi]) is
skipped when the triangle inequality proves that no distance to `centre` falls below its
current maximum of `min_d2`: max(|c - mu_g| - hi, lo - |c - mu_g|) >= sqrt(max), checked on
distances with the rounding margin `delta` (`rounding_margin(d)`).

Args:
    xf, d: the blocked layout (see `blocked_d2`).
    mu_t: (d * G,) float64 centroids, transposed: mu_t[j * G + g].
    c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot: as in `refresh_maxima`; updated.
    c_lo, c_hi: (G,) float64 min / max distance of a member to its cluster centroid.
    b_lo, b_hi: (nblocks,) float64 the same per block (real slots only).
    centre: (d,) float32 the new centre.
    pick: the slot of the new centre (set to -inf first), or -1.
    delta: relative rounding margin.

Returns:
    (next slot or -1, blocks swept, clusters that passed the cluster test).
"""
bounded_greedy.__doc__ = """`budget` k-center greedy picks on the blocked layout, starting from slot `first`.

Each pick records its slot and its `min_d2` at pick time, then (except after the last pick)
runs `bounded_update_argmax` with itself as the centre. Arguments as in
`bounded_update_argmax`, plus `out_slot` (budget,) int64, `out_d2` (budget,) float64 and
`counts` (budget, 2) int64 (blocks swept, clusters swept per step), all written.

Returns:
    The number of picks made (budget, unless every slot was picked first).
"""
