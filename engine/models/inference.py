"""Detector inference into the canonical prediction batch (engine/predictions.py).

One eval path per family replaces torchvision's post-processing so that every kept box
keeps a link to where it came from (the Faster R-CNN proposal or the one-stage anchor).
That link gives each box its full class distribution `probs` (C + 1 columns, column 0 =
background) and its `roi_embedding`, which torchvision's outputs drop
(docs/methods.md §0).

Input canvases are `S x S` letterboxed images (image at the top-left, `scale = S / max(h,
w)`); with `min_size = max_size = S` the model's transform leaves them at `S x S`, so each
image's outputs do not depend on the other images of the batch.

Semantics kept from torchvision: class-wise boxes (R-CNN), `score > score_thresh`,
per-level top-k candidates (one-stage), class-wise (batched) NMS, top `max_boxes` by
score. Differences, all ours: boxes are clipped to the image *content* region of the
canvas (not to the padded canvas) and boxes that become empty (< 0.01 px) are removed in
every family; the one-stage families ignore output column 0 (see engine/detectors.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import boxes as box_ops

SUPPORTED_VIEWS = ("orig", "hflip", "cutout", "resize", "rotate")
_MIN_BOX_SIZE = 1e-2
# Default parameters of the augmented views (docs/methods.md §0; CALD's views).
VIEW_DEFAULTS = {"resize": 0.8, "rotate": 5.0, "cutout_holes": 2, "cutout_size": 0.2, "cutout_seed": 0}


def _view_prefix(view: str) -> str:
    return "" if view == "orig" else f"{view}_"


def prepare(images: np.ndarray, device: Any) -> torch.Tensor:
    """uint8 NHWC canvases -> float32 NCHW in [0, 1] on `device`.

    Args:
        images: (N, S, S, 3) uint8.
        device: torch device or its name.

    Returns:
        (N, 3, S, S) float32.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)  # move uint8: 4x less traffic
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def _ensure_device(model: nn.Module, device: Any) -> torch.device:
    dev = torch.device(device)
    try:
        cur = next(model.parameters()).device
    except StopIteration:
        return dev
    if cur.type != dev.type or (dev.index is not None and cur.index != dev.index):
        model.to(dev)
    return dev


def _check_canvas(model: nn.Module, images: np.ndarray) -> None:
    s = getattr(model, "poolscout_input_size", None)
    n, h, w = images.shape[:3]
    if h != w:
        raise ValueError(f"canvases must be square (letterboxed), got {h}x{w}")
    if s is not None and h != s:
        raise ValueError(f"canvases are {h}x{w} but the detector was built for input_size {s}")


def _features(model: nn.Module, x: torch.Tensor) -> tuple[Any, "OrderedDict[str, torch.Tensor]"]:
    """Normalise (the transform's resize is the identity at S x S) and run backbone + FPN.

    Args:
        x: (N, 3, S, S) float in [0, 1].

    Returns:
        (ImageList with sizes (S, S), level name -> (N, d, S/s, S/s) feature maps).
    """
    image_list, _ = model.transform(list(x))
    feats = model.backbone(image_list.tensors)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    return image_list, feats


def _pooled(feats: "OrderedDict[str, torch.Tensor]") -> torch.Tensor:
    """Image embedding: mean over FPN levels of the globally average-pooled maps -> (N, d)."""
    return torch.stack([f.mean(dim=(2, 3)) for f in feats.values()], 0).mean(0)


