"""GSAL: diffusion difficulty of images and proposals, and a three-level concept graph.

docs/methods.md section 4. Two independent halves meet in the selector `gsal`:

Difficulty (the diffusion model lives in `engine.models.diffusion`; this module only does
the arithmetic on its reconstructions, so that it can be checked by hand):
  * `difficulty_maps`: for an image x (C, H, W) and K reconstructions x_hat_k (K, C, H, W),
    D(u) = mean_k sum_c (x_c(u) - x_hat_k,c(u))^2 and V(u) = sum_c Var_k x_hat_k,c(u)
    (population variance, divisor K).
  * `box_means`: the mean of a map over each box's pixels (integral image, O(1) a box).
  * `normalised_values`: D_b = mean_{u in b} D(u) / (median_u D(u) + eps), the same for V;
    the image-level value is the mean over the whole image over the same median.
  * `zscore`: g_b = z(D_b) + z(V_b), z over the pool (the statistics are the pool's, passed in).

Coverage:
  * `ConceptGraph`: L1 super-category (from the categories' `supercategory`, or k-means of
    class prototypes), L2 predicted class, L3 visual cluster (k-means of the box embeddings
    within a class, k_c = ceil(sqrt(n_c / 2))); labeled mass M(v) per node.
  * prior pi(v) = 1 / (M(v) + 1); a box's prior is the geometric mean over its three nodes.
  * `greedy`: S(I) = max_b g+_b pi_b; each pick adds its boxes to the masses along their
    paths. Masses only grow, so S only falls: a lazy max-heap gives the exact greedy.

[ours] choices the paper leaves open, each a parameter of the selector:
  * g is shifted to be positive before it multiplies the prior (`shift`): g+ = g - min g + 1
    over the candidates' boxes ("min"), so that the product orders boxes by difficulty within
    a node and by node coverage between equally difficult boxes; "none" multiplies g as is.
  * a pick adds all its predicted boxes to the masses (`update` "all"; "best": only the box
    that gave S(I)).
  * labeled mass: L2 = the labeled instances of the class, L1 = the sum over its classes,
    L3 = the class's labeled mass spread over its clusters in proportion to their pool
    boxes (the labeled boxes' own embeddings are not stored).
  * an image without boxes has S = -inf: it is picked only after every image with boxes.
  * which term dominated a pick: the one whose value ranks higher among the candidates'
    boxes at pick time (the percentile of g+_b among all g+, of pi_b among all priors).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from poolscout.engine.acquisition.signals import register_signal
from poolscout.engine.acquisition.selectors import (SELECTORS, SelectContext, Selection, candidate_boxes, check_budget,
                                                    json_float)

EPS = 1e-8


# --------------------------------------------------------------------------- difficulty
def difficulty_maps(x: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel discrepancy D and variability V of one image or a batch.

    Args:
        x: (C, H, W) or (N, C, H, W) the image(s), in the model's value range.
        recon: (K, C, H, W) or (N, K, C, H, W) the K reconstructions of each image.

    Returns:
        (D, V): (H, W) or (N, H, W) float64 each.
    """
    x = np.asarray(x, dtype=np.float64)
    r = np.asarray(recon, dtype=np.float64)
    single = x.ndim == 3
    if single:
        x, r = x[None], r[None]
    if x.ndim != 4 or r.ndim != 5 or r.shape[0] != x.shape[0] or r.shape[2:] != x.shape[1:]:
        raise ValueError(f"difficulty_maps: x {x.shape} and recon {r.shape} do not match "
                         "((N, C, H, W) and (N, K, C, H, W))")
    d = ((x[:, None] - r) ** 2).sum(axis=2).mean(axis=1)
    v = r.var(axis=1).sum(axis=1)
    return (d[0], v[0]) if single else (d, v)


