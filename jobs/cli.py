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
from pathlib import Path

import click

from poolscout.engine.core.config import ConfigError, load_config
from poolscout.engine.core.registry import RegistryError
from poolscout.engine.core.run import RunDir, RunError

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
        except Exception:
            logs = _log_dir()
            if logs:  # the traceback follows in full; Ray's side of the story is in the logs
                click.echo(f"poolscout: Ray's driver and worker logs are in {logs}", err=True)
            raise

    return wrapper


def _log_dir():
    mod = sys.modules.get("poolscout.jobs.ray_env")
    return getattr(mod, "LOG_DIR", None) if mod is not None else None


def _set_verbose(ctx, param, value):
    if value:
        from poolscout.jobs import ray_env

        ray_env.VERBOSE = True
    return value


def common(fn):
    """--config / --set / --address / --quiet / --verbose for every command."""
    fn = click.option("--verbose", is_flag=True, expose_value=False, callback=_set_verbose, is_eager=True,
                      help="Show Ray's own logs and progress bars (by default they go to RUN/logs/).")(fn)
    fn = click.option("--quiet", is_flag=True, help="Hide poolscout's progress bars too.")(fn)
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


def _ray(cfg, address, quiet, run=None):
    from poolscout.jobs.ray_env import connect

    return connect(address or cfg.ray.address, cfg.ray.num_cpus, quiet=quiet,
                   log_dir=(run.root / "logs") if run is not None else None)


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
      poolscout run runs/steel --cycles 6 --budget 100 --strategy entropy
      poolscout status runs/steel
      poolscout report runs/steel --out report/
      poolscout demo                      # synthetic pool, random vs entropy, report
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
    from poolscout.engine.data.pool import init_run

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
    from poolscout.jobs.train import train as do_train

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet, run)
    s = do_train(run, cfg, cycle=cycle, force=force, progress=not quiet)
    _print(s, ["cycle", "model", "labeled", "warm_start", "seconds", "failed_images", "skipped"])


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cycle", type=int, default=None)
@click.option("--force", is_flag=True, help="Rescore a cycle already scored by the same model.")
@click.option("--retry-rejects", is_flag=True,
              help="First re-probe the images init rejected; those that pass now rejoin the pool.")
@common
def score(run_dir, cycle, force, retry_rejects, configs, overrides, address, quiet):
    """Score the unlabeled pool with Ray Data (predictions + scores.parquet).

    Images that fail to decode are this cycle's failures (cycles/<k>/rejects.parquet): they
    stay in the pool and the next scoring tries them again."""
    from poolscout.jobs.score import score as do_score

    run, cfg = _load(run_dir, configs, overrides)
    if retry_rejects:
        from poolscout.engine.data.rejects import retry_rejects as do_retry

        r = do_retry(run, cfg, progress=not quiet)
        # images that rejoin the pool change the work list, so a scored cycle is scored again
        click.echo(f"retry rejects: {r['restored']} of {r['retried']} rejected images rejoin the pool", err=True)
    _ray(cfg, address, quiet, run)
    _print(do_score(run, cfg, cycle=cycle, progress=not quiet, force=force))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--all-states", is_flag=True, help="Also embed test images (default: pool and labeled).")
@common
def embed(run_dir, all_states, configs, overrides, address, quiet):
    """Backbone embeddings of the pool (ImageNet EfficientNet-Lite0, no training), cached.

    \b
    Computed once per run in a Ray Data stream (RUN/embeddings/backbone); a later call
    embeds only new images. Used by --seed-strategy and `--set select.embedding=backbone`.
    """
    from poolscout.jobs.embed import embed_backbone

    run, cfg = _load(run_dir, configs, overrides)
    if cfg.loop.executor == "ray":
        _ray(cfg, address, quiet, run)
    states = ("pool", "labeled", "test") if all_states else ("pool", "labeled")
    _print(embed_backbone(run, cfg, states=states, progress=not quiet))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default=None, help="Strategy name (configs/strategies) or YAML path.")
