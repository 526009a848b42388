"""Training-side loss terms of HUALE and PPAL's class quality, as pure tensor functions.

docs/methods.md section 3 (HUALE, item 4) and section 8 (PPAL, DCUS). The Faster R-CNN
ROI heads that use them are in `engine.roi_heads`. Boxes are `x1, y1, x2, y2`; deltas are
the box coder's normalised (dx, dy, dw, dh).

References:
    [HUALE] "Hierarchical Uncertainty Aggregation and Emphasis Loss for Active Learning in
        Object Detection" (Emphasis loss, EIoU loss, the lambda-weighted total) [paper];
        the concrete dynamic factors are our reading [ours].
    [KL] He, Zhu, Wang, Savvides, Zhang, "Bounding Box Regression with Uncertainty for
        Accurate Object Detection", CVPR 2019 (uncertainty-aware / KL regression loss).
    [PPAL] Yang et al., "Plug and Play Active Learning for Object Detection", CVPR 2024
        (difficulty-calibrated uncertainty sampling: per-class quality EMA) [code].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7
PPAL_SCORE_EXP = 0.6
PPAL_IOU_EXP = 0.4


def emphasis_factors(p_gt: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HUALE's dynamic Emphasis-loss factors.

    The Emphasis loss is L = (1 + b_cls) L_cls + (1 + b_loc) L_loc [HUALE, paper], with

        b_cls = 1 - p_gt,   b_loc = 1 - IoU                                        [ours]

    where p_gt is the predicted probability of the ground-truth class (softmax; the
    background class for negative ROIs) and IoU that of the predicted box with its
    ground-truth box. Both are detached: they re-weight samples, no gradient flows
    through them.

    Args:
        p_gt: (n,) probabilities in [0, 1].
        iou: (m,) IoUs in [0, 1].

    Returns:
        (b_cls (n,), b_loc (m,)), detached.
    """
    return (1.0 - p_gt).detach(), (1.0 - iou).detach()