def _pixel_ranges(boxes: np.ndarray, width: float, height: float, w: int, h: int) -> np.ndarray:
    """Pixel index ranges [x0, x1) x [y0, y1) of boxes given in a width x height frame, on a
    w x h map: the pixels whose centres lie inside the box; a box that holds no pixel centre
    (in x or in y) takes the pixel under its own centre, so every box has at least one."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = w / float(width), h / float(height)
    x0 = np.ceil(b[:, 0] * sx - 0.5)
    x1 = np.ceil(b[:, 2] * sx - 0.5)
    y0 = np.ceil(b[:, 1] * sy - 0.5)
    y1 = np.ceil(b[:, 3] * sy - 0.5)
    # a box that holds no pixel centre takes the pixel under its own centre
    cx = np.floor((b[:, 0] + b[:, 2]) * 0.5 * sx)
    cy = np.floor((b[:, 1] + b[:, 3]) * 0.5 * sy)
    ex, ey = x1 <= x0, y1 <= y0
    x0, x1 = np.where(ex, cx, x0), np.where(ex, cx + 1, x1)
    y0, y1 = np.where(ey, cy, y0), np.where(ey, cy + 1, y1)
    x0 = np.clip(x0, 0, w - 1)
    y0 = np.clip(y0, 0, h - 1)
    x1 = np.clip(np.maximum(x1, x0 + 1), 1, w)
    y1 = np.clip(np.maximum(y1, y0 + 1), 1, h)
    x0 = np.minimum(x0, x1 - 1)
    y0 = np.minimum(y0, y1 - 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def box_means(m: np.ndarray, boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Mean of map m (H, W) over each box's pixels (see `_pixel_ranges`), via an integral image.

    Args:
        m: (H, W) map.
        boxes: (B, 4) x1, y1, x2, y2 in the image's original width x height frame.

    Returns:
        (B,) float64.
    """
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = m.cumsum(0).cumsum(1)
    r = _pixel_ranges(boxes, width, height, w, h)
    s = ii[r[:, 3], r[:, 2]] - ii[r[:, 1], r[:, 2]] - ii[r[:, 3], r[:, 0]] + ii[r[:, 1], r[:, 0]]
    return s / ((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]))


def normalised_values(d: np.ndarray, v: np.ndarray, boxes: np.ndarray, width: float, height: float,
                      eps: float = EPS) -> dict[str, np.ndarray | float]:
    """methods.md's per-box and image values of one image.

    Returns:
        {"d_box": (B,), "v_box": (B,), "d_image": float, "v_image": float}: each mean divided
        by the image's median of the same map plus eps.
    """
    md, mv = float(np.median(d)) + eps, float(np.median(v)) + eps
    return {"d_box": box_means(d, boxes, width, height) / md, "v_box": box_means(v, boxes, width, height) / mv,
            "d_image": float(np.mean(d)) / md, "v_image": float(np.mean(v)) / mv}


def pool_boxes(maps: np.ndarray, offsets: np.ndarray, boxes: np.ndarray, width: np.ndarray, height: np.ndarray,
               eps: float = EPS) -> dict[str, np.ndarray]:
    """`normalised_values` of a batch: maps (N, 2, h, w) holding D and V of each image (NaN
    for an image that was not scored), boxes of image i = rows offsets[i]:offsets[i + 1].

    Returns:
        {"gsal_d", "gsal_v": (M,) float32 per box; "gsal_d_image", "gsal_v_image": (N,)
        float64 per image}; NaN where the image has no maps.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    m = int(offsets[-1])
    out = {"gsal_d": np.full(m, np.nan, np.float32), "gsal_v": np.full(m, np.nan, np.float32),
           "gsal_d_image": np.full(n, np.nan), "gsal_v_image": np.full(n, np.nan)}
    for i in range(n):
        if not np.isfinite(maps[i]).all():
            continue
        a, b = offsets[i], offsets[i + 1]
        vals = normalised_values(maps[i, 0], maps[i, 1], np.asarray(boxes[a:b]).reshape(-1, 4), float(width[i]),
                                 float(height[i]), eps)
        out["gsal_d"][a:b] = vals["d_box"]
        out["gsal_v"][a:b] = vals["v_box"]
        out["gsal_d_image"][i] = vals["d_image"]
        out["gsal_v_image"][i] = vals["v_image"]
    return out


def zscore(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(values - mean) / std with the pool's statistics; std 0 (or NaN) gives zeros."""
    values = np.asarray(values, dtype=np.float64)
    if not (std > 0.0) or not math.isfinite(std):
        return np.zeros_like(values)
    return (values - mean) / std