@click.option("--budget", type=int, default=None, help="Images to select.")
@click.option("--cycle", type=int, default=None)
@common
def select(run_dir, strategy, budget, cycle, configs, overrides, address, quiet):
    """Pick the batch to label with a named strategy (selection.parquet)."""
    from poolscout.jobs.select import select as do_select

    run, cfg = _load(run_dir, configs, overrides)
    res = do_select(run, cfg, strategy=strategy, budget=budget, cycle=cycle)
    for w in res.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    _print(res)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default=None, help="Strategy name (configs/strategies) or YAML path.")
@click.option("--budget", type=int, default=None, help="Images to pick.")
@click.option("--where", default=None, metavar="FILTER",
              help="Only candidates where FILTER holds, e.g. \"class == 'scratch' and score_max < 0.5\".")
@click.option("--name", default=None, help="Save as cycles/<k>/queries/NAME.parquet (default <strategy>_b<budget>).")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), default=None,
              help="YAML list of queries ({strategy, budget, where?, name?}) answered in one call.")
@click.option("--cycle", type=int, default=None)
@click.option("--show", type=int, default=5, show_default=True, help="Picks to print per query.")
@common
def query(run_dir, strategy, budget, where, name, batch_file, cycle, show, configs, overrides, address, quiet):
    """Ask a scored cycle which images a strategy would pick, without re-scoring.

    \b
    Answers from the cycle's cached scores, embeddings and kNN graph; each answer is saved
    as a named query beside the cycle (cycles/<k>/queries/), never replacing its
    selection.parquet. Filter columns: the stored signals, num_boxes, class (the top
    box's class) and score_max.
      poolscout query runs/steel --strategy entropy --budget 100 --where "class == 'scratches'"
      poolscout query runs/steel --batch queries.yaml
    """
    import time

    from poolscout.jobs.query import QuerySession, default_name, read_batch

    run, cfg = _load(run_dir, configs, overrides)
    if batch_file and (strategy or budget or where or name):
        raise ValueError("--batch takes its queries from the file: drop --strategy/--budget/--where/--name")
    if batch_file:
        queries = read_batch(batch_file)
    else:
        strat = strategy or cfg.select.strategy
        b = int(budget if budget is not None else cfg.select.budget)
        queries = [{"strategy": strat, "budget": b, "where": where, "name": name or default_name(strat, b, where)}]
    session = QuerySession(run, cfg, cycle, log=None if quiet else (lambda m: click.echo(m, err=True)))
    t0 = time.time()
    man = None
    for q in queries:
        table, summary = session.ask(q["strategy"], q["budget"], q.get("where"))
        path = session.save(q["name"], table, summary)
        click.echo(f"{q['name']}: {summary['strategy']} picked {summary['selected']} of {summary['candidates']} "
                   f"candidates{' where ' + q['where'] if q.get('where') else ''} in {summary['seconds']:.2f} s "
                   f"-> {path}")
        for w in summary.get("warnings", []):
            click.echo(f"  warning: {w}", err=True)
        if show > 0 and len(table):
            from poolscout.engine.core import io as _io

            if man is None:
                man = _io.read_table(run.manifest, columns=["image_id", "source_key"])
            import pyarrow.compute as pc

            head = table.slice(0, show)
            files = pc.take(man["source_key"], pc.index_in(head["image_id"], man["image_id"])).to_pylist()
            for r, i, sc, f in zip(head["rank"].to_pylist(), head["image_id"].to_pylist(),
                                   head["score"].to_pylist(), files):
                click.echo(f"  {r:>4}  {f}  (id {i}, score {sc:.4g})")
    if len(queries) > 1:
        click.echo(f"{len(queries)} queries in {time.time() - t0:.1f} s")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["coco", "label_studio", "cvat", "csv", "all"]), default=None,
              help="Export format (default: export.format); label_studio also writes label_studio_config.xml.")
@click.option("--cycle", type=int, default=None)
@click.option("--image-root-url", default=None, metavar="URL",
              help="Label Studio image references become URL + the URL-quoted source_key (e.g. "
                   "https://host/images/); default export.image_root_url, else /data/local-files/?d=<path "
                   "relative to export.local_files_root, or to the run's images folder>.")
