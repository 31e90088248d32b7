"""Random trees for tests: Hypothesis strategies for parameter/gradient trees of mixed
ranks and dtypes, and random variables of a zoo model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@st.composite
def tree_specs(draw, min_leaves: int = 1, max_leaves: int = 6):
    """A nested dict/list layout: {path: (shape, dtype)} plus an RNG seed for values."""
    n = draw(st.integers(min_leaves, max_leaves))
    leaves = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=4)))
        leaves.append((shape, draw(st.sampled_from(DTYPES))))
    return leaves, draw(st.integers(0, 2**31 - 1))


def nest(values: list):
    """Puts leaves into a Flax-like nesting with dicts and a list."""
    tree = {}
    for i, value in enumerate(values):
        if i % 3 == 0:
            tree[f"Dense_{i}"] = {"kernel": value}
        elif i % 3 == 1:
            tree.setdefault("block", {})[f"w{i}"] = value
        else:
            tree.setdefault("layers", []).append(value)
    return tree


def make_tree(leaves, rng: np.random.Generator, scale: float = 1.0):
    """Random normal values for a spec, cast to each leaf's dtype (a NumPy tree)."""
    return nest(
        [
            np.asarray(rng.normal(size=shape) * scale).astype(dtype)
            for shape, dtype in leaves
        ]
    )


def related_gradients(leaves, rng: np.random.Generator):
    """Two gradient trees whose leaves range from aligned to opposed to zero."""
    first, second = [], []
    for shape, dtype in leaves:
        a = rng.normal(size=shape)
        kind = rng.integers(5)
        if kind == 0:
            b = a.copy()
        elif kind == 1:
            b = -a
        elif kind == 2:
            b = np.zeros(shape)
        else:
            mix = rng.uniform(-1, 1)
            b = mix * a + (1 - abs(mix)) * rng.normal(size=shape)
        first.append(np.asarray(a).astype(dtype))
        second.append(np.asarray(b).astype(dtype))
    return nest(first), nest(second)


def random_variables(name: str, num_classes: int = 5, seed: int = 0) -> dict:
    """Random Flax variables of zoo model `name` (BatchNorm statistics random too, so
    nothing is trivial), built from the init's shapes without compiling it (MobileViT's
    init takes ~12 s to compile on a 2-core CPU)."""
    from grasp_jax import models

    variables = jax.eval_shape(
        lambda: models.init(name, num_classes, jax.random.key(seed), (1, 64, 64, 3))
    )
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32) for leaf in leaves]
    )
