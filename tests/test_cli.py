"""CLI smoke tests: help texts, and errors that name the bad key, file or field."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from poolscout.engine.core.config import ConfigError, load_config
from poolscout.jobs.cli import cli

COMMANDS = ["init", "train", "score", "select", "export", "cycle", "synth", "strategies"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    res = CliRunner().invoke(cli, [cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage:" in res.output
    if cmd not in ("synth", "strategies"):
        assert "--set" in res.output and "--config" in res.output


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "poolscout.jobs", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cycle" in out.stdout


def test_unknown_set_key_is_named(tmp_path, tiny_pool):
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--images", str(tiny_pool["images"]),
                                   "--set", "train.epocs=3"])
    assert res.exit_code == 2
    assert "train.epocs" in res.output and "epochs" in res.output


def test_bad_value_type_is_named(tmp_path, tiny_pool):
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--images", str(tiny_pool["images"]),
                                   "--set", "train.batch_size=many"])
    assert res.exit_code == 2 and "train.batch_size" in res.output


def test_bad_config_file_is_named(tmp_path, tiny_pool):
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector:\n  nam: x\n")
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--images", str(tiny_pool["images"]),
                                   "--config", str(bad)])
    assert res.exit_code == 2 and "bad.yaml" in res.output and "detector.nam" in res.output


def test_commands_on_a_missing_run_fail_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    for cmd in (["train"], ["score"], ["select", "--budget", "3"], ["export"]):
        res = CliRunner().invoke(cli, [cmd[0], str(tmp_path / "empty"), *cmd[1:]])
        assert res.exit_code == 2, (cmd, res.output)
        assert "not an initialised run" in res.output


def test_labeled_and_fraction_are_exclusive(tmp_path, tiny_pool):
    ids = tmp_path / "ids.txt"
    ids.write_text("syn_00000\n")
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "r"), "--images", str(tiny_pool["images"]),
                                   "--annotations", str(tiny_pool["annotations"]),
                                   "--labeled", str(ids), "--seed-fraction", "0.1"])
    assert res.exit_code == 2 and "not both" in res.output


def test_config_layers_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\nscore:\n  views: [orig]\n")
    cfg = load_config([f], ["train.epochs=7", "select.budget=3"])
    assert cfg.train.epochs == 7 and cfg.select.budget == 3 and cfg.score.views == ("orig",)
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config([], ["train.epochs=1.5"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config([], ["train.epochs"])


def test_unknown_strategy_lists_known(tmp_path):
    from poolscout.engine.acquisition.strategies import load_strategy

    with pytest.raises(Exception) as e:
        load_strategy("no_such_strategy")
    assert "no_such_strategy" in str(e.value)
