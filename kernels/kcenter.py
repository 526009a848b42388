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
# The bounded greedy (engine/methods/coreset.py) orders the candidates cluster-major in
# "slots": LANES slots to a block, each cluster owning a run of whole blocks (the last one
# padded); slot s stands for row rows[s] of the untouched (N, d) float32 embeddings x. Per
# slot it keeps an int8 sketch of w = x - mu_g (mu_g its cluster centroid): codes q8[s] (d,),
# scale a, |q|^2 and e >= |w - a q| (a quarter of the embeddings' memory, no float copy).
# Applying a centre c to a cluster works at three levels, each exact:
#   1. a cluster or a block is skipped when the triangle inequality on distances to the
#      centroid, max(|c - mu| - hi, lo - |c - mu|), already reaches the square root of its
#      current maximum of min_d2 (lo, hi: min / max centroid distance of its members);
#   2. in a block that is swept, u = c - mu_g is sketched as b p (p int16, |u - b p| <= eu),
#      and each slot gets |c - x| = |u - w| >= |b p - a q| - eu - e, where
#      |b p - a q|^2 = b^2 |p|^2 - 2 a b (p.q) + a^2 |q|^2 with p.q an exact int32 dot
#      product (vectorised); slots whose bound reaches their min_d2 are skipped;
#   3. the remaining slots get the exact distance from x, with the arithmetic of
#      `update_argmax` (float64, summed over j in order), so min_d2 stays bitwise that of the
#      plain greedy.
# Every bound is shrunk by a relative margin `delta` (`rounding_margin`), far above the
# rounding of the float64 quantities involved.
# Padding slots have row -1 and min_d2 = -inf: never lowered, never picked.

LANES = 32


