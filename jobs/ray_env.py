"""Connect to a Ray cluster (RAY_ADDRESS / --address) or start the embedded local Ray."""
from __future__ import annotations

import logging
import os

import ray


def connect(address: str | None = None, num_cpus: int = 0, quiet: bool = False) -> dict:
    """Initialise Ray once per process.

    Args:
        address: a cluster address ("ray://host:10001", "host:6379", "auto"); falls back to
            the RAY_ADDRESS environment variable; without either an embedded local Ray starts.
        num_cpus: CPUs of the embedded local Ray (0 = all cores); ignored for a cluster.
        quiet: hide Ray's own INFO logs (tests).

    Returns:
        {"address": ..., "local": bool, "cpus": float}
    """
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {"log_to_driver": not quiet, "include_dashboard": False}
        if quiet:
            kwargs["logging_level"] = logging.WARNING
        if addr:
            ray.init(address=addr, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not quiet
    res = ray.cluster_resources()
    return {"address": ray.get_runtime_context().gcs_address, "cpus": res.get("CPU", 0.0),
            "gpus": res.get("GPU", 0.0)}
