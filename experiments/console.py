"""What the commands print while they work. On a terminal: progress bars. Redirected to
a file: no bars and no cursor codes, one line per finished unit of work (a data set
built, a source trained, a run), each with a timestamp, its name and its result."""

from __future__ import annotations

import sys
import threading
import time

import jax


def on_terminal() -> bool:
    """Progress bars only where someone watches them."""
    return sys.stderr.isatty()


_PRINTING = threading.Lock()  # whole lines from runs side by side


def event(what: str) -> None:
    """One timestamped line on stdout (process 0 only)."""
    if jax.process_index() == 0:
        with _PRINTING:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}", flush=True)
