"""Runs `experiments.main` and kills itself with SIGKILL at one chosen point.

    python -m tests.kill_worker POINT N -- <experiments.main arguments>

POINT names a function (below); on its N-th call the process sends itself SIGKILL, so
nothing is flushed, closed or cleaned up, as when a machine dies. `test_kill.py` reruns
the experiment after each kill and compares its results with an uninterrupted run.
Without POINT (`-`) the experiment runs to the end.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(owner, name: str, n: int, *, after: bool) -> None:
    """Replaces `owner.name` by a wrapper that dies on its n-th call (before or after
    the original ran)."""
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            _die()
        result = original(*args, **kwargs)
        if calls[0] == n and after:
            _die()
        return result

    setattr(owner, name, wrapper)


class _DyingOs:
    """`os` for one module, whose `replace` dies on its n-th call: the temp file is
    written, the rename never happens."""

    def __init__(self, n: int):
        self._n, self._calls = n, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        self._calls += 1
        if self._calls == self._n:
            _die()
        os.replace(src, dst)


def _dying_generator(owner, name: str, n: int) -> None:
    """A generator method that dies after yielding n items (mid data build)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        for i, item in enumerate(original(*args, **kwargs)):
            if i == n:
                _die()
            yield item

    setattr(owner, name, wrapper)


def _install(point: str, n: int) -> None:
    from data.digits_drift import DigitsDrift
    from experiments import report
    from grasp_jax import checkpoints, files, grasp, train

    points = {
        "data_build": lambda: _dying_generator(DigitsDrift, "_generate_examples", n),
        "train_step": lambda: _kill_on_call(train, "train_step", n, after=True),
        "epoch_checkpoint": lambda: _kill_on_call(
            checkpoints.TrainProgress, "save", n, after=True
        ),
        "save_variables": lambda: _kill_on_call(
            checkpoints, "save_variables", n, after=False
        ),
        "saved_variables": lambda: _kill_on_call(
            checkpoints, "save_variables", n, after=True
        ),
        "merge": lambda: _kill_on_call(grasp, "library_stage", n, after=True),
        "result_rename": lambda: setattr(files, "os", _DyingOs(n)),
        "write_run": lambda: _kill_on_call(report, "write_run", n, after=True),
        "source_matrix": lambda: _kill_on_call(
            report, "write_source_matrix", n, after=False
        ),
        "summary": lambda: _kill_on_call(report, "write_summary", n, after=False),
    }
    points[point]()


POINTS = (
    "data_build",
    "train_step",
    "epoch_checkpoint",
    "save_variables",
    "saved_variables",
    "merge",
    "result_rename",
    "write_run",
    "source_matrix",
    "summary",
)


def main() -> None:
    point, n, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: python -m tests.kill_worker POINT N -- ARGS"
    if point != "-":
        _install(point, int(n))
    from absl import app

    from experiments import main as experiment
    from experiments.configs import expand_config_argument

    experiment.define_flags()  # as `python -m experiments.main` does
    app.run(experiment.main, argv=expand_config_argument(["experiments.main", *args]))


if __name__ == "__main__":
    importlib.import_module("experiments")  # the repository root is on sys.path
    main()
