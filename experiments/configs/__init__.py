"""Experiment configs: each module's `get_config(arg)` returns an ml_collections ConfigDict.

`--config=digits` names a module here; a path (`--config=my/config.py`) works too. The
argument after the colon is `key=value` pairs, `--config=clear100:model=resnet50,trials=5`
(dotted keys reach sections: `grasp.threshold=0.5`); a bare value sets the model, so
`--config=clear100:resnet50` keeps working.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(__file__).parent


def available() -> list[str]:
    """The config modules here: those that define `get_config` (not `base`, `reference`)."""
    return sorted(
        p.stem for p in CONFIG_DIR.glob("*.py") if "\ndef get_config(" in p.read_text()
    )


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


def parse_arg(arg: str | None) -> dict[str, str]:
    """`"model=resnet50,trials=5"` -> {"model": "resnet50", "trials": "5"}; a bare value
    (`"resnet50"`) is the model."""
    pairs = {}
    for item in filter(None, (arg or "").split(",")):
        key, equals, value = item.partition("=")
        if equals:
            pairs[key.strip()] = value.strip()
        else:
            pairs["model"] = key.strip()
    return pairs


def override(config: ml_collections.ConfigDict, pairs: dict[str, str]):
    """Sets each dotted key of `pairs`, its text read as the type of the value it
    replaces; an unknown key is a ValueError that lists the valid ones."""
    for key, text in pairs.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = _child(node, section, key)
        old = _child(node, leaf, key)
        node[leaf] = typed_value(text, old, key)
    return config


def _child(node, name: str, key: str):
    if name not in node:
        raise ValueError(
            f"unknown config key {key!r}; {nearest(name, node)}valid keys here: "
            f"{sorted(node)}"
        )
    return node[name]


def nearest(name: str, keys) -> str:
    """ "did you mean 'trials'? " for a near miss of one of `keys`, else ""."""
    import difflib

    near = difflib.get_close_matches(name, sorted(keys), n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def typed_value(text: str, old, key: str):
    """`text` read as the type of `old` (the value it replaces); ValueError names `key`."""
    if isinstance(old, str) or old is None:
        return text
    if isinstance(old, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{key}={text!r}; use true or false")
        return text.lower() == "true"
    if isinstance(old, tuple):
        items = tuple(filter(None, (t.strip() for t in text.split("+"))))
        numbers = [v for v in old if isinstance(v, int | float) and not isinstance(v, bool)]
        if not old or len(numbers) < len(old):  # names (or nothing to go by): text
            return items
        kind = 0.0 if any(isinstance(v, float) for v in numbers) else 0
        return tuple(typed_value(item, kind, key) for item in items)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if not isinstance(value, type(old)):
        raise ValueError(f"{key}={text!r}; expected a value of type {type(old).__name__}")
    return value
