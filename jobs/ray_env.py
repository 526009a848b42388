"""Connect to a Ray cluster (RAY_ADDRESS / --address) or start the embedded local Ray, and
keep Ray's own output off poolscout's console.

By default the console shows only poolscout's lines (a progress bar per stage, a summary
line per stage, errors in full). Ray's driver-side logs (the "ray" loggers) go to
`<log_dir>/ray-driver.log`, its workers' stdout/stderr stay in the Ray session's log
folder (linked as `<log_dir>/ray-session`), and Ray Data's progress bars are off;
`verbose=True` brings all of it back to the console.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import ray

# Where the current process's Ray logs go (printed with errors); None until `connect`.
LOG_DIR: Path | None = None
# Process-wide default of `connect(verbose=...)`: the CLI's --verbose sets it.
VERBOSE = False
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def _route_ray_logs(log_dir: Path | None, verbose: bool) -> None:
    """Send the driver-side "ray" loggers to a file (or nowhere) instead of the console."""
    if verbose:
        return
    handler: logging.Handler
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / "ray-driver.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    for name in _RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False


_DATA_LOGGING = """\
# written by poolscout: Ray Data logs to its session file only, not to the console
version: 1
disable_existing_loggers: false
formatters:
  ray:
    format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"
handlers:
  file:
    class: ray.data._internal.logging.SessionFileHandler
    formatter: ray
    filename: ray-data.log
loggers:
  ray.data:
    level: DEBUG
    handlers: [file]
    propagate: false
"""


def _quiet_ray_data(log_dir: Path | None) -> None:
    """Ray Data reconfigures its logger at every execution from $RAY_DATA_LOGGING_CONFIG."""
    import tempfile

    folder = log_dir if log_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ray-data-logging.yaml"
    path.write_text(_DATA_LOGGING)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    # Ray's C++ core prints warnings of the driver process straight to stderr
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()
    except Exception:  # noqa: BLE001 - private API; the env var alone covers later executions
        pass


@contextlib.contextmanager
def _stderr_to(path: Path | None):
    """Point file descriptor 2 at `path` (or /dev/null) for the duration: Ray's C++ core and
    the processes ray.init starts write there directly, past Python's sys.stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters)
        yield
        return
    target = open(path, "ab") if path is not None else open(os.devnull, "wb")  # noqa: SIM115
    try:
        os.dup2(target.fileno(), 2)
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        target.close()


def _link_session_logs(log_dir: Path) -> None:
    """`<log_dir>/ray-session` -> this Ray session's log folder (embedded Ray only)."""
    try:
        from ray._private import worker as _worker

        node = getattr(_worker, "_global_node", None)
        logs = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - a private API; the link is a convenience
        logs = None
    if logs is None or not logs.is_dir():
        return
    link = log_dir / "ray-session"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
    except OSError:
        pass


