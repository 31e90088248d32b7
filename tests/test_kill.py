"""Crash safety: a small experiment killed with SIGKILL at ten points (data build, source
training, checkpoint saves, GRASP's merge, result writes, the summary) reruns to the
end, redoes only unfinished work, and ends bit-identical to an uninterrupted run.

Each point costs two subprocess runs (~40 s); CI runs three of them, `make test-kill` (or
`pytest -m slow tests/test_kill.py`) runs all ten and the check that two fresh work
folders agree (in CI, each resumed run already recomputes everything after its kill point
in a second process and must equal the uninterrupted run).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
def uninterrupted(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(workdir)


@pytest.mark.slow
def test_two_fresh_work_directories_give_bit_identical_results(uninterrupted, tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outcome(tmp_path) == uninterrupted
    assert len(uninterrupted) >= 12  # 3 runs x 3 files, summary, source matrix, sources


KILL_POINTS = [
    ("data_build", 100, True),  # inside TFDS's generation of the first bin
    ("train_step", 10, True),  # mid-epoch, pretraining
    ("epoch_checkpoint", 2, False),  # an epoch's (asynchronous) checkpoint in flight
    ("save_variables", 2, True),  # a source trained, not yet saved
    ("saved_variables", 3, True),  # a source saved, its training state not removed
    ("merge", 1, False),  # between GRASP's merge and its fine-tuning
    ("result_rename", 3, False),  # a result file written to its temp file, not renamed
    ("write_run", 1, True),  # between two methods
    ("source_matrix", 1, True),  # sources done, nothing run
    ("summary", 1, True),  # every run done, the summary not written
]


@pytest.mark.parametrize(
    ("point", "n"),
    [
        pytest.param(point, n, marks=[pytest.mark.slow] if slow else [], id=point)
        for point, n, slow in KILL_POINTS
    ],
)
def test_a_killed_experiment_resumes_to_the_same_results(uninterrupted, tmp_path, point, n):
    killed = run(tmp_path, point, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert outcome(tmp_path) != uninterrupted  # it really stopped before the end
    done = finished_work(tmp_path)
    rerun = run(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outcome(tmp_path) == uninterrupted
    after = finished_work(tmp_path)
    redone = sorted(p for p in done if after.get(p) != done[p])
    assert not redone, f"finished work was redone after a kill at {point}: {redone}"
