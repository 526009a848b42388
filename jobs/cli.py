"""The `poolscout` command line.

Every command takes `--config FILE` (repeatable) and `--set key=value` overrides on top of
the run's run.yaml; RAY_ADDRESS or `--address` points it at a running Ray cluster, else an
embedded local Ray starts. Errors print one line naming the bad key, file or field, and
exit with status 2.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from engine.config import ConfigError, load_config
from engine.registry import RegistryError
from engine.run import RunDir, RunError

EXPECTED = (ConfigError, RunError, RegistryError, ValueError, FileNotFoundError, KeyError)


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            _fail(str(e) if not isinstance(e, KeyError) or isinstance(e, RegistryError) else str(e.args[0]))

    return wrapper


def common(fn):
    """--config / --set / --address / --quiet for every command."""
    fn = click.option("--quiet", is_flag=True, help="Hide Ray's logs and progress bars.")(fn)
    fn = click.option("--address", default=None, envvar="RAY_ADDRESS",
                      help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray).")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one setting, e.g. --set train.epochs=2 (repeatable).")(fn)
    fn = click.option("--config", "configs", multiple=True, type=click.Path(dir_okay=False),
                      help="YAML config layered over the run's run.yaml (repeatable).")(fn)
    return _guard(fn)


def _load(run_dir: str, configs, overrides):
    run = RunDir(Path(run_dir))
    return run, run.config(list(configs), list(overrides))


def _ray(cfg, address, quiet):
    from jobs.ray_env import connect

    return connect(address or cfg.ray.address, cfg.ray.num_cpus, quiet=quiet)


def _print(summary: dict, keys=None) -> None:
    d = {k: v for k, v in summary.items() if keys is None or k in keys}
    click.echo(json.dumps(d, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="poolscout")
def cli() -> None:
    """poolscout: pick the images worth labeling next, retrain, repeat.

    \b
    Typical use:
      poolscout init runs/steel --images DIR --annotations ANN --seed-fraction 0.05 --config configs/neu_det.yaml
      poolscout cycle runs/steel --strategy entropy --budget 100
    """


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of images (searched recursively).")
@click.option("--annotations", type=click.Path(exists=True), default=None,
              help="COCO JSON file, or a folder of VOC XML / YOLO txt files.")
@click.option("--format", "fmt", type=click.Choice(["coco", "voc", "yolo"]), default=None,
              help="Annotation format (default: inferred from --annotations).")
@click.option("--labeled", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of image ids to start labeled (ids, relative paths or file stems).")
@click.option("--seed-fraction", type=float, default=None, help="Label a seeded random fraction of the pool.")
@click.option("--test", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of image ids held out for evaluation.")
@click.option("--force", is_flag=True, help="Re-initialise a run whose inputs differ.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--config", "configs", multiple=True, type=click.Path(dir_okay=False))
@_guard
def init(run_dir, images, annotations, fmt, labeled, seed_fraction, test, force, overrides, configs):
    """Create a run directory: manifest, annotations, ledger, rejects, run.yaml."""
    from engine.pool import init_run

    if labeled and seed_fraction is not None:
        raise ValueError("give --labeled or --seed-fraction, not both")
    if seed_fraction is not None and not (0.0 < seed_fraction < 1.0):
        raise ValueError(f"--seed-fraction must be in (0, 1), got {seed_fraction}")
    cfg = load_config(list(configs), list(overrides))
    summary = init_run(RunDir(Path(run_dir)), images=images, annotations=annotations, fmt=fmt, labeled=labeled,
                       seed_fraction=seed_fraction, test=test, cfg=cfg, force=force)
    _print(summary)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cycle", type=int, default=None, help="Cycle to train (default: the current one).")
@click.option("--force", is_flag=True, help="Retrain even if the cycle has a model.")
@common
def train(run_dir, cycle, force, configs, overrides, address, quiet):
    """Train the detector on the labeled images (Ray Train TorchTrainer)."""
    from jobs.train import train as do_train

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet)
    s = do_train(run, cfg, cycle=cycle, force=force, progress=not quiet)
    _print(s, ["cycle", "model", "labeled", "warm_start", "seconds", "skipped"])


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cycle", type=int, default=None)
@common
def score(run_dir, cycle, configs, overrides, address, quiet):
    """Score the unlabeled pool with Ray Data (predictions + scores.parquet)."""
    from jobs.score import score as do_score

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet)
    _print(do_score(run, cfg, cycle=cycle, progress=not quiet))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default=None, help="Strategy name (configs/strategies) or YAML path.")
@click.option("--budget", type=int, default=None, help="Images to select.")
@click.option("--cycle", type=int, default=None)
@common
def select(run_dir, strategy, budget, cycle, configs, overrides, address, quiet):
    """Pick the batch to label with a named strategy (selection.parquet)."""
    from jobs.select import select as do_select

    run, cfg = _load(run_dir, configs, overrides)
    _print(do_select(run, cfg, strategy=strategy, budget=budget, cycle=cycle))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["coco", "label_studio", "csv", "all"]), default=None)
@click.option("--cycle", type=int, default=None)
@common
def export(run_dir, fmt, cycle, configs, overrides, address, quiet):
    """Write the selected batch for annotators (COCO, Label Studio, CSV)."""
    from jobs.export import export as do_export

    run, cfg = _load(run_dir, configs, overrides)
    _print(do_export(run, cfg, fmt=fmt, cycle=cycle))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default=None)
@click.option("--budget", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["coco", "label_studio", "csv", "all"]), default="all")
@common
def cycle(run_dir, strategy, budget, fmt, configs, overrides, address, quiet):
    """train -> score -> select -> export for the current cycle."""
    from jobs.cycle import run_cycle

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet)
    _print(run_cycle(run, cfg, strategy=strategy, budget=budget, fmt=fmt, progress=not quiet,
                     log=lambda m: click.echo(m, err=True)))


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "n_images", type=int, default=200, show_default=True)
@click.option("--size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--class-weight", "weights", multiple=True, metavar="CLASS=W",
              help="Relative frequency of a defect class, e.g. --class-weight pit=0.1 (repeatable).")
@_guard
def synth(out_dir, n_images, size, seed, weights):
    """Generate a seeded synthetic steel-defect pool (images + COCO annotations)."""
    from engine.synthetic import generate

    cw = {}
    for w in weights:
        if "=" not in w:
            raise ValueError(f"--class-weight {w!r}: expected CLASS=WEIGHT")
        name, val = w.split("=", 1)
        cw[name] = float(val)
    _print(generate(out_dir, n_images=n_images, size=size, seed=seed, class_weights=cw or None))


@cli.command("strategies")
@_guard
def strategies_cmd():
    """List the shipped strategies."""
    from engine.strategies import list_strategies, load_strategy

    for name in list_strategies():
        s = load_strategy(name)
        click.echo(f"{name:22s} {s.description}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="poolscout")


if __name__ == "__main__":
    main()
