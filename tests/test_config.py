"""engine.config: range checks at load, their one-line messages, the shipped YAML, and the
warmup warning at train start."""
from __future__ import annotations

import dataclasses
import time
import typing
import warnings

import pytest
from click.testing import CliRunner

from poolscout.engine.core.config import (
    Config,
    ConfigError,
    build_config,
    check_config,
    configs_dir,
    load_config,
    load_yaml,
    settings,
)

# (key, a value out of its range) -> load must fail naming the key first.
BAD = [
    ("seed", "-1"),
    ("dataset.name", "''"),
    ("dataset.classes", "[a, a]"),
    ("dataset.classes", "['', b]"),
    ("dataset.extensions", "[]"),
    ("dataset.max_pixels", "0"),
    ("dataset.box_tolerance_px", "-0.5"),
    ("dataset.min_box_size", "-1"),
    ("detector.name", "''"),
    ("detector.input_size", "16"),
    ("detector.weights", "''"),
    ("detector.backbone_weights", "' '"),
    ("detector.max_boxes", "0"),
    ("detector.score_thresh", "1.5"),
    ("detector.score_thresh", "-0.1"),
    ("detector.nms_thresh", "2"),
    ("detector.fpn_channels", "0"),
    ("detector.trainable_backbone_layers", "6"),
    ("detector.trainable_backbone_layers", "-1"),
    ("detector.rpn_pre_nms_top_n_train", "0"),
    ("detector.rpn_post_nms_top_n_train", "0"),
    ("detector.rpn_pre_nms_top_n_test", "-5"),
    ("detector.rpn_post_nms_top_n_test", "0"),
    ("detector.rpn_batch_size_per_image", "0"),
    ("detector.box_batch_size_per_image", "0"),
    ("detector.anchor_sizes", "[]"),
    ("detector.anchor_sizes", "[8, 0, 32, 64]"),
    ("detector.dropout", "1.0"),
    ("detector.dropout", "-0.2"),
    ("train.epochs", "0"),
    ("train.batch_size", "0"),
    ("train.lr", "-1"),
    ("train.lr", "0"),
    ("train.lr", ".inf"),
    ("train.lr", ".nan"),
    ("train.momentum", "1.0"),
    ("train.momentum", "-0.1"),
    ("train.weight_decay", "-1.0e-4"),
    ("train.warmup_iters", "-1"),
    ("train.hflip_prob", "1.5"),
    ("train.num_workers", "0"),
    ("train.cpus_per_worker", "-1"),
    ("train.torch_threads", "-1"),
    ("train.max_images", "-1"),
    ("train.warm_epochs", "-2"),
    ("train.eiou_gamma", "-0.5"),
    ("train.eiou_weight", "0"),
    ("train.loss_lambda", "1.5"),
    ("train.quality_momentum", "1.1"),
    ("score.batch_size", "0"),
    ("score.concurrency", "0"),
    ("score.num_gpus", "-1"),
    ("score.num_cpus", "-0.5"),
    ("score.torch_threads", "-1"),
    ("score.decode_batch_size", "0"),
    ("score.views", "[orig, flip]"),
    ("score.signals", "[entropy:max, '']"),
    ("score.empty_value", "pool_median"),
    ("score.empty_value", ".nan"),
    ("score.mc_passes", "-1"),
    ("score.view_resize", "0"),
    ("score.view_resize", "1.2"),
    ("score.view_rotate", "270"),
    ("score.cutout_holes", "-1"),
    ("score.cutout_size", "1.0"),
    ("select.strategy", "''"),
    ("select.budget", "0"),
    ("export.format", "yaml"),
    ("export.min_score", "-0.1"),
    ("loop.cycles", "-1"),
    ("loop.oracle", "crowd"),
    ("loop.seed_size", "-3"),
    ("loop.seed_strategy", "magic"),
    ("loop.executor", "k8s"),
    ("loop.eval_batch_size", "0"),
    ("ray.address", "''"),
    ("ray.num_cpus", "-1"),
]