def sketch_pmax(d: int) -> int:
    """Largest |p| of the int16 centre sketch such that d products 127 |p| fit an int32 sum."""
    return int(min(32767, (2**31 - 1) // (127 * max(int(d), 1))))


def rounding_margin(d: int) -> float:
    """The relative margin `delta` of the bounded kernels for dimension d: far above the
    rounding of a float64 sum of d squares (about d * 2**-53) and of the bound arithmetic."""
    return 1e-9 + 8.0 * (int(d) + 8) * 2.0 ** -53


# --- layout builders ----------------------------------------------------------------------------
def cluster_sums_numpy(x: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> None:
    """Reference twin of `cluster_sums` (rows added in row order, float64)."""
    sums[:] = 0.0
    for i in range(len(x)):
        sums[labels[i]] += x[i].astype(np.float64)


def _cluster_sums_py(x, labels, sums):  # pragma: no cover - compiled below
    sums[:] = 0.0
    d = x.shape[1]
    for i in range(x.shape[0]):
        g = labels[i]
        for j in range(d):
            sums[g, j] += np.float64(x[i, j])


def quantize_rows_numpy(x, rows, mu, blk_cluster, delta, q8, qa, qn2, qe, r) -> None:
    """Reference twin of `quantize_rows` (vectorised over slots): the same codes q, scales a
    and |q|^2; the two norms are summed in another order (equal to rounding)."""
    nslot = len(rows)
    d = x.shape[1]
    ok = rows >= 0
    xs = np.zeros((nslot, d), dtype=np.float32)
    xs[ok] = x[rows[ok]]
    g = np.repeat(np.asarray(blk_cluster), LANES)
    w = xs.astype(np.float64) - np.asarray(mu, dtype=np.float64)[g]
    w[~ok] = 0.0
    r[:] = np.sqrt((w * w).sum(axis=1))
    a = np.abs(w).max(axis=1) / 127.0
    with np.errstate(divide="ignore"):
        inv = np.where(a > 0.0, 1.0 / a, 0.0)
    q = np.minimum(np.maximum(np.floor(w * inv[:, None] + 0.5), -127.0), 127.0)
    t = w - a[:, None] * q
    e = np.sqrt((t * t).sum(axis=1))
    q2 = (q * q).sum(axis=1)
    qa[:] = a
    qn2[:] = q2
    qe[:] = e * (1.0 + delta) + delta * (r + a * np.sqrt(q2))
    q8[:] = q.astype(np.int8)


def _quantize_rows_py(x, rows, mu, blk_cluster, delta, q8, qa, qn2, qe, r):  # pragma: no cover
    nslot = rows.shape[0]
    d = x.shape[1]
    for s in range(nslot):  # padding: an all-zero sketch, never looked at
        if rows[s] < 0:
            for j in range(d):
                q8[s, j] = 0
            qa[s] = 0.0
            qn2[s] = 0.0
            qe[s] = 0.0
            r[s] = 0.0
    slot_of = np.empty(x.shape[0], dtype=np.int64)
    for s in range(nslot):
        if rows[s] >= 0:
            slot_of[rows[s]] = s
    _quantize_range(x, slot_of, mu, blk_cluster, delta, q8, qa, qn2, qe, r, 0, x.shape[0])


def _quantize_range_py(x, slot_of, mu, blk_cluster, delta, q8, qa, qn2, qe, r, lo, hi):  # pragma: no cover
    """The sketch of rows lo .. hi - 1 (slot_of: the slot of each row), as `quantize_rows`;
    disjoint row ranges write disjoint slots, so threads may split the rows."""
    w = np.empty(x.shape[1])
    for i in range(lo, hi):  # rows in order: x is read sequentially
        s = slot_of[i]
        rr, a, q2, e = _sketch_row(x[i], mu[blk_cluster[s // LANES]], w, q8[s])
        r[s] = rr
        qa[s] = a
        qn2[s] = q2
        qe[s] = e * (1.0 + delta) + delta * (rr + a * np.sqrt(q2))


def _sketch_row_py(xi, mug, w, qrow):  # pragma: no cover - compiled below (reassociating: vectorised)
    """The sketch of one row: (|w|, a, |q|^2, |w - a q|) for w = float64(xi) - mug, codes
    written to `qrow`. The two norms may be summed in any order (their rounding stays far
    inside the margin delta); a, q and |q|^2 are exact whatever the order."""
    d = xi.shape[0]
    ss = 0.0
    amax = 0.0
    for j in range(d):
        t = np.float64(xi[j]) - mug[j]
        w[j] = t
        ss += t * t
        amax = max(amax, abs(t))
    a = amax / 127.0
    inv = 1.0 / a if a > 0.0 else 0.0
    e2 = 0.0
    q2 = 0.0
    for j in range(d):
        qj = min(max(np.floor(w[j] * inv + 0.5), -127.0), 127.0)
        t = w[j] - a * qj
        e2 += t * t
        q2 += qj * qj
        qrow[j] = np.int8(qj)
    return np.sqrt(ss), a, q2, np.sqrt(e2)


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


def _top_cluster_py(rows, c_max, c_slot):  # pragma: no cover - compiled below
    bv = -np.inf
    bg = -1
    br = -1
    for g in range(c_max.shape[0]):
        s = c_slot[g]
        if s >= 0 and _better(c_max[g], rows[s], bv, br):
            bv = c_max[g]
            bg = g
            br = rows[s]
    return bg


# --- the bounded step ------------------------------------------------------------------------------
def _centroid_distance(centre, mu, g):
    """|centre - mu[g]| in float64, summed over j in order (the kernel and its twin share it)."""
    dc = 0.0
    for j in range(mu.shape[1]):
        t = np.float64(centre[j]) - mu[g, j]
        dc += t * t
    return np.sqrt(dc)


def _sketch_centre_py(centre, mu, g, pmax, delta, p):  # pragma: no cover - compiled below
    """u = centre - mu[g] as b p (p int16 written to `p`): returns (b, |p|^2, eu >= |u - b p|)."""
    d = p.shape[0]
    amax = 0.0
    for j in range(d):
        t = abs(np.float64(centre[j]) - mu[g, j])
        if t > amax:
            amax = t
    bsc = amax / pmax
    e2 = 0.0
    p2 = 0.0
    uu = 0.0
    for j in range(d):
        u = np.float64(centre[j]) - mu[g, j]
        pj = 0.0
        if bsc > 0.0:
            pj = min(max(np.floor(u / bsc + 0.5), -pmax), pmax)
        t = u - bsc * pj
        e2 += t * t
        p2 += pj * pj
        uu += u * u
        p[j] = np.int16(pj)
    eu = np.sqrt(e2) * (1.0 + delta) + delta * (np.sqrt(uu) + bsc * np.sqrt(p2))
    return bsc, p2, eu


def _exact_update_py(x, rows, min_d2, centre, idx, nk):  # pragma: no cover - compiled below
    """min_d2[s] = min(min_d2[s], |x[rows[s]] - centre|^2) for the nk slots idx[:nk], each with
    the arithmetic of `update_argmax` (float64, summed over j in order); four slots side by side
    for instruction-level parallelism. Returns whether any value was lowered."""
    d = x.shape[1]
    lowered = False
    k = 0
    while k < nk:
        m = min(4, nk - k)
        i0 = rows[idx[k]]
        i1 = rows[idx[k + 1]] if m > 1 else i0
        i2 = rows[idx[k + 2]] if m > 2 else i0
        i3 = rows[idx[k + 3]] if m > 3 else i0
        e0 = 0.0
        e1 = 0.0
        e2 = 0.0
        e3 = 0.0
        for j in range(d):
            cj = np.float64(centre[j])
            t0 = np.float64(x[i0, j]) - cj
            t1 = np.float64(x[i1, j]) - cj
            t2 = np.float64(x[i2, j]) - cj
            t3 = np.float64(x[i3, j]) - cj
            e0 += t0 * t0
            e1 += t1 * t1
            e2 += t2 * t2
            e3 += t3 * t3
        for u in range(m):
            e = e0 if u == 0 else (e1 if u == 1 else (e2 if u == 2 else e3))
            s = idx[k + u]
            if e < min_d2[s]:
                min_d2[s] = e
                lowered = True
        k += m
    return lowered


def _apply_centre_py(x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max,
                     c_slot, g, centre, delta, p, ipb, need, idx, st):  # pragma: no cover - compiled below
    """Lower min_d2 of cluster g's slots with their distances to `centre`, skipping what the
    bounds rule out; st += (1 if the cluster was swept, blocks swept, exact distances)."""
    d = x.shape[1]
    dc = _centroid_distance(centre, mu, g)
    if _far(dc, c_lo[g], c_hi[g], c_max[g], delta):
        return
    st[0] += 1
    pmax = np.float64(min(32767, (2**31 - 1) // (127 * max(d, 1))))
    bsc, p2, eu = _sketch_centre(centre, mu, g, pmax, delta, p)
    bp2 = bsc * bsc * p2
    shrink = 1.0 - 2.0 * delta
    changed = False
    for blk in range(c_b0[g], c_b0[g + 1]):
        if _far(dc, b_lo[blk], b_hi[blk], b_max[blk], delta):
            continue
        st[1] += 1
        s0 = blk * LANES
        # exact int32 dot products p.q of the block's slots (vectorised over j)
        for k in range(LANES):
            acc = 0
            for j in range(d):
                acc += np.int32(q8[s0 + k, j]) * np.int32(p[j])
            ipb[k] = np.float64(np.int32(acc))  # the sum fits an int32 (sketch_pmax)
        # the sketch bound of each slot, without branches
        for k in range(LANES):
            s = s0 + k
            a = qa[s]
            aq2 = a * a * qn2[s]
            cr = 2.0 * a * bsc * ipb[k]
            v2 = (bp2 - cr + aq2) - delta * (bp2 + abs(cr) + aq2)
            lb = np.sqrt(max(v2, 0.0)) * (1.0 - delta) - qe[s] - eu
            m2 = min_d2[s]
            far = (lb > 0.0) & (lb * lb * shrink >= m2)
            need[k] = (m2 > -np.inf) & (far == False)  # noqa: E712 (no branch)
        nk = 0
        for k in range(LANES):
            if need[k]:
                idx[nk] = s0 + k
                nk += 1
        st[2] += nk
        lowered = _exact_update(x, rows, min_d2, centre, idx, nk)
        if lowered:
            _block_max(blk, rows, min_d2, b_max, b_slot)
            changed = True
    if changed:
        _cluster_max(g, c_b0, rows, b_max, b_slot, c_max, c_slot)


def _bounded_greedy_py(x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max,
                       c_slot, first, budget, delta, out_slot, out_d2, counts):  # pragma: no cover - compiled below
    d = x.shape[1]
    ng = c_max.shape[0]
    blk_cluster = np.empty(b_max.shape[0], dtype=np.int64)
    for g in range(ng):
        for blk in range(c_b0[g], c_b0[g + 1]):
            blk_cluster[blk] = g
    cen = np.empty((max(budget, 1), d), dtype=np.float32)
    applied = np.zeros(ng, dtype=np.int64)
    p = np.empty(d, dtype=np.int16)
    ipb = np.empty(LANES)
    need = np.empty(LANES, dtype=np.bool_)
    idx = np.empty(LANES, dtype=np.int64)
    st = np.zeros(3, dtype=np.int64)
    n_c = 0
    nxt = first
    done = 0
    for t in range(budget):
        s = nxt
        out_slot[t] = s
        out_d2[t] = min_d2[s]
        done = t + 1
        min_d2[s] = -np.inf
        _block_max(s // LANES, rows, min_d2, b_max, b_slot)
        _cluster_max(blk_cluster[s // LANES], c_b0, rows, b_max, b_slot, c_max, c_slot)
        if t + 1 == budget:
            break
        for j in range(d):
            cen[n_c, j] = x[rows[s], j]
        n_c += 1
        st[:] = 0
        refreshes = 0
        while True:
            g = _top_cluster(rows, c_max, c_slot)
            if g < 0:
                nxt = -1
                break
            if applied[g] == n_c:
                nxt = c_slot[g]
                break
            refreshes += 1
            for i in range(applied[g], n_c):
                _apply_centre(x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot,
                              c_max, c_slot, g, cen[i], delta, p, ipb, need, idx, st)
            applied[g] = n_c
        counts[t, 0] = refreshes
        counts[t, 1] = st[0]
        counts[t, 2] = st[1]
        counts[t, 3] = st[2]
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


def _apply_centre_numpy(lay, min_d2, b_max, b_slot, c_max, c_slot, g, centre, delta, st) -> None:
    """Reference twin of `_apply_centre` (vectorised over the cluster's blocks)."""
    x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows = lay
    d = x.shape[1]
    dc = _centroid_distance(centre, mu, g)
    if _far_numpy(dc, c_lo[g], c_hi[g], c_max[g], delta):
        return
    st[0] += 1
    pmax = float(sketch_pmax(d))
    u = centre.astype(np.float64) - mu[g]
    bsc = np.max(np.abs(u)) / pmax
    pq = np.minimum(np.maximum(np.floor(u / bsc + 0.5), -pmax), pmax) if bsc > 0.0 else np.zeros(d)
    e2 = p2 = uu = 0.0
    for j in range(d):  # sequential float64 sums, as the kernel
        t = u[j] - bsc * pq[j]
        e2 += t * t
        p2 += pq[j] * pq[j]
        uu += u[j] * u[j]
    eu = np.sqrt(e2) * (1.0 + delta) + delta * (np.sqrt(uu) + bsc * np.sqrt(p2))
    bp2 = bsc * bsc * p2
    blks = np.arange(c_b0[g], c_b0[g + 1])
    blks = blks[~_far_numpy(dc, b_lo[blks], b_hi[blks], b_max[blks], delta)]
    st[1] += len(blks)
    sl = (blks[:, None] * LANES + np.arange(LANES)[None, :]).reshape(-1)
    ip = (q8[sl].astype(np.int64) @ pq.astype(np.int64)).astype(np.float64)
    a = qa[sl]
    aq2 = a * a * qn2[sl]
    cr = 2.0 * a * bsc * ip
    v2 = (bp2 - cr + aq2) - delta * (bp2 + np.abs(cr) + aq2)
    lb = np.sqrt(np.maximum(v2, 0.0)) * (1.0 - delta) - qe[sl] - eu
    m2 = min_d2[sl]
    with np.errstate(invalid="ignore"):
        far = (lb > 0.0) & (lb * lb * (1.0 - 2.0 * delta) >= m2)
    ex = sl[(m2 > -np.inf) & ~far]
    st[2] += len(ex)
    s2 = np.zeros(len(ex))
    xe = x[rows[ex]]
    for j in range(d):
        t = xe[:, j].astype(np.float64) - np.float64(centre[j])
        s2 += t * t
    low = s2 < min_d2[ex]
    min_d2[ex[low]] = s2[low]
    touched = np.unique(ex[low] // LANES)
    for blk in touched:
        b_max[blk], b_slot[blk] = _best_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
    if len(touched):
        c_max[g], c_slot[g] = _cluster_best_numpy(g, c_b0, rows, b_max, b_slot)


def bounded_greedy_numpy(x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows, min_d2, b_max, b_slot, c_max,
                         c_slot, first, budget, delta, out_slot, out_d2, counts) -> int:
    """Reference twin of `bounded_greedy`: the same lazy loop, vectorised per cluster."""
    lay = (x, q8, qa, qn2, qe, mu, c_b0, c_lo, c_hi, b_lo, b_hi, rows)
    ng = len(c_max)
    blk_cluster = np.repeat(np.arange(ng), np.diff(c_b0))
    cen: list[np.ndarray] = []
    applied = np.zeros(ng, dtype=np.int64)
    nxt = int(first)
    done = 0
    for t in range(int(budget)):
        s = nxt
        out_slot[t] = s
        out_d2[t] = min_d2[s]
        done = t + 1
        min_d2[s] = -np.inf
        blk = s // LANES
        b_max[blk], b_slot[blk] = _best_numpy(min_d2, rows, np.arange(blk * LANES, (blk + 1) * LANES))
        c_max[blk_cluster[blk]], c_slot[blk_cluster[blk]] = _cluster_best_numpy(blk_cluster[blk], c_b0, rows,
                                                                                b_max, b_slot)
        if t + 1 == budget:
            break
        cen.append(x[rows[s]].copy())
        st = np.zeros(3, dtype=np.int64)
        refreshes = 0
        while True:
            ok = np.flatnonzero(c_slot >= 0)
            key = np.full(len(min_d2), -np.inf)
            key[c_slot[ok]] = c_max[ok]
            top = _best_numpy(key, rows, c_slot[ok])[1]
            if top < 0:
                nxt = -1
                break
            g = int(blk_cluster[top // LANES])
            if applied[g] == len(cen):
                nxt = int(c_slot[g])
                break
            refreshes += 1
            for i in range(applied[g], len(cen)):
                _apply_centre_numpy(lay, min_d2, b_max, b_slot, c_max, c_slot, g, cen[i], delta, st)
            applied[g] = len(cen)
        counts[t] = (refreshes, *st)
        if nxt < 0:
            break
    return done


if njit is not None:
    _jit = njit(cache=True, nogil=True)
    _better = _jit(_better)
    _far = _jit(_far)
    _centroid_distance = _jit(_centroid_distance)
    _sketch_centre = _jit(_sketch_centre_py)
    _block_max = _jit(_block_max_py)
    _cluster_max = _jit(_cluster_max_py)
    _top_cluster = _jit(_top_cluster_py)
    _exact_update = _jit(_exact_update_py)
    _apply_centre = _jit(_apply_centre_py)
    cluster_sums = _jit(_cluster_sums_py)
    # reassociation lets LLVM vectorise the two norms of a row (see _sketch_row_py); no
    # contraction, so that the codes q are those of the twin
    _sketch_row = njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "nnan", "ninf"})(_sketch_row_py)
    _quantize_range = _jit(_quantize_range_py)
    quantize_rows = _jit(_quantize_rows_py)
    refresh_maxima = _jit(_refresh_maxima_py)
    bounded_greedy = _jit(_bounded_greedy_py)
else:  # pragma: no cover
    cluster_sums = cluster_sums_numpy
    quantize_rows = quantize_rows_numpy
    _quantize_range = None
    refresh_maxima = refresh_maxima_numpy
    bounded_greedy = bounded_greedy_numpy

cluster_sums.__doc__ = """`sums[g] = sum of the rows i of x (N, d) float32 with labels[i] == g`, in float64
(sums (G, d) float64, overwritten)."""
quantize_rows.__doc__ = """The int8 sketch of every slot against its cluster centroid.

For slot s in block blk (cluster g = blk_cluster[blk]) with w = float64(x[rows[s]]) - mu[g]:
a = max_j |w_j| / 127 and q_j = clip(floor(w_j (1 / a) + 1/2), -127, 127) (q = 0 when a = 0).
The two norms are float64 sums in an unspecified order (vectorised): their rounding is far
inside the margin delta, which is all the bounds need; a, q and |q|^2 do not depend on it.

Args:
    x: (N, d) float32 embeddings.
    rows: (S,) int64 row of each slot, every row of x exactly once, -1 for padding (an
        all-zero sketch); S a multiple of LANES.
    mu: (G, d) float64 centroids.
    blk_cluster: (S / LANES,) int64 cluster of each block.
    delta: `rounding_margin(d)`.
    q8: (S, d) int8 written, the codes q.
    qa, qn2: (S,) float64 written: a and |q|^2.
    qe: (S,) float64 written: an upper bound on |w - a q| (its float64 value widened by delta).
    r: (S,) float64 written: |w|, the distance to the centroid.
"""


def quantize_rows_threaded(x, rows, slot_of_row, mu, blk_cluster, delta, q8, qa, qn2, qe, r, threads: int = 1) -> None:
    """`quantize_rows` with the rows split over `threads` threads (the kernel releases the
    GIL); `slot_of_row` (N,) int64 is the inverse of `rows`. Same output for any `threads`."""
    pad = rows < 0
    q8[pad] = 0
    for a in (qa, qn2, qe, r):
        a[pad] = 0.0
    if _quantize_range is None:  # pragma: no cover - without numba
        quantize_rows_numpy(x, rows, mu, blk_cluster, delta, q8, qa, qn2, qe, r)
        return
    n = x.shape[0]
    threads = max(1, min(int(threads), n // 65536 + 1))
    cuts = np.linspace(0, n, threads + 1).astype(np.int64)
    args = (x, slot_of_row, mu, blk_cluster, float(delta), q8, qa, qn2, qe, r)
    if threads == 1:
        _quantize_range(*args, 0, n)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda t: _quantize_range(*args, int(cuts[t]), int(cuts[t + 1])), range(threads)))


refresh_maxima.__doc__ = """Recompute every block's and cluster's maximum of `min_d2` and its slot.

Args:
    c_b0: (G + 1,) int64, cluster g owns blocks c_b0[g] .. c_b0[g + 1] - 1.
    rows: (S,) int64 original row of each slot (-1: padding).
    min_d2: (S,) float64 squared distance to the nearest centre (-inf: picked or padding).
    b_max, b_slot: (nblocks,) written: the block maximum and its slot (ties to the lowest
        row; -inf, -1 when the block holds only -inf).
    c_max, c_slot: (G,) written likewise per cluster.
"""
bounded_greedy.__doc__ = """`budget` exact k-center greedy picks on the cluster-major layout, from slot `first`.

Lazy: each cluster keeps how many of the centres picked so far were applied to it, and its
maximum of `min_d2` (an upper bound while centres are pending). A pick takes the cluster
with the largest (maximum, lowest row); if centres are pending for it, they are applied
(`_apply_centre`: clusters and blocks ruled out by the triangle inequality on centroid
distances, slots by their int8 sketch, the rest get the float64 distance of
`update_argmax`) and the search repeats; a cluster that is up to date holds the true
farthest point. Since min_d2 only decreases, the picks, and min_d2 at pick time, are those
of the plain greedy (ties to the lowest original row); clusters that never come near the
top are never swept again.

Args:
    x: (N, d) float32 embeddings; q8, qa, qn2, qe: the slots' sketch (`quantize_rows`).
    mu: (G, d) float64 centroids.
    c_b0, rows, min_d2, b_max, b_slot, c_max, c_slot: as in `refresh_maxima` (consistent on
        entry); updated (min_d2 of clusters with pending centres stays an upper bound).
    c_lo, c_hi: (G,) float64 min / max centroid distance of a cluster's members.
    b_lo, b_hi: (nblocks,) float64 the same per block (real slots only).
    first: the slot of the first pick.
    budget: picks.
    delta: `rounding_margin(d)`.
    out_slot: (budget,) int64 written: the picked slots.
    out_d2: (budget,) float64 written: min_d2 of each pick at pick time.
    counts: (budget, 4) int64 written per step: clusters refreshed, (cluster, centre) pairs
        swept, blocks swept, exact distances.

Returns:
    The number of picks made (budget, unless every slot was picked first).
"""
