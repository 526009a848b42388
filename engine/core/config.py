"""Typed configuration: YAML -> frozen dataclasses, with `key=value` overrides.

Precedence (later wins): dataclass defaults < run.yaml < --config FILE < --set key=value.
Unknown keys and values of the wrong type fail at load time with a message naming the
key and the file it came from. YAML is read with `yaml.safe_load` only (no code runs).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and its source."""


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "custom"
    # Optional class list (order = category ids 1..C). When given, annotation class names
    # outside it are rejected; when empty, classes are taken from the annotations.
    classes: tuple[str, ...] = ()
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    # Images whose header announces more pixels than this are rejected undecoded
    # (decompression-bomb guard).
    max_pixels: int = 64_000_000
    # Boxes that leave the image by at most this many pixels are clipped; further out
    # the image is rejected with the reason.
    box_tolerance_px: float = 2.0
    min_box_size: float = 1.0


@dataclass(frozen=True)
class DetectorConfig:
    name: str = "fasterrcnn_effnet_lite0_fpn"
    # Images are resized (aspect kept) and padded to input_size x input_size, so every
    # tensor has the same shape and results do not depend on batch composition.
    input_size: int = 160
    # None: random init; "DEFAULT": torchvision hub weights; else a local .pt/.pth path.
    weights: str | None = None
    # "auto": the packaged ImageNet weights where the preset has them; None: random;
    # "DEFAULT" or a path, as for weights.
    backbone_weights: str | None = "auto"
    max_boxes: int = 100
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    fpn_channels: int = 64
    trainable_backbone_layers: int = 3
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 150
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.0
    # timm backbones (the EfficientNet-Lite0 preset): keep the stem conv + BN frozen.
    freeze_stem: bool = True
    # Faster R-CNN only: an extra Linear head predicting the log-variance of each class's 4
    # box deltas (engine.roi_heads.UncertainBoxPredictor; He et al. 2019). Needed by
    # train.aware_loss and by the huale_lc signal (box_var at inference).
    box_var_head: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    hflip_prob: float = 0.5
    # Start each cycle from the previous cycle's model when there is one.
    warm_start: bool = True
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # 0 = as many threads as the node has cores (Ray would otherwise give 1 per CPU slot).
    torch_threads: int = 0
    max_images: int = 0  # 0 = all labeled images; >0 caps them (smoke tests)
    # Epochs of a warm-started cycle (one that starts from the previous cycle's model);
    # 0 = `epochs`. Fine-tuning needs fewer passes than the first training.
    warm_epochs: int = 0
    # HUALE training-side losses (docs/methods.md section 3; Faster R-CNN family only, see
    # engine/roi_heads.py). All off = torchvision's Faster R-CNN losses.
    # Emphasis loss: per-ROI factors (1 + b_cls) on the classification and (1 + b_loc) on the
    # localisation loss, b_cls = 1 - p_gt, b_loc = 1 - IoU (detached).
    emphasis_loss: bool = False
    # EIoU loss (1 + GIoU)^gamma (1 - GIoU) on decoded boxes instead of smooth L1 on deltas.
    eiou_loss: bool = False
    eiou_gamma: float = 0.8
    # Weight on the EIoU term. An IoU loss in [0, 2] per box is an order of magnitude weaker
    # than smooth L1 on torchvision's encoded deltas (weights 10, 10, 5, 5); IoU-loss Faster
    # R-CNN configurations commonly weight it 10 [ours]. 1 = the paper's formula as written.
    eiou_weight: float = 1.0
    # Uncertainty-aware regression smoothL1 / (2 sigma^2) + 0.5 log sigma^2 as an extra term
    # "loss_aware"; requires detector.box_var_head.
    aware_loss: bool = False
    # lambda in [0, 1]: total = L_cls + lambda L_box_reg + (1 - lambda)(L_rpn + L_aware);
    # None = every term at weight 1.
    loss_lambda: float | None = None
    # EMA momentum of the per-class quality Q_c (PPAL's q = p_gt^0.6 IoU^0.4) tracked by the
    # Faster R-CNN ROI heads during training (buffer roi_heads.class_quality).
    quality_momentum: float = 0.9


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 8
    # Detector actors; each reserves num_cpus / num_gpus.
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    torch_threads: int = 0
    decode_batch_size: int = 32
    views: tuple[str, ...] = ("orig", "hflip")
    # Signal specs "name[:reduce[:k]]"; a column "name_reduce[_k]" each in scores.parquet.
    signals: tuple[str, ...] = (
        "random",
        "entropy:max",
        "entropy:mean",
        "margin:max",
        "least_confidence:max",
    )
    # Value of a box-reduced signal for an image with no boxes: "pool_max" (the most
    # informative value seen in the pool), "pool_min", or a number.
    empty_value: str = "pool_max"
    store_roi_embeddings: bool = True
    embed_labeled: bool = True  # image embeddings of labeled images (core-set centers)
    # T, the MC-dropout passes of the box head, run only when a signal needs them (bald);
    # the detector must be trained with detector.dropout > 0.
    mc_passes: int = 10
    # Augmented views (CALD, HUALE): resize factor, rotation in degrees (counter-clockwise),
    # cutout holes and their side as a fraction of the shorter image side.
    view_resize: float = 0.8
    view_rotate: float = 5.0
    cutout_holes: int = 2
    cutout_size: float = 0.2