# Values on the edge of their range: accepted.
EDGE_OK = [
    "seed=0", "detector.input_size=32", "detector.score_thresh=0", "detector.score_thresh=1",
    "detector.trainable_backbone_layers=0", "detector.trainable_backbone_layers=5", "detector.dropout=0.0",
    "detector.weights=null", "detector.backbone_weights=null", "train.epochs=1", "train.lr=1.0e-9",
    "train.momentum=0", "train.weight_decay=0", "train.warmup_iters=0", "train.hflip_prob=1",
    "train.num_workers=1", "train.torch_threads=0", "train.loss_lambda=null", "train.loss_lambda=0",
    "train.loss_lambda=1", "train.quality_momentum=1", "score.num_cpus=0.75", "score.mc_passes=0",
    "score.empty_value=pool_min", "score.empty_value=0.5", "score.empty_value=-1", "score.views=[]",
    "score.views=[orig, hflip, cutout, resize, rotate]", "score.view_resize=1", "score.view_rotate=-180",
    "score.cutout_size=0", "select.budget=1", "export.format=all", "export.min_score=1", "loop.cycles=0",
    "loop.oracle=human", "loop.seed_strategy=kcenter", "loop.executor=local", "ray.num_cpus=0",
]


def _ids(table):
    return [f"{k}={v}" for k, v in table]


