"""What every command shares: its flags, a fast `--help`, and how it ends on a user's
mistake (one line that names it and the fix, exit status 1, no traceback; anything else
is a bug and keeps its traceback). Light to import: JAX and the models load only once
the flags are parsed."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from experiments import configs, distributed
from experiments.configs import CONFIG_DIR

HELP_FLAGS = {"-h", "-?", "--help", "--helpshort", "--helpfull"}


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a user's mistake (imported when first needed)."""
    from data.folder_layout import LayoutError
    from experiments.settings import ConfigError
    from grasp_jax.checkpoints import CheckpointError
    from grasp_jax.files import OutputError
    from grasp_jax.interop import InteropError

    return (ConfigError, CheckpointError, InteropError, LayoutError, OutputError)


CONFIG_HELP = """configs (experiments/configs/, or a path to a config file):
  {configs}
overrides:
  --config=digits:trials=1,grasp.threshold=0.5   (key=value after a colon)
  --config.grasp.threshold=0.5                    (one key per flag)"""
EXPERIMENT_FLAGS_HELP = """flags:
  --config=NAME[:ARGS]   the experiment (default digits)
  --workdir=DIR          output folder (default runs/<config name>)
  --distributed          join a TPU pod / SLURM job (jax.distributed.initialize)
  --coordinator=HOST:PORT --num_processes=N --process_id=I   any other cluster
  --cpu_collectives=gloo collectives between CPU-only hosts"""


def exit_on_help(argv: list[str], doc: str, own_flags=None, *, takes_config=True) -> None:
    """`--help` without parsing the config (which imports JAX and the data sets): the
    command's docstring, the configs and the override syntax (`takes_config`), then the
    experiment flags, or the flags `own_flags()` defines for a command with its own;
    exit 0."""
    if not HELP_FLAGS & set(argv[1:]):
        return
    print(doc.strip())
    if takes_config:
        print()
        print(CONFIG_HELP.format(configs=", ".join(configs.available())))
    if own_flags is None:
        print(EXPERIMENT_FLAGS_HELP)
        raise SystemExit(0)
    known = set(flags.FLAGS)
    own_flags()
    print("flags:" if takes_config else "\nflags:")
    if takes_config:
        print("  --config=NAME[:ARGS]: the experiment (default digits)")
    for name in sorted(set(flags.FLAGS) - known):
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, "") else f" (default {flag.default})"
        print(f"  --{name}: {flag.help}{default}")
    raise SystemExit(0)


def quiet_logs() -> None:
    """absl, TFDS, Orbax and JAX log at WARNING (Orbax logs every save at INFO) unless
    `--verbosity` asks for more."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def exit_on_config_error(argv: list[str], command: str) -> None:
    """Loads `--config` and its `--config.KEY=` overrides once before absl does: a
    mistake in them is one line naming it (and the nearest valid key), exit 1."""
    from experiments.configs.loading import ConfigFileError, check_arguments

    try:
        check_arguments(argv[1:])
    except ConfigFileError as err:
        raise SystemExit(f"{command}: {err}") from None


def define_config_flags() -> None:
    """`--config` (a file under experiments/configs, with `:key=value` arguments and
    `--config.<key>=` overrides) and `--workdir`, as every experiment command takes."""
    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
    flags.DEFINE_string("workdir", None, "Output folder (default runs/<config>).")


def define_experiment_flags() -> None:
    """The flags of the experiment commands: the config, the work folder, multi-host."""
    define_config_flags()
    distributed.define_flags()


def run_experiment_command(command: str, work, check=None):
    """Joins the job, reads `--config` and `--workdir`, checks the config (and with
    `check(config)` the command's own keys) and the folder and runs `work(config,
    workdir)` with one-line user errors; returns (config, workdir, result)."""
    from experiments import methods, settings, workdir_lock  # not for compare

    quiet_logs()
    distributed.initialize()
    config, workdir = config_and_workdir()
    with one_line_errors(command):
        settings.check(config, methods.REGISTRY)  # before the folder is made
        if check is not None:
            check(config)
        check_workdir(workdir)
        with workdir_lock.held(workdir, command):
            return config, workdir, work(config, workdir)


def config_and_workdir():
    """The parsed `--config` and `--workdir` (default `runs/<config name>`)."""
    config = flags.FLAGS.config
    return config, Path(flags.FLAGS.workdir or f"runs/{config.name}").expanduser()


@contextlib.contextmanager
def one_line_errors(command: str):
    """Turns `user_errors()` raised inside into `command: message` on stderr and exit 1,
    and Ctrl-C into one line saying what is kept (exit 130)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, user_errors()):
            raise SystemExit(f"{command}: {err}") from None
        if disk_full(err):  # from us, Orbax or TensorStore, often inside another error
            raise SystemExit(
                f"{command}: no space left on the disk of --workdir; free some and rerun "
                "the same command: finished runs, trained sources and the last finished "
                "epoch are kept"
            ) from None
        raise
    except KeyboardInterrupt:
        print(
            f"{command}: interrupted; finished runs, trained sources and the last "
            "finished epoch are saved: rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from or during, is a full disk or quota:
    an OSError (ENOSPC, EDQUOT) or TensorStore's RESOURCE_EXHAUSTED status in a message."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "RESOURCE_EXHAUSTED" in str(err) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def check_workdir(workdir: Path) -> None:
    """A work directory must be a folder we can write to: checked before any work."""
    from experiments.settings import ConfigError

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