# --------------------------------------------------------------------------- signals
def _finite_stats(v: np.ndarray) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if len(v) else (0.0, 0.0)


def pool_stats(batch: dict[str, np.ndarray]) -> dict:
    """Mean and standard deviation over the pool of the boxes' and the images' D and V (the
    `pool_context` of gsal_g and gsal_g_image)."""
    return {"gsal_stats": {k: _finite_stats(batch[k]) for k in ("gsal_d", "gsal_v", "gsal_d_image", "gsal_v_image")
                           if k in batch}}


def _field(batch: dict, key: str, n: int | None = None) -> np.ndarray:
    if batch.get(key) is None:
        raise KeyError(f"{key!r} is missing: score with a gsal signal (the diffusion stage) or a gsal strategy")
    return np.asarray(batch[key], dtype=np.float64)


def _z_sum(batch: dict, kd: str, kv: str, gsal_stats: dict | None) -> np.ndarray:
    d, v = _field(batch, kd), _field(batch, kv)
    if gsal_stats is None:  # in the stream: the pool's statistics come when scoring ends
        return np.full(len(d), np.nan)
    return zscore(d, *gsal_stats[kd]) + zscore(v, *gsal_stats[kv])


@register_signal("gsal_d", direction="high", per_box=True, fields=("gsal_d",), diffusion=True)
def gsal_d(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box diffusion discrepancy D_b (mean D over the box / the image's median D)."""
    return _field(batch, "gsal_d")


@register_signal("gsal_v", direction="high", per_box=True, fields=("gsal_v",), diffusion=True)
def gsal_v(batch: dict[str, np.ndarray], *, view: str = "orig") -> np.ndarray:
    """Per-box denoising variability V_b (mean V over the box / the image's median V)."""
    return _field(batch, "gsal_v")


@register_signal("gsal_g", direction="high", per_box=True, fields=("gsal_d", "gsal_v"), diffusion=True,
                 pool_context=pool_stats)
def gsal_g(batch: dict[str, np.ndarray], *, view: str = "orig", gsal_stats: dict | None = None) -> np.ndarray:
    """Per-box difficulty g_b = z(D_b) + z(V_b), z over the pool's boxes."""
    return _z_sum(batch, "gsal_d", "gsal_v", gsal_stats)


@register_signal("gsal_d_image", direction="high", per_box=False, fields=("gsal_d_image",), diffusion=True)
def gsal_d_image(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Whole-image D (mean D / median D)."""
    return _field(batch, "gsal_d_image")


@register_signal("gsal_v_image", direction="high", per_box=False, fields=("gsal_v_image",), diffusion=True)
def gsal_v_image(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Whole-image V (mean V / median V)."""
    return _field(batch, "gsal_v_image")


@register_signal("gsal_g_image", direction="high", per_box=False, fields=("gsal_d_image", "gsal_v_image"),
                 diffusion=True, pool_context=pool_stats)
def gsal_g_image(batch: dict[str, np.ndarray], gsal_stats: dict | None = None) -> np.ndarray:
    """Whole-image difficulty z(D_I) + z(V_I), z over the pool's images."""
    return _z_sum(batch, "gsal_d_image", "gsal_v_image", gsal_stats)


# --------------------------------------------------------------------------- concept graph
def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from poolscout.engine.methods.typiclust import kmeans_labels

    k = int(min(max(1, k), len(x)))
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    return np.asarray(kmeans_labels(np.ascontiguousarray(x, dtype=np.float32), k, seed=seed), dtype=np.int64)


@dataclass
class ConceptGraph:
    """Nodes of the three levels and each box's path.

    Attributes:
        l1, l2, l3: (M,) int64 the box's node at each level; l2 is the class (1..C), l1 an
            index into `l1_names`, l3 a global index into the visual clusters.
        l1_names: name of each L1 node.
        l3_class: (n_l3,) int64 the class of each L3 node; l3_local: its index within it.
        l1_of_class: (C + 1,) int64 the L1 node of each class (index 0 unused, -1).
    """

    l1: np.ndarray
    l2: np.ndarray
    l3: np.ndarray
    l1_names: list[str]
    l3_class: np.ndarray
    l3_local: np.ndarray
    l1_of_class: np.ndarray

    @property
    def n_l3(self) -> int:
        return len(self.l3_class)


def build_concept_graph(labels: np.ndarray, emb: np.ndarray | None, num_classes: int, *,
                        supercategory: list[str] | None = None, seed: int = 0) -> ConceptGraph:
    """The three-level graph of M boxes.

    Args:
        labels: (M,) int64 predicted class 1..C of each box.
        emb: (M, r) box embeddings (L3 clusters, and L1 prototypes), or None: one L3 node per
            class, and L1 from `supercategory` or a single node.
        num_classes: C.
        supercategory: the L1 name of each class 1..C (e.g. COCO's `supercategory`), or None
            to cluster the class prototypes (the mean embedding of a class's boxes) into
            ceil(sqrt(C' / 2)) groups, C' the classes present.
        seed: of the k-means runs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    c = int(num_classes)
    if len(labels) and (labels.min() < 1 or labels.max() > c):
        raise ValueError(f"concept graph: box labels must lie in 1..{c}")
    l1_of_class = np.full(c + 1, -1, dtype=np.int64)
    present = np.unique(labels)
    if supercategory is not None:
        if len(supercategory) != c:
            raise ValueError(f"concept graph: {len(supercategory)} super-categories for {c} classes")
        names = sorted(set(supercategory))
        idx = {n: i for i, n in enumerate(names)}
        l1_of_class[1:] = [idx[s] for s in supercategory]
        l1_names = names
    elif emb is None or len(present) <= 1:
        l1_of_class[1:] = 0
        l1_names = ["all"]
    else:
        proto = np.stack([emb[labels == k].mean(axis=0) for k in present])
        g = _kmeans(proto, math.ceil(math.sqrt(len(present) / 2.0)), seed)
        l1_of_class[1:] = 0  # classes with no box: group 0 (they own no box)
        l1_of_class[present] = g
        l1_names = [f"group{i}" for i in range(int(g.max()) + 1)]
    l3 = np.zeros(len(labels), dtype=np.int64)
    l3_class: list[int] = []
    l3_local: list[int] = []
    for k in present.tolist():
        rows = np.flatnonzero(labels == k)
        kc = math.ceil(math.sqrt(len(rows) / 2.0))
        lab = np.zeros(len(rows), dtype=np.int64) if emb is None else _kmeans(emb[rows], kc, seed + k)
        used, lab = np.unique(lab, return_inverse=True)
        l3[rows] = len(l3_class) + lab
        l3_class += [k] * len(used)
        l3_local += list(range(len(used)))
    return ConceptGraph(l1=l1_of_class[labels], l2=labels, l3=l3, l1_names=l1_names,
                        l3_class=np.asarray(l3_class, dtype=np.int64), l3_local=np.asarray(l3_local, dtype=np.int64),
                        l1_of_class=l1_of_class)


def labeled_masses(graph: ConceptGraph, class_counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labeled mass per node (M1 (n_l1,), M2 (C + 1,), M3 (n_l3,)) float64 from the labeled
    instances of each class 1..C (`class_counts[c - 1]`); L3 gets its class's mass in
    proportion to the pool boxes of each cluster."""
    c = len(graph.l1_of_class) - 1
    m2 = np.zeros(c + 1)
    if class_counts is not None:
        cc = np.asarray(class_counts, dtype=np.float64)
        m2[1 : 1 + min(c, len(cc))] = cc[:c]
    m1 = np.zeros(len(graph.l1_names))
    np.add.at(m1, graph.l1_of_class[1:], m2[1:])
    boxes_per_l3 = np.bincount(graph.l3, minlength=graph.n_l3).astype(np.float64)
    boxes_per_class = np.bincount(graph.l3_class, weights=boxes_per_l3, minlength=c + 1)
    share = boxes_per_l3 / np.maximum(boxes_per_class[graph.l3_class], 1.0)
    m3 = m2[graph.l3_class] * share
    return m1, m2, m3


def node_prior(m1: np.ndarray, m2: np.ndarray, m3: np.ndarray, graph: ConceptGraph) -> np.ndarray:
    """(n_l3,) the prior of a box in each L3 node: the geometric mean of 1 / (M + 1) over its
    L1, L2 and L3 nodes."""
    k = graph.l3_class
    return ((m1[graph.l1_of_class[k]] + 1.0) * (m2[k] + 1.0) * (m3 + 1.0)) ** (-1.0 / 3.0)


# --------------------------------------------------------------------------- greedy
@dataclass
class GreedyResult:
    rows: np.ndarray  # (b,) picked images (rows of offsets), in pick order
    score: np.ndarray  # (b,) S(I) at pick time
    box: np.ndarray  # (b,) the box (global row) that gave S(I), -1 for an image without boxes
    prior: np.ndarray  # (b,) that box's prior at pick time
    masses: np.ndarray  # (b, 3) labeled masses of its L1, L2, L3 nodes at pick time
    dominant: list[str]  # "difficulty" | "coverage" | "none"


def greedy(offsets: np.ndarray, g: np.ndarray, graph: ConceptGraph, budget: int, *,
           class_counts: np.ndarray | None = None, use_prior: bool = True, use_difficulty: bool = True,
           update: str = "all") -> GreedyResult:
    """Greedy S(I) = max_b g_b pi_b over images (ties to the lowest image row, then the lowest box).

    Args:
        offsets: (N + 1,) boxes of image i are rows offsets[i]:offsets[i + 1].
        g: (M,) positive difficulty of each box (shifted by the caller).
        graph: the boxes' concept graph.
        budget: picks.
        class_counts: labeled instances per class 1..C (the masses' start), or None.
        use_prior: False: pi = 1 (difficulty only).
        use_difficulty: False: g = 1 (coverage only).
        update: "all" (every box of a picked image adds to the masses) or "best" (its best box).
    """
    if update not in ("all", "best"):
        raise ValueError(f"gsal: update must be 'all' or 'best', got {update!r}")
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    gg = np.asarray(g, dtype=np.float64) if use_difficulty else np.ones(len(graph.l3))
    m1, m2, m3 = labeled_masses(graph, class_counts)
    # per (image, L3 node): the best box of the image in that node (largest g, lowest row)
    img = np.repeat(np.arange(n), np.diff(offsets))
    order = np.lexsort((np.arange(len(gg)), -gg, graph.l3, img))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (img[order][1:] != img[order][:-1]) | (graph.l3[order][1:] != graph.l3[order][:-1])
    pair_box = order[first]  # one box per (image, node) pair, grouped by image
    pair_img = img[pair_box]
    pair_cut = np.searchsorted(pair_img, np.arange(n + 1))

    def prior_now() -> np.ndarray:
        return node_prior(m1, m2, m3, graph) if use_prior else np.ones(graph.n_l3)

    def best_of(i: int, pri: np.ndarray) -> tuple[float, int]:
        bx = pair_box[pair_cut[i] : pair_cut[i + 1]]
        if len(bx) == 0:
            return -math.inf, -1
        s = gg[bx] * pri[graph.l3[bx]]
        top = s.max()
        return float(top), int(bx[s == top].min())  # ties go to the lowest box row

    pri = prior_now()
    # the first S(I) of every image at once: max over its (image, node) pairs
    s0 = np.full(n, -math.inf)
    if len(pair_box):
        has = pair_cut[1:] > pair_cut[:-1]
        s0[has] = np.maximum.reduceat(gg[pair_box] * pri[graph.l3[pair_box]], pair_cut[:-1][has])
    heap = list(zip((-s0).tolist(), range(n)))
    heapq.heapify(heap)
    g_sorted = np.sort(gg)
    b = min(int(budget), n)
    rows, score, box, prior_at, masses, dom = [], [], [], [], [], []
    box_count = np.bincount(graph.l3, minlength=graph.n_l3)
    version = 0
    stamp = np.zeros(n, dtype=np.int64)  # the version each heap entry was computed at
    while len(rows) < b:
        neg, i = heapq.heappop(heap)
        if stamp[i] != version:
            s, _ = best_of(i, pri)
            stamp[i] = version
            heapq.heappush(heap, (-s, i))
            continue
        s, bj = best_of(i, pri)
        rows.append(i)
        score.append(s)
        box.append(bj)
        if bj < 0:
            prior_at.append(math.nan)
            masses.append((math.nan, math.nan, math.nan))
            dom.append("none")
        else:
            v = graph.l3[bj]
            prior_at.append(float(pri[v]))
            masses.append((float(m1[graph.l1[bj]]), float(m2[graph.l2[bj]]), float(m3[v])))
            # percentile of the box's g among all boxes, of its prior among all boxes' priors
            pg = float(np.searchsorted(g_sorted, gg[bj], side="right") / max(len(gg), 1)) if use_difficulty else 0.0
            pp = float(box_count[pri <= pri[v]].sum() / max(len(gg), 1)) if use_prior else 0.0
            dom.append("difficulty" if pg >= pp and use_difficulty else "coverage")
            added = np.arange(offsets[i], offsets[i + 1]) if update == "all" else np.array([bj])
            np.add.at(m1, graph.l1[added], 1.0)
            np.add.at(m2, graph.l2[added], 1.0)
            np.add.at(m3, graph.l3[added], 1.0)
            if use_prior:
                pri = prior_now()
                version += 1
        stamp[i] = -1  # never again
    return GreedyResult(np.asarray(rows, dtype=np.int64), np.asarray(score), np.asarray(box, dtype=np.int64),
                        np.asarray(prior_at), np.asarray(masses, dtype=np.float64).reshape(-1, 3), dom)


# --------------------------------------------------------------------------- selector
@SELECTORS.register("gsal", final=True, needs_embedding=False, needs_boxes=True,
                    box_fields=("labels", "roi_embedding", "gsal_d", "gsal_v"))
def gsal(table: dict[str, np.ndarray], budget: int, *, ctx: SelectContext, prior: bool = True,
         difficulty: bool = True, shift: str = "min", update: str = "all", supercategory: list | str | None = None,
         num_classes: int | None = None, seed: int = 0) -> Selection:
    """GSAL's greedy over the candidates' predicted boxes (`ctx.boxes`: labels,
    roi_embedding and the per-box D_b, V_b written at scoring). g_b = z(D_b) + z(V_b), z over
    the candidates' boxes (the pool's, unless a query filters the candidates).

    Args:
        prior: use the concept-graph prior (False: `gsal_difficulty`, pi = 1).
        difficulty: use the diffusion difficulty (False: `gsal_coverage`, g = 1).
        shift: "min" (g+ = g - min g + 1 over the candidates' boxes) or "none".
        update: "all" or "best" (see `greedy`).
        supercategory: L1 name of each class 1..C; None or "auto": the run's categories'
            `supercategory` (ctx.categories) when every class has one and there are at least
            two, else clusters of class prototypes; "clusters": always clusters of class
            prototypes (the graph learns no grouping from the dataset's metadata: a benchmark
            whose rare class alone has its own super-category would otherwise be told it).
        num_classes: C (None: the largest predicted label, or the labeled counts' length).
        seed: of the graph's k-means.

    Returns:
        Selection with score = S(I) at pick time; rationale {"gsal": {path, mass, g, prior,
        score, box, dominant, rank}}: path = [L1 name, class, "class/cluster"], mass = the
        labeled masses of those nodes at pick time.

    References:
        methods.md section 4 (GSAL); the diffusion signals: engine.models.diffusion.
    """
    budget = check_budget(budget)
    if shift not in ("min", "none"):
        raise ValueError(f"selector gsal: shift must be 'min' or 'none', got {shift!r}")
    if not (prior or difficulty):
        raise ValueError("selector gsal: at least one of prior and difficulty must be on")
    ids = np.asarray(table["image_id"], dtype=np.int64)
    fields = (("offsets", "labels") + (("gsal_d", "gsal_v") if difficulty else ())
              + (("roi_embedding",) if prior else ()))
    bx = candidate_boxes("gsal", ctx, ids, fields)
    n = len(ids)
    if n == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    offsets = np.asarray(bx["offsets"], dtype=np.int64)
    labels = np.asarray(bx["labels"], dtype=np.int64).reshape(-1)
    if len(offsets) != n + 1 or offsets[-1] != len(labels):
        raise ValueError(f"selector gsal: ctx.boxes offsets describe {len(offsets) - 1} images, the table has {n}")
    counts = ctx.labeled_class_counts
    c = int(num_classes) if num_classes is not None else max(int(labels.max()) if len(labels) else 1,
                                                              len(counts) if counts is not None else 1)
    emb = np.asarray(bx["roi_embedding"], dtype=np.float32) if prior and bx.get("roi_embedding") is not None else None
    cats = ctx.categories or []
    if isinstance(supercategory, str):
        if supercategory not in ("auto", "clusters"):
            raise ValueError(f"selector gsal: supercategory must be a list of names, 'auto' or 'clusters', "
                             f"got {supercategory!r}")
        from_categories = supercategory == "auto"
        supercategory = None
    else:
        from_categories = supercategory is None
    if from_categories and len(cats) >= c:
        sup = [str(x.get("supercategory") or "") for x in cats[:c]]
        if all(sup) and len(set(sup)) >= 2:
            supercategory = sup
    graph = build_concept_graph(labels, emb, c, supercategory=supercategory, seed=int(seed))
    names = [str(x.get("name", i + 1)) for i, x in enumerate(cats[:c])] if len(cats) >= c else None
    if difficulty:
        d = np.asarray(bx["gsal_d"], dtype=np.float64).reshape(-1)
        v = np.asarray(bx["gsal_v"], dtype=np.float64).reshape(-1)
        if not (np.isfinite(d).all() and np.isfinite(v).all()):
            raise ValueError("selector gsal: gsal_d / gsal_v hold NaN or inf values (boxes scored without the "
                             "diffusion stage?)")
        g = zscore(d, *_finite_stats(d)) + zscore(v, *_finite_stats(v))
        if shift == "min" and len(g):
            g = g - g.min() + 1.0
    else:
        g = np.ones(len(labels))
    res = greedy(offsets, g, graph, min(budget, n), class_counts=counts, use_prior=bool(prior),
                 use_difficulty=bool(difficulty), update=update)
    rat = []
    for t, (i, bj) in enumerate(zip(res.rows.tolist(), res.box.tolist())):
        if bj < 0:
            rat.append({"gsal": {"path": None, "mass": None, "g": None, "prior": None, "score": None, "box": None,
                                 "dominant": "none", "rank": t + 1}})
            continue
        k = int(graph.l2[bj])
        v = int(graph.l3[bj])
        cname = names[k - 1] if names else k
        rat.append({"gsal": {"path": [graph.l1_names[int(graph.l1[bj])], cname, f"{cname}/{int(graph.l3_local[v])}"],
                             "mass": [json_float(m) for m in res.masses[t]], "g": json_float(g[bj]),
                             "prior": json_float(res.prior[t]), "score": json_float(res.score[t]),
                             "box": int(bj - offsets[i]), "dominant": res.dominant[t], "rank": t + 1}})
    return Selection(ids[res.rows], np.where(np.isfinite(res.score), res.score, np.nan), rat)


__all__ = ["ConceptGraph", "GreedyResult", "box_means", "build_concept_graph", "difficulty_maps", "greedy",
           "gsal", "gsal_d", "gsal_d_image", "gsal_g", "gsal_g_image", "gsal_v", "gsal_v_image", "labeled_masses",
           "node_prior", "normalised_values", "pool_boxes", "pool_stats", "zscore"]
