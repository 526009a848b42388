"""Active similarity refinement of defect masks (Clarkson, Edwards, Xie; methods.md section 9).

Coarse binary defect masks (boxes filled, a segmentation model's output, or noise) are
refined with a patch embedding: patches (default 32 px) centred on pixels of the images,
labeled by the mask at their centre, train a small ResNet with a triplet loss (batch-hard
positives, semi-hard negatives, margin 0.2) and a binary defect head. The expert is shown
an anchor (chosen at random or by the defect head's entropy) with its 5 hardest positives
(same current label, farthest in the embedding) and 5 hardest negatives (other label,
nearest), found with a FAISS index (never all pairs), and marks those that match the
anchor. Answers feed back as (a) mask updates (the centre pixel or the whole patch), (b) a
user-refined set training draws from, or (c) both.

Everything here is plain NumPy / torch / FAISS; the run directory, the answer log, Ray Train
and the web page live in jobs/refine.py and jobs/refine_web.py.

Labels are binary: 0 background, 1 defect (any class). Coordinates are (x, y) = (column,
row) of the displayed image; a patch centred on (x, y) covers rows y - s//2 .. y - s//2 + s - 1
(reflect padding at the borders).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INIT_KINDS = ("roi", "segmentation", "random")
MODES = ("a", "b", "c")  # mask update, user-refined set, both
ANCHORS = ("random", "entropy")
RELABEL = ("centre", "patch")


# --------------------------------------------------------------------------- masks
def roi_mask(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2 in pixels, exclusive right/bottom edges) filled: (H, W) uint8 0/1."""
    h, w = shape
    m = np.zeros((h, w), np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, r0 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c1, r1 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if c1 > c0 and r1 > r0:
            m[r0:r1, c0:c1] = 1
    return m


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 0/1 mask: (labels (H, W) int32, 0 background, 1..n), n."""
    m = np.asarray(mask) > 0
    h, w = m.shape
    lab = np.zeros((h, w), np.int32)
    n = 0
    for r0, c0 in zip(*np.nonzero(m)):
        if lab[r0, c0]:
            continue
        n += 1
        lab[r0, c0] = n
        stack = [(int(r0), int(c0))]
        while stack:
            r, c = stack.pop()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and m[rr, cc] and not lab[rr, cc]:
                        lab[rr, cc] = n
                        stack.append((rr, cc))
    return lab, n


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes (x1, y1, x2, y2; right/bottom exclusive) of the 8-connected defect
    components of a 0/1 mask: the "ROI" an expert would draw when only masks exist."""
    lab, n = components(mask)
    out = []
    for k in range(1, n + 1):
        rr, cc = np.nonzero(lab == k)
        out.append((cc.min(), rr.min(), cc.max() + 1, rr.max() + 1))
    return np.array(out, np.float64).reshape(-1, 4)


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation with the 3 x 3 square, `iterations` times (bool)."""
    m = np.asarray(mask) > 0
    for _ in range(int(iterations)):
        p = np.pad(m, 1)
        out = np.zeros_like(m)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                out |= p[dr:dr + m.shape[0], dc:dc + m.shape[1]]
        m = out
    return m


def random_mask(shape: tuple[int, int], rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Uniform noise: every pixel a defect with probability p (the paper's "random" start)."""
    return (rng.random(shape) < p).astype(np.uint8)


def degrade_mask(truth: np.ndarray, rng: np.random.Generator, *, grow: int = 3, drop: float = 0.3,
                 false_blobs: int = 2, blob: int = 6) -> np.ndarray:
    """A stand-in for a pre-trained segmentation model's output on a benchmark: the truth
    dilated by `grow` px, each defect component dropped with probability `drop`, and
    `false_blobs` spurious square blobs of side `blob` added. Deterministic for an rng."""
    t = np.asarray(truth) > 0
    lab, n = components(t)
    keep = np.concatenate([[False], rng.random(n) >= drop])
    m = keep[lab]
    if grow > 0:
        m = dilate(m, grow)
    h, w = t.shape
    for _ in range(false_blobs):
        r, c = int(rng.integers(0, max(1, h - blob))), int(rng.integers(0, max(1, w - blob)))
        m[r:r + blob, c:c + blob] = True
    return m.astype(np.uint8)


# --------------------------------------------------------------------------- patches
def sample_centres(mask: np.ndarray, n: int, rng: np.random.Generator, *, balance: bool = True,
                   margin: int = 0) -> np.ndarray:
    """(n, 2) int32 centres (x, y) sampled from a 0/1 mask.

    With `balance`, half from the mask's defect pixels and half from its background (all
    from the other side when one side is empty), so thin defects are not drowned; without,
    uniformly over the image. `margin` keeps centres that far from the borders. Sampled
    without replacement while pixels last; fewer than n only when the image is smaller.
    """
    m = np.asarray(mask)
    h, w = m.shape
    rows, cols = np.mgrid[margin:h - margin, margin:w - margin]
    rows, cols = rows.ravel(), cols.ravel()
    if rows.size == 0:
        return np.zeros((0, 2), np.int32)
    if not balance:
        k = rng.choice(rows.size, size=min(n, rows.size), replace=False)
        return np.stack([cols[k], rows[k]], 1).astype(np.int32)
    lab = m[rows, cols] > 0
    pos, neg = np.flatnonzero(lab), np.flatnonzero(~lab)
    n_pos = min(pos.size, n // 2 if neg.size else n)
    n_neg = min(neg.size, n - n_pos)
    n_pos = min(pos.size, n - n_neg)  # the background side may be short too
    k = np.concatenate([rng.choice(pos, size=n_pos, replace=False), rng.choice(neg, size=n_neg, replace=False)])
    return np.stack([cols[k], rows[k]], 1).astype(np.int32)


def extract_patches(image: np.ndarray, centres: np.ndarray, size: int = 32) -> np.ndarray:
    """(n, size, size, C) uint8 crops of an (H, W, C) or (H, W) image centred on (x, y),
    reflect-padded at the borders. A centre outside the image raises IndexError."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    h, w = img.shape[:2]
    c = np.asarray(centres, np.int64).reshape(-1, 2)
    if c.size and ((c[:, 0] < 0).any() or (c[:, 0] >= w).any() or (c[:, 1] < 0).any() or (c[:, 1] >= h).any()):
        raise IndexError(f"a patch centre lies outside the {w}x{h} image")
    half = size // 2
    pad = np.pad(img, ((half, size), (half, size), (0, 0)), mode="reflect" if min(h, w) > size else "edge")
    out = np.empty((len(c), size, size, img.shape[2]), img.dtype)
    for i, (x, y) in enumerate(c):
        out[i] = pad[y:y + size, x:x + size]  # padded row y + half - half
    return out


def to_tensor(patches: np.ndarray) -> torch.Tensor:
    """uint8 (n, s, s, C) -> float (n, 3, s, s) in [-1, 1] (grey images repeated)."""
    t = torch.from_numpy(np.ascontiguousarray(patches)).float().div_(127.5).sub_(1.0).permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


# --------------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.skip(x))


class PatchNet(nn.Module):
    """A small ResNet (a stem and three residual blocks, widths w, 2w, 4w) over patches:
    an L2-normalised embedding and a binary defect logit."""

    def __init__(self, width: int = 16, dim: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2),
                                    _Block(4 * width, 4 * width, 2))
        self.embed = nn.Linear(4 * width, dim)
        self.head = nn.Linear(4 * width, 1)
        self.width, self.dim = width, dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.blocks(self.stem(x)).mean((2, 3))
        return F.normalize(self.embed(f), dim=1), self.head(f).squeeze(1)


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> tuple[torch.Tensor, int]:
    """Mean of max(0, d(a,p)^2 - d(a,n)^2 + m) over the anchors of a batch that have a
    positive and a negative: p the farthest same-label point (batch-hard), n the nearest
    semi-hard negative (d(a,p) < d(a,n) < d(a,p) + m) or, when none, the nearest negative.
    Returns (loss, number of triplets)."""
    d2 = torch.cdist(emb, emb).pow(2)
    d = d2.clamp_min(0).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_mask, neg_mask = same & ~eye, ~same
    has = pos_mask.any(1) & neg_mask.any(1)
    if not bool(has.any()):
        return emb.sum() * 0.0, 0
    inf = torch.tensor(float("inf"), device=emb.device)
    d_ap = torch.where(pos_mask, d, -inf).max(1).values
    p_idx = torch.where(pos_mask, d, -inf).argmax(1)
    semi = neg_mask & (d > d_ap[:, None]) & (d < d_ap[:, None] + margin)
    semi_any = semi.any(1)
    n_semi = torch.where(semi, d, inf).argmin(1)
    n_hard = torch.where(neg_mask, d, inf).argmin(1)
    n_idx = torch.where(semi_any, n_semi, n_hard)
    a = torch.arange(len(labels), device=emb.device)
    loss = (d2[a, p_idx] - d2[a, n_idx] + margin).clamp_min(0)
    return loss[has].mean(), int(has.sum())


@dataclass
class TrainSettings:
    steps: int = 150
    batch: int = 128
    lr: float = 1e-3
    margin: float = 0.2
    head_weight: float = 1.0
    seed: int = 0


def fit_patches(model: PatchNet, patches: np.ndarray, labels: np.ndarray, ts: TrainSettings, *,
                refined: tuple[np.ndarray, np.ndarray] | None = None, refined_share: float = 0.5,
                log=None) -> list[dict]:
    """Train `model` in place on uint8 patches (n, s, s, C) with 0/1 labels: triplet loss
    plus binary cross-entropy of the defect head, Adam, `ts.steps` batches of `ts.batch`
    patches, each batch half defect and half background where both exist. `refined`
    (patches, labels) is the user-refined set; when given with patches, `refined_share` of
    every batch is drawn from it. Returns per-step history (loss, triplets)."""
    g = torch.Generator().manual_seed(int(ts.seed))
    rng = np.random.default_rng(ts.seed)
    opt = torch.optim.Adam(model.parameters(), lr=ts.lr)
    labels = np.asarray(labels, np.int64)
    have_main = len(labels) > 0
    have_ref = refined is not None and len(refined[1]) > 0
    if not have_main and not have_ref:
        raise ValueError("nothing to train on: no labeled patches")
    by = [np.flatnonzero(labels == c) for c in (0, 1)] if have_main else None
    rby = [np.flatnonzero(np.asarray(refined[1]) == c) for c in (0, 1)] if have_ref else None

    def draw(groups, n):
        groups = [x for x in groups if x.size]
        per = [n // len(groups) + (1 if i < n % len(groups) else 0) for i in range(len(groups))]
        return np.concatenate([rng.choice(x, size=k, replace=x.size < k) for x, k in zip(groups, per)])

    history = []
    model.train()
    for step in range(int(ts.steps)):
        n_ref = (int(round(ts.batch * refined_share)) if have_main else ts.batch) if have_ref else 0
        parts_x, parts_y = [], []
        if have_main and ts.batch - n_ref > 0:
            k = draw(by, ts.batch - n_ref)
            parts_x.append(patches[k]), parts_y.append(labels[k])
        if n_ref:
            k = draw(rby, n_ref)
            parts_x.append(refined[0][k]), parts_y.append(np.asarray(refined[1], np.int64)[k])
        x = to_tensor(np.concatenate(parts_x))
        y = torch.from_numpy(np.concatenate(parts_y))
        if torch.rand(1, generator=g).item() < 0.5:  # flips: defects have no orientation
            x = x.flip(3)
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(2)
        emb, logit = model(x)
        tl, nt = triplet_loss(emb, y, ts.margin)
        bce = F.binary_cross_entropy_with_logits(logit, y.float())
        loss = tl + ts.head_weight * bce
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "loss": loss.detach().item(), "triplet": tl.detach().item(),
                        "bce": bce.detach().item(), "triplets": nt})
        if log is not None and (step + 1) % 50 == 0:
            log(f"step {step + 1}/{ts.steps}: loss {history[-1]['loss']:.4f}")
    model.eval()
    return history


@torch.no_grad()
def embed(model: PatchNet, patches: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, dim), defect probabilities float32 (n,)) in eval mode."""
    model.eval()
    es, ps = [], []
    for i in range(0, len(patches), batch):
        e, logit = model(to_tensor(patches[i:i + batch]))
        es.append(e.numpy()), ps.append(torch.sigmoid(logit).numpy())
    if not es:
        return np.zeros((0, model.dim), np.float32), np.zeros(0, np.float32)
    return np.concatenate(es).astype(np.float32), np.concatenate(ps).astype(np.float32)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


# --------------------------------------------------------------------------- acquisition
def choose_anchor(p_defect: np.ndarray, eligible: np.ndarray, how: str, rng: np.random.Generator) -> int:
    """Index of the next anchor among `eligible` (bool): uniformly at random, or the
    eligible patch whose defect probability has the highest entropy (ties: lowest index)."""
    if how not in ANCHORS:
        raise ValueError(f"anchors must be one of {ANCHORS}, got {how!r}")
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        raise LookupError("every patch has been answered")
    if how == "random":
        return int(rng.choice(idx))
    h = binary_entropy(p_defect[idx])
    return int(idx[int(np.argmax(h))])


class CandidateIndex:
    """FAISS inner-product indexes of the patch embeddings, one per current label, for the
    anchor's hardest positives (same label, farthest: the nearest to -q on unit vectors) and
    hardest negatives (other label, nearest). Exact (flat) up to `exact_below` patches per
    label, IVF beyond (nprobe configurable)."""

    def __init__(self, emb: np.ndarray, labels: np.ndarray, *, exact_below: int = 200_000, nprobe: int = 16):
        import faiss

        self.emb = np.ascontiguousarray(emb, np.float32)
        self.labels = np.asarray(labels, np.int64)
        self._ids, self._index = {}, {}
        d = self.emb.shape[1]
        for c in (0, 1):
            ids = np.flatnonzero(self.labels == c)
            self._ids[c] = ids
            if ids.size == 0:
                continue
            x = self.emb[ids]
            if ids.size < exact_below:
                ix = faiss.IndexFlatIP(d)
            else:
                nlist = int(min(4096, max(16, np.sqrt(ids.size))))
                ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
                ix.train(x)
                ix.nprobe = nprobe
            ix.add(x)
            self._index[c] = ix

    def _search(self, c: int, q: np.ndarray, k: int, exclude: set[int]) -> list[int]:
        if c not in self._index:
            return []
        want = min(len(self._ids[c]), k + len(exclude) + 1)
        _, nn = self._index[c].search(q[None].astype(np.float32), want)
        out = []
        for j in nn[0]:
            if j < 0:
                continue
            i = int(self._ids[c][j])
            if i not in exclude:
                out.append(i)
            if len(out) == k:
                break
        return out

    def candidates(self, anchor: int, k: int = 5, exclude: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """(hardest positives, hardest negatives) of patch `anchor`, k each, excluding the
        anchor and `exclude`."""
        ex = set(int(i) for i in exclude) | {int(anchor)}
        c = int(self.labels[anchor])
        q = self.emb[anchor]
        return self._search(c, -q, k, ex), self._search(1 - c, q, k, ex)


# --------------------------------------------------------------------------- feedback and evaluation
def relabel(mask: np.ndarray, x: int, y: int, label: int, *, scope: str = "centre", size: int = 32) -> None:
    """Mode (a)'s mask update, in place: the centre pixel, or the whole patch window."""
    if scope == "centre":
        mask[y, x] = label
    elif scope == "patch":
        h, w = mask.shape
        half = size // 2
        mask[max(0, y - half):min(h, y - half + size), max(0, x - half):min(w, x - half + size)] = label
    else:
        raise ValueError(f"relabel scope must be one of {RELABEL}, got {scope!r}")


def simulated_answer(truth: np.ndarray, anchor_xy: tuple[int, int], cands: Sequence[tuple[int, int]], *,
                     shift: bool = False, size: int = 32) -> tuple[int, list[bool], dict[int, tuple[int, int]]]:
    """The simulated expert (benchmarks, tests): answers from a ground-truth 0/1 mask of one
    image per patch. Returns (anchor label, same-as-anchor per candidate, shifts): with
    `shift`, a candidate whose centre is background but whose window holds defect pixels,
    shown with a defect anchor, is shifted onto its nearest defect pixel and marked same.
    `cands` are (truth mask, (x, y)) pairs."""
    tm, (ax, ay) = truth, anchor_xy
    a = int(tm[ay, ax] > 0)
    same, shifts = [], {}
    for i, (m, (x, y)) in enumerate(cands):
        lab = int(m[y, x] > 0)
        if shift and a == 1 and lab == 0:
            h, w = m.shape
            half = size // 2
            r0, c0 = max(0, y - half), max(0, x - half)
            win = m[r0:min(h, y - half + size), c0:min(w, x - half + size)] > 0
            if win.any():
                rr, cc = np.nonzero(win)
                j = int(np.argmin((rr + r0 - y) ** 2 + (cc + c0 - x) ** 2))
                shifts[i] = (int(cc[j] + c0 - x), int(rr[j] + r0 - y))
                lab = 1
        same.append(lab == a)
    return a, same, shifts


def patch_f1(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Precision, recall and F1 of the defect class over patch predictions (0/1)."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "n": int(p.size)}


@torch.no_grad()
def dense_prediction(model: PatchNet, image: np.ndarray, *, size: int = 32, stride: int = 8) -> np.ndarray:
    """(H, W) float32 defect probability: the head on a grid of patch centres every `stride`
    px, each value spread over its stride x stride cell."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    ys = np.arange(stride // 2, h, stride)
    xs = np.arange(stride // 2, w, stride)
    yy, xx = np.meshgrid(np.minimum(ys, h - 1), np.minimum(xs, w - 1), indexing="ij")
    cent = np.stack([xx.ravel(), yy.ravel()], 1)
    _, p = embed(model, extract_patches(img, cent, size))
    grid = p.reshape(len(ys), len(xs))
    return np.repeat(np.repeat(grid, stride, 0), stride, 1)[:h, :w].astype(np.float32)
