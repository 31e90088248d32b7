"""Checks of the kernels' arguments where they are concrete: a threshold or eps given as
a Python or NumPy scalar (and the merges' keep or drop rate), and the donated `current`
at a top-level call. A mistake (a threshold of 30 for 0.3, `source` passed as `current`)
is a ValueError naming the argument, not a silent merge or an XLA donation error. Traced
values (inside a caller's `jit`, `scan` or `vmap`) and device arrays pass unchecked, as
reading them would mean a host read: the documented ranges are then the caller's
contract (nested jits do not donate, so aliasing is harmless there)."""

from __future__ import annotations

import functools
import inspect
import math

import jax
import numpy as np

# A threshold above every cosine score (which lie in [-1, 1]): no unit moves.
NOTHING_MOVES = 1.01
THRESHOLD_RANGE = (-1.0, NOTHING_MOVES)


class Checked:
    """`jitted` called after `check(**bound arguments)`; every other attribute (`lower`,
    `trace`, `eval_shape`) is the jitted function's."""

    def __init__(self, jitted, check):
        self._jitted = jitted
        self._check = check
        self._signature = inspect.signature(jitted)
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self._check(bound.arguments)
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def checked(check):
    """Decorator form of `Checked`, applied over `jax.jit`."""
    return lambda jitted: Checked(jitted, check)


def concrete(value) -> float | None:
    """`value` as a float when it is a host scalar (Python or NumPy), else None: a
    tracer cannot be read, and reading a device array would sync with the device."""
    if isinstance(value, int | float | np.number) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    ):
        return float(value)
    return None


def threshold_in_range(threshold: float) -> bool:
    """The one range every entry point accepts: [-1, 1] holds every cosine score, and
    NOTHING_MOVES lies above them all."""
    low, high = THRESHOLD_RANGE
    return low <= threshold <= high


def check_merge_arguments(arguments: dict) -> None:
    """`check_scalars`, and nothing of the donated `current` shared with another input."""
    check_scalars(arguments)
    check_not_aliased(arguments)


def check_scalars(arguments: dict) -> None:
    """threshold in [-1, 1.01], eps finite and >= 0."""
    threshold = concrete(arguments.get("threshold"))
    if threshold is not None and not threshold_in_range(threshold):
        low, high = THRESHOLD_RANGE
        raise ValueError(
            f"threshold={threshold:g}: cosine scores lie in [-1, 1]; use a threshold in "
            f"[{low:g}, {high:g}] ({high:g}: nothing moves; a percentage? 0.3, not 30)"
        )
    eps = concrete(arguments.get("eps"))
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps:g}: use a small finite eps >= 0 (1e-8)")


def check_fraction(name: str, value, *, one_allowed: bool = True) -> None:
    """A concrete `value` in [0, 1] (or [0, 1) without `one_allowed`): TIES's keep,
    DARE's drop rate. A percentage (20 for 0.2) would otherwise index past the sorted
    magnitudes, or rescale by a negative factor, without an error."""
    value = concrete(value)
    if value is None:
        return
    if not (0.0 <= value <= 1.0 and (one_allowed or value < 1.0)):
        interval = "[0, 1]" if one_allowed else "[0, 1)"
        raise ValueError(
            f"{name}={value:g}: use a fraction in {interval} (a percentage? 0.2, not 20)"
        )


def check_not_aliased(arguments: dict) -> None:
    """`current` is donated: an array it shares with another argument would be read
    after XLA reused its buffer."""
    donated = {
        id(leaf)
        for leaf in jax.tree.leaves(arguments["current"])
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    }
    for name, value in arguments.items():
        if name == "current" or not donated:
            continue
        if any(id(leaf) in donated for leaf in jax.tree.leaves(value)):
            raise ValueError(
                f"{name} shares arrays with current, which is donated (its buffers "
                f"become the result); pass a copy: jax.tree.map(jnp.copy, {name})"
            )
