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
# The bounded greedy (engine/methods/coreset.py) keeps the candidates in a cluster-major
# layout of "slots": LANES slots to a block, each cluster owning a run of whole blocks (the
# last one padded). Per slot it holds
#   * xr[s]: the float32 embedding (one reordered copy, row-major), for exact distances;
#   * an int8 sketch of w = x - mu_g (mu_g its cluster centroid): codes q (stored per block
#     transposed, q8[(blk * d + j) * LANES + lane]), scale a, |q|^2 and a bound e >= |w - a q|.
# A greedy step with centre c then works at three levels, each exact:
#   1. a cluster or a block is skipped when the triangle inequality on distances to the
#      centroid, max(|c - mu| - hi, lo - |c - mu|), already reaches the square root of its
#      current maximum of min_d2 (lo, hi: min / max centroid distance of its members);
#   2. in a block that is swept, each slot gets the lower bound |c - x| >= |u - a q| - e
#      (u = c - mu), with the float32 dot product u.q and all roundings bounded; slots whose
#      bound reaches their min_d2 are skipped;
#   3. the remaining slots get the exact distance, with the arithmetic of `update_argmax`
#      (float64, summed over j in order), so min_d2 stays bitwise that of the plain greedy.
# Every bound is shrunk by a relative margin `delta` (`rounding_margin`), far above the
# rounding of the float64 quantities involved; the float32 dot product has its own bound.
# Padding slots have row -1 and min_d2 = -inf: never lowered, never picked.

LANES = 32
_EPS32 = 1.01 * 2.0 ** -24


def rounding_margin(d: int) -> float:
    """The relative margin `delta` of the bounded kernels for dimension d: far above the
    rounding of a float64 sum of d squares (about d * 2**-53) and of the bound arithmetic."""
    return 1e-9 + 8.0 * (int(d) + 8) * 2.0 ** -53


# --- layout builders ----------------------------------------------------------------------------
def gather_rows_numpy(x: np.ndarray, rows: np.ndarray, xr: np.ndarray) -> None:
    """Reference twin of `gather_rows`."""
    ok = rows >= 0
    xr[~ok] = 0.0
    xr[ok] = x[rows[ok]]


def _gather_rows_py(x, rows, xr):  # pragma: no cover - compiled below
    d = x.shape[1]
    for s in range(rows.shape[0]):
        r = rows[s]
        if r < 0:
            for j in range(d):
                xr[s, j] = 0.0
        else:
            for j in range(d):
                xr[s, j] = x[r, j]


