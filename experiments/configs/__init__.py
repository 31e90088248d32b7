"""Experiment configs: each module's `get_config(arg)` returns an ml_collections ConfigDict.

`--config=digits` names a module here; a path (`--config=my/config.py`) and an argument
suffix (`--config=digits:small`) work too, as with ml_collections' config_flags.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def expand_config_argument(argv: list[str]) -> list[str]:
    """Rewrites `--config=NAME[:ARG]` to this folder's `NAME.py[:ARG]`."""
    expanded = []
    for arg in argv:
        if arg.startswith("--config="):
            value = arg.removeprefix("--config=")
            name, colon, rest = value.partition(":")
            if not name.endswith(".py") and "/" not in name:
                if name not in available():
                    raise SystemExit(
                        f"unknown config {name!r}; available: {', '.join(available())} "
                        "(or give a path to a config file)"
                    )
                arg = f"--config={CONFIG_DIR / name}.py{colon}{rest}"
        expanded.append(arg)
    return expanded