@dataclass(frozen=True)
class SelectConfig:
    strategy: str = "entropy"
    budget: int = 100


@dataclass(frozen=True)
class ExportConfig:
    format: str = "coco"
    min_score: float = 0.3


@dataclass(frozen=True)
class LoopConfig:
    """The active-learning loop (`poolscout run`)."""

    cycles: int = 4
    # "simulated": a GT oracle reveals annotations.parquet (benchmarks); "human": the loop
    # pauses after each selection until `poolscout import` brings the answers.
    oracle: str = "simulated"
    # Seed set when the run has no labeled images yet: this many images, picked by
    # "random" or "kcenter" (k-center greedy on image embeddings of the untrained detector,
    # a cold-start diversity pick).
    seed_size: int = 0
    seed_strategy: str = "random"
    # "ray": Ray Train + Ray Data per stage (the product path); "local": every stage in this
    # process (benchmarks run many loops as Ray tasks, one per CPU).
    executor: str = "ray"
    eval_batch_size: int = 8
    # Score the pool even when the strategy needs no model signal (e.g. random).
    always_score: bool = False


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    num_cpus: int = 0  # 0 = all cores, embedded local Ray only


@dataclass(frozen=True)
class Config:
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def to_plain(obj: Any) -> Any:
    """Dataclass -> nested dict of YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for {key!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key, source) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: unsupported type {tp} for {key!r}")


def _merge_into(cls: type, current: Any, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '(top)'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key {full!r} (known keys here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _merge_into(tp, getattr(current, key), value or {}, full + ".", source)
        else:
            changes[key] = _coerce(value, tp, full, source)
    return dataclasses.replace(current, **changes)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: cannot parse value ({e})") from None
    return key.split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def build_config(
    layers: list[tuple[str, dict[str, Any]]] = (),
    overrides: list[str] = (),
    base: Config | None = None,
) -> Config:
    """Apply YAML layers (source name, mapping) then `key=value` overrides."""
    cfg = base or Config()
    for source, data in layers:
        data = dict(data)
        data.pop("fingerprint", None)  # run.yaml carries it; it is not a setting
        cfg = _merge_into(Config, cfg, data, "", source)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge_into(Config, cfg, nested, "", f"--set {text}")
    return cfg


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), base: Config | None = None) -> Config:
    return build_config([(str(p), load_yaml(p)) for p in paths], overrides, base)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    """Where the shipped YAML lives (the repository's configs/ for an editable install)."""
    import os

    env = os.environ.get("POOLSCOUT_CONFIGS")
    return Path(env) if env else repo_root() / "configs"