@torch.inference_mode()
def embed(model: nn.Module, images: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """Image embeddings only (backbone + FPN, no heads).

    Args:
        model: a detector from `engine.detectors.build_detector`.
        images: (N, S, S, 3) uint8 letterboxed canvases.
        device: where to run.

    Returns:
        (N, d) float32, d = `model.poolscout_embed_dim`; equals `predict(...)["embedding"]`.
    """
    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros((0, model.poolscout_embed_dim), np.float32)
    _check_canvas(model, images)
    dev = _ensure_device(model, device)
    if model.training:
        model.eval()
    _, feats = _features(model, prepare(images, dev))
    return _pooled(feats).float().cpu().numpy()


# --------------------------------------------------------------------------- Faster R-CNN
def _rcnn_raw(model: nn.Module, image_list: Any, feats: "OrderedDict[str, torch.Tensor]"
              ) -> dict[str, list[torch.Tensor]]:
    """RPN -> ROI pooling -> box head -> predictor, per image.

    Returns:
        Lists over images (key -> list) of decoded boxes "boxes" (P, C+1, 4) in canvas
        pixels, softmax "probs" (P, C+1), box-head features "box_feats" (P, r), pooled ROI
        features "pooled" (P, d, 7, 7) (MC dropout reruns the box head on them) and, when
        the predictor has a log-variance head, "log_var" (P, C+1, 4); P = proposals of
        that image.
    """
    proposals, _ = model.rpn(image_list, feats)
    rh = model.roi_heads
    pooled = rh.box_roi_pool(feats, proposals, image_list.image_sizes)
    box_feats = rh.box_head(pooled)
    log_var = None
    if hasattr(rh.box_predictor, "forward_with_var"):
        class_logits, box_regression, log_var = rh.box_predictor.forward_with_var(box_feats)
    else:
        class_logits, box_regression = rh.box_predictor(box_feats)
    boxes = rh.box_coder.decode(box_regression, proposals)
    probs = F.softmax(class_logits, -1)
    counts = [len(p) for p in proposals]
    out = {"boxes": list(boxes.split(counts)), "probs": list(probs.split(counts)),
           "box_feats": list(box_feats.split(counts)), "pooled": list(pooled.split(counts))}
    if log_var is not None:
        out["log_var"] = list(log_var.reshape(len(log_var), -1, 4).split(counts))
    return out


def _rcnn_select(boxes: torch.Tensor, probs: torch.Tensor, content_hw: tuple[int, int], score_thresh: float,
                 nms_thresh: float, max_boxes: int) -> tuple[torch.Tensor, ...]:
    """torchvision's RoIHeads.postprocess_detections, keeping each box's proposal index.

    Args:
        boxes: (P, K, 4) class-wise boxes, K = C + 1.
        probs: (P, K) softmax.
        content_hw: clip region (image content on the canvas).

    Returns:
        boxes (M, 4), scores (M,), labels (M,) in 1..C, proposal index (M,); by score.
    """
    p, k = probs.shape
    boxes = box_ops.clip_boxes_to_image(boxes, content_hw)[:, 1:].reshape(-1, 4)
    scores = probs[:, 1:].reshape(-1)
    flat = torch.arange(p * (k - 1), device=probs.device)
    labels = flat % (k - 1) + 1
    prop = torch.div(flat, k - 1, rounding_mode="floor")
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels, prop = boxes[keep], scores[keep], labels[keep], prop[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=_MIN_BOX_SIZE)
    boxes, scores, labels, prop = boxes[keep], scores[keep], labels[keep], prop[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)[:max_boxes]
    return boxes[keep], scores[keep], labels[keep], prop[keep]


def mc_dropout_moments(model: nn.Module, pooled: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T stochastic passes of the box head + predictor over fixed pooled ROI features.

    The backbone, FPN, RPN and ROI pooling ran once; only the (cheap) box head is
    repeated, with its dropout modules in train mode.

    Args:
        pooled: (M, d, 7, 7) pooled features of the kept boxes' proposals.
        passes: T >= 1.

    Returns:
        mean softmax (M, C+1) = mean_t p_t, and mean entropy (M,) = mean_t H(p_t); BALD of
        a box is H(mean_t p_t) - mean_t H(p_t) (Gal et al., "Deep Bayesian Active Learning
        with Image Data", ICML 2017; Houlsby et al. 2011).

    Raises:
        ValueError: the box head has no dropout (build the detector with detector.dropout > 0).
    """
    from poolscout.engine.models.detectors import set_mc_dropout

    rh = model.roi_heads
    if set_mc_dropout(rh.box_head, True) == 0:
        raise ValueError("MC dropout needs dropout in the box head: set detector.dropout > 0 "
                         "(and train with it) to use MC-dropout signals such as bald")
    try:
        k = rh.box_predictor.cls_score.out_features
        mean_p = pooled.new_zeros((len(pooled), k))
        mean_h = pooled.new_zeros((len(pooled),))
        if len(pooled):
            for _ in range(int(passes)):
                logits = rh.box_predictor(rh.box_head(pooled))[0]
                logp = F.log_softmax(logits.float(), -1)
                p = logp.exp()
                mean_p += p
                mean_h -= (p * logp).sum(-1)
            mean_p /= passes
            mean_h /= passes
    finally:
        set_mc_dropout(rh.box_head, False)
    return mean_p, mean_h


def _rcnn_detect(model: nn.Module, image_list: Any, feats: "OrderedDict[str, torch.Tensor]",
                 content_hw: Sequence[tuple[int, int]], max_boxes: int, mc_passes: int = 0,
                 mc_rows: tuple[int, int] = (0, 0)) -> list[dict[str, torch.Tensor]]:
    raw = _rcnn_raw(model, image_list, feats)
    rh = model.roi_heads
    out = []
    for i in range(len(raw["boxes"])):
        b, s, lab, prop = _rcnn_select(raw["boxes"][i], raw["probs"][i], content_hw[i], rh.score_thresh,
                                       rh.nms_thresh, max_boxes)
        d = {"boxes": b, "scores": s, "labels": lab, "probs": raw["probs"][i][prop],
             "roi_embedding": raw["box_feats"][i][prop]}
        if "log_var" in raw:  # predicted variance of the kept class's 4 deltas
            d["box_var"] = raw["log_var"][i][prop, lab].float().exp()
        if mc_passes and mc_rows[0] <= i < mc_rows[1]:
            d["mc_probs"], d["mc_entropy"] = mc_dropout_moments(model, raw["pooled"][i][prop], mc_passes)
        out.append(d)
    return out


# --------------------------------------------------------------------------- RetinaNet / FCOS
def sigmoid_to_distribution(q: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoids -> a distribution over background + C classes (our choice).

    p_0 = prod_c (1 - q_c), p_c = q_c, then normalised to sum 1: background is the event
    "no class fires" under independent per-class detectors.

    Args:
        q: (M, C) sigmoid outputs.

    Returns:
        (M, C+1), rows summing to 1.
    """
    bg = torch.prod(1.0 - q, dim=1, keepdim=True)
    p = torch.cat([bg, q], dim=1).clamp_min(0)
    return p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _one_stage_detect(model: nn.Module, image_list: Any, feats: "OrderedDict[str, torch.Tensor]",
                      content_hw: Sequence[tuple[int, int]], max_boxes: int) -> list[dict[str, torch.Tensor]]:
    """RetinaNet / FCOS post-processing that keeps each detection's anchor.

    Scores as torchvision: RetinaNet q_c, FCOS sqrt(q_c * sigmoid(centerness)), with
    q_c = sigmoid(class logit). `probs` = `sigmoid_to_distribution(q)` of the anchor (the
    class sigmoids, without centerness). `roi_embedding` = the FPN feature vector (d,) at
    the anchor's cell of its level.
    """
    fcos = model.poolscout_family == "fcos"
    maps = list(feats.values())
    head = model.head(maps)
    anchors = model.anchor_generator(image_list, maps)
    hw = [f.shape[2] * f.shape[3] for f in maps]
    a_per_cell = head["cls_logits"].shape[1] // sum(hw)
    per_level = [n * a_per_cell for n in hw]
    starts = np.concatenate([[0], np.cumsum(per_level)]).tolist()
    logits_all = head["cls_logits"][:, :, 1:]  # column 0 is never a target (detectors.py)
    c = logits_all.shape[-1]
    out = []
    for i in range(len(maps[0])):
        all_boxes, all_scores, all_labels, all_anchor = [], [], [], []
        for lvl in range(len(maps)):
            a0, a1 = starts[lvl], starts[lvl + 1]
            q = torch.sigmoid(logits_all[i, a0:a1])
            if fcos:
                q = torch.sqrt(q * torch.sigmoid(head["bbox_ctrness"][i, a0:a1]))
            scores = q.flatten()
            keep = scores > model.score_thresh
            scores = scores[keep]
            idx = torch.where(keep)[0]
            scores, top = scores.topk(min(int(model.topk_candidates), idx.numel()))
            idx = idx[top]
            anchor = torch.div(idx, c, rounding_mode="floor")
            reg = head["bbox_regression"][i, a0:a1][anchor]
            anc = anchors[i][a0:a1][anchor]
            boxes = model.box_coder.decode(reg, anc) if fcos else model.box_coder.decode_single(reg, anc)
            all_boxes.append(box_ops.clip_boxes_to_image(boxes, content_hw[i]))
            all_scores.append(scores)
            all_labels.append(idx % c + 1)
            all_anchor.append(anchor + a0)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        labels, anchor = torch.cat(all_labels), torch.cat(all_anchor)
        keep = box_ops.remove_small_boxes(boxes, min_size=_MIN_BOX_SIZE)
        boxes, scores, labels, anchor = boxes[keep], scores[keep], labels[keep], anchor[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, model.nms_thresh)[:max_boxes]
        boxes, scores, labels, anchor = boxes[keep], scores[keep], labels[keep], anchor[keep]
        probs = sigmoid_to_distribution(torch.sigmoid(logits_all[i][anchor]))
        emb = torch.empty((len(anchor), maps[0].shape[1]), dtype=maps[0].dtype, device=maps[0].device)
        starts_t = torch.as_tensor(starts, device=anchor.device)
        level = torch.bucketize(anchor, starts_t[1:], right=True)
        for lvl in range(len(maps)):
            sel = torch.where(level == lvl)[0]
            if sel.numel() == 0:
                continue
            cell = torch.div(anchor[sel] - starts[lvl], a_per_cell, rounding_mode="floor")
            w = maps[lvl].shape[3]
            ys, xs = torch.div(cell, w, rounding_mode="floor"), cell % w
            emb[sel] = maps[lvl][i, :, ys, xs].T
        out.append({"boxes": boxes, "scores": scores, "labels": labels, "probs": probs, "roi_embedding": emb})
    return out


# --------------------------------------------------------------------------- predict
def _flip_content(images: np.ndarray, content_w: np.ndarray, content_h: np.ndarray) -> np.ndarray:
    """Mirror each canvas's image region left-right; the padding stays where it is."""
    out = images.copy()
    for i in range(len(images)):
        cw, ch = int(content_w[i]), int(content_h[i])
        out[i, :ch, :cw] = images[i, :ch, :cw][:, ::-1]
    return out


def view_params(params: dict | None = None) -> dict:
    """VIEW_DEFAULTS updated with `params`; unknown keys are an error naming them."""
    out = dict(VIEW_DEFAULTS)
    for k, v in (params or {}).items():
        if k not in out:
            raise ValueError(f"unknown view parameter {k!r}; known: {', '.join(out)}")
        out[k] = v
    if not 0 < float(out["resize"]) <= 1:
        raise ValueError(f"view parameter resize must be in (0, 1], got {out['resize']}")
    if not 0 <= float(out["cutout_size"]) < 1:
        raise ValueError(f"view parameter cutout_size must be in [0, 1), got {out['cutout_size']}")
    return out


def cutout_holes(image_id: int, content_w: int, content_h: int, holes: int, size: float,
                 seed: int = 0) -> np.ndarray:
    """Square holes of the cutout view: (holes, 4) int x1, y1, x2, y2 on the canvas.

    Side = round(size * min(w, h)) (at least 1 px), top-left corners uniform over the
    content region from a generator seeded by (seed, image_id): the same holes however the
    pool is batched. DeVries & Taylor, "Improved Regularization of Convolutional Neural
    Networks with Cutout", 2017; as a consistency view in CALD (Yu et al. 2022).
    """
    side = max(1, int(round(size * min(content_w, content_h))))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF])
    x = rng.integers(0, max(1, content_w - side + 1), size=holes)
    y = rng.integers(0, max(1, content_h - side + 1), size=holes)
    return np.stack([x, y, np.minimum(x + side, content_w), np.minimum(y + side, content_h)], 1)


def _view_canvases(view: str, images: np.ndarray, image_id: np.ndarray, content_w: np.ndarray,
                   content_h: np.ndarray, prm: dict) -> tuple[np.ndarray, np.ndarray]:
    """Canvases of one view and per-image (sx, sy) content scale factors (resize only).

    Every view keeps the image at the top-left of the canvas: hflip mirrors the content
    region; cutout paints `cutout_holes` grey (value 124, about the ImageNet mean) squares;
    resize scales the content by `resize` (the rest becomes padding); rotate turns the
    content by `rotate` degrees counter-clockwise as displayed about its centre
    (bilinear, black corners). kernels.consistency.map_view_boxes maps boxes back.
    """
    n = len(images)
    factors = np.ones((n, 2), np.float64)
    if view == "orig":
        return images, factors
    if view == "hflip":
        return _flip_content(images, content_w, content_h), factors
    from PIL import Image

    out = images.copy()
    for i in range(n):
        cw, ch = int(content_w[i]), int(content_h[i])
        if view == "cutout":
            for x1, y1, x2, y2 in cutout_holes(image_id[i], cw, ch, int(prm["cutout_holes"]),
                                               float(prm["cutout_size"]), int(prm["cutout_seed"])):
                out[i, y1:y2, x1:x2] = 124
        elif view == "resize":
            nw, nh = max(1, int(round(cw * float(prm["resize"])))), max(1, int(round(ch * float(prm["resize"]))))
            small = Image.fromarray(images[i, :ch, :cw]).resize((nw, nh), Image.BILINEAR)
            out[i, :ch, :cw] = 0
            out[i, :nh, :nw] = np.asarray(small)
            factors[i] = (nw / cw, nh / ch)
        elif view == "rotate":
            rot = Image.fromarray(images[i, :ch, :cw]).rotate(float(prm["rotate"]), resample=Image.BILINEAR,
                                                               center=(cw / 2.0, ch / 2.0), fillcolor=(0, 0, 0))
            out[i, :ch, :cw] = np.asarray(rot)
        else:
            raise ValueError(f"unknown view {view!r}; supported: {', '.join(SUPPORTED_VIEWS)}")
    return out, factors


def _unmap_view(view: str, boxes: np.ndarray, counts: np.ndarray, content_w: np.ndarray, content_h: np.ndarray,
                factors: np.ndarray, prm: dict) -> np.ndarray:
    """Canvas boxes of a view -> canvas boxes of the original view (float64)."""
    if view in ("orig", "cutout"):
        return boxes
    if view == "resize":
        img = np.repeat(np.arange(len(counts)), counts)
        out = boxes.copy()
        out[:, 0::2] /= factors[img, 0:1]
        out[:, 1::2] /= factors[img, 1:2]
        return out
    from poolscout.kernels.consistency import map_view_boxes

    off = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    param = float(prm["rotate"]) if view == "rotate" else 0.0
    return map_view_boxes(boxes, off, content_w.astype(np.float64), content_h.astype(np.float64), view, param)


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray, *, image_id: np.ndarray, width: np.ndarray,
            height: np.ndarray, scale: np.ndarray, content_w: np.ndarray, content_h: np.ndarray,
            views: Sequence[str] = ("orig",), max_boxes: int = 100, roi_embeddings: bool = True,
            device: Any = "cpu", mc_passes: int = 0, params: dict | None = None,
            stack_views: bool | None = None) -> dict[str, np.ndarray]:
    """Detections, class distributions and embeddings of a batch, in the canonical layout.

    The views run as one forward pass of V * N canvases (`stack_views`, the default on
    CUDA) or one pass of N per view (the default elsewhere: measured faster on CPUs).

    Args:
        model: detector from `engine.detectors.build_detector` (put in eval mode here if it
            is in train mode).
        images: (N, S, S, 3) uint8 letterboxed canvases, image at the top-left.
        image_id: (N,) int64.
        width, height: (N,) original image sizes in pixels.
        scale: (N,) canvas pixels per original pixel (S / max(height, width)).
        content_w, content_h: (N,) size of the image region on the canvas.
        views: subset of SUPPORTED_VIEWS: "orig", "hflip" (mirror), "cutout" (grey
            squares), "resize" (x `resize`), "rotate" (`rotate` degrees); boxes of a view
            are mapped back into the original frame (rotate: the enclosing box of the
            back-rotated box) before scaling.
        max_boxes: at most this many boxes per image and view, highest score first.
        roi_embeddings: add `{v}roi_embedding` (M, r).
        device: where to run (the model is moved there if needed).
        mc_passes: T > 0 adds MC-dropout moments of the original view's kept boxes,
            `mc_probs` (M, C+1) and `mc_entropy` (M,) (Faster R-CNN with detector.dropout
            > 0 only; see `mc_dropout_moments`).
        params: view parameters overriding VIEW_DEFAULTS.
        stack_views: see above; None = by device. Outputs agree either way (up to float
            rounding of batched kernels).

    Returns:
        image_id (N,) int64, width / height (N,) int32, embedding (N, d) float32 (of the
        original view), and per view v with prefix p ("" or "hflip_", ...): p+offsets
        (N+1,) int64, p+boxes (M, 4) float32 in original pixels clipped to the image,
        p+scores (M,) float32, p+labels (M,) int64 in 1..C, p+probs (M, C+1) float32
        (column 0 = background; for R-CNN scores == probs[label]), p+roi_embedding (M, r)
        float32, p+box_var (M, 4) float32 when the detector has a variance head
        (exp of the predicted log-variance of the kept class's 4 regression deltas).
    """
    views = tuple(views)
    bad = [v for v in views if v not in SUPPORTED_VIEWS]
    if bad or not views:
        raise ValueError(f"unsupported view(s) {bad or '(none)'}; supported: {', '.join(SUPPORTED_VIEWS)}")
    if len(set(views)) != len(views):
        raise ValueError(f"duplicate views in {views}")
    if mc_passes and "orig" not in views:
        raise ValueError("mc_passes needs the 'orig' view")
    if mc_passes and model.poolscout_family != "rcnn":
        raise ValueError(f"MC dropout is implemented for the Faster R-CNN family, not {model.poolscout_family!r}")
    prm = view_params(params)
    images = np.asarray(images)
    n = len(images)
    meta = {"image_id": np.asarray(image_id, np.int64).reshape(-1), "width": np.asarray(width, np.int32).reshape(-1),
            "height": np.asarray(height, np.int32).reshape(-1)}
    scale = np.asarray(scale, np.float64).reshape(-1)
    content_w = np.asarray(content_w).astype(np.int64).reshape(-1)
    content_h = np.asarray(content_h).astype(np.int64).reshape(-1)
    for k, v in [*meta.items(), ("scale", scale), ("content_w", content_w), ("content_h", content_h)]:
        if len(v) != n:
            raise ValueError(f"{k} has {len(v)} entries for {n} images")
    num_classes = int(model.poolscout_num_classes)
    has_var = model.poolscout_family == "rcnn" and hasattr(model.roi_heads.box_predictor, "forward_with_var")
    out: dict[str, np.ndarray] = dict(meta)
    if n == 0:
        out["embedding"] = np.zeros((0, model.poolscout_embed_dim), np.float32)
        for v in views:
            p = _view_prefix(v)
            out[p + "offsets"] = np.zeros(1, np.int64)
            out[p + "boxes"] = np.zeros((0, 4), np.float32)
            out[p + "scores"] = np.zeros(0, np.float32)
            out[p + "labels"] = np.zeros(0, np.int64)
            out[p + "probs"] = np.zeros((0, num_classes + 1), np.float32)
            if roi_embeddings:
                out[p + "roi_embedding"] = np.zeros((0, model.poolscout_roi_dim), np.float32)
            if has_var:
                out[p + "box_var"] = np.zeros((0, 4), np.float32)
        if mc_passes:
            out["mc_probs"] = np.zeros((0, num_classes + 1), np.float32)
            out["mc_entropy"] = np.zeros(0, np.float32)
        return out
    _check_canvas(model, images)
    s = images.shape[1]
    if np.any(content_w < 1) or np.any(content_h < 1) or np.any(content_w > s) or np.any(content_h > s):
        raise ValueError("content_w / content_h must lie in 1..S")
    if np.any(scale <= 0):
        raise ValueError("scale must be positive")
    dev = _ensure_device(model, device)
    if model.training:
        model.eval()

    canv = [_view_canvases(v, images, meta["image_id"], content_w, content_h, prm) for v in views]
    hw1 = [(int(h), int(w)) for h, w in zip(content_h, content_w)]
    detect = _rcnn_detect if model.poolscout_family == "rcnn" else _one_stage_detect

    def run(canvases: np.ndarray, hw: list, mc_rows: tuple[int, int]) -> tuple[list, Any]:
        image_list, feats = _features(model, prepare(canvases, dev))
        extra = (int(mc_passes), mc_rows) if model.poolscout_family == "rcnn" else ()
        return detect(model, image_list, feats, hw, int(max_boxes), *extra), feats

    if stack_views is None:
        stack_views = dev.type == "cuda"
    orig_feats = None
    if stack_views:  # one pass of V * N canvases (best on GPUs)
        o = views.index("orig") if "orig" in views else 0
        dets, feats = run(np.concatenate([c[0] for c in canv], 0), hw1 * len(views), (o * n, (o + 1) * n))
        if "orig" in views:
            orig_feats = OrderedDict((k, f[o * n:(o + 1) * n]) for k, f in feats.items())
    else:  # one pass per view: on CPUs a batch of 2N costs ~1.4x two batches of N
        dets = []
        for v, (c, _) in zip(views, canv):
            d, feats = run(c, hw1, (0, n) if v == "orig" else (0, 0))
            dets += d
            if v == "orig":
                orig_feats = feats
    if orig_feats is None:  # the embedding is of the original image; run the backbone on it once more
        _, orig_feats = _features(model, prepare(images, dev))
    out["embedding"] = _pooled(orig_feats).float().cpu().numpy()

    def cat(part: list[dict], key: str, width: int) -> np.ndarray:
        return torch.cat([d[key] for d in part]).float().cpu().numpy().reshape(-1, width)

    for vi, v in enumerate(views):
        p = _view_prefix(v)
        part = dets[vi * n:(vi + 1) * n]
        counts = np.array([len(d["scores"]) for d in part], np.int64)
        off = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=off[1:])
        boxes = torch.cat([d["boxes"] for d in part]).double().cpu().numpy().reshape(-1, 4)
        img = np.repeat(np.arange(n), counts)
        boxes = _unmap_view(v, boxes, counts, content_w, content_h, canv[vi][1], prm)
        boxes = boxes / scale[img, None]
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, meta["width"][img, None])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, meta["height"][img, None])
        out[p + "offsets"] = off
        out[p + "boxes"] = boxes.astype(np.float32)
        out[p + "scores"] = torch.cat([d["scores"] for d in part]).float().cpu().numpy()
        out[p + "labels"] = torch.cat([d["labels"] for d in part]).cpu().numpy().astype(np.int64)
        out[p + "probs"] = cat(part, "probs", num_classes + 1)
        if roi_embeddings:
            out[p + "roi_embedding"] = cat(part, "roi_embedding", model.poolscout_roi_dim)
        if has_var:
            out[p + "box_var"] = cat(part, "box_var", 4)
        if v == "orig" and mc_passes:
            out["mc_probs"] = cat(part, "mc_probs", num_classes + 1)
            out["mc_entropy"] = cat(part, "mc_entropy", 1).reshape(-1)
    return out
