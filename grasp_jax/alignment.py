"""Gradient alignment: how much two models agree on the direction of descent.

GRASP transfers a unit of parameters from a source model when the source's gradient on
target data points the same way as the current model's. The reference scores whole
tensors; `channel` and `element` are finer units of the same cosine.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from grasp_jax.tree_checks import PyTree, check_floating, check_same_structure

Granularity = Literal["tensor", "channel", "element"]
GRANULARITIES = ("tensor", "channel", "element")


def check_granularity(granularity: str) -> None:
    """Raises ValueError for an unknown granularity name."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; use one of {GRANULARITIES}")


def _unit_axes(ndim: int, granularity: str) -> tuple[int, ...] | None:
    if granularity == "tensor":
        return tuple(range(ndim))
    if granularity == "channel" and ndim >= 2:
        return tuple(range(ndim - 1))
    return None


def _cosine(a: jax.Array, b: jax.Array, axes: tuple[int, ...] | None, eps) -> jax.Array:
    """dot(a, b) / (|a| |b| + eps) in float32, reduced over `axes` (None: per element)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if axes is None:
        return a * b / (jnp.abs(a) * jnp.abs(b) + eps)
    dot = jnp.sum(a * b, axis=axes)
    norm_a = jnp.sqrt(jnp.sum(a * a, axis=axes))
    norm_b = jnp.sqrt(jnp.sum(b * b, axis=axes))
    return dot / (norm_a * norm_b + eps)


def leaf_score(a: jax.Array, b: jax.Array, granularity: str, eps) -> jax.Array:
    """The alignment score(s) of one leaf; see `alignment_scores` for the shapes."""
    return _cosine(a, b, _unit_axes(jnp.ndim(a), granularity), eps)


def has_gradient(a: jax.Array, b: jax.Array, granularity: str) -> jax.Array:
    """Per unit (the scores' shape): both gradients have a non-zero entry. The reference
    scores only parameters that have a gradient in both models; in JAX an unused
    parameter's gradient is exactly zero instead of missing, so this stands for it."""
    axes = _unit_axes(jnp.ndim(a), granularity)
    if axes is None:
        return (a != 0) & (b != 0)
    return jnp.any(a != 0, axis=axes) & jnp.any(b != 0, axis=axes)


def movable_scores(
    scores: PyTree, grad_current: PyTree, grad_source: PyTree, granularity: str
) -> PyTree:
    """`scores` with -inf where a unit has no gradient in either model: such a unit
    never moves, whatever the threshold (the reference never scores it)."""
    return jax.tree.map(
        lambda s, a, b: jnp.where(has_gradient(a, b, granularity), s, -jnp.inf),
        scores,
        grad_current,
        grad_source,
    )


def alignment_scores_impl(
    grad_current: PyTree, grad_source: PyTree, granularity: str, eps
) -> PyTree:
    """Unjitted body of `alignment_scores`, shared with `merge_step`'s single program."""
    check_granularity(granularity)
    check_same_structure(("grad_current", "grad_source"), grad_current, grad_source)
    check_floating(("grad_current", "grad_source"), grad_current, grad_source)
    return jax.tree_util.tree_map(
        lambda a, b: leaf_score(a, b, granularity, eps), grad_current, grad_source
    )


@functools.partial(jax.jit, static_argnames=("granularity",))
def alignment_scores(
    grad_current: PyTree,
    grad_source: PyTree,
    *,
    granularity: Granularity = "tensor",
    eps: float = 1e-8,
) -> PyTree:
    """Cosine similarity of two gradient trees, one leaf of scores per parameter leaf.

    `dot(a, b) / (norm(a) * norm(b) + eps)`, computed in float32 whatever the gradients'
    dtype. Score shapes per leaf of shape `s`:
      - "tensor" (the reference): a scalar over the flattened leaf.
      - "channel": shape `s[-1:]`, one score per output feature (the last axis of Flax
        `Dense`/`Conv` kernels) over all other axes; a leaf of rank <= 1 gets one score
        per element.
      - "element": shape `s`, the formula per element (about the sign agreement).
    Zero gradients score 0. Trees of different structure or shapes raise ValueError.
    """
    return alignment_scores_impl(grad_current, grad_source, granularity, eps)
