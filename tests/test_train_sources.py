"""`experiments.train_sources`: a CI-sized run of the real command, resume and skipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from experiments import sources
from experiments.configs import expand_config_argument
from experiments.configs.digits import get_config
from experiments.sources import train_sources
from grasp_jax import checkpoints

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(digits_dir):
    config = get_config()
    config.data_dir = str(digits_dir)
    config.bins = ("d0", "d1")
    config.pretrain.epochs = 1
    config.source_training.epochs = 2
    return config


def test_sources_share_one_init_and_are_skipped_when_done(digits_dir, tmp_path):
    config = tiny_config(digits_dir)
    summary = train_sources(config, tmp_path)
    assert list(summary) == ["d0", "d1"]
    for bin_name, meta in summary.items():
        assert meta["bin"] == bin_name and meta["dataset"] == "digits_drift"
        assert len(meta["history"]) == 2 and "jax" in meta["versions"]
        assert meta["best_val_accuracy"] == max(h["val_accuracy"] for h in meta["history"])
    assert checkpoints.is_complete(sources.source_dir(config, tmp_path, "_pretrained"))
    assert summary["d0"]["seed"] != summary["d1"]["seed"]
    marker = sources.source_dir(config, tmp_path, "d0") / "metadata.json"
    stamp = marker.stat().st_mtime_ns
    events = sorted((tmp_path / "tensorboard").iterdir())
    again = train_sources(config, tmp_path)  # everything is there: nothing retrains
    assert marker.stat().st_mtime_ns == stamp and again == summary
    assert sorted((tmp_path / "tensorboard").iterdir()) == events  # no empty event file
    restored = sources.restore_source(config, tmp_path, "d1")
    assert set(restored) == {"params", "batch_stats"}


def test_config_names_resolve_and_unknown_ones_list_the_choices():
    (arg,) = expand_config_argument(["--config=digits:x"])
    assert arg.endswith("experiments/configs/digits.py:x")
    assert expand_config_argument(["--config=my/own.py"]) == ["--config=my/own.py"]
    with pytest.raises(
        SystemExit,
        match="unknown config 'clear1000'; available: clear10, clear100, digits, yearbook",
    ):
        expand_config_argument(["--config=clear1000"])


def train_sources_command(workdir, *overrides: str, timeout: int) -> None:
    """`python -m experiments.train_sources --config=digits` as a user runs it."""
    command = [sys.executable, "-m", "experiments.train_sources", "--config=digits"]
    subprocess.run(
        [*command, f"--workdir={workdir}", *overrides],
        cwd=ROOT,
        check=True,
        timeout=timeout,
        capture_output=True,
    )


@pytest.mark.slow
def test_command_line_default_config(tmp_path):
    """The full default: pretraining and all five sources (about two minutes)."""
    train_sources_command(tmp_path, timeout=1200)
    for bin_name in get_config().bins:
        meta = checkpoints.read_metadata(
            tmp_path / "sources/digits_drift/small_cnn" / bin_name
        )
        assert meta["best_val_accuracy"] >= 0.7


def test_command_line_overrides(digits_dir, tmp_path):
    """The command itself with --config.* overrides, as CI's small version."""
    train_sources_command(
        tmp_path,
        f"--config.data_dir={digits_dir}",
        "--config.bins=('d2',)",
        "--config.pretrain.epochs=1",
        "--config.source_training.epochs=1",
        timeout=600,
    )
    assert checkpoints.is_complete(tmp_path / "sources/digits_drift/small_cnn/d2")
    assert not (tmp_path / "sources/digits_drift/small_cnn/d0").exists()
