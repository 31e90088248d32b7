"""Gradients summed over several batches, as GRASP's alignment step needs them.

The reference sums the per-batch gradients of `num_alignment_batches` target batches
before it scores alignment. Accumulating in a donated float32 buffer keeps one gradient
tree alive however many batches there are. A model state that the forward pass changes
(BatchNorm statistics in train mode) is threaded from batch to batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from grasp_jax.tree_checks import PyTree


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _accumulate(loss_fn: Callable, total: PyTree, params: PyTree, state, batch, *rest):
    grads, (state, _) = jax.grad(loss_fn, has_aux=True)(params, state, batch, *rest)
    return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), state


@functools.cache
def _as_stateful(loss_fn: Callable) -> Callable:
    """`loss_fn(params, batch, *rest)` in the stateful form (cached: one compilation)."""

    def threaded(params, state, batch, *rest):
        return loss_fn(params, batch, *rest), (state, None)

    return threaded


def summed_gradients(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    *rest: Any,
    state: Any | None = None,
) -> Any:
    """Sum over `batches` of the gradient of `loss_fn` at `params`, in float32.

    Without `state`: `loss_fn(params, batch, *rest)` returns a scalar loss, and the sum
    is returned. With `state` (e.g. BatchNorm statistics): `loss_fn(params, state, batch,
    *rest)` returns `(loss, (new_state, extra))`, as Flax's training steps do (`extra`,
    e.g. the logits, is ignored); the state is threaded through the batches in order and
    `(sum, final_state)` is returned. Each batch runs one jitted step; `loss_fn` is a
    static argument, so pass the same function object each time (not a fresh lambda) to
    reuse the compiled step. Raises ValueError on no batches.
    """
    stateful = state is not None
    step_fn = loss_fn if stateful else _as_stateful(loss_fn)
    carried = state if stateful else None
    total = None
    for batch in batches:
        if total is None:
            total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        total, carried = _accumulate(step_fn, total, params, carried, batch, *rest)
    if total is None:
        raise ValueError(
            "summed_gradients got no batches; pass an iterable with at least one batch "
            "(e.g. itertools.islice(train_batches, num_alignment_batches))."
        )
    return (total, carried) if stateful else total
