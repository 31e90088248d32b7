"""How the commands end on a user's mistake: one line that names it and the fix, exit
status 1, no traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from data.folder_layout import LayoutError
from experiments import distributed, methods, settings
from experiments.configs import CONFIG_DIR
from experiments.settings import ConfigError
from grasp_jax.checkpoints import CheckpointError
from grasp_jax.files import OutputError
from grasp_jax.interop import InteropError

USER_ERRORS = (ConfigError, CheckpointError, InteropError, LayoutError, OutputError)


def define_config_flags() -> None:
    """`--config` (a file under experiments/configs, with `:key=value` arguments and
    `--config.<key>=` overrides) and `--workdir`, as every experiment command takes."""
    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
    flags.DEFINE_string("workdir", None, "Output folder (default runs/<config>).")


def define_experiment_flags() -> None:
    """The flags of the experiment commands: the config, the work folder, multi-host."""
    define_config_flags()
    distributed.define_flags()


def run_experiment_command(command: str, work):
    """Joins the job, reads `--config` and `--workdir`, checks the folder and runs
    `work(config, workdir)` with one-line user errors; returns (config, workdir, result)."""
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    distributed.initialize()
    config, workdir = config_and_workdir()
    with one_line_errors(command):
        settings.check(config, methods.REGISTRY)  # before the folder is made
        check_workdir(workdir)
        return config, workdir, work(config, workdir)


def config_and_workdir():
    """The parsed `--config` and `--workdir` (default `runs/<config name>`)."""
    config = flags.FLAGS.config
    return config, Path(flags.FLAGS.workdir or f"runs/{config.name}").expanduser()


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
