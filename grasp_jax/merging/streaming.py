"""The weight-space merges with the sources taken one at a time: memory flat in K.

A merger is a small frozen object with `init(like)`, `update(state, tree, index,
pass_index)` and `finish(state)`; `merge_streaming` drives it over loaders that restore
one source each, so at most one source is in memory beside the base and the merger's
running sums. Soup, task arithmetic, DARE, MagMax and Fisher need one pass. TIES needs
two: its sign election needs every source's trimmed task vector, so pass 1 accumulates
the sign mass (and each source's trim threshold), pass 2 restores the sources again and
takes the agreeing entries; it holds base, one source, the elected signs (int8) and a
sum and count. The results equal `kernels`' all-at-once functions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from grasp_jax.merging import kernels
from grasp_jax.tree_checks import PyTree, check_floating, check_same_structure

_f32 = kernels._f32


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def _cast_like(like: PyTree, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda r, x: x.astype(r.dtype), like, tree)


def _dtypes(tree: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


def _checked(state: dict, tree: PyTree, index: int) -> PyTree:
    check_same_structure(
        ("the tree merge_streaming started from", f"sources[{index}]"), state["like"], tree
    )
    check_floating((f"sources[{index}]",), tree)
    return tree


@functools.partial(jax.jit, donate_argnums=0)
def _add(total, tree):
    return jax.tree.map(lambda t, x: t + _f32(x), total, tree)


@functools.partial(jax.jit, donate_argnums=0)
def _add_delta(total, tree, base):
    return jax.tree.map(jnp.add, total, kernels.task_vector(base, tree))


_base_plus = jax.jit(kernels.base_plus)


@dataclasses.dataclass(frozen=True)
class Soup:
    """Running sum of the sources; `init` takes any tree of the model's shapes."""

    passes: ClassVar[int] = 1

    def init(self, like: PyTree) -> dict:
        return {"like": _dtypes(like), "sum": _zeros(like), "count": 0}

    def update(self, state, tree, index, pass_index):
        state["sum"] = _add(state["sum"], _checked(state, tree, index))
        state["count"] += 1
        return state

    def finish(self, state) -> PyTree:
        mean = jax.tree.map(lambda s: s / state["count"], state["sum"])
        return _cast_like(state["like"], mean)


@dataclasses.dataclass(frozen=True)
class TaskArithmetic:
    """Running sum of the task vectors; `init` takes the base."""

    scale: float = 0.3
    passes: ClassVar[int] = 1

    def init(self, base: PyTree) -> dict:
        check_floating(("base",), base)
        return {"like": _dtypes(base), "base": base, "sum": _zeros(base)}

    def update(self, state, tree, index, pass_index):
        state["sum"] = _add_delta(state["sum"], _checked(state, tree, index), state["base"])
        return state

    def finish(self, state) -> PyTree:
        return _base_plus(state["base"], state["sum"], self.scale)


@functools.partial(jax.jit, donate_argnums=0)
def _add_dropped(total, tree, base, key, rate):
    tau = kernels.task_vector(base, tree)
    return jax.tree.map(jnp.add, total, kernels.dare_drop(tau, key, rate))


@dataclasses.dataclass(frozen=True)
class Dare(TaskArithmetic):
    """Task arithmetic over DARE-dropped task vectors (source k: fold_in(key, k))."""

    key: Any = None  # a jax.random key; required
    rate: float = 0.5

    def update(self, state, tree, index, pass_index):
        key = jax.random.fold_in(self.key, index)
        tree = _checked(state, tree, index)
        state["sum"] = _add_dropped(state["sum"], tree, state["base"], key, self.rate)
        return state


@functools.partial(jax.jit, donate_argnums=0)
def _keep_larger(best, tree, base):
    tau = kernels.task_vector(base, tree)
    return jax.tree.map(lambda m, t: jnp.where(jnp.abs(t) > jnp.abs(m), t, m), best, tau)


@dataclasses.dataclass(frozen=True)
class MagMax(TaskArithmetic):
    """Per element the task vector entry of largest magnitude so far (earlier on ties)."""

    scale: float = 0.5

    def update(self, state, tree, index, pass_index):
        state["sum"] = _keep_larger(
            state["sum"], _checked(state, tree, index), state["base"]
        )
        return state


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_weighted(numerator, denominator, params, fisher, floor):
    weights = jax.tree.map(lambda f: jnp.maximum(_f32(f), floor), fisher)
    numerator = jax.tree.map(lambda n, w, x: n + w * _f32(x), numerator, weights, params)
    return numerator, jax.tree.map(jnp.add, denominator, weights)


