"""File modes for atomic writes: a temp file renamed into place keeps the temp file's
private mode (0600) unless it is given the mode a plain `open(path, "w")` would have."""

from __future__ import annotations

import os


def public_mode() -> int:
    """0666 minus the process umask (read once, restored at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
