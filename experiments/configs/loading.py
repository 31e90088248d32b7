"""Loads `--config` and its `--config.KEY=VALUE` overrides as the commands will, before
absl parses them, so that every mistake in them is one line (a missing file, a file that
raises or has no `get_config`, a `get_config` that returns no ConfigDict, an unknown key
with the nearest valid one, a value of the wrong type) instead of a flag-parsing
traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from experiments.configs import (
    CONFIG_DIR,
    available,
    expand_config_argument,
    nearest,
    typed_value,
)


class ConfigFileError(ValueError):
    """A `--config` argument that cannot give a config."""


def check_arguments(argv: list[str]) -> None:
    """Raises ConfigFileError (one line) for the first mistake in `argv`'s config flags."""
    value = f"{CONFIG_DIR / 'digits'}.py"
    overrides = []
    for arg in expand_config_argument(argv):
        if arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        elif arg.startswith("--config."):
            overrides.append(arg.removeprefix("--config."))
    config = load(value)
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals:
            raise ConfigFileError(f"--config.{key}: give a value, --config.{key}=VALUE")
        set_key(config, key, text)


def load(value: str) -> ml_collections.ConfigDict:
    """The config `--config=FILE[:ARG]` gives (FILE already a path)."""
    file_name, _, arg = value.partition(":")
    shown = f"--config={_short(file_name)}"
    path = Path(file_name).expanduser()
    if not path.is_file():
        raise ConfigFileError(
            f"{shown}: no such config file; use one of {', '.join(available())} or the "
            "path of a .py file defining get_config(arg=None)"
        )
    spec = importlib.util.spec_from_file_location(f"grasp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: say where, not a traceback of ours
        raise ConfigFileError(f"{shown}: loading it raised {_one_line(err)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(f"{shown}: the file defines no get_config(arg=None)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as err:  # our configs' override errors
        raise ConfigFileError(f"{shown}{':' + arg if arg else ''}: {err}") from None
    except Exception as err:
        raise ConfigFileError(f"{shown}: get_config raised {_one_line(err)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"{shown}: get_config returned a {type(config).__name__}; return an "
            "ml_collections.ConfigDict (experiments/configs/digits.py is an example)"
        )
    return config


def set_key(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """`config.<key> = text` read as the type of the value it replaces."""
    *sections, leaf = key.split(".")
    node = config
    for depth, name in enumerate([*sections, leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join([*sections, leaf][:depth]) or "the config"
            raise ConfigFileError(f"--config.{key}: {unknown_key(name, node, where)}")
        if depth < len(sections):
            node = node[name]
    try:
        node[leaf] = typed_value(text, node[leaf], key)
    except ValueError as err:
        raise ConfigFileError(f"--config.{err}") from None


def unknown_key(name: str, node, where: str) -> str:
    """`name` is not a key of `node`: the nearest valid one, then all of them."""
    keys = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
    return f"no key {name!r} in {where}; {nearest(name, keys)}valid keys: {', '.join(keys)}"


def _short(file_name: str) -> str:
    path = Path(file_name)
    return path.stem if path.parent == CONFIG_DIR else file_name


def _one_line(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
