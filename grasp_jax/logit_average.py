"""K models of one architecture as one model whose logits are their mean: FUSION's model.

The K models' variables are stacked along a leading axis (`stack`) and the member model
is mapped over it (`each_member`), so one jitted step trains all K jointly through the
averaged logits, as the reference's FUSION does (docs/reference.md §5). Memory grows with
K: that is the method.
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
            logits = each_member(
                lambda v: self.member.apply(v, images, train=False), variables
            )
            return logits.astype(jnp.float32).mean(axis=0)
        count = jax.tree.leaves(variables)[0].shape[0]

        def one(v, key):
            return self.member.apply(
                v, images, train=True, mutable=mutable, rngs={"dropout": key}
            )

        keys = jax.random.split(rngs["dropout"], count)
        logits, updates = each_member(one, variables, keys)
        return logits.astype(jnp.float32).mean(axis=0), updates


def each_member(fn: Callable, *stacked: PyTree) -> PyTree:
    """`fn` applied along the leading axis of `stacked`, its outputs stacked alike.

    One `vmap` on GPU and TPU. On the CPU the K calls are unrolled in the program: vmap
    turns K models' convolutions into grouped ones, which XLA:CPU runs several times
    slower than K plain convolutions (a K=2 training step: 3.0x for small_cnn, 1.9x for
    MobileViT-XXS; `benchmarks/fusion_members.py`), at the cost of K copies to compile.
    The choice is made when the program is lowered for its platform."""
    return jax.lax.platform_dependent(
        *stacked,
        cpu=lambda *trees: members_unrolled(fn, *trees),
        default=lambda *trees: jax.vmap(fn)(*trees),
    )


def members_unrolled(fn: Callable, *stacked: PyTree) -> PyTree:
    """`jax.vmap(fn)(*stacked)` written as one call of `fn` per member."""
    count = jax.tree.leaves(stacked)[0].shape[0]
    outputs = [fn(*jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(count)]
    return jax.tree.map(lambda *parts: jnp.stack(parts), *outputs)
