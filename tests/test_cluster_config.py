"""cluster.yaml: Ray's own cluster-launcher validation accepts it, and it keeps the promises
its comments make (token authentication on every node, the dashboard on 127.0.0.1 only, the
token file shipped, the project installed)."""
from __future__ import annotations

import yaml

from tests.conftest import REPO


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_config())  # fills the launcher's defaults, as `ray up` does
    validate_config(cfg)  # Ray's JSON schema and its own consistency checks; raises on a bad config
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values())


def test_cluster_yaml_starts_every_node_with_token_auth_and_a_private_dashboard():
    cfg = _config()
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address=" in workers
    assert any(dst.endswith("/.ray/auth_token") for dst in cfg["file_mounts"])  # the token reaches every node
    assert any("pip install" in c and "poolscout" in c for c in cfg["setup_commands"])
    # the head only schedules: no scoring or training lands on it
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_rays_validation_would_catch_a_broken_config():
    """The check above can fail: the same validation refuses a config with a wrong type or a
    head node type that does not exist."""
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = {**_config(), "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**_config(), "head_node_type": "nope"}))
