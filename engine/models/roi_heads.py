"""Faster R-CNN ROI heads with HUALE's training losses and PPAL's class quality.

`PoolscoutRoIHeads` is torchvision's `RoIHeads` with its own training-mode loss
(docs/methods.md section 3, item 4, and section 8); in eval mode it is the parent.
`UncertainBoxPredictor` is torchvision's `FastRCNNPredictor` plus a log-variance head.
The loss functions themselves are in `engine.losses`.

Training losses, over the N ROIs sampled in the batch (positives P: label >= 1):

    p_gt,i   softmax probability of ROI i's GT class (background 0 for negatives)
    IoU_i    IoU of the decoded box of the GT class with the matched GT box (positives)
    w_cls,i  = 1 + b_cls,i = 2 - p_gt,i   with emphasis, else 1   (detached)
    w_loc,i  = 1 + b_loc,i = 2 - IoU_i    with emphasis, else 1   (detached)

    loss_classifier = sum_i w_cls,i CE_i / N
    loss_box_reg    = sum_{i in P} w_loc,i L_loc,i / N
                      L_loc = w_eiou EIoU on decoded boxes (train.eiou_loss, w_eiou =
                      train.eiou_weight, default 1) or torchvision's
                      smooth L1 (beta 1/9, summed over the 4 deltas)
    loss_aware      = sum_{i in P} L_aware,i / N   (train.aware_loss; needs the var head)

The normalisation by all sampled ROIs is torchvision's. With `train.loss_lambda` = lambda
set, loss_box_reg is multiplied by lambda and loss_aware by (1 - lambda) here, and the RPN
terms by (1 - lambda) in `engine.training.train_epochs` (the model's
`poolscout_loss_weights`), giving HUALE's

    total = lambda L_EIoU + (1 - lambda)(L_rpn + L_aware)                      [paper]
            + L_cls (kept at weight 1)                                          [ours]

With every switch off the losses are torchvision's `fastrcnn_loss`, bit for bit.

Whether or not a switch is on, each training step folds the positives into the buffers
`class_quality` (C,) and `class_quality_seen` (C,) (PPAL's per-class quality EMA, row
c - 1 = class c); they are in the state dict, so checkpoints and warm starts carry them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads

from poolscout.engine.models.losses import aware_regression_loss, class_quality_update, eiou_loss, emphasis_factors, paired_iou_giou

LOG_VAR_CLAMP = 10.0
SMOOTH_L1_BETA = 1.0 / 9.0
RPN_LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg")
QUALITY_BUFFERS = ("class_quality", "class_quality_seen")


class UncertainBoxPredictor(FastRCNNPredictor):
    """FastRCNNPredictor plus a class-wise log-variance head for the 4 box deltas.

    Parameters `cls_score` and `bbox_pred` are the parent's (same names and shapes, so
    their state-dict entries are interchangeable); `bbox_log_var` (in -> K * 4) predicts
    a = log sigma^2 per class and coordinate, initialised to 0 (sigma^2 = 1).

    Args:
        in_channels: box-head width.
        num_classes: K = C + 1 (with background).

    Forward:
        forward(x) -> (class_logits (R, K), box_regression (R, K * 4)), as the parent, so
            torchvision's inference path is unchanged.
        forward_with_var(x) -> (class_logits, box_regression, log_var (R, K * 4)), log_var
            laid out like box_regression and clamped to [-10, 10]; the variance of class
            k's coordinate j is exp(log_var.reshape(R, K, 4)[:, k, j]), in the units of the
            box coder's normalised deltas.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_log_var = nn.Linear(in_channels, num_classes * 4)
        nn.init.zeros_(self.bbox_log_var.weight)
        nn.init.zeros_(self.bbox_log_var.bias)

    def forward_with_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() == 4:
            torch._assert(list(x.shape[2:]) == [1, 1],
                          f"x has the wrong shape, expecting the last two dimensions to be [1,1] instead of "
                          f"{list(x.shape[2:])}")
        x = x.flatten(start_dim=1)
        log_var = self.bbox_log_var(x).clamp(-LOG_VAR_CLAMP, LOG_VAR_CLAMP)
        return self.cls_score(x), self.bbox_pred(x), log_var


def _train_value(cfg: Any, key: str, default: Any) -> Any:
    return getattr(cfg, key, default) if cfg is not None else default


