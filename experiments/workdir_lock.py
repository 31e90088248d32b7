"""One command per work folder. Two commands on one folder would train the same sources
twice, race on TFDS's build, or take each other's live training for an interrupted one:
the second is refused in one line while the first runs. A lock left by a process that
died is taken over, so an interrupted command resumes without a manual step; the temp
files its killed writes left are deleted then, as no one else writes there."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import jax

from experiments.settings import ConfigError
from grasp_jax import files

LOCK = ".lock"


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being written, or gone
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the holder still runs (assumed so for a process on another host)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def held(workdir: Path, command: str):
    """Holds `<workdir>/.lock` (pid, host, command, start) while the block runs."""
    if jax.process_index() != 0:  # one writer: the processes of one job share it
        yield
        return
    path = Path(workdir) / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                time.sleep(0.1)  # its holder is writing it
                continue
            if _alive(holder):
                started = time.strftime("%H:%M:%S", time.localtime(holder["started"]))
                raise ConfigError(
                    f"--workdir={workdir} is in use by {holder['command']} (pid "
                    f"{holder['pid']} on {holder['host']}, since {started}); wait for it "
                    f"to finish or pass another --workdir (if that process is gone, "
                    f"delete {path})"
                ) from None
            path.unlink(missing_ok=True)  # its process died: take the folder over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine | {"started": time.time()}, f)
        break
    else:
        raise ConfigError(f"{path} cannot be read; delete it if no command is running")
    files.remove_stale_temps(workdir)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
