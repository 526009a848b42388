"""Typed configuration: YAML -> frozen dataclasses, with `key=value` overrides.

Precedence (later wins): dataclass defaults < run.yaml < --config FILE < --set key=value.
Unknown keys, values of the wrong type and values out of range (the checks declared next
to each field, see `spec`) fail at load time with one line naming the key and the file
it came from. YAML is read with `yaml.safe_load` only (no code runs).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and its source."""


# --------------------------------------------------------------------------- range checks
# Each setting's valid range sits next to its field: `lr: float = spec(0.01, gt(0))`.
# `check_config` runs them after every load (build_config / load_config); a failure is one
# line "<key>: must be ..., got <value>" (+ " (in FILE)" when a YAML file set the value).
@dataclass(frozen=True)
class Check:
    """One constraint: `ok(value)` holds, else the message is `<key>: <text>, got <value>`."""

    ok: Callable[[Any], bool]
    text: str


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ge(lo: float) -> Check:
    return Check(lambda v: _num(v) and v >= lo, f"must be >= {lo}")


def gt(lo: float) -> Check:
    return Check(lambda v: _num(v) and v > lo, f"must be > {lo}")


def within(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    def ok(v: Any) -> bool:
        return _num(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Check(ok, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, "must be one of " + ", ".join(map(repr, choices)))


def each(check: Check) -> Check:
    """`check` on every item of a list setting."""
    return Check(lambda v: all(check.ok(x) for x in v), "every item " + check.text)


def _empty_rule(v: Any) -> bool:
    if v in ("pool_max", "pool_min"):
        return True
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


PROB = within(0, 1)
NONEMPTY = Check(lambda v: len(v.strip() if isinstance(v, str) else v) > 0, "must not be empty")
DISTINCT = Check(lambda v: len(set(v)) == len(v), "must not repeat an item")
EMPTY_RULE = Check(_empty_rule, "must be 'pool_max', 'pool_min' or a number")
# engine.models.predictions.VIEWS (not imported here: config stays free of numpy/torch; a
# test keeps the two equal), and jobs.export.FORMATS plus "all".
VIEWS = ("orig", "hflip", "cutout", "resize", "rotate")
EXPORT_FORMATS = ("coco", "label_studio", "cvat", "csv", "all")


def spec(default: Any, *checks: Check) -> Any:
    """A dataclass field: its default and the checks its value must pass at load."""
    return field(default=default, metadata={"checks": checks})


@dataclass(frozen=True)
class DatasetConfig:
    name: str = spec("custom", NONEMPTY)
    # Optional class list (order = category ids 1..C). When given, annotation class names
    # outside it are rejected; when empty, classes are taken from the annotations.
    classes: tuple[str, ...] = spec((), each(NONEMPTY), DISTINCT)
    extensions: tuple[str, ...] = spec((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"), NONEMPTY, each(NONEMPTY))
    # Images whose header announces more pixels than this are rejected undecoded
    # (decompression-bomb guard).
    max_pixels: int = spec(64_000_000, ge(1))
    # Boxes that leave the image by at most this many pixels are clipped; further out
    # the image is rejected with the reason.
    box_tolerance_px: float = spec(2.0, ge(0))
    min_box_size: float = spec(1.0, ge(0))
    # A super-category for each name of `classes` (same order): a grouping selectors may use
    # (GSAL's L1 level); it replaces the annotations' `supercategory` (COCO's field). Empty:
    # the annotations' own, if any.
    supercategories: tuple[str, ...] = spec((), each(NONEMPTY))
    # false hides every super-category from selectors (GSAL then clusters class prototypes),
    # e.g. when a benchmark's rare class alone has its own and would be singled out.
    use_supercategories: bool = True


@dataclass(frozen=True)
class DetectorConfig:
    name: str = spec("fasterrcnn_effnet_lite0_fpn", NONEMPTY)  # a DETECTORS name, checked at build
    # Images are resized (aspect kept) and padded to input_size x input_size, so every
    # tensor has the same shape and results do not depend on batch composition.
    input_size: int = spec(160, ge(32))
    # None: random init; "DEFAULT": torchvision hub weights; else a local .pt/.pth path.
    weights: str | None = spec(None, NONEMPTY)
    # "auto": the packaged ImageNet weights where the preset has them; None: random;
    # "DEFAULT" or a path, as for weights.
    backbone_weights: str | None = spec("auto", NONEMPTY)
    max_boxes: int = spec(100, ge(1))
    score_thresh: float = spec(0.05, PROB)
    nms_thresh: float = spec(0.5, PROB)
    fpn_channels: int = spec(64, ge(1))
    # Backbone stages trained when it starts from pretrained weights, counted from the last
    # (torchvision's meaning; 0-5). None = the preset's default: 3 for the torchvision
    # presets, all stages but the stem (freeze_stem) for EfficientNet-Lite0.
    trainable_backbone_layers: int | None = spec(None, within(0, 5))
    rpn_pre_nms_top_n_train: int = spec(600, ge(1))
    rpn_post_nms_top_n_train: int = spec(300, ge(1))
    rpn_pre_nms_top_n_test: int = spec(300, ge(1))
    rpn_post_nms_top_n_test: int = spec(150, ge(1))
    rpn_batch_size_per_image: int = spec(128, ge(1))
    box_batch_size_per_image: int = spec(128, ge(1))
    anchor_sizes: tuple[int, ...] = spec((16, 32, 64, 128), NONEMPTY, each(ge(1)))
    dropout: float = spec(0.0, within(0, 1, hi_open=True))
    # timm backbones (the EfficientNet-Lite0 preset): keep the stem conv + BN frozen.
    freeze_stem: bool = True
    # Faster R-CNN only: an extra Linear head predicting the log-variance of each class's 4
    # box deltas (engine.roi_heads.UncertainBoxPredictor; He et al. 2019). Needed by
    # train.aware_loss and by the huale_lc signal (box_var at inference).
    box_var_head: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = spec(8, ge(1))
    batch_size: int = spec(4, ge(1))
    lr: float = spec(0.01, gt(0))
    momentum: float = spec(0.9, within(0, 1, hi_open=True))
    weight_decay: float = spec(1e-4, ge(0))
    # Linear warmup iterations; more than a cycle's iterations is warned about at train start.
    warmup_iters: int = spec(50, ge(0))
    hflip_prob: float = spec(0.5, PROB)
    # Start each cycle from the previous cycle's model when there is one.
    warm_start: bool = True
    num_workers: int = spec(1, ge(1))
    use_gpu: bool = False
    cpus_per_worker: float = spec(1.0, ge(0))
    # How the "ray" executor trains: "ray_train" (a Ray Train TorchTrainer job), "in_process"
    # (in the driver), or "auto": in-process when one worker is all there is on an embedded
    # local Ray (a Ray Train job would spend ~a minute starting up, every cycle).
    backend: str = spec("auto", one_of("auto", "ray_train", "in_process"))
    # Ray Train: restarts after a lost worker (each resumes from the last epoch checkpoint,
    # reported after every epoch when checkpoint_epochs is on).
    max_failures: int = spec(2, ge(0))
    checkpoint_epochs: bool = True
    # 0 = as many threads as the node has cores (Ray would otherwise give 1 per CPU slot).
    torch_threads: int = spec(0, ge(0))
    max_images: int = spec(0, ge(0))  # 0 = all labeled images; >0 caps them (smoke tests)
    # Auto-labeling: > 0 also trains cycle k on the previous cycle's detections of at least
    # this confidence on the images still in the pool (pseudo labels, kept in
    # cycles/<k>/pseudo_labels.parquet: never in the ledger, the annotations or an export).
    # Images with no such detection are not added. 0 = off.
    pseudo_labels: float = spec(0.0, within(0, 1))
    pseudo_max_images: int = spec(0, ge(0))  # 0 = every qualifying pool image; else the most confident
    # Epochs of a warm-started cycle (one that starts from the previous cycle's model);
    # 0 = `epochs`. Fine-tuning needs fewer passes than the first training.
    warm_epochs: int = spec(0, ge(0))
    # Peak learning rate of a warm-started cycle; 0 = `lr`. Fine-tuning a trained detector
    # at the full rate first undoes part of what it learned (the demo's mAP50 fell from 0.37
    # to 0.19 after a 2-epoch warm cycle at lr 0.01).
    warm_lr: float = spec(0.0, ge(0))
    # HUALE training-side losses (docs/methods.md section 3; Faster R-CNN family only, see
    # engine/roi_heads.py). All off = torchvision's Faster R-CNN losses.
    # Emphasis loss: per-ROI factors (1 + b_cls) on the classification and (1 + b_loc) on the
    # localisation loss, b_cls = 1 - p_gt, b_loc = 1 - IoU (detached).
    emphasis_loss: bool = False
    # EIoU loss (1 + GIoU)^gamma (1 - GIoU) on decoded boxes instead of smooth L1 on deltas.
    eiou_loss: bool = False
    eiou_gamma: float = spec(0.8, ge(0))
    # Weight on the EIoU term. An IoU loss in [0, 2] per box is an order of magnitude weaker
    # than smooth L1 on torchvision's encoded deltas (weights 10, 10, 5, 5); IoU-loss Faster
    # R-CNN configurations commonly weight it 10 [ours]. 1 = the paper's formula as written.
    eiou_weight: float = spec(1.0, gt(0))
    # Uncertainty-aware regression smoothL1 / (2 sigma^2) + 0.5 log sigma^2 as an extra term
    # "loss_aware"; requires detector.box_var_head.
    aware_loss: bool = False
    # lambda in [0, 1]: total = L_cls + lambda L_box_reg + (1 - lambda)(L_rpn + L_aware);
    # None = every term at weight 1.
    loss_lambda: float | None = spec(None, PROB)
    # EMA momentum of the per-class quality Q_c (PPAL's q = p_gt^0.6 IoU^0.4) tracked by the
    # Faster R-CNN ROI heads during training (buffer roi_heads.class_quality).
    quality_momentum: float = spec(0.9, PROB)


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = spec(8, ge(1))
    # Detector actors; each reserves num_cpus / num_gpus.
    concurrency: int = spec(1, ge(1))
    num_gpus: float = spec(0.0, ge(0))
    num_cpus: float = spec(1.0, ge(0))
    torch_threads: int = spec(0, ge(0))
    decode_batch_size: int = spec(32, ge(1))
    views: tuple[str, ...] = spec(("orig", "hflip"), each(one_of(*VIEWS)))
    # Signal specs "name[:reduce[:k]]"; a column "name_reduce[_k]" each in scores.parquet.
    # (Parsed against the signal registry when scoring starts.)
    signals: tuple[str, ...] = spec((
        "random",
        "entropy:max",
        "entropy:mean",
        "margin:max",
        "least_confidence:max",
    ), each(NONEMPTY))
    # Value of a box-reduced signal for an image with no boxes: "pool_max" (the most
    # informative value seen in the pool), "pool_min", or a number.
    empty_value: str = spec("pool_max", EMPTY_RULE)
    store_roi_embeddings: bool = True
    embed_labeled: bool = True  # image embeddings of labeled images (core-set centers)
    # Strategies whose per-cycle caches (the kNN graph of the coverage selectors) are built
    # right after scoring, so the cycle's first query does not pay for them; () = none.
    # "auto": select.strategy, if one of its selectors keeps such a cache (maxherding,
    # uncertainty_herding, probcover), else none.
    warm_queries: tuple[str, ...] = spec(("auto",), each(NONEMPTY))
    # T, the MC-dropout passes of the box head, run only when a signal needs them (bald);
    # the detector must be trained with detector.dropout > 0.
    mc_passes: int = spec(10, ge(0))
    # Augmented views (CALD, HUALE): resize factor, rotation in degrees (counter-clockwise),
    # cutout holes and their side as a fraction of the shorter image side.
    view_resize: float = spec(0.8, within(0, 1, lo_open=True))
    view_rotate: float = spec(5.0, within(-180, 180))
    cutout_holes: int = spec(2, ge(0))
    cutout_size: float = spec(0.2, within(0, 1, hi_open=True))


@dataclass(frozen=True)
class SelectConfig:
    strategy: str = spec("entropy", NONEMPTY)  # a configs/strategies name or YAML path
    budget: int = spec(100, ge(1))
    # The "embedding" column that diversity and coverage stages read: "model" (the scoring
    # detector's pooled FPN features) or "backbone" (ImageNet EfficientNet-Lite0, no
    # training needed; `poolscout embed`, cached per run).
    embedding: str = spec("model", one_of("model", "backbone"))
    # Stage options any strategy can use: a share of each batch drawn uniformly at random
    # from the candidates the strategy left, and per-class quotas over the images' predicted
    # (top-box) classes: "uniform" splits the budget evenly over the classes predicted in
    # the pool, so rare classes get a floor; leftovers go to the strategy over the rest.
    mix_random: float = spec(0.0, within(0, 1, hi_open=True))
    quota: str = spec("none", one_of("none", "uniform"))


@dataclass(frozen=True)
class EmbedConfig:
    """Backbone embeddings (`poolscout embed`, jobs/embed.py)."""

    input_size: int = spec(224, ge(32))
    batch_size: int = spec(16, ge(1))
    dtype: str = spec("float16", one_of("float16", "float32"))
    # "auto" = the packaged ImageNet EfficientNet-Lite0 file; else a local weights file
    weights: str = spec("auto", NONEMPTY)
    concurrency: int = spec(1, ge(1))
    num_cpus: float = spec(1.0, ge(0))
    num_gpus: float = spec(0.0, ge(0))
    torch_threads: int = spec(0, ge(0))


@dataclass(frozen=True)
class ExportConfig:
    format: str = spec("coco", one_of(*EXPORT_FORMATS))
    min_score: float = spec(0.3, PROB)
    # Label Studio image references (engine.data.export.image_ref): "" = the local-files
    # form /data/local-files/?d=<path under local_files_root>; else a URL prefix joined
    # with the URL-quoted source_key (e.g. https://host/images/).
    image_root_url: str = ""
    # Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; "" = the run's images folder.
    local_files_root: str = ""


@dataclass(frozen=True)
class LoopConfig:
    """The active-learning loop (`poolscout run`)."""

    cycles: int = spec(4, ge(0))
    # "simulated": a GT oracle reveals annotations.parquet (benchmarks); "human": the loop
    # pauses after each selection until `poolscout import` brings the answers.
    oracle: str = spec("simulated", one_of("simulated", "human"))
    # Seed set when the run has no labeled images yet: this many images, picked by
    # "random", or on backbone embeddings (no model needed: `poolscout embed`) by coverage:
    # "maxherding", "typiclust", "probcover", or "kcenter" (k-center greedy).
    seed_size: int = spec(0, ge(0))
    seed_strategy: str = spec("random", one_of("random", "kcenter", "maxherding", "typiclust", "probcover"))
    # "ray": Ray Train + Ray Data per stage (the product path); "local": every stage in this
    # process (benchmarks run many loops as Ray tasks, one per CPU).
    executor: str = spec("ray", one_of("ray", "local"))
    eval_batch_size: int = spec(8, ge(1))
    # torch threads of evaluation (0 = score.torch_threads, else torch's default)
    eval_threads: int = spec(0, ge(0))
    # Score the pool even when the strategy needs no model signal (e.g. random).
    always_score: bool = False
    # The stopping signal: a fixed sample of this many pool images (drawn once, at the first
    # evaluation; 0 = off) on which each cycle's model predicts; the agreement of consecutive
    # models' boxes there (engine.evaluation.metrics.prediction_agreement) at or above
    # `stop_agreement` means new labels now change the model little.
    stop_set: int = spec(200, ge(0))
    stop_agreement: float = spec(0.9, within(0, 1))
    stop_min_score: float = spec(0.3, within(0, 1))


@dataclass(frozen=True)
class GsalConfig:
    """GSAL's diffusion model and difficulty signals (docs/methods.md section 4)."""

    # a local diffusers UNet2DModel directory; None = the run's own (`poolscout diffusion
    # train`, saved in <run>/diffusion/model)
    model: str | None = spec(None, NONEMPTY)
    preset: str = spec("cpu-small", one_of("cpu-small", "gpu"))
    resolution: int = spec(0, ge(0))  # 0 = the preset's (64 / 128)
    channels: str = spec("grey", one_of("grey", "rgb"))
    seeds: int = spec(5, ge(1))  # K noise seeds per image
    t0: float = spec(0.25, within(0, 1, lo_open=True))  # noise level, a fraction of T
    steps: int = spec(10, ge(1))  # DDIM steps from t0
    batch_size: int = spec(32, ge(1))  # (image, seed) pairs per UNet call
    autocast: str = spec("none", one_of("none", "fp16", "bf16"))  # CUDA only
    eps: float = spec(1e-8, ge(0))  # of the median normalisation
    # keep each pool image's D / V maps (RUN/diffusion/maps/<model+settings digest>/, 2 R^2
    # float32 an image): later cycles' scorings skip the diffusion stage for those images
    cache_maps: bool = True
    # where the maps are kept (None: RUN/diffusion/maps); runs that share a pool and a model
    # (a benchmark's loops) may share one folder
    maps_dir: str | None = spec(None, NONEMPTY)
    # training on the pool (`poolscout diffusion train`)
    train_steps: int = spec(2500, ge(1))  # cpu-small: ~25 min on 2 cores (0.59 s a step of 16)
    train_images: int = spec(20000, ge(0))  # a seeded sample of the pool (0 = all of it)
    train_batch_size: int = spec(16, ge(1))
    lr: float = spec(2e-4, within(0, 1, lo_open=True))
    ema_decay: float = spec(0.999, within(0, 1, hi_open=True))
    checkpoint_every: int = spec(250, ge(1))
    train_threads: int = spec(0, ge(0))  # torch threads (0 = all cores)
    # score-time stage (Ray Data actors): how many, and what each reserves (0.5 CPU: on a
    # 2-core node it fits beside a 1-CPU detector actor and the 0.25-CPU tasks)
    concurrency: int = spec(1, ge(1))
    num_cpus: float = spec(0.5, ge(0))
    num_gpus: float = spec(0.0, ge(0))
    threads: int = spec(0, ge(0))  # torch threads of a score-time actor (0 = torch's default)


@dataclass(frozen=True)
class SegmentConfig:
    """Pixel-level active learning for segmentation (two-stage eDALD, docs/methods.md
    section 5; `poolscout segment`)."""

    # masks: "ids" (pixel = class id, 255 ignore) or "folder" (binary, class = top folder)
    mask_format: str = spec("ids", one_of("ids", "folder"))
    mask_threshold: int = spec(127, ge(0))
    # "two_stage" (eDALD), or the baselines "random", "entropy", "herding", "edald"
    strategy: str = spec("two_stage", one_of("two_stage", "random", "entropy", "herding", "edald"))
    rounds: int = spec(4, ge(0))  # acquisition rounds after round 0
    budget: int = spec(100, ge(1))  # B pixels labeled per round (round 0 too)
    candidates: int = spec(1000, ge(1))  # N_c random candidate pixels per image and round
    local_budget: int = spec(20, ge(1))  # b, stage 1a's picks per image
    keep: float = spec(0.5, within(0, 1, lo_open=True))  # stage 1b keeps this share of the local picks
    noises: int = spec(5, ge(0))  # K fixed noises of eDALD's MI
    timesteps: tuple[int, ...] = spec((50, 150, 250), NONEMPTY, each(ge(0)))
    blocks: tuple[int, ...] = spec((), each(ge(0)))  # UNet up blocks read (empty = all)
    knn_k: int = spec(64, ge(2))  # neighbours of the sparse herding graph (beyond 4096 points)
    head_epochs: int = spec(50, ge(1))
    head_lr: float = spec(1e-3, within(0, 1, lo_open=True))
    head_batch_size: int = spec(256, ge(1))
    head_class_weights: str = spec("sqrt", one_of("sqrt", "inverse", "none"))  # cross-entropy class weights
    eval_max_side: int = spec(256, ge(0))  # evaluation grid's longer side (0 = full resolution)
    batch_size: int = spec(4, ge(1))  # images per feature batch
    # feature stage (Ray Data actors)
    concurrency: int = spec(1, ge(1))
    num_cpus: float = spec(1.0, ge(0))
    num_gpus: float = spec(0.0, ge(0))
    threads: int = spec(0, ge(0))


@dataclass(frozen=True)
class RayConfig:
    address: str | None = spec(None, NONEMPTY)
    num_cpus: int = spec(0, ge(0))  # 0 = all cores, embedded local Ray only


@dataclass(frozen=True)
class Config:
    seed: int = spec(0, ge(0))
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    gsal: GsalConfig = field(default_factory=GsalConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# Constraints between settings, known at load: (keys involved, ok(cfg), message after the
# first key).
CROSS_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Config], bool], str], ...] = (
    (("dataset.supercategories", "dataset.classes"),
     lambda c: not c.dataset.supercategories or len(c.dataset.supercategories) == len(c.dataset.classes),
     "needs one name per entry of dataset.classes (same order)"),
    (("train.aware_loss", "detector.box_var_head"), lambda c: not c.train.aware_loss or c.detector.box_var_head,
     "true needs detector.box_var_head: true (the uncertainty-aware loss reads the box variance head)"),
)


def to_plain(obj: Any) -> Any:
    """Dataclass -> nested dict of YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def settings(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, tuple[Check, ...]]]:
    """(dotted key, value, checks) of every leaf setting of a config dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata.get("checks", ())


def check_config(cfg: Config, sources: dict[str, str] | None = None) -> Config:
    """Range-check every setting (the checks next to the fields, then CROSS_CHECKS).

    Args:
        cfg: the configuration.
        sources: dotted key -> where its value came from (a file, or "--set ..."); a
            value from a file is reported with it.

    Returns:
        `cfg`, unchanged.

    Raises:
        ConfigError: "<key>: must be ..., got <value>" for the first bad setting.
    """
    sources = sources or {}

    def fail(key: str, text: str) -> None:
        src = sources.get(key)
        where = f" (in {src})" if src and not src.startswith("--set") else ""
        raise ConfigError(f"{key}: {text}{where}")

    for key, value, checks in settings(cfg):
        if value is None:  # an optional setting left unset
            continue
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value!r}")
        for c in checks:
            if not c.ok(value):
                fail(key, f"{c.text}, got {to_plain(value)!r}")
    for keys, ok, text in CROSS_CHECKS:
        if not ok(cfg):
            fail(keys[0], text)
    return cfg


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