def paired_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = EPS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of matching rows of two box sets (not all pairs).

    IoU = I / U, GIoU = IoU - (A_c - U) / A_c with A_c the area of the smallest box
    enclosing both (Rezatofighi et al., CVPR 2019). `eps` is added to every denominator so
    that degenerate (zero-area) boxes give finite values and gradients; widths and heights
    are clamped at 0, so an inverted box has area 0.

    Args:
        boxes1, boxes2: (n, 4) x1, y1, x2, y2.

    Returns:
        (iou (n,) in [0, 1], giou (n,) in [-1, 1]).
    """
    w1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0)
    h1 = (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    w2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0)
    h2 = (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    iw = (torch.minimum(boxes1[:, 2], boxes2[:, 2]) - torch.maximum(boxes1[:, 0], boxes2[:, 0])).clamp(min=0)
    ih = (torch.minimum(boxes1[:, 3], boxes2[:, 3]) - torch.maximum(boxes1[:, 1], boxes2[:, 1])).clamp(min=0)
    inter = iw * ih
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / (union + eps)
    cw = (torch.maximum(boxes1[:, 2], boxes2[:, 2]) - torch.minimum(boxes1[:, 0], boxes2[:, 0])).clamp(min=0)
    ch = (torch.maximum(boxes1[:, 3], boxes2[:, 3]) - torch.minimum(boxes1[:, 1], boxes2[:, 1])).clamp(min=0)
    hull = cw * ch
    giou = iou - (hull - union) / (hull + eps)
    return iou, giou


def eiou_loss(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, gamma: float = 0.8, eps: float = EPS
              ) -> torch.Tensor:
    """HUALE's EIoU loss per box pair.

        L_EIoU = (1 + GIoU)^gamma (1 - GIoU),   gamma = 0.8 by default        [HUALE, paper]

    GIoU lies in [-1, 1], so 1 + GIoU is clamped at 0 before the power (rounding can
    push it just below). The result lies in [0, 2] and is 0 for identical boxes. The
    focal factor (1 + GIoU)^gamma is not detached; it is differentiable everywhere
    (the power is taken on max(1 + GIoU, tiny) and its gradient is 0 where the base is 0).
    Note: d L / d GIoU = gamma (1 + GIoU)^(gamma - 1) (1 - GIoU) - (1 + GIoU)^gamma is
    negative only for GIoU > (gamma - 1) / (gamma + 1) (-0.11 for gamma 0.8); Faster R-CNN
    positives (proposal IoU >= 0.5) start well inside that region.

    Args:
        pred_boxes, gt_boxes: (n, 4) x1, y1, x2, y2.
        gamma: focusing exponent >= 0.
        eps: added to the IoU / GIoU denominators (degenerate boxes stay finite).

    Returns:
        (n,) losses.
    """
    _, giou = paired_iou_giou(pred_boxes, gt_boxes, eps)
    base = (1.0 + giou).clamp(min=0.0)
    tiny = torch.finfo(base.dtype).tiny
    positive = base > 0
    focal = torch.where(positive, base.clamp(min=tiny).pow(gamma), torch.zeros_like(base))
    if gamma == 0:
        focal = torch.ones_like(base)
    return focal * (1.0 - giou)


def aware_regression_loss(pred_deltas: torch.Tensor, target_deltas: torch.Tensor, log_var: torch.Tensor,
                          beta: float = 1.0 / 9.0) -> torch.Tensor:
    """Uncertainty-aware box regression loss per box (KL-loss style) [KL]; HUALE's L_aware.

        L_aware = sum_{k=1..4} [ smoothL1_beta(d_k - t_k) exp(-a_k) / 2 + a_k / 2 ]
                = sum_k [ smoothL1_beta(d_k - t_k) / (2 sigma_k^2) + 0.5 log sigma_k^2 ]

    with a_k = log sigma_k^2 the predicted log-variance of coordinate k and
    smoothL1_beta(x) = 0.5 x^2 / beta for |x| < beta, |x| - 0.5 beta otherwise (beta = 1/9,
    torchvision's Faster R-CNN setting). He et al. 2019 predict alpha = log sigma^2 for the
    same numerical reasons; gradients reach both the deltas and the log-variance.

    Args:
        pred_deltas, target_deltas, log_var: (n, 4).
        beta: smooth-L1 transition point.

    Returns:
        (n,) losses (can be negative: 0.5 log sigma^2 < 0 when sigma^2 < 1).
    """
    sl1 = F.smooth_l1_loss(pred_deltas, target_deltas, beta=beta, reduction="none")
    return (0.5 * sl1 * torch.exp(-log_var) + 0.5 * log_var).sum(dim=-1)


@torch.no_grad()
def class_quality_update(quality: torch.Tensor, seen: torch.Tensor, labels: torch.Tensor, p_gt: torch.Tensor,
                         iou: torch.Tensor, momentum: float) -> None:
    """Fold one batch into PPAL's per-class quality EMA, in place [PPAL, code].

    Per positive sample (label >= 1)

        q_i = p_gt,i^0.6 * IoU_i^0.4

    where PPAL uses sigmoid(s_gt) (a sigmoid classifier) and we use the softmax
    probability of the ground-truth class (Faster R-CNN has a softmax) [ours]. For every
    class c present in the batch, with m_c the batch mean of q over its samples:

        Q_c <- momentum * Q_c + (1 - momentum) * m_c     if c was seen before
        Q_c <- m_c                                          at its first observation

    and seen[c] is set. Classes absent from the batch keep their values.

    Args:
        quality: (C,) float buffer, updated in place; row c - 1 holds class c.
        seen: (C,) bool (or float 0/1) buffer, updated in place.
        labels: (n,) int64 class labels in 0..C; labels <= 0 (background, ignored) are skipped.
        p_gt: (n,) probability of the GT class.
        iou: (n,) IoU of the predicted box with its GT box.
        momentum: EMA momentum in [0, 1].

    Raises:
        ValueError: a label above C.
    """
    labels = labels.reshape(-1)
    pos = labels > 0
    if not bool(pos.any()):
        return
    num = quality.numel()
    lab = labels[pos]
    if int(lab.max()) > num:
        raise ValueError(f"class_quality_update: label {int(lab.max())} but only {num} classes")
    q = (p_gt.reshape(-1)[pos].to(quality.dtype).clamp(0, 1).pow(PPAL_SCORE_EXP)
         * iou.reshape(-1)[pos].to(quality.dtype).clamp(0, 1).pow(PPAL_IOU_EXP))
    idx = lab - 1
    sums = torch.zeros_like(quality).index_add_(0, idx, q)
    counts = torch.zeros_like(quality).index_add_(0, idx, torch.ones_like(q))
    present = counts > 0
    mean = sums / counts.clamp(min=1)
    was_seen = seen.bool()
    ema = momentum * quality + (1.0 - momentum) * mean
    new = torch.where(was_seen, ema, mean)
    quality.copy_(torch.where(present, new, quality))
    seen.copy_((was_seen | present).to(seen.dtype))