@dataclasses.dataclass(frozen=True)
class Fisher:
    """Running Fisher-weighted sums; each `tree` is a pair (params, diagonal Fisher)."""

    floor: float = 1e-6
    passes: ClassVar[int] = 1

    def init(self, like: PyTree) -> dict:
        return {"like": _dtypes(like), "num": _zeros(like), "den": _zeros(like)}

    def update(self, state, tree, index, pass_index):
        params, fisher = tree
        _checked(state, params, index)
        check_same_structure((f"sources[{index}]", f"fishers[{index}]"), params, fisher)
        state["num"], state["den"] = _add_weighted(
            state["num"], state["den"], params, fisher, self.floor
        )
        return state

    def finish(self, state) -> PyTree:
        mean = jax.tree.map(jnp.divide, state["num"], state["den"])
        return _cast_like(state["like"], mean)


@functools.partial(jax.jit, static_argnames="keep")
def _trimmed(tree, base, *, keep):
    tau = kernels.task_vector(base, tree)
    threshold = kernels.trim_threshold(tau, keep)
    return kernels.trim(tau, threshold)


@functools.partial(jax.jit, static_argnames="keep", donate_argnums=0)
def _add_mass(mass, tree, base, *, keep):
    return jax.tree.map(jnp.add, mass, _trimmed(tree, base, keep=keep))


@functools.partial(jax.jit, static_argnames="keep", donate_argnums=(0, 1))
def _add_agreeing(total, count, tree, base, sign, *, keep):
    trimmed = _trimmed(tree, base, keep=keep)
    agree = jax.tree.map(lambda t, s: (jnp.sign(t) == s) & (t != 0), trimmed, sign)
    total = jax.tree.map(lambda a, t, m: a + jnp.where(m, t, 0.0), total, trimmed, agree)
    count = jax.tree.map(lambda c, m: c + m.astype(jnp.int32), count, agree)
    return total, count


@dataclasses.dataclass(frozen=True)
class Ties:
    """Two passes: sign mass, then the disjoint mean of the agreeing entries."""

    keep: float = 0.2
    scale: float = 0.3
    passes: ClassVar[int] = 2

    def init(self, base: PyTree) -> dict:
        check_floating(("base",), base)
        return {"like": _dtypes(base), "base": base, "mass": _zeros(base)}

    def update(self, state, tree, index, pass_index):
        tree = _checked(state, tree, index)
        if pass_index == 0:
            state["mass"] = _add_mass(state["mass"], tree, state["base"], keep=self.keep)
            return state
        if "sign" not in state:  # the election, once every source has voted
            state["sign"] = jax.tree.map(
                lambda m: jnp.sign(m).astype(jnp.int8), state.pop("mass")
            )
            state["sum"] = _zeros(state["base"])
            state["count"] = jax.tree.map(
                lambda x: jnp.zeros(jnp.shape(x), jnp.int32), state["base"]
            )
        state["sum"], state["count"] = _add_agreeing(
            state["sum"], state["count"], tree, state["base"], state["sign"], keep=self.keep
        )
        return state

    def finish(self, state) -> PyTree:
        mean = jax.tree.map(
            lambda s, c: s / jnp.maximum(c, 1), state["sum"], state["count"]
        )
        return _base_plus(state["base"], mean, self.scale)


def merge_streaming(
    merger, start: PyTree, loaders: Sequence[Callable[[], PyTree]]
) -> PyTree:
    """Runs `merger` over the sources: `loaders[k]()` returns source k (for Fisher, the
    pair (params, Fisher)); called once per pass, so one source is alive at a time.
    `start` is the base (or, for Soup and Fisher, any tree of the model's shapes)."""
    if not loaders:
        raise ValueError("merge_streaming needs at least one source loader; got none")
    state = merger.init(start)
    for pass_index in range(merger.passes):
        for index, load in enumerate(loaders):
            state = merger.update(state, load(), index, pass_index)
    return merger.finish(state)