def quantize_blocks_numpy(xr, mu, blk_cluster, delta, q8, qa, qn2, qe, r) -> None:
    """Reference twin of `quantize_blocks` (same arithmetic, vectorised over slots)."""
    nslot, d = xr.shape
    g = np.repeat(np.asarray(blk_cluster), LANES)
    m = np.asarray(mu, dtype=np.float64)[g]  # (S, d)
    w = xr.astype(np.float64) - m
    ss = np.zeros(nslot)
    for j in range(d):
        ss += w[:, j] * w[:, j]
    r[:] = np.sqrt(ss)
    amax = np.zeros(nslot)
    for j in range(d):
        amax = np.maximum(amax, np.abs(w[:, j]))
    a = amax / 127.0
    q = np.zeros((nslot, d))
    nz = a > 0.0
    q[nz] = np.minimum(np.maximum(np.floor(w[nz] / a[nz, None] + 0.5), -127.0), 127.0)
    e2 = np.zeros(nslot)
    q2 = np.zeros(nslot)
    for j in range(d):
        t = w[:, j] - a * q[:, j]
        e2 += t * t
        q2 += q[:, j] * q[:, j]
    qa[:] = a
    qn2[:] = q2
    qe[:] = np.sqrt(e2) * (1.0 + delta) + delta * (r + a * np.sqrt(q2))
    q8[:] = q.astype(np.int8).reshape(nslot // LANES, LANES, d).transpose(0, 2, 1).reshape(-1)


def _quantize_blocks_py(xr, mu, blk_cluster, delta, q8, qa, qn2, qe, r):  # pragma: no cover
    nslot, d = xr.shape
    w = np.empty(d)
    for s in range(nslot):
        g = blk_cluster[s // LANES]
        ss = 0.0
        amax = 0.0
        for j in range(d):
            t = np.float64(xr[s, j]) - mu[g, j]
            w[j] = t
            ss += t * t
            if abs(t) > amax:
                amax = abs(t)
        r[s] = np.sqrt(ss)
        a = amax / 127.0
        e2 = 0.0
        q2 = 0.0
        base = (s // LANES) * d * LANES + s % LANES
        for j in range(d):
            qj = 0.0
            if a > 0.0:
                qj = min(max(np.floor(w[j] / a + 0.5), -127.0), 127.0)
            t = w[j] - a * qj
            e2 += t * t
            q2 += qj * qj
            q8[base + j * LANES] = np.int8(qj)
        qa[s] = a
        qn2[s] = q2
        qe[s] = np.sqrt(e2) * (1.0 + delta) + delta * (r[s] + a * np.sqrt(q2))


# --- maxima with ties to the lowest original row ---------------------------------------------------
def _better(v, r, best_v, best_r):
    """(v, row r) ranks above (best_v, best_r): larger value, then lower row; -inf never ranks."""
    if r < 0 or not v > -np.inf:
        return False
    return v > best_v or (v == best_v and (best_r < 0 or r < best_r))


def _far(dc, lo, hi, m2, delta):
    """True when no point whose centroid distance lies in [lo, hi] can come closer than
    sqrt(m2) to a centre at centroid distance dc, so a block / cluster whose maximum min_d2
    is m2 keeps all its values. `delta` covers the rounding of the distances involved."""
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
        if _better(min_d2[s], rows[s], bv, br):
            bv = min_d2[s]
            bs = s
            br = rows[s]
    b_max[blk] = bv
    b_slot[blk] = bs


def _cluster_max_py(g, c_b0, rows, b_max, b_slot, c_max, c_slot):  # pragma: no cover - compiled below
    bv = -np.inf
    bs = -1
    br = -1
    for blk in range(c_b0[g], c_b0[g + 1]):
        s = b_slot[blk]
        if s >= 0 and _better(b_max[blk], rows[s], bv, br):
            bv = b_max[blk]
            bs = s
            br = rows[s]
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
        if s >= 0 and _better(c_max[g], rows[s], bv, br):
            bv = c_max[g]
            bs = s
            br = rows[s]
    return bs


# --- the bounded step ------------------------------------------------------------------------------
def _sketch_far(uu, un, dot, a, q2, e, m2, gam, delta):
    """True when the int8 sketch proves |c - x| >= sqrt(m2) (see the section comment):
    |u32 - a q|^2 = uu - 2 a u32.q + a^2 |q|^2 with |fl32(u32.q) - u32.q| <= gam |u32| |q|,
    then |c - x| >= |u32 - a q| - e - |u - u32|."""
    if not m2 > -np.inf:
        return True
    qn = np.sqrt(q2)
    v2 = uu - 2.0 * a * dot + a * a * q2 - 2.0 * a * gam * un * qn - delta * (uu + 2.0 * a * abs(dot) + a * a * q2)
    if not v2 > 0.0:
        return False
    lb = np.sqrt(v2) * (1.0 - delta) - e - (_EPS32 + delta) * un
    if not lb > 0.0:
        return False
    return lb * lb * (1.0 - 2.0 * delta) >= m2


def _bounded_update_argmax_py(xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2,
                              b_max, b_slot, c_max, c_slot, centre, pick, delta):  # pragma: no cover
    ng = c_max.shape[0]
    d = xr.shape[1]
    gam = 1.01 * (d + 1) * 2.0 ** -24
    pick_blk = -1
    if pick >= 0:
        min_d2[pick] = -np.inf
        pick_blk = pick // LANES
    # distance of the centre to every centroid (vectorised over clusters)
    dcm = np.zeros(ng)
    for j in range(d):
        cj = np.float64(centre[j])
        o = j * ng
        for g in range(ng):
            t = cj - mu_t[o + g]
            dcm[g] += t * t
    for g in range(ng):
        dcm[g] = np.sqrt(dcm[g])
    u32 = np.empty(d, dtype=np.float32)
    acc = np.empty(LANES, dtype=np.float32)
    n_blocks = 0
    n_clusters = 0
    n_exact = 0
    for g in range(ng):
        b0 = c_b0[g]
        b1 = c_b0[g + 1]
        forced = b0 <= pick_blk < b1
        if not forced and _far(dcm[g], c_lo[g], c_hi[g], c_max[g], delta):
            continue
        n_clusters += 1
        uu = 0.0
        for j in range(d):
            u32[j] = np.float32(np.float64(centre[j]) - mu[g, j])
            uj = np.float64(u32[j])
            uu += uj * uj
        un = np.sqrt(uu)
        changed = forced
        for blk in range(b0, b1):
            if blk != pick_blk and _far(dcm[g], b_lo[blk], b_hi[blk], b_max[blk], delta):
                continue
            n_blocks += 1
            # float32 u.q for the LANES slots side by side (vectorised)
            base = blk * d * LANES
            for k in range(LANES):
                acc[k] = 0.0
            for j in range(d):
                uj32 = u32[j]
                o = base + j * LANES
                for k in range(LANES):
                    acc[k] += uj32 * np.float32(q8[o + k])
            lowered = blk == pick_blk
            for k in range(LANES):
                s = blk * LANES + k
                m2 = min_d2[s]
                if _sketch_far(uu, un, np.float64(acc[k]), qa[s], qn2[s], qe[s], m2, gam, delta):
                    continue
                n_exact += 1
                e2 = 0.0
                for j in range(d):
                    t = np.float64(xr[s, j]) - np.float64(centre[j])
                    e2 += t * t
                if e2 < m2:
                    min_d2[s] = e2
                    lowered = True
            if lowered:
                _block_max(blk, rows, min_d2, b_max, b_slot)
                changed = True
        if changed:
            _cluster_max(g, c_b0, rows, b_max, b_slot, c_max, c_slot)
    return _global_argmax(rows, c_max, c_slot), n_blocks, n_clusters, n_exact


def _bounded_greedy_py(xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot,
                       c_max, c_slot, first, budget, delta, out_slot, out_d2, counts):  # pragma: no cover
    d = xr.shape[1]
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
        for j in range(d):
            centre[j] = xr[s, j]
        nxt, nb, nc, ne = _bounded_update_argmax(xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows,
                                                 min_d2, b_max, b_slot, c_max, c_slot, centre, s, delta)
        counts[t, 0] = nb
        counts[t, 1] = nc
        counts[t, 2] = ne
        if nxt < 0:
            break
    return done


# --- plain-NumPy twins of the bounded kernels (same arithmetic, same skips, same ties) ------------
def _best_numpy(vals: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> tuple[float, int]:
    """The best (value, slot) among `slots`: largest value, then lowest row; (-inf, -1) if none."""
    slots = np.asarray(slots, dtype=np.int64)
    v = vals[slots]
    ok = (rows[slots] >= 0) & (v > -np.inf)
    if not ok.any():
        return -np.inf, -1
    top = v[ok].max()
    cand = slots[ok][v[ok] == top]
    return float(top), int(cand[np.argmin(rows[cand])])


def _cluster_best_numpy(g, c_b0, rows, b_max, b_slot) -> tuple[float, int]:
    bl = np.arange(c_b0[g], c_b0[g + 1])
    bl = bl[b_slot[bl] >= 0]
    if len(bl) == 0:
        return -np.inf, -1
    key = np.full(len(rows), -np.inf)
    key[b_slot[bl]] = b_max[bl]
    return _best_numpy(key, rows, b_slot[bl])


def refresh_maxima_numpy(c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot) -> None:
    """Reference twin of `refresh_maxima`."""
    for blk in range(len(b_max)):
        b_max[blk], b_slot[blk] = _best_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
    for g in range(len(c_max)):
        c_max[g], c_slot[g] = _cluster_best_numpy(g, c_b0, rows, b_max, b_slot)


def _far_numpy(dc, lo, hi, m2, delta):
    with np.errstate(invalid="ignore", over="ignore"):
        lb = np.maximum(dc - hi, lo - dc) - delta * (dc + hi)
        return ~(m2 > -np.inf) | ((lb > 0.0) & (lb * lb * (1.0 - 2.0 * delta) >= m2))


def _sketch_far_numpy(uu, un, dot, a, q2, e, m2, gam, delta):
    with np.errstate(invalid="ignore", over="ignore"):
        qn = np.sqrt(q2)
        v2 = uu - 2.0 * a * dot + a * a * q2 - 2.0 * a * gam * un * qn - delta * (uu + 2.0 * a * np.abs(dot) + a * a * q2)
        lb = np.sqrt(np.where(v2 > 0.0, v2, 0.0)) * (1.0 - delta) - e - (_EPS32 + delta) * un
        ok = (v2 > 0.0) & (lb > 0.0) & (lb * lb * (1.0 - 2.0 * delta) >= m2)
        return ~(m2 > -np.inf) | ok


def bounded_update_argmax_numpy(xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max,
                                b_slot, c_max, c_slot, centre, pick, delta) -> tuple[int, int, int, int]:
    """Reference twin of `bounded_update_argmax` (vectorised; same distances, same skips)."""
    ng = len(c_max)
    nb = len(b_max)
    d = xr.shape[1]
    gam = 1.01 * (d + 1) * 2.0 ** -24
    pick_blk = -1
    if pick >= 0:
        min_d2[pick] = -np.inf
        pick_blk = pick // LANES
    mut = np.asarray(mu_t).reshape(d, ng)
    dcm = np.zeros(ng)
    for j in range(d):
        t = np.float64(centre[j]) - mut[j]
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
    gt = blk_cluster[todo]
    u64 = centre.astype(np.float64)[None, :] - np.asarray(mu, dtype=np.float64)[gt]  # (k, d)
    u32 = u64.astype(np.float32)
    uu = np.zeros(len(todo))
    for j in range(d):
        uj = u32[:, j].astype(np.float64)
        uu += uj * uj
    un = np.sqrt(uu)
    q = np.asarray(q8).reshape(nb, d, LANES)[todo]
    acc = np.zeros((len(todo), LANES), dtype=np.float32)
    for j in range(d):
        acc += u32[:, j][:, None] * q[:, j, :].astype(np.float32)
    sl = todo[:, None] * LANES + np.arange(LANES)[None, :]
    far = _sketch_far_numpy(uu[:, None], un[:, None], acc.astype(np.float64), qa[sl], qn2[sl], qe[sl], min_d2[sl],
                            gam, delta)
    ex = sl[~far]
    s2 = np.zeros(len(ex))
    for j in range(d):
        t = xr[ex, j].astype(np.float64) - np.float64(centre[j])
        s2 += t * t
    min_d2[ex] = np.where(s2 < min_d2[ex], s2, min_d2[ex])
    for blk in todo:
        b_max[blk], b_slot[blk] = _best_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
    for g in np.unique(gt):
        c_max[g], c_slot[g] = _cluster_best_numpy(g, c_b0, rows, b_max, b_slot)
    ok = np.flatnonzero(c_slot >= 0)
    key = np.full(len(min_d2), -np.inf)
    key[c_slot[ok]] = c_max[ok]
    return _best_numpy(key, rows, c_slot[ok])[1], len(todo), int((~c_far).sum()), len(ex)


def bounded_greedy_numpy(xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot,
                         c_max, c_slot, first, budget, delta, out_slot, out_d2, counts) -> int:
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
        nxt, counts[t, 0], counts[t, 1], counts[t, 2] = bounded_update_argmax_numpy(
            xr, q8, qa, qn2, qe, mu, mu_t, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max, c_slot,
            xr[s].copy(), s, delta)
        if nxt < 0:
            break
    return done


if njit is not None:
    _jit = njit(cache=True, nogil=True)
    _better = _jit(_better)
    _far = _jit(_far)
    _sketch_far = _jit(_sketch_far)
    _block_max = _jit(_block_max_py)
    _cluster_max = _jit(_cluster_max_py)
    _global_argmax = _jit(_global_argmax_py)
    _bounded_update_argmax = _jit(_bounded_update_argmax_py)
    gather_rows = _jit(_gather_rows_py)
    quantize_blocks = _jit(_quantize_blocks_py)
    refresh_maxima = _jit(_refresh_maxima_py)
    bounded_update_argmax = _bounded_update_argmax
    bounded_greedy = _jit(_bounded_greedy_py)
else:  # pragma: no cover
    gather_rows = gather_rows_numpy
    quantize_blocks = quantize_blocks_numpy
    refresh_maxima = refresh_maxima_numpy
    bounded_update_argmax = bounded_update_argmax_numpy
    bounded_greedy = bounded_greedy_numpy

gather_rows.__doc__ = """Reorder: `xr[s] = x[rows[s]]` (float32 (N, d) -> (S, d)), zeros where `rows[s] == -1`."""
quantize_blocks.__doc__ = """The int8 sketch of every slot against its cluster centroid.

For slot s in block blk (cluster g = blk_cluster[blk]) with w = float64(xr[s]) - mu[g]:
a = max_j |w_j| / 127 and q_j = clip(floor(w_j / a + 1/2), -127, 127) (q = 0 when a = 0).

Args:
    xr: (S, d) float32 slots (S a multiple of LANES).
    mu: (G, d) float64 centroids.
    blk_cluster: (S / LANES,) int64 cluster of each block.
    delta: `rounding_margin(d)`.
    q8: (S * d,) int8 written, q of block blk at [(blk * d + j) * LANES + lane].
    qa, qn2: (S,) float64 written: a and |q|^2.
    qe: (S,) float64 written: an upper bound on |w - a q| (its float64 value widened by delta).
    r: (S,) float64 written: |w|, the distance to the centroid (float64, summed in order).
"""
refresh_maxima.__doc__ = """Recompute every block's and cluster's maximum of `min_d2` and its slot.

Args:
    c_b0: (G + 1,) int64, cluster g owns blocks c_b0[g] .. c_b0[g + 1] - 1.
    rows: (S,) int64 original row of each slot (-1: padding).
    min_d2: (S,) float64 squared distance to the nearest centre (-inf: picked or padding).
    b_max, b_slot: (nblocks,) written: the block maximum and its slot (ties to the lowest
        row; -inf, -1 when the block holds only -inf).
    c_max, c_slot: (G,) written likewise per cluster.
"""
bounded_update_argmax.__doc__ = """One exact k-center greedy step on the cluster-major layout, skipping what cannot change.

Marks `pick` (a slot, or -1) as picked, lowers `min_d2` with the squared distances to
`centre` wherever they are smaller, and returns the slot of the new farthest point, exactly
as `update_argmax` would on the unpermuted rows (ties to the lowest original row): clusters
and blocks are ruled out by the triangle inequality on centroid distances, slots by their
int8 sketch, and only the rest get the float64 distance (see the section comment).

Args:
    xr, q8, qa, qn2, qe: slots and their sketch (`gather_rows`, `quantize_blocks`).
    mu: (G, d) float64 centroids; mu_t: (d * G,) the same transposed (mu_t[j * G + g]).
    c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot: as in `refresh_maxima`; updated.
    c_lo, c_hi: (G,) float64 min / max centroid distance of a cluster's members.
    b_lo, b_hi: (nblocks,) float64 the same per block (real slots only).
    centre: (d,) float32 the new centre.
    pick: the slot of the new centre (set to -inf first), or -1.
    delta: `rounding_margin(d)`.

Returns:
    (next slot or -1, blocks swept, clusters swept, exact distances computed).
"""
bounded_greedy.__doc__ = """`budget` k-center greedy picks on the cluster-major layout, starting from slot `first`.

Each pick records its slot and its `min_d2` at pick time, then (except after the last pick)
runs `bounded_update_argmax` with itself as the centre. Arguments as in
`bounded_update_argmax`, plus `out_slot` (budget,) int64, `out_d2` (budget,) float64 and
`counts` (budget, 3) int64 (blocks swept, clusters swept, exact distances per step), written.

Returns:
    The number of picks made (budget, unless every slot was picked first).
"""
