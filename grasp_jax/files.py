"""Atomic file writes: a temp file in the target's folder, renamed into place, so a
reader sees the old file or the new one, never half of one, and a failure (full disk,
no permission) leaves what the path held before untouched."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputError(OSError):
    """A file could not be written (disk full, no permission)."""


def public_mode() -> int:
    """0666 minus the process umask (read once, restored at once): the mode a plain
    `open(path, "w")` gives, not the temp file's private 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(temp_path)` and renames the temp file to `path`. The temp file keeps
    `path`'s suffix (writers such as matplotlib pick the format by it)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
        )
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(
            f"could not write {path} ({err.strerror or err}); free some space or choose a "
            "writable --workdir, then rerun (finished work is kept and resumed)"
        ) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


# write_atomic's temp files: `.<stem>.<mkstemp's 8 random characters>.tmp<suffix>`.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.\w+)?")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Deletes the temp files write_atomic left under `folder` when its process was
    killed mid-write (a rerun writes its own). Only for a folder no live process writes
    to; returns what was deleted."""
    stale = [
        p
        for p in Path(folder).rglob(".*.tmp*")
        if _TEMP_NAME.fullmatch(p.name) and p.is_file()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> Path:
    """`text` written atomically to `path`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))