@common
def export(run_dir, fmt, cycle, image_root_url, configs, overrides, address, quiet):
    """Write the selected batch for annotators (COCO, Label Studio, CVAT, CSV)."""
    from poolscout.jobs.export import export as do_export

    run, cfg = _load(run_dir, configs, overrides)
    _print(do_export(run, cfg, fmt=fmt, cycle=cycle, image_root_url=image_root_url))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default=None)
@click.option("--budget", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["coco", "label_studio", "cvat", "csv", "all"]), default="all")
@common
def cycle(run_dir, strategy, budget, fmt, configs, overrides, address, quiet):
    """train -> score -> select -> export for the current cycle."""
    from poolscout.jobs.cycle import run_cycle

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet, run)
    _print(run_cycle(run, cfg, strategy=strategy, budget=budget, fmt=fmt, progress=not quiet,
                     log=lambda m: click.echo(m, err=True)))


@cli.command("run")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cycles", type=int, default=None, help="Acquisition rounds (the loop trains cycles + 1 times).")
@click.option("--budget", type=int, default=None, help="Images to label per round.")
@click.option("--strategy", default=None, help="Strategy name (configs/strategies) or YAML path.")
@click.option("--oracle", type=click.Choice(["simulated", "human"]), default=None,
              help="simulated: reveal the run's GT; human: pause for `poolscout import` after each selection.")
@click.option("--seed-size", type=int, default=None, help="Seed set size when nothing is labeled yet.")
@click.option("--seed-strategy", type=click.Choice(["random", "kcenter", "maxherding", "typiclust", "probcover"]),
              default=None, help="Seed set when nothing is labeled: random, or a coverage pick on backbone "
                                 "embeddings (no model needed).")
@click.option("--executor", type=click.Choice(["ray", "local"]), default=None,
              help="ray: Ray Train + Ray Data per stage (default); local: everything in this process.")
@common
def run_cmd(run_dir, cycles, budget, strategy, oracle, seed_size, seed_strategy, executor, configs, overrides,
            address, quiet):
    """Run the active-learning loop to the end, or resume it where it stopped."""
    from poolscout.jobs.loop import loop_config, run_loop

    run = RunDir(Path(run_dir))
    run.require()
    ov = list(overrides)
    for key, val in (("loop.cycles", cycles), ("select.budget", budget), ("select.strategy", strategy),
                     ("loop.oracle", oracle), ("loop.seed_size", seed_size), ("loop.seed_strategy", seed_strategy),
                     ("loop.executor", executor)):
        if val is not None:
            ov.append(f"{key}={val}")
    if address:
        ov.append(f"ray.address={address}")
    cfg = loop_config(run, list(configs), ov)
    state = run_loop(run, cfg, progress=not quiet, log=lambda m: click.echo(m, err=True))
    _print({k: state.get(k) for k in ("status", "strategy", "cycle", "cycles", "message")})
    if state.get("status") == "waiting_for_labels":
        sys.exit(0)


@cli.command("import")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="COCO JSON or Label Studio JSON export with the answers for the current selection.")
@click.option("--format", "fmt", type=click.Choice(["coco", "label_studio"]), default=None,
              help="Answer format (default: detected from the file).")
@click.option("--cycle", type=int, default=None,
              help="Selection the answers belong to (default: the cycle whose selection holds the answered "
                   "images).")
@_guard
def import_cmd(run_dir, labels, fmt, cycle):
    """Import human labels for the selected batch (idempotent; partial batches allowed)."""
    from poolscout.engine.data import oracle
    from poolscout.jobs.loop import loop_state

    run = RunDir(Path(run_dir))
    run.require()
    answers = oracle.read_answers(labels, fmt, manifest=_read(run.manifest), categories=run.read_categories())
    k = cycle
    if k is None:
        k = oracle.answers_cycle(run, answers)
    if k is None:  # the file answers no image: the loop's cycle
        k = loop_state(run).get("cycle")
    if k is None:
        k = run.current_cycle()
    res = oracle.import_answers(run, answers, int(k), source=str(Path(labels).resolve()))
    _print({"cycle": int(k), **res})


def _read(path):
    from poolscout.engine.core import io

    return io.read_table(path)