class PoolscoutRoIHeads(RoIHeads):
    """torchvision's RoIHeads (boxes only) with configurable HUALE losses; see the module doc.

    Build it from an existing head with `from_roi_heads`; `configure_losses(train_cfg)`
    sets the switches (all off by default). Attributes (not in the state dict):
    `emphasis_loss`, `eiou_loss`, `eiou_gamma`, `aware_loss`, `loss_lambda`,
    `quality_momentum`. Buffers (in the state dict): `class_quality` (C,) float32 and
    `class_quality_seen` (C,) bool.

    Args:
        *args, **kwargs: RoIHeads' arguments (mask / keypoint heads are not supported).
        num_classes: C, object classes without background.
    """

    def __init__(self, *args: Any, num_classes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.has_mask() or self.has_keypoint():
            raise ValueError("PoolscoutRoIHeads supports box heads only (no mask / keypoint heads)")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.register_buffer("class_quality", torch.zeros(int(num_classes), dtype=torch.float32))
        self.register_buffer("class_quality_seen", torch.zeros(int(num_classes), dtype=torch.bool))
        self.emphasis_loss = False
        self.eiou_loss = False
        self.eiou_gamma = 0.8
        self.eiou_weight = 1.0
        self.aware_loss = False
        self.loss_lambda: Optional[float] = None
        self.quality_momentum = 0.9

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, num_classes: int) -> "PoolscoutRoIHeads":
        """A PoolscoutRoIHeads sharing every module and setting of torchvision's `heads`.

        The box pool, head and predictor are the same objects (their state-dict keys stay
        the same); only the two quality buffers are new.
        """
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError("PoolscoutRoIHeads supports box heads only (no mask / keypoint heads)")
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                  heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                  heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                  heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                  num_classes=num_classes)
        # the very objects (matcher flags such as allow_low_quality_matches, the coder's clip)
        new.proposal_matcher = heads.proposal_matcher
        new.fg_bg_sampler = heads.fg_bg_sampler
        new.box_coder = heads.box_coder
        new.box_similarity = heads.box_similarity
        new.train(heads.training)
        return new

    @property
    def has_var_head(self) -> bool:
        """Whether the predictor has `forward_with_var` (an UncertainBoxPredictor)."""
        return hasattr(self.box_predictor, "forward_with_var")

    def configure_losses(self, train_cfg: Any = None) -> None:
        """Set the loss switches from a TrainConfig (None or missing fields: the defaults).

        Raises:
            ValueError: aware loss without the variance head (names both config keys),
                loss_lambda outside [0, 1], eiou_gamma < 0, eiou_weight <= 0 or quality_momentum
                outside [0, 1].
        """
        emphasis = bool(_train_value(train_cfg, "emphasis_loss", False))
        eiou = bool(_train_value(train_cfg, "eiou_loss", False))
        gamma = float(_train_value(train_cfg, "eiou_gamma", 0.8))
        eiou_weight = float(_train_value(train_cfg, "eiou_weight", 1.0))
        aware = bool(_train_value(train_cfg, "aware_loss", False))
        lam = _train_value(train_cfg, "loss_lambda", None)
        momentum = float(_train_value(train_cfg, "quality_momentum", 0.9))
        if aware and not self.has_var_head:
            raise ValueError("train.aware_loss: true needs detector.box_var_head: true (the uncertainty-aware "
                             "loss trains the box log-variance head); set both, or turn train.aware_loss off")
        if lam is not None and not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"train.loss_lambda must be in [0, 1] or null, got {lam}")
        if gamma < 0:
            raise ValueError(f"train.eiou_gamma must be >= 0, got {gamma}")
        if not eiou_weight > 0:
            raise ValueError(f"train.eiou_weight must be > 0, got {eiou_weight}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"train.quality_momentum must be in [0, 1], got {momentum}")
        self.emphasis_loss, self.eiou_loss, self.eiou_gamma, self.aware_loss = emphasis, eiou, gamma, aware
        self.eiou_weight = eiou_weight
        self.loss_lambda = None if lam is None else float(lam)
        self.quality_momentum = momentum

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: Optional[list[dict[str, torch.Tensor]]] = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets should not be None in training mode")
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        log_var = None
        if self.has_var_head:
            class_logits, box_regression, log_var = self.box_predictor.forward_with_var(box_features)
        else:
            class_logits, box_regression = self.box_predictor(box_features)
        gt_boxes = []
        for t, m, p in zip(targets, matched_idxs, proposals):
            b = t["boxes"].to(p.dtype)
            gt_boxes.append(b[m] if b.numel() else p.new_zeros((len(m), 4)))
        losses = self.box_losses(class_logits, box_regression, log_var, torch.cat(proposals), torch.cat(labels),
                                 torch.cat(regression_targets), torch.cat(gt_boxes))
        return [], losses

    def box_losses(self, class_logits: torch.Tensor, box_regression: torch.Tensor, log_var: Optional[torch.Tensor],
                   proposals: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor,
                   gt_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training losses of the sampled ROIs (module docstring), and the quality update.

        Args:
            class_logits: (N, K).
            box_regression: (N, K * 4) deltas.
            log_var: (N, K * 4) or None.
            proposals: (N, 4) sampled proposals.
            labels: (N,) in 0..C.
            regression_targets: (N, 4) encoded matched GT boxes.
            gt_boxes: (N, 4) matched GT boxes (meaningful for positives).

        Returns:
            {"loss_classifier", "loss_box_reg"} and "loss_aware" when the aware loss is on.
        """
        n = class_logits.shape[0]
        pos = torch.where(labels > 0)[0]
        labels_pos = labels[pos]
        deltas = box_regression.reshape(n, box_regression.size(-1) // 4, 4)[pos, labels_pos]
        targets_pos = regression_targets[pos]
        with torch.no_grad():
            p_gt = F.softmax(class_logits.detach().float(), -1).gather(1, labels[:, None]).squeeze(1)
        # decoded boxes of the GT class: EIoU, b_loc and the class quality (always) use them
        pred_boxes = self.box_coder.decode_single(deltas, proposals[pos])
        with torch.no_grad():
            iou, _ = paired_iou_giou(pred_boxes.detach().float(), gt_boxes[pos].float())
            class_quality_update(self.class_quality, self.class_quality_seen, labels_pos, p_gt[pos], iou,
                                 self.quality_momentum)

        if self.emphasis_loss:
            b_cls, b_loc = emphasis_factors(p_gt, iou)
            ce = F.cross_entropy(class_logits, labels, reduction="none")
            loss_cls = ((1.0 + b_cls.to(ce.dtype)) * ce).sum() / n
        else:
            loss_cls = F.cross_entropy(class_logits, labels)
            b_loc = None

        if self.eiou_loss:
            per_box = self.eiou_weight * eiou_loss(pred_boxes.float(), gt_boxes[pos].float(), gamma=self.eiou_gamma)
        elif b_loc is not None:
            per_box = F.smooth_l1_loss(deltas, targets_pos, beta=SMOOTH_L1_BETA, reduction="none").sum(1)
        else:
            per_box = None
        if per_box is None:  # torchvision's fastrcnn_loss, the same operations
            loss_box = F.smooth_l1_loss(deltas, targets_pos, beta=SMOOTH_L1_BETA, reduction="sum") / labels.numel()
        else:
            if b_loc is not None:
                per_box = (1.0 + b_loc.to(per_box.dtype)) * per_box
            loss_box = per_box.sum() / n

        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        lam = self.loss_lambda
        if lam is not None:
            losses["loss_box_reg"] = loss_box * lam
        if log_var is not None:
            if self.aware_loss:
                lv = log_var.reshape(n, -1, 4)[pos, labels_pos]
                loss_aware = aware_regression_loss(deltas, targets_pos, lv, beta=SMOOTH_L1_BETA).sum() / n
                losses["loss_aware"] = loss_aware * (1.0 - lam) if lam is not None else loss_aware
            else:
                # an untrained var head: a zero term keeps its parameters in the graph, which
                # DistributedDataParallel (find_unused_parameters=False) requires
                losses["loss_box_reg"] = losses["loss_box_reg"] + 0.0 * log_var.sum()
        return losses


def install_roi_heads(model: nn.Module, num_classes: int, box_var_head: bool) -> nn.Module:
    """Swap a torchvision Faster R-CNN's ROI heads for PoolscoutRoIHeads (in place).

    Args:
        model: a torchvision FasterRCNN.
        num_classes: C.
        box_var_head: replace the FastRCNNPredictor by an UncertainBoxPredictor whose
            `cls_score` / `bbox_pred` are copies of the old ones (same initial values).

    Returns:
        `model`, with an empty `poolscout_loss_weights` dict (filled by `configure_detector_losses`).
    """
    heads = model.roi_heads
    if box_var_head:
        old = heads.box_predictor
        new = UncertainBoxPredictor(old.cls_score.in_features, old.cls_score.out_features)
        with torch.no_grad():
            for name in ("cls_score", "bbox_pred"):
                getattr(new, name).load_state_dict(getattr(old, name).state_dict())
        heads.box_predictor = new
    model.roi_heads = PoolscoutRoIHeads.from_roi_heads(heads, num_classes)
    model.poolscout_loss_weights = {}
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


HUALE_SWITCHES = ("emphasis_loss", "eiou_loss", "aware_loss")


def configure_detector_losses(model: nn.Module, train_cfg: Any) -> dict[str, float]:
    """Apply the train config's loss switches to a detector before training.

    Configures `model.roi_heads` (a PoolscoutRoIHeads) and sets
    `model.poolscout_loss_weights` = {"loss_objectness": 1 - lambda, "loss_rpn_box_reg":
    1 - lambda} when `train_cfg.loss_lambda` is set, else {}. A DDP / DataParallel wrapper
    is looked through.

    Returns:
        The loss-key -> factor dict (missing keys: 1), which `train_epochs` applies.

    Raises:
        ValueError: a HUALE switch (or loss_lambda) on a detector that is not a Faster
            R-CNN with PoolscoutRoIHeads, or an invalid combination (see configure_losses).
    """
    m = _unwrap(model)
    heads = getattr(m, "roi_heads", None)
    lam = _train_value(train_cfg, "loss_lambda", None)
    if not isinstance(heads, PoolscoutRoIHeads):
        on = [f"train.{k}" for k in HUALE_SWITCHES if _train_value(train_cfg, k, False)]
        if lam is not None:
            on.append("train.loss_lambda")
        if on:
            raise ValueError(f"{', '.join(on)}: HUALE losses exist for the Faster R-CNN family only (family "
                             f"{getattr(m, 'poolscout_family', type(m).__name__)!r}); turn them off")
        return dict(getattr(m, "poolscout_loss_weights", {}) or {})
    heads.configure_losses(train_cfg)
    weights = {} if lam is None else {k: 1.0 - float(lam) for k in RPN_LOSS_KEYS}
    m.poolscout_loss_weights = weights
    return dict(weights)
