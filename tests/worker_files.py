"""Trees passed between the test process and its subprocess workers as .npz files.

The workers start from small_cnn variables made by the test process (`save_start`): each
would otherwise compile the model's init afresh (2-4 s; a process with another device
count finds no program of the test's in the cache). They hand results back the same way
(`save_tree`), so that a one-device reference is computed once, in the test process."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from grasp_jax import models

INPUT_SHAPE = (1, 32, 32, 3)
SEEDS = (0, 1)


def _init(seed: int) -> dict:
    return models.init("small_cnn", 10, jax.random.PRNGKey(seed), INPUT_SHAPE)


def save_tree(path, tree) -> None:
    """`tree`'s leaves, as NumPy arrays, to `path` (.npz)."""
    np.savez(path, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))})


def load_tree(path, like):
    """The tree `save_tree` wrote, in the structure of `like`."""
    treedef = jax.tree.structure(like)
    with np.load(path) as stored:
        return jax.tree.unflatten(
            treedef, [stored[str(i)] for i in range(treedef.num_leaves)]
        )


def save_start(path: Path) -> str:
    """Writes small_cnn's variables for every seed in SEEDS to `path`; returns it."""
    save_tree(path, {seed: _init(seed) for seed in SEEDS})
    return str(path)


def load_start(path) -> dict[int, dict]:
    """Every seed's variables that `save_start` wrote, by seed (NumPy leaves)."""
    shapes = jax.eval_shape(_init, SEEDS[0])  # every seed's variables share one structure
    return load_tree(path, dict.fromkeys(SEEDS, shapes))