@cli.command("status")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_guard
def status_cmd(run_dir, as_json):
    """Where the loop stands: stage, labeled counts, mAP per cycle, pending labels."""
    from poolscout.jobs.loop import status
    from poolscout.jobs.segment import is_segmentation, segment_status

    run = RunDir(Path(run_dir))
    if is_segmentation(run):
        _segment_status(segment_status(run), as_json)
        return
    st = status(run)
    if as_json:
        _print(st)
        return
    click.echo(f"run      {st['run']}")
    where = ""
    if st["status"] == "running" and st["cycle"] is not None:
        where = f" (cycle {st['cycle']}, stage {st['stage']})"
    elif st["status"] == "stages run by hand":
        where = f" (last: cycle {st['cycle']} {st['stage']})"
    click.echo(f"status   {st['status']}{where}")
    click.echo(f"strategy {st['strategy']}   planned cycles {st['cycles_planned']}")
    click.echo("ledger   " + ", ".join(f"{k} {v}" for k, v in st["ledger"].items()))
    if st["cycles"]:
        click.echo(f"{'cycle':>5} {'labeled':>8} {'mAP50':>7} {'mAP':>7} {'agree':>7}  stages done")
        for c in st["cycles"]:
            f = (lambda v: f"{v:7.3f}" if isinstance(v, (int, float)) else f"{'-':>7}")
            lab = c["labeled_images"] if c["labeled_images"] is not None else "-"
            click.echo(f"{c['cycle']:>5} {lab:>8} {f(c['map50'])} {f(c['map'])} {f(c.get('agreement'))}  "
                       f"{', '.join(c['stages'])}")
    if st.get("stop"):
        s = st["stop"]
        click.echo(f"stopping cycle {s['cycle']}: consecutive models agree on {s['agreement']:.0%} of the stop set's "
                   "boxes" + (": labels now buy little" if s["labels_buy_little"] else ""))
    if st.get("batch"):
        b = st["batch"]
        click.echo(f"waiting  {b['labeled']} of {b['selected']} selected images labeled; "
                   f"answer with `poolscout import {st['run']} --labels FILE`")


def _segment_status(st: dict, as_json: bool) -> None:
    if as_json:
        _print(st)
        return
    click.echo(f"run      {st['run']} (segmentation)")
    click.echo("images   " + ", ".join(f"{k} {v}" for k, v in st["ledger"].items()))
    click.echo(f"labeled  {st['labeled_pixels']} pixels")
    if st["rounds"]:
        click.echo(f"{'round':>5} {'pixels':>8} {'mIoU':>7}  steps done")
        for r in st["rounds"]:
            miou = f"{r['miou']:7.3f}" if isinstance(r["miou"], (int, float)) else f"{'-':>7}"
            px = r["labeled_pixels"] if r["labeled_pixels"] is not None else "-"
            click.echo(f"{r['round']:>5} {px:>8} {miou}  {', '.join(r['steps'])}")
    if st["pending"]:
        click.echo(f"waiting  label the pixels in {st['pending']}, then "
                   f"`poolscout segment import {st['run']} --points FILE`")
    for r in st["refine"]:
        f1 = f", held-out F1 {r['f1']:.3f}" if isinstance(r["f1"], (int, float)) else ""
        click.echo(f"refine   {r['dir']}: {r['answers']} answers, model v{r['model_version']}{f1} "
                   f"(init {r['init']}, mode {r['mode']}, {r['anchors']} anchors)")


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--montage", "montage_images", type=int, default=12, show_default=True,
              help="Selected images drawn per cycle.")
@click.option("--quiet", is_flag=True)
@_guard
def report_cmd(run_dirs, out_dir, montage_images, quiet):
    """Learning curves (PNG) and one self-contained HTML page for one or more runs."""
    from poolscout.engine.evaluation.report import write_report

    index = write_report([Path(d) for d in run_dirs], Path(out_dir), montage_images=montage_images,
                         progress=not quiet)
    click.echo(f"report: {index}")


