"""The diagonal (empirical) Fisher of a model on target data, for Fisher merging.

F = mean over examples of the squared gradient of the example's loss (the log-likelihood
of its true label). Examples run one after another inside a `lax.scan`, so memory holds
one gradient and the running sum, not a batch of per-example gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from grasp_jax.tree_checks import PyTree


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _add_squared_gradients(
    example_loss: Callable, total: PyTree, params: PyTree, batch, *rest
):
    def one(total, example):
        grads = jax.grad(example_loss)(params, example, *rest)
        return jax.tree.map(
            lambda t, g: t + jnp.square(g.astype(jnp.float32)), total, grads
        ), None

    total, _ = jax.lax.scan(one, total, batch)
    return total


def fisher_diagonal(
    example_loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batches: Iterable[PyTree],
    *rest: PyTree,
) -> PyTree:
    """Mean over every example of `batches` of grad(example_loss)(params, example)**2,
    in float32. `example_loss(params, example, *rest)` scores one example (`rest`: what
    it needs beside the parameters, e.g. BatchNorm statistics): each leaf of a batch
    carries a leading example axis, which is scanned over. Pass the same `example_loss`
    object each time (it is a static argument: one compilation)."""
    total, count = None, 0
    for batch in batches:
        if total is None:
            total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        total = _add_squared_gradients(example_loss, total, params, batch, *rest)
        count += len(jax.tree.leaves(batch)[0])
    if total is None:
        raise ValueError("fisher_diagonal got no batches; pass at least one batch")
    return jax.tree.map(lambda t: t / count, total)
