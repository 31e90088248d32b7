"""K models of one architecture as one model whose logits are their mean: FUSION's model.

The K models' variables are stacked along a leading axis (`stack`) and the member model
is `vmap`ped over it, so one jitted step trains all K jointly through the averaged
logits, as the reference's FUSION does (docs/reference.md §5). Memory grows with K: that is
the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.tree_checks import PyTree, check_same_structure


def stack(loaders: Sequence[Callable[[], PyTree]]) -> PyTree:
    """The loaded trees stacked along a new leading axis, filled one tree at a time into
    host buffers (at most one loaded tree beside the stack)."""
    first = jax.device_get(loaders[0]())
    buffers = jax.tree.map(lambda x: np.empty((len(loaders), *np.shape(x)), x.dtype), first)
    for index, load in enumerate(loaders):
        tree = first if index == 0 else jax.device_get(load())
        check_same_structure(("models[0]", f"models[{index}]"), first, tree)
        for buffer, x in zip(jax.tree.leaves(buffers), jax.tree.leaves(tree), strict=True):
            buffer[index] = x
    return jax.tree.map(jnp.asarray, buffers)


@dataclasses.dataclass(frozen=True)
class LogitAverage:
    """`member` applied to each of the stacked variables; the logits averaged. In train
    mode each member draws its own dropout key and updates its own BatchNorm stats."""

    member: nn.Module

    def apply(self, variables, images, *, train=False, mutable=False, rngs=None):
        if not train:
            logits = jax.vmap(lambda v: self.member.apply(v, images, train=False))(
                variables
            )
            return logits.astype(jnp.float32).mean(axis=0)
        count = jax.tree.leaves(variables)[0].shape[0]

        def one(v, key):
            return self.member.apply(
                v, images, train=True, mutable=mutable, rngs={"dropout": key}
            )

        keys = jax.random.split(rngs["dropout"], count)
        logits, updates = jax.vmap(one)(variables, keys)
        return logits.astype(jnp.float32).mean(axis=0), updates