@cli.command("demo")
@click.option("--out", "out_dir", default="poolscout-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the pool, the runs and the report go.")
@click.option("--images", "n_images", type=int, default=320, show_default=True, help="Synthetic pool size.")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--cycles", type=int, default=2, show_default=True)
@click.option("--budget", type=int, default=45, show_default=True)
@click.option("--seed-size", type=int, default=40, show_default=True)
@click.option("--strategies", default="random,entropy", show_default=True,
              help="Comma-separated; random is the reference the verdict compares against.")
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated loop seeds.")
@common
def demo_cmd(out_dir, n_images, size, cycles, budget, seed_size, strategies, seeds, configs, overrides, address,
             quiet):
    """Synthetic inspection pool -> random vs entropy loops over 2 seeds on the embedded Ray -> report + verdict."""
    from poolscout.jobs.demo import run_demo

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    res = run_demo(Path(out_dir), n_images=n_images, size=size, cycles=cycles, budget=budget,
                   seed_size=seed_size, strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                   seeds=seed_list, configs=list(configs), overrides=list(overrides), address=address,
                   progress=not quiet, log=lambda m: click.echo(m, err=True))
    click.echo(res["verdict"])


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "n_images", type=int, default=200, show_default=True)
@click.option("--size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--class-weight", "weights", multiple=True, metavar="CLASS=W",
              help="Relative frequency of a defect class, e.g. --class-weight pit=0.1 (repeatable).")
@click.option("--masks", is_flag=True, help="Also write segmentation masks (masks/<name>.png, class ids).")
@_guard
def synth(out_dir, n_images, size, seed, weights, masks):
    """Generate a seeded synthetic steel-defect pool (images + COCO annotations [+ masks])."""
    from poolscout.engine.data.synthetic import generate

    cw = {}
    for w in weights:
        if "=" not in w:
            raise ValueError(f"--class-weight {w!r}: expected CLASS=WEIGHT")
        name, val = w.split("=", 1)
        cw[name] = float(val)
    _print(generate(out_dir, n_images=n_images, size=size, seed=seed, class_weights=cw or None, masks=masks))


@cli.group()
def diffusion() -> None:
    """GSAL's diffusion model (the difficulty signals gsal_* and the gsal strategies)."""


@diffusion.command("train")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--steps", type=int, default=None, help="Training steps (default gsal.train_steps).")
@common
def diffusion_train(run_dir, steps, configs, overrides, address, quiet):
    """Train the in-domain diffusion model on the unlabeled pool (RUN/diffusion/model).

    
    A diffusers UNet2DModel (preset gsal.preset), DDPM noise schedule, EMA weights,
    checkpointed every gsal.checkpoint_every steps; rerun to resume. Scoring then loads it
    (or set gsal.model to any local diffusers directory instead of training)."""
    from poolscout.jobs.diffusion import train_diffusion

    run, cfg = _load(run_dir, configs, overrides)
    if cfg.loop.executor == "ray":
        _ray(cfg, address, quiet, run)
    s = train_diffusion(run, cfg, steps=steps, progress=not quiet, overrides=list(overrides),
                        log=lambda m: click.echo(m, err=True))
    _print(s, ["model", "steps", "trained_steps", "images", "seconds", "loss_last100", "parameters", "executor"])


@cli.group()
def segment() -> None:
    """Pixel-level active learning for segmentation (two-stage eDALD on diffusion features)."""


