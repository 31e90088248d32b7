"""The weight-space merges with the sources taken one at a time: memory flat in K.

A merger is shaped like an optax `GradientTransformation`: a `StreamingMerger` of pure
functions over an immutable NamedTuple state (each traces under jit),

    state = merger.init(start)
    state = merger.update(state, source, base, index, pass_index)  # every source, pass
    merged = merger.finish(state, start)

`start` is the base for the task-vector mergers (`from_base`) and otherwise any tree of
the model's shapes and dtypes (arrays or `jax.ShapeDtypeStruct`); `base` is the base or
None. `index` (which source, may be traced) seeds DARE; `pass_index` is a Python int.
The state is laid out as `start` is: a `start` placed as the sources are (arrays on their
devices, or structs naming their sharding) makes every update one compiled program; an
unplaced one compiles the first update apart. `merge_streaming` drives a merger over
loaders that restore one source each, so memory holds the base, one source and the
merger's running sums. TIES needs two passes: the sign election needs every source's
trimmed task vector, so pass 1 sums the sign mass and pass 2 restores the sources again
and averages the entries that agree with the elected sign. The results equal `kernels`'
all-at-once functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grasp_jax.arguments import check_fraction
from grasp_jax.merging import kernels
from grasp_jax.tree_checks import PyTree, check_floating, check_same_structure


class StreamingMerger(NamedTuple):
    """A merge as pure functions; see the module docstring."""

    init: Callable[[PyTree], Any]
    update: Callable[[Any, PyTree, PyTree | None, Any, int], Any]
    finish: Callable[[Any, PyTree], PyTree]
    passes: int = 1  # how often every source is fed to `update`
    from_base: bool = False  # works on task vectors: `init`/`update` need the base


class SumState(NamedTuple):
    total: PyTree  # float32 running sum (of weights, task vectors or maxima)
    count: jax.Array


class DareState(NamedTuple):
    total: PyTree
    key: jax.Array


class FisherState(NamedTuple):
    numerator: PyTree
    denominator: PyTree


class TiesState(NamedTuple):
    mass: PyTree | None  # pass 1: the trimmed task vectors' sum
    sign: PyTree | None  # pass 2: the elected signs (int8)
    total: PyTree | None  # pass 2: sum and count of the agreeing entries
    count: PyTree | None


def _placement(x) -> jax.sharding.Sharding | None:
    """Where a concrete array, or a `ShapeDtypeStruct` that names devices, is laid out;
    None for anything else (a tracer, a NumPy array, `jax.eval_shape`'s abstract mesh)."""
    where = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if isinstance(where, jax.sharding.NamedSharding) and not isinstance(
        where.mesh, jax.sharding.Mesh
    ):
        return None
    return where


def _zeros(like: PyTree, dtype=jnp.float32) -> PyTree:
    """Zeros of `like`'s shapes, each laid out as its `like` leaf is: the state then
    enters `update` as its output leaves it, so the first update compiles the program
    the later ones reuse."""
    return jax.tree.map(
        lambda x: jnp.zeros(jnp.shape(x), dtype, device=_placement(x)), like
    )


def _placed_scalar(value, like: PyTree):
    """`value` (a count, a key) replicated over the devices of `like`'s first leaf."""
    leaves = jax.tree.leaves(like)
    where = _placement(leaves[0]) if leaves else None
    if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    elif not isinstance(where, jax.sharding.SingleDeviceSharding):
        return value
    return jax.device_put(value, where)


def _cast_like(like: PyTree, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda r, x: x.astype(r.dtype), like, tree)


def _checked(total: PyTree, source: PyTree, index) -> PyTree:
    """`source`, after checking it has the merge's structure and floating leaves."""
    name = f"sources[{index}]" if isinstance(index, int) else "a source"
    check_same_structure(("the tree the merge started from", name), total, source)
    check_floating((name,), source)
    return source


def _tau(base: PyTree, source: PyTree, total: PyTree, index) -> PyTree:
    return kernels.task_vector(base, _checked(total, source, index))


def _start_sum(like: PyTree) -> SumState:
    check_floating(("start",), like)
    return SumState(_zeros(like), _placed_scalar(jnp.zeros((), jnp.int32), like))


def soup() -> StreamingMerger:
    """The uniform mean of the sources' weights."""

    def update(state, source, base, index, pass_index):
        source = _checked(state.total, source, index)
        total = jax.tree.map(lambda t, x: t + kernels._f32(x), state.total, source)
        return SumState(total, state.count + 1)

    def finish(state, start):
        return _cast_like(start, jax.tree.map(lambda t: t / state.count, state.total))

    return StreamingMerger(_start_sum, update, finish)


def _task_vector_merger(combine: Callable, scale) -> StreamingMerger:
    """Task-vector merges that fold each tau into one running tree: base + scale * it."""

    def update(state, source, base, index, pass_index):
        tau = _tau(base, source, state.total, index)
        return SumState(jax.tree.map(combine, state.total, tau), state.count + 1)

    def finish(state, base):
        return kernels.base_plus(base, state.total, scale)

    return StreamingMerger(_start_sum, update, finish, from_base=True)


def task_arithmetic(scale=0.3) -> StreamingMerger:
    """base + scale * sum_k tau_k."""
    return _task_vector_merger(jnp.add, scale)


def magmax(scale=0.5) -> StreamingMerger:
    """Per element the task-vector entry of largest magnitude; on equal magnitudes the
    later source's (as `kernels.magmax` and FusionBench)."""
    return _task_vector_merger(
        lambda best, tau: jnp.where(jnp.abs(tau) >= jnp.abs(best), tau, best), scale
    )


def dare(key: jax.Array, rate=0.5, scale=0.3) -> StreamingMerger:
    """Task arithmetic over DARE-dropped task vectors (source k: fold_in(key, k))."""
    check_fraction("rate", rate, one_allowed=False)

    def init(base):
        check_floating(("base",), base)
        return DareState(_zeros(base), _placed_scalar(key, base))

    def update(state, source, base, index, pass_index):
        tau = _tau(base, source, state.total, index)
        dropped = kernels.dare_drop(tau, jax.random.fold_in(state.key, index), rate)
        return DareState(jax.tree.map(jnp.add, state.total, dropped), state.key)

    def finish(state, base):
        return kernels.base_plus(base, state.total, scale)

    return StreamingMerger(init, update, finish, from_base=True)


def fisher(floor=1e-6, normalize=True) -> StreamingMerger:
    """Fisher-weighted mean (`kernels.fisher`); each source is a pair (params, diagonal
    Fisher). A model's normalising coefficient needs only its own Fisher: one pass."""

    def init(like):
        check_floating(("start",), like)
        return FisherState(_zeros(like), _zeros(like))

    def update(state, source, base, index, pass_index):
        params, fisher_tree = source
        _checked(state.numerator, params, index)
        check_same_structure(("the source's params", "its Fisher"), params, fisher_tree)
        coefficient = kernels.fisher_coefficient(fisher_tree, floor, normalize)
        weights = jax.tree.map(
            lambda f: coefficient * (kernels._f32(f) + floor), fisher_tree
        )
        numerator = jax.tree.map(
            lambda n, w, x: n + w * kernels._f32(x), state.numerator, weights, params
        )
        return FisherState(numerator, jax.tree.map(jnp.add, state.denominator, weights))

    def finish(state, start):
        return _cast_like(
            start, jax.tree.map(jnp.divide, state.numerator, state.denominator)
        )

    return StreamingMerger(init, update, finish)


def ties(keep=0.2, scale=0.3, aggregate="sum") -> StreamingMerger:
    """TIES in two passes: sign mass, then the disjoint sum (or mean) of the agreeing
    entries (`kernels.ties`). `keep` fixes an index, so it is a Python float."""
    keep = float(keep)
    check_fraction("keep", keep)
    aggregate = kernels.check_aggregate(aggregate)

    def init(base):
        check_floating(("base",), base)
        return TiesState(_zeros(base), None, None, None)

    def trimmed(base, source, like, index):
        tau = _tau(base, source, like, index)
        return kernels.trim(tau, kernels.trim_threshold(tau, keep))

    def update(state, source, base, index, pass_index):
        if pass_index == 0:
            tau = trimmed(base, source, state.mass, index)
            return state._replace(mass=jax.tree.map(jnp.add, state.mass, tau))
        if state.sign is None:  # the election, once every source has voted
            sign = jax.tree.map(lambda m: jnp.sign(m).astype(jnp.int8), state.mass)
            state = TiesState(None, sign, _zeros(base), _zeros(base, jnp.int32))
        tau = trimmed(base, source, state.total, index)
        agree = jax.tree.map(lambda t, s: (jnp.sign(t) == s) & (t != 0), tau, state.sign)
        total = jax.tree.map(
            lambda a, t, m: a + jnp.where(m, t, 0.0), state.total, tau, agree
        )
        count = jax.tree.map(lambda c, m: c + m.astype(jnp.int32), state.count, agree)
        return state._replace(total=total, count=count)

    def finish(state, base):
        merged = state.total
        if aggregate == "mean":
            merged = jax.tree.map(lambda s, c: s / jnp.maximum(c, 1), merged, state.count)
        return kernels.base_plus(base, merged, scale)

    return StreamingMerger(init, update, finish, passes=2, from_base=True)


def merge_streaming(
    merger: StreamingMerger, start: PyTree, loaders: Sequence[Callable[[], PyTree]]
) -> PyTree:
    """Runs `merger` over the sources: `loaders[k]()` returns source k (for Fisher, the
    pair (params, Fisher)); called once per pass, so one source is alive at a time.
    `start`: the base for a `from_base` merger, else any tree of the model's shapes.
    Each update is one jitted program that donates the previous state (one program for
    all sources when `start` is laid out as they are; see the module docstring)."""
    if not loaders:
        raise ValueError("merge_streaming needs at least one source loader; got none")
    update = jax.jit(merger.update, static_argnums=4, donate_argnums=0)
    base = start if merger.from_base else None
    state = merger.init(start)
    for pass_index in range(merger.passes):
        for index, load in enumerate(loaders):
            try:
                state = update(state, load(), base, index, pass_index)
            except ValueError as err:  # traced, `index` cannot name the source itself
                raise ValueError(f"sources[{index}]: {err}") from err
    if merger.from_base:
        return jax.jit(merger.finish)(state, start)
    return merger.finish(state, start)  # `start` may be abstract: shapes and dtypes
