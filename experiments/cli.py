"""How the commands end on a user's mistake: one line that names it and the fix, exit
status 1, no traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from data.folder_layout import LayoutError
from experiments.report import OutputError
from experiments.settings import ConfigError
from grasp_jax.checkpoints import CheckpointError
from grasp_jax.interop import InteropError

USER_ERRORS = (ConfigError, CheckpointError, InteropError, LayoutError, OutputError)


@contextlib.contextmanager
def one_line_errors(command: str):
    """Turns USER_ERRORS raised inside into `command: message` on stderr and exit 1."""
    try:
        yield
    except USER_ERRORS as err:
        raise SystemExit(f"{command}: {err}") from None


def check_workdir(workdir: Path) -> None:
    """A work directory must be a folder we can write to: checked before any work."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file; pass a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"--workdir={workdir} cannot be created ({err.strerror})"
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir} is not writable; pass a folder you own")