@segment.command("init")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of images (searched recursively).")
@click.option("--masks", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of PNG masks, at each image's relative path with .png.")
@click.option("--mask-format", type=click.Choice(["ids", "folder"]), default=None,
              help="ids: pixel = class id (255 ignore); folder: binary, class = the image's top folder.")
@click.option("--test", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of image ids held out for evaluation (they need masks).")
@click.option("--force", is_flag=True, help="Re-initialise a run whose inputs differ.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--config", "configs", multiple=True, type=click.Path(dir_okay=False))
@_guard
def segment_init(run_dir, images, masks, mask_format, test, force, overrides, configs):
    """Create a segmentation run: the image tables plus masks.parquet (bad masks rejected)."""
    from poolscout.jobs.segment import init_segmentation

    ov = list(overrides) + ([f"segment.mask_format={mask_format}"] if mask_format else [])
    cfg = load_config(list(configs), ov)
    _print(init_segmentation(RunDir(Path(run_dir)), images=images, masks=masks, test=test, cfg=cfg, force=force))


@segment.command("run")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--rounds", type=int, default=None, help="Acquisition rounds after round 0 (default segment.rounds).")
@click.option("--budget", type=int, default=None, help="Pixels labeled per round (default segment.budget).")
@click.option("--strategy", type=click.Choice(["two_stage", "random", "entropy", "herding", "edald"]), default=None)
@click.option("--executor", type=click.Choice(["ray", "local"]), default=None)
@common
def segment_run(run_dir, rounds, budget, strategy, executor, configs, overrides, address, quiet):
    """Run (or resume) the pixel loop: candidates -> select -> label -> train the head -> mIoU."""
    from poolscout.jobs.segment import run_segmentation

    ov = list(overrides) + ([f"segment.budget={budget}"] if budget else []) + (
        [f"segment.strategy={strategy}"] if strategy else [])
    run, cfg = _load(run_dir, configs, ov)
    ex = executor or cfg.loop.executor
    if ex == "ray":
        _ray(cfg, address, quiet, run)
    res = run_segmentation(run, cfg, rounds=rounds, executor=ex, progress=not quiet, overrides=ov,
                           log=lambda m: click.echo(m, err=True))
    _print({"rounds": [{"round": m["round"], "labeled_pixels": m["labeled_pixels"], "miou": m["eval"]["miou"]}
                       for m in res["rounds"]], **({"pending": res["pending"]} if "pending" in res else {})})


@segment.command("import")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--points", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV (image, x, y, class) or COCO keypoints JSON of labeled pixels.")
@click.option("--cycle", type=int, default=None, help="Round the labels answer (default: the newest).")
@common
def segment_import(run_dir, points, cycle, configs, overrides, address, quiet):
    """Add people's point labels to the pixel ledger (a pixel labeled already is skipped)."""
    from poolscout.jobs.segment import import_points

    run, cfg = _load(run_dir, configs, overrides)
    _print(import_points(run, cfg, points, cycle=cycle))


@segment.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--images", "max_images", type=int, default=8, show_default=True, help="Images per round's overlay.")
@_guard
def segment_report(run_dir, out_dir, max_images):
    """mIoU against labeled pixels, per-class IoU per round, and each round's picks on the images."""
    from poolscout.engine.evaluation.seg_report import write_report

    click.echo(str(write_report(run_dir, out_dir, max_images=max_images)))


@cli.command("refine")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--init", "init", type=click.Choice(["roi", "segmentation", "random"]), default="roi", show_default=True,
              help="Initial masks: boxes filled (ROI), PNG masks from --init-masks, or uniform noise.")
