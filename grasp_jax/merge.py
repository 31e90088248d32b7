"""`merge_step`: one GRASP transfer (score, take the aligned units) as a JAX transform.

A pure function of pytrees, like optax's updates: it traces under a caller's `jit`,
`lax.scan`, `vmap` and sharded `jit`, never reads a value back to the host, and returns
its statistics as small device arrays (per leaf or per unit, never parameter-sized for
whole tensors). Called at top level it is one XLA program that writes the merged tree
into the donated buffers of `current`; inside a caller's `jit` it is inlined and the
caller's own donation decides.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grasp_jax.alignment import Granularity, alignment_scores_impl, movable_scores
from grasp_jax.arguments import check_merge_arguments, checked
from grasp_jax.transfer import Mode, TransferResult, check_pair, transfer_impl
from grasp_jax.tree_checks import PyTree, check_same_structure


class MergeStats(NamedTuple):
    """What a merge did, as device arrays. A NamedTuple, so it is a pytree: it leaves
    `jit`, `scan` and `vmap` as is, and `jax.device_get` reads it in one call."""

    scores: PyTree  # float32 alignment scores, shapes as `alignment_scores` gives them
    weights: PyTree  # float32, the scores' shapes: source share per unit (hard: 0 or 1)
    taken: PyTree  # int32 scalar per leaf: elements that took from the source
    fraction: jax.Array  # float32 scalar: share of parameter elements taken (soft: mean w)
    nonfinite: jax.Array  # int32 scalar: number of leaves with a non-finite score

    def mask(self, params: PyTree) -> PyTree:
        """Bool, `params`' shapes: where the source went in (weight > 0). Built on
        demand, since for whole tensors it is one decision repeated per element."""
        return jax.tree.map(
            lambda w, p: jnp.broadcast_to(w > 0, jnp.shape(p)), self.weights, params
        )


def _stats(scores: PyTree, result: TransferResult) -> MergeStats:
    nonfinite = sum(
        (jnp.any(~jnp.isfinite(s)).astype(jnp.int32) for s in jax.tree.leaves(scores)),
        jnp.int32(0),
    )
    return MergeStats(scores, result.weights, result.taken, result.fraction, nonfinite)


@checked(check_merge_arguments)
@functools.partial(
    jax.jit, static_argnames=("granularity", "mode"), donate_argnames=("current",)
)
def merge_step(
    current: PyTree,
    source: PyTree,
    grad_current: PyTree,
    grad_source: PyTree,
    *,
    threshold: float | jax.Array = 0.3,
    granularity: Granularity = "tensor",
    mode: Mode = "hard",
    eps: float | jax.Array = 1e-8,
) -> tuple[PyTree, MergeStats]:
    """Scores the gradients' alignment and transfers the agreeing units of `source`.

    Equivalent to `transfer(current, source, alignment_scores(grad_current,
    grad_source), ...)` in one program, except that a unit whose gradient is zero in
    either model never moves (as the reference, which scores only parameters with a
    gradient in both). `current` is donated at top level: its buffers
    become the merged tree, so do not use it afterwards (copy it first if you must);
    drop your last reference to `source` and no second model outlives the call.
    On the CPU a whole-tensor hard transfer copies a leaf only where the source's is
    taken; on accelerators it selects (a GPU conditional would stall on the host).
    `threshold` and `eps` are traced (changing them never recompiles); `granularity`
    and `mode` are static. Pass `params` only: BatchNorm statistics are not parameters
    and must not move.
    """
    check_pair(current, source)
    check_same_structure(("current", "grad_current"), current, grad_current)
    scores = alignment_scores_impl(grad_current, grad_source, granularity, eps)
    movable = movable_scores(scores, grad_current, grad_source, granularity)
    result = transfer_impl(current, source, movable, threshold, mode)
    return result.params, _stats(scores, result)


@checked(check_merge_arguments)
@functools.partial(jax.jit, static_argnames=("granularity",), donate_argnames=("current",))
def random_merge_step(
    current: PyTree,
    source: PyTree,
    grad_current: PyTree,
    grad_source: PyTree,
    *,
    key: jax.Array,
    threshold: float | jax.Array = 0.3,
    granularity: Granularity = "tensor",
    eps: float | jax.Array = 1e-8,
) -> tuple[PyTree, MergeStats]:
    """The control for what alignment adds: moves as many units as `merge_step`'s hard
    rule would (finite `score > threshold`), chosen uniformly at random among the units
    with a gradient in both models (tensors, channels or elements as `granularity` makes
    them), copied whole.

    `MergeStats.scores` are the alignment scores the count came from; `weights`,
    `taken` and `fraction` say what actually moved. Traceable and donating like
    `merge_step`; the count stays on device.
    """
    check_pair(current, source)
    check_same_structure(("current", "grad_current"), current, grad_current)
    scores = alignment_scores_impl(grad_current, grad_source, granularity, eps)
    movable = movable_scores(scores, grad_current, grad_source, granularity)
    leaves, treedef = jax.tree.flatten(movable)
    sizes = [leaf.size for leaf in leaves]
    units = sum(sizes)
    count = sum(
        (jnp.sum(jnp.isfinite(s) & (s > threshold), dtype=jnp.int32) for s in leaves),
        jnp.int32(0),
    )
    # The `count` candidates (units with a gradient in both models) of lowest random
    # draw are picked; units without a gradient are never candidates.
    candidate = jnp.concatenate([(s > -jnp.inf).ravel() for s in leaves])
    draws = jnp.where(candidate, jax.random.uniform(key, (units,)), 2.0)
    rank = jnp.argsort(jnp.argsort(draws))
    picked = (rank < count).astype(jnp.float32)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    random_scores = treedef.unflatten(
        [
            picked[start : start + size].reshape(jnp.shape(s))
            for s, start, size in zip(leaves, starts, sizes, strict=True)
        ]
    )
    result = transfer_impl(current, source, random_scores, 0.5, "hard")
    return result.params, _stats(scores, result)
