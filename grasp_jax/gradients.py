"""Gradients summed over several batches, as GRASP's alignment step needs them.

The reference sums the per-batch gradients of `num_alignment_batches` target batches
before it scores alignment. Accumulating in a donated float32 buffer keeps one gradient
tree alive however many batches there are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from grasp_jax.tree_checks import PyTree


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _accumulate(loss_fn: Callable, total: PyTree, params: PyTree, batch, *rest):
    grads = jax.grad(loss_fn)(params, batch, *rest)
    return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)


def summed_gradients(
    loss_fn: Callable[..., jax.Array], params: PyTree, batches: Iterable[Any], *rest: Any
) -> PyTree:
    """Sum over `batches` of `grad(loss_fn)(params, batch, *rest)`, in float32.

    `loss_fn(params, batch, *rest)` returns a scalar loss. Each batch runs one jitted
    step; `loss_fn` is a static argument, so pass the same function object each time
    (not a fresh lambda) to reuse the compiled step. Raises ValueError on no batches.
    """
    total = None
    for batch in batches:
        if total is None:
            total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        total = _accumulate(loss_fn, total, params, batch, *rest)
    if total is None:
        raise ValueError(
            "summed_gradients got no batches; pass an iterable with at least one batch "
            "(e.g. itertools.islice(train_batches, num_alignment_batches))."
        )
    return total