@click.option("--init-masks", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of initial PNG masks for --init segmentation (image source key with .png).")
@click.option("--mode", type=click.Choice(["a", "b", "c"]), default="c", show_default=True,
              help="Feedback: a = update the mask, b = a user-refined set training draws from, c = both.")
@click.option("--anchors", type=click.Choice(["entropy", "random"]), default="entropy", show_default=True)
@click.option("--relabel", type=click.Choice(["centre", "patch"]), default="centre", show_default=True,
              help="Mode a/c: relabel the centre pixel or the whole patch.")
@click.option("--patch", type=int, default=32, show_default=True, help="Patch side in pixels.")
@click.option("--per-image", type=int, default=32, show_default=True, help="Patch centres per pool image.")
@click.option("--retrain-every", type=int, default=50, show_default=True, help="Answers between retrains.")
@click.option("--steps", type=int, default=150, show_default=True, help="Training steps (batches of 128) per retrain.")
@click.option("--max-images", type=int, default=0, help="Use at most this many pool images (0: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ray-train", is_flag=True, help="Retrain as a Ray Train job (default: in this process).")
@click.option("--restart", is_flag=True, help="Set an earlier session with other settings aside and start anew.")
@click.option("--simulate", type=int, default=None, metavar="N",
              help="No page: answer N anchors with the simulated expert (from the run's masks or boxes) and "
                   "print the held-out F1 after each retrain.")
@click.option("--shift/--no-shift", default=True, help="--simulate: let the simulated expert shift patches.")
@click.option("--port", type=int, default=0, help="Port on 127.0.0.1 (0: a free one).")
@click.option("--token", default=None, help="Access token (default: a random one, printed in the URL).")
@click.option("--address", default=None, envvar="RAY_ADDRESS", help="Ray cluster for --ray-train.")
@_guard
def refine_cmd(run_dir, init, init_masks, mode, anchors, relabel, patch, per_image, retrain_every, steps, max_images,
               seed, ray_train, restart, simulate, shift, port, token, address):
    """Refine defect masks with active similarity learning: serve the page on 127.0.0.1.

    \b
    The page shows an anchor patch with its 5 hardest positives and 5 hardest negatives;
    mark those that match the anchor, shift a patch onto the defect with the arrow keys,
    undo, retrain. Every answer is stored in RUN/refine/answers.jsonl as it is given, so a
    closed browser or a killed server loses nothing: the same command resumes.
    """
    from poolscout.jobs.refine import RefineSession

    if ray_train:
        from poolscout.jobs.ray_env import connect

        connect(address, log_dir=Path(run_dir) / "logs")
    session = RefineSession(run_dir, init=init, init_masks=init_masks, mode=mode, anchors=anchors, relabel=relabel,
                            patch=patch, per_image=per_image, retrain_every=retrain_every, steps=steps,
                            max_images=max_images, seed=seed, executor="ray" if ray_train else "local",
                            restart=restart, log=click.echo)
    st = session.state()
    click.echo(f"refine: {st['patches']} patches of {len(st['images'])} images, model v{st['model_version']}, "
               f"{st['answers']} answers so far" + (f", held-out F1 {st['f1']:.3f}" if st["f1"] is not None else ""))
    if simulate is not None:
        def show(r):
            f1 = "-" if r["f1"] is None else f"{r['f1']:.3f}"
            click.echo(f"  v{r['model_version']}: {r['answers_used']} answers, F1 {f1} ({r['seconds']:.1f} s)")

        session.simulate(simulate, shift=shift, on_retrain=show)
        _print(session.state(), ["answers", "model_version", "f1"])
        return
    from poolscout.jobs.refine_web import serve

    serve(session, port=port, token=token)


@cli.command("tune")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", required=True, help="Strategy name (configs/strategies) or YAML path.")
@click.option("--space", default=None, help="Search space: a YAML path or a name in configs/tune "
                                            "(default: the strategy's name).")
@click.option("--trials", type=int, default=8, show_default=True)
@click.option("--cycles", type=int, default=3, show_default=True, help="Simulated rounds per trial.")
@click.option("--budget", type=int, default=None, help="Images per round (default: 15% of a split's pool).")
@click.option("--seed-size", type=int, default=None, help="Seed set (default: 15% of a split's pool).")
@click.option("--grace", type=int, default=1, show_default=True, help="Rounds before ASHA may stop a trial.")
@click.option("--seed", type=int, default=0, show_default=True, help="Splits, seed sets and the search.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: RUN/tune/<strategy>.")
@common
def tune_cmd(run_dir, strategy, space, trials, cycles, budget, seed_size, grace, seed, out, configs, overrides,
             address, quiet):
    """Tune a strategy's weights with Ray Tune by simulated loops on the run's labeled images.

    \b
    The labeled images are split in halves A and B. Trials (ASHA-stopped) search the space on
    A, each a simulated loop scored by the AULC of mAP50; the best becomes a strategy file
    (RUN/tune/<strategy>/best_<strategy>.yaml), and the defaults and the best are run on B,
    which the search never saw.
    """
    from poolscout.jobs.tune import tune

    run, cfg = _load(run_dir, configs, overrides)
    _ray(cfg, address, quiet, run)
    doc = tune(run, cfg, strategy=strategy, space=space or strategy, trials=trials, cycles=cycles, budget=budget,
               seed_size=seed_size, grace=grace, seed=seed, out=out, config_files=list(configs),
               extra_overrides=list(overrides), progress=not quiet, log=lambda m: click.echo(m, err=True))
    _print({k: doc[k] for k in ("strategy", "best_params", "aulc", "verdict", "best_strategy_file", "seconds")})


@cli.command("strategies")
@_guard
def strategies_cmd():
    """List the shipped strategies."""
    from poolscout.engine.acquisition.strategies import list_strategies, load_strategy

    for name in list_strategies():
        s = load_strategy(name)
        click.echo(f"{name:22s} {s.description}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="poolscout")


if __name__ == "__main__":
    main()