@pytest.mark.parametrize(("key", "value"), BAD, ids=_ids(BAD))
def test_out_of_range_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config([], [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"{key}: "), msg
    assert " must " in msg and ", got " in msg and "\n" not in msg


@pytest.mark.parametrize("text", EDGE_OK)
def test_values_on_the_edge_of_their_range_load(text):
    load_config([], [text])


def test_message_format_for_set_and_for_a_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config([], ["train.lr=-1"])
    assert str(e.value) == "train.lr: must be > 0, got -1.0"
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert str(e.value) == f"train.lr: must be > 0, got -1.0 (in {f})"
    # a later layer fixes an earlier one: only the final value is checked
    assert load_config([f], ["train.lr=0.02"]).train.lr == 0.02
    with pytest.raises(ConfigError, match=r"^loop\.executor: must be one of 'ray', 'local', got 'k8s'$"):
        load_config([], ["loop.executor=k8s"])
    with pytest.raises(ConfigError, match=r"^detector\.anchor_sizes: every item must be >= 1, got \[8, 0\]$"):
        load_config([], ["detector.anchor_sizes=[8,0]"])
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number, got inf$"):
        load_config([], ["train.lr=.inf"])


def test_run_yaml_layer_is_checked_and_named(tmp_path):
    data = Config().to_dict()
    data["score"]["concurrency"] = 0
    with pytest.raises(ConfigError, match=r"^score\.concurrency: must be >= 1, got 0 \(in runs/x/run\.yaml\)$"):
        build_config([("runs/x/run.yaml", data)])


def test_cross_check_aware_loss_needs_box_var_head():
    with pytest.raises(ConfigError, match=r"^train\.aware_loss: true needs detector\.box_var_head: true"):
        load_config([], ["train.aware_loss=true"])
    cfg = load_config([], ["train.aware_loss=true", "detector.box_var_head=true"])
    assert cfg.train.aware_loss and cfg.detector.box_var_head


def test_type_errors_still_come_first():
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config([], ["train.epochs=0.5"])


def test_defaults_pass_their_own_checks():
    assert check_config(Config()) == Config()


def _hints(obj, prefix=""):
    """dotted key -> declared type of every leaf field."""
    out = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_hints(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def test_every_numeric_field_declares_its_range():
    hints = _hints(Config())
    missing = []
    for key, _, checks in settings(Config()):
        tp = hints[key]
        args = set(typing.get_args(tp)) | {tp}
        numeric = bool(args & {int, float}) or any(typing.get_args(a) in ((int, ...), (float, ...)) for a in args)
        if numeric and not checks:
            missing.append(key)
    assert not missing, f"numeric settings without a declared range: {missing}"
    # and every key the BAD table names exists
    assert {k for k, _ in BAD} <= set(hints)


def test_enumerated_choices_match_their_users():
    from poolscout.engine.core import config as C
    from poolscout.engine.models import predictions
    from poolscout.jobs import export

    assert C.VIEWS == tuple(predictions.VIEWS)
    assert set(C.EXPORT_FORMATS) == set(export.FORMATS) | {"all"}


# --------------------------------------------------------------------------- shipped YAML
SHIPPED = sorted(configs_dir().glob("*.yaml"))


def test_configs_dir_has_yaml():
    assert SHIPPED, f"no YAML in {configs_dir()}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path, tmp_path):
    # `poolscout init --config FILE` ...
    cfg = load_config([path])
    # ... and every later command: run.yaml (as init writes it), then --config FILE
    run_yaml = {**cfg.to_dict(), "fingerprint": {"pool_hash": "x"}}
    assert build_config([(str(tmp_path / "run.yaml"), run_yaml), (str(path), load_yaml(path))]) == cfg


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_pool):
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run
    from tests.conftest import TINY_SETTINGS

    run = RunDir(tmp_path_factory.mktemp("cfg_run") / "run")
    init_run(run, images=tiny_pool["images"], annotations=tiny_pool["annotations"], seed_fraction=0.25,
             cfg=load_config([], TINY_SETTINGS))
    return run


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a command tries to start or join Ray."""
    from poolscout.jobs import ray_env

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_env, "connect", refuse)


@pytest.mark.parametrize("cmd", ["train", "score", "cycle", "run", "select", "export"])
def test_cli_bad_value_is_one_line_exit_2_without_ray(cmd, tiny_run, no_ray):
    from poolscout.jobs.cli import cli

    before = tiny_run.run_yaml.read_text()
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, [cmd, str(tiny_run.root), "--set", "train.lr=-1"])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    assert res.output.splitlines() == ["error: train.lr: must be > 0, got -1.0"]
    assert res.stdout == ""
    assert seconds < 1.0
    assert tiny_run.run_yaml.read_text() == before
    assert not (tiny_run.root / "cycles").exists()


def test_cli_init_refuses_a_bad_value_before_scanning(tmp_path, tiny_pool, no_ray):
    from poolscout.jobs.cli import cli

    res = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--images", str(tiny_pool["images"]),
                                   "--set", "detector.input_size=8"])
    assert res.exit_code == 2
    assert res.output.splitlines() == ["error: detector.input_size: must be >= 32, got 8"]
    assert not (tmp_path / "r").exists()


def test_cli_bad_config_file_value_names_the_file(tmp_path, tiny_run, no_ray):
    from poolscout.jobs.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("loop:\n  executor: k8s\n")
    res = CliRunner().invoke(cli, ["train", str(tiny_run.root), "--config", str(bad)])
    assert res.exit_code == 2
    assert res.output.splitlines() == [f"error: loop.executor: must be one of 'ray', 'local', got 'k8s' (in {bad})"]


# --------------------------------------------------------------------------- warmup
class _Toy:
    """A 'detector' with one parameter: its loss dict is w^2."""

    def __new__(cls):
        import torch

        class Toy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(2))

            def forward(self, images, targets):
                return {"loss_toy": (self.w ** 2).sum()}

        return Toy()


def _batches(n):
    import torch

    return [([torch.zeros(3, 4, 4)], [{"image_id": i}]) for i in range(n)]


def _train(cfg, n_batches, **kw):
    from poolscout.engine.models.training import train_epochs

    return train_epochs(_Toy(), _batches(n_batches), cfg, progress=False, log=lambda m: None, **kw)


def test_warmup_longer_than_the_run_warns_once():
    from poolscout.engine.core.config import TrainConfig
    from poolscout.engine.models.training import WarmupWarning

    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_iters=5)
    with pytest.warns(WarmupWarning) as rec:
        _train(cfg, 2)
    msgs = [str(w.message) for w in rec if issubclass(w.category, WarmupWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0] == ("train.warmup_iters=5 is longer than this training run's 4 iterations (2 epochs x 2 batches "
                       "per epoch, train.batch_size=4): the learning rate never reaches train.lr=0.01; lower "
                       "train.warmup_iters")


def test_warmup_within_the_run_or_a_resume_does_not_warn():
    from poolscout.engine.core.config import TrainConfig
    from poolscout.engine.models.training import WarmupWarning, warmup_warning

    with warnings.catch_warnings():
        warnings.simplefilter("error", WarmupWarning)
        _train(TrainConfig(epochs=2, warmup_iters=4), 2)  # exactly the run: fine
        _train(TrainConfig(epochs=2, warmup_iters=50), 2, start_epoch=1)  # a resume: warned at the start
    assert warmup_warning(TrainConfig(epochs=8, warmup_iters=50), 7) is None
    assert "train.warmup_iters=50" in warmup_warning(TrainConfig(epochs=8, warmup_iters=50), 6)


def test_yaml_errors_are_one_line(tmp_path):
    from poolscout.engine.core.config import ConfigError, load_config

    bad = tmp_path / "evil.yaml"
    bad.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as e:
        load_config([str(bad)], [])
    assert "evil.yaml" in str(e.value) and "\n" not in str(e.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 0.01 # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8") as e:
        load_config([str(latin)], [])
    with pytest.raises(ConfigError) as e:
        load_config([], ["train.epochs=[1"])
    assert "train.epochs" in str(e.value) and "\n" not in str(e.value)
