"""The one forward pass and loss that training, GRASP's alignment and the benchmarks share.

`forward` is where a model meets its variables: in train mode dropout draws from `rng`
and BatchNorm uses and updates batch statistics; in eval mode the running statistics are
used and returned unchanged. `loss_fn(model, train=...)` wraps it for `jax.grad`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from grasp_jax.tree_checks import PyTree


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy, in float32 whatever the compute dtype."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def forward(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    images: jax.Array,
    *,
    train: bool,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, PyTree]:
    """Logits of preprocessed `images` and the BatchNorm statistics after the pass."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, images, train=False), batch_stats
    logits, updates = model.apply(
        variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
    )
    return logits, updates.get("batch_stats", batch_stats)


@functools.cache
def loss_fn(model: nn.Module, *, train: bool) -> Callable:
    """`f(params, batch_stats, batch) -> (loss, (batch_stats, logits))` for `jax.grad`
    with `has_aux`. `batch` holds preprocessed `image`s, `label`s and, in train mode, the
    dropout key `rng`. Cached per (model, mode): one function object, one compilation."""

    def loss(params, batch_stats, batch):
        logits, batch_stats = forward(
            model, params, batch_stats, batch["image"], train=train, rng=batch.get("rng")
        )
        return cross_entropy(logits, batch["label"]), (batch_stats, logits)

    return loss