def _loopback_only() -> None:
    """Make the embedded local Ray listen on 127.0.0.1 only.

    Ray resolves a node IP of 127.0.0.1 to the machine's address unless clusters are off
    for the platform (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's own switch for laptops);
    with it, GCS, raylet, object manager, workers and the agents bind to the loopback
    address instead of all interfaces. The variable reaches the processes ray.init starts;
    the driver reads Ray's constant at call time, which is set here too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except Exception:  # noqa: BLE001 - private API; the env var covers the started processes
        pass


def _registry_dir() -> Path:
    import tempfile

    if os.environ.get("POOLSCOUT_RAY_REGISTRY"):
        return Path(os.environ["POOLSCOUT_RAY_REGISTRY"])
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"poolscout-{uid}" / "ray-sessions"


def _record_session() -> None:
    """Note the processes this driver's embedded Ray started (pid + start time), so a later
    `poolscout` can stop the ones a killed driver left behind (see `reap_orphans`)."""
    try:
        import psutil

        me = psutil.Process()
        procs = [{"pid": c.pid, "created": c.create_time()} for c in me.children(recursive=True)]
        d = _registry_dir()
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{me.pid}.json").write_text(json.dumps({"driver": me.pid, "created": me.create_time(), "procs": procs}))
    except Exception:  # noqa: BLE001 - bookkeeping only
        pass


def reap_orphans(registry: Path | None = None) -> int:
    """Stop the processes left by embedded Rays whose driver died (e.g. killed with SIGKILL).

    Only processes recorded by `_record_session` are touched, and only while their start
    time still matches (a reused pid is left alone). Returns how many were stopped.
    """
    import psutil

    d = registry or _registry_dir()
    stopped = []
    for rec_file in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(rec_file.read_text())
        except (OSError, ValueError):
            rec_file.unlink(missing_ok=True)
            continue
        try:
            alive = psutil.Process(int(rec["driver"])).create_time() == rec["created"]
        except (psutil.Error, KeyError, ValueError, TypeError):
            alive = False
        if alive:
            continue
        for p in rec.get("procs", []):
            try:
                proc = psutil.Process(int(p["pid"]))
                if proc.create_time() == p["created"]:
                    proc.terminate()
                    stopped.append(proc)
            except (psutil.Error, KeyError, ValueError, TypeError):
                pass
        rec_file.unlink(missing_ok=True)
    _, slow = psutil.wait_procs(stopped, timeout=5)
    for proc in slow:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(stopped)


def _forget_session() -> None:
    with contextlib.suppress(OSError):
        (_registry_dir() / f"{os.getpid()}.json").unlink()


def connect(address: str | None = None, num_cpus: int = 0, quiet: bool = False, *, verbose: bool | None = None,
            log_dir: str | Path | None = None) -> dict:
    """Initialise Ray once per process.

    Args:
        address: a cluster address ("ray://host:10001", "host:6379", "auto"); falls back to
            the RAY_ADDRESS environment variable; without either an embedded local Ray starts.
        num_cpus: CPUs of the embedded local Ray (0 = all cores); ignored for a cluster.
        quiet: kept for callers that only want Ray silent (the default now).
        verbose: relay Ray's driver and worker logs and Ray Data's progress bars to the console
            (default: VERBOSE).
        log_dir: folder for Ray's driver log and a link to the session's worker logs
            (RUN/logs for the CLI).

    Returns:
        {"address": ..., "cpus": float, "gpus": float, "logs": str | None}
    """
    global LOG_DIR
    verbose = VERBOSE if verbose is None else bool(verbose)
    if not ray.is_initialized():
        log_dir = Path(log_dir) if log_dir is not None else None
        if not verbose:
            _quiet_ray_data(log_dir)
        _route_ray_logs(log_dir, verbose)
        addr = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {"log_to_driver": bool(verbose), "include_dashboard": False,
                        "logging_level": logging.INFO if verbose else logging.WARNING}
        with contextlib.nullcontext() if verbose else _stderr_to(
                (log_dir / "ray-init.log") if log_dir is not None else None):
            if addr:
                ray.init(address=addr, **kwargs)
            else:
                reaped = reap_orphans()
                _loopback_only()
                ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
                _record_session()
                atexit.register(_forget_session)
                if reaped:
                    logging.getLogger("ray").warning("stopped %d Ray processes an earlier killed run left", reaped)
        _route_ray_logs(log_dir, verbose)  # ray.init may have (re)configured its loggers
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(verbose)
        for attr in ("enable_operator_progress_bars", "print_on_execution_start"):
            if hasattr(ctx, attr):
                setattr(ctx, attr, bool(verbose))
        if log_dir is not None:
            LOG_DIR = log_dir
            if not addr:
                _link_session_logs(log_dir)
    res = ray.cluster_resources()
    return {"address": ray.get_runtime_context().gcs_address, "cpus": res.get("CPU", 0.0),
            "gpus": res.get("GPU", 0.0), "logs": str(LOG_DIR) if LOG_DIR else None}


def is_local() -> bool:
    """Whether the connected Ray is an embedded single-node instance started by this process."""
    if not ray.is_initialized():
        return True
    return len([n for n in ray.nodes() if n.get("Alive")]) <= 1 and not os.environ.get("RAY_ADDRESS")
