"""Data parallel training on 8 forced CPU devices matches the 1-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import stage_worker, worker_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> str:
    """small_cnn's variables for the workers (`tests.worker_files`)."""
    return str(worker_files.save_start(tmp_path_factory.mktemp("start") / "start.npz"))


@pytest.fixture(scope="module")
def one_device_stage(digits_dir, start):
    """(variables, MergeStats) of the stage the sharded tests run, on one device."""
    steps, current, source, batches, key = stage_worker.stage_inputs(digits_dir, start)
    merged, stats = steps.stage(current, source, batches, key, key)
    return jax.tree.map(np.asarray, merged), stats


def run_fit(data_dir, start, out: Path, devices: int, epochs: int = 2) -> tuple[dict, dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fit_worker",
            str(data_dir),
            start,
            str(out),
            str(epochs),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    with open(str(out) + ".json") as f:
        meta = json.load(f)
    return dict(np.load(str(out) + ".npz")), meta


def test_eight_devices_match_one(digits_dir, start, tmp_path):
    """Same batch, same gradients and BatchNorm statistics; same training curve.

    Parameters after AdamW training are not compared: Adam moves every entry by about
    the learning rate whatever its gradient's size, so entries whose gradient is near
    zero take the sign of float noise (measured: 0.015 apart after 7 steps, while the
    losses agree to 1e-5 and the validation accuracy is identical)."""
    one, meta_one = run_fit(digits_dir, start, tmp_path / "one", devices=1)
    eight, meta_eight = run_fit(digits_dir, start, tmp_path / "eight", devices=8)
    assert meta_one["devices"] == 1 and meta_eight["devices"] == 8
    step = [k for k in one if k.startswith("step")]
    assert len(step) == 17  # 11 parameter gradients, 6 BatchNorm statistics
    for key in step:
        scale = np.abs(one[key]).max()
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-3, atol=1e-4 * scale)
    for a, b in zip(meta_one["history"], meta_eight["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3
        assert a["val_accuracy"] == b["val_accuracy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_train_one_replicated_model(digits_dir, start, tmp_path):
    """jax.distributed with the CPU backend's gloo collectives, one device a process:
    both processes hold the same model, and it is the model one process with two devices
    trains (the same sharding; only the all-reduce's transport differs)."""
    port = str(free_port())
    out = tmp_path / "multi"
    commands = [
        [
            sys.executable,
            "-m",
            "tests.fit_worker",
            str(digits_dir),
            start,
            str(out),
            "2",
            str(i),
            port,
        ]
        for i in range(2)
    ]
    workers = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in commands
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err.decode()[-2000:]
    results = []
    for i in range(2):
        with open(f"{out}.{i}.json") as f:
            meta = json.load(f)
        assert meta["processes"] == 2 and meta["devices"] == 2
        results.append((dict(np.load(f"{out}.{i}.npz")), meta["history"]))
    (params_0, history_0), (params_1, history_1) = results
    for key in params_0:
        np.testing.assert_array_equal(params_0[key], params_1[key])

    def numbers(history):  # all but the wall-clock throughput
        return [{k: v for k, v in h.items() if k != "images_per_second"} for h in history]

    assert numbers(history_0) == numbers(history_1)

    single, meta = run_fit(digits_dir, start, tmp_path / "single", devices=2)
    assert meta["processes"] == 1 and meta["devices"] == 2
    for key in (k for k in single if k.startswith("step")):
        scale = np.abs(single[key]).max()
        np.testing.assert_allclose(params_0[key], single[key], rtol=1e-5, atol=1e-6 * scale)
    for a, b in zip(history_0, meta["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert a["val_accuracy"] == b["val_accuracy"]


def test_a_model_sharded_over_eight_devices_keeps_its_layout(
    digits_dir, start, one_device_stage, tmp_path
):
    """merge_step, a GRASP stage, train_step and loop.fit on parameters sharded
    FSDP-style over 4 of 8 forced CPU devices: every parameter keeps its sharding and
    the results are the one-device ones (`tests/sharded_worker.py` asserts each; the
    stage's are compared here)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = tmp_path / "stage.npz"
    done = subprocess.run(
        [sys.executable, "-m", "tests.sharded_worker", str(digits_dir), start, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all checks held" in done.stdout
    want, want_stats = one_device_stage
    got = worker_files.load_tree(out, {"variables": want, "scores": want_stats.scores})
    close = np.testing.assert_allclose
    jax.tree.map(lambda a, b: close(a, b, atol=1e-4), got["scores"], want_stats.scores)
    stats = (got["variables"]["batch_stats"], want["batch_stats"])
    jax.tree.map(lambda a, b: close(a, b, rtol=1e-5, atol=1e-6), *stats)
    params = (got["variables"]["params"], want["params"])
    jax.tree.map(lambda a, b: close(a, b, rtol=0, atol=0), *params)


def test_two_processes_run_a_grasp_stage_on_a_model_split_between_them(
    digits_dir, start, request, tmp_path
):
    """gloo collectives, 2 devices a process, small_cnn sharded over all 4: the stage's
    merged parameters are the one-device stage's, bit for bit, in both processes."""
    port, out = str(free_port()), tmp_path / "stage"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stage_worker",
                str(digits_dir),
                start,
                str(out),
                str(i),
                port,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    want, want_stats = request.getfixturevalue("one_device_stage")  # as workers run
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err.decode()[-2000:]
    for i in range(2):
        with open(f"{out}.{i}.json") as f:
            result = json.load(f)
        assert (result["processes"], result["devices"]) == (2, 4)
        assert (
            result["processes_per_parameter"] == 2 and result["split_across_processes"] >= 4
        )
        assert abs(result["fraction"] - float(want_stats.fraction)) < 1e-6
        assert 0 < result["fraction"] < 1
        got = worker_files.load_tree(f"{out}.{i}.npz", want)
        # parameters bit for bit; statistics from sums that a sharded batch rounds apart
        for part, atol in (("params", 0), ("batch_stats", 1e-5)):
            for a, b in zip(
                jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), strict=True
            ):
                np.testing.assert_allclose(a, b, rtol=0, atol=atol)
