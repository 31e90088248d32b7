"""Crash safety: a small experiment killed with SIGKILL at ten points (data build, source
training, checkpoint saves, GRASP's merge, result writes, the summary) reruns to the
end, redoes only unfinished work, and ends bit-identical to an uninterrupted run.

Each point costs two subprocess runs (~40 s). `make test-kill` (or `pytest -m slow
tests/test_kill.py`) runs all ten one by one, and the check that two fresh work folders
agree. CI runs their small twin: one work folder killed at three of the points in turn,
each rerun resuming what the one before left (~half the time of three separate points,
with the same checks after every process).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pinned_experiment

REPO = Path(__file__).resolve().parents[1]
CONFIG = (
    "--config=digits:bins=d0+d1+d2,targets=d1,trials=1,pretrain.epochs=1,"
    "source_training.epochs=1,grasp.initial_epochs=1,grasp.finetune_epochs=1,"
    "methods=grasp+ensemble+target_only"
)
# Values that measure the machine, not the model: never compared.
VOLATILE = re.compile(r"time|seconds|minutes|per_second|memory|_mb$|_gb$")
# Files whose presence means a piece of work is finished (never redone on a rerun).
FINISHED = ("sources/**/checksums.json", "results/**/metrics.json")


def run(workdir: Path, point: str = "-", n: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tests.kill_worker", point, str(n), "--", CONFIG]
    return subprocess.run(
        [*command, f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def stable(value):
    """`value` without the keys that measure time or memory."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def outcome(workdir: Path) -> dict:
    """Every result and every source's weight checksum, machine-dependent values out."""
    files = [
        *workdir.glob("results/**/*.json"),
        *workdir.glob("sources/**/checksums.json"),
    ]
    return {
        str(p.relative_to(workdir)): stable(json.loads(p.read_text()))
        for p in sorted(files)
        if p.name != "memory_profile.json"
    }


def finished_work(workdir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for pattern in FINISHED
        for p in workdir.glob(pattern)
    }


@pytest.fixture(scope="module")
def uninterrupted(small_sources, digits_dir, tmp_path_factory) -> dict:
    """The experiment run to the end, from the test session's sources and data set (the
    same settings: the runs after a kill build and train theirs and must match them bit
    for bit)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    (workdir / "tfds").symlink_to(digits_dir)  # where the config looks for its data
    result = run(pinned_experiment.with_sources(small_sources, workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(workdir)


@pytest.mark.slow
def test_two_fresh_work_directories_give_bit_identical_results(uninterrupted, tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outcome(tmp_path) == uninterrupted
    assert len(uninterrupted) >= 12  # 3 runs x 3 files, summary, source matrix, sources


# (point, n): the process kills itself on the n-th call at `point` (tests/kill_worker.py).
KILL_POINTS = [
    ("data_build", 100),  # inside TFDS's generation of the first bin
    ("train_step", 10),  # mid-epoch, pretraining
    ("epoch_checkpoint", 2),  # an epoch's (asynchronous) checkpoint in flight
    ("save_variables", 2),  # a source trained, not yet saved
    ("saved_variables", 3),  # a source saved, its training state not removed
    ("merge", 1),  # between GRASP's merge and its fine-tuning
    ("result_rename", 3),  # a result file written to its temp file, not renamed
    ("write_run", 1),  # between two methods
    ("source_matrix", 1),  # sources done, nothing run
    ("summary", 1),  # every run done, the summary not written
]


def kill_then_finish(workdir: Path, kills: list[tuple[str, int]], uninterrupted: dict):
    """Runs the experiment in `workdir` once per kill point, each run killed there and
    resuming the one before, then once to the end: every kill must really stop it, no
    run may redo what an earlier one finished, and the end must equal `uninterrupted`."""
    for point, n in [*kills, ("-", 0)]:
        done = finished_work(workdir)
        result = run(workdir, point, n)
        if point == "-":
            assert result.returncode == 0, result.stderr[-3000:]
            assert outcome(workdir) == uninterrupted
        else:
            assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])
            assert outcome(workdir) != uninterrupted, f"no kill at {point}"
        after = finished_work(workdir)
        redone = sorted(p for p in done if after.get(p) != done[p])
        which = "the last run" if point == "-" else f"the run killed at {point}"
        assert not redone, f"{which} redid finished work: {redone}"


@pytest.mark.slow
@pytest.mark.parametrize(("point", "n"), KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_a_killed_experiment_resumes_to_the_same_results(uninterrupted, tmp_path, point, n):
    kill_then_finish(tmp_path, [(point, n)], uninterrupted)


def test_an_experiment_killed_three_times_resumes_to_the_same_results(
    uninterrupted, tmp_path
):
    """CI's twin of the ten: an epoch checkpoint in flight, between GRASP's merge and
    its fine-tuning, a result file written but not renamed, one after the other."""
    kills = [("epoch_checkpoint", 2), ("merge", 1), ("result_rename", 3)]
    kill_then_finish(tmp_path, kills, uninterrupted)