def _merge_into(cls: type, current: Any, data: dict[str, Any], prefix: str, source: str,
                seen: dict[str, str] | None = None) -> Any:
    """`current` (a `cls`) with `data`'s values; `seen` (when given) maps each key set to `source`."""
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
            changes[key] = _merge_into(tp, getattr(current, key), value or {}, full + ".", source, seen)
        else:
            changes[key] = _coerce(value, tp, full, source)
            if seen is not None:
                seen[full] = source
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
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"--set {text!r}: cannot parse value ({_yaml_one_line(e)})") from None
    return key.split("."), value


def _yaml_one_line(e: Exception) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{p}: not valid YAML ({_yaml_one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def build_config(
    layers: list[tuple[str, dict[str, Any]]] = (),
    overrides: list[str] = (),
    base: Config | None = None,
) -> Config:
    """Apply YAML layers (source name, mapping) then `key=value` overrides, then range-check
    the result (`check_config`; a bad value is reported with the layer that set it)."""
    cfg = base or Config()
    seen: dict[str, str] = {}
    for source, data in layers:
        data = dict(data)
        data.pop("fingerprint", None)  # run.yaml carries it; it is not a setting
        cfg = _merge_into(Config, cfg, data, "", source, seen)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge_into(Config, cfg, nested, "", f"--set {text}", seen)
    return check_config(cfg, seen)


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), base: Config | None = None) -> Config:
    return build_config([(str(p), load_yaml(p)) for p in paths], overrides, base)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    """Where the shipped YAML lives (the repository's configs/ for an editable install)."""
    import os

    env = os.environ.get("POOLSCOUT_CONFIGS")
    return Path(env) if env else repo_root() / "configs"
