"""Validation of pytree pairs: mismatches are errors that name the first differing path.

The kernels combine several trees leaf by leaf. `tree_map` would either fail with a terse
treedef dump or, worse, broadcast a wrongly shaped leaf silently. These checks run at trace
time (shapes are static), so they cost nothing once a function is compiled.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def path_str(path: tuple) -> str:
    """Renders a key path as `params/Dense_0/kernel` (the way Flax users read names)."""
    if not path:
        return "<root>"
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """The leaves of `tree` with their rendered paths, in `tree_flatten` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(path), leaf) for path, leaf in flat]


def _shape(leaf) -> tuple:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else jax.numpy.shape(leaf)


def dtype_of(leaf):
    """A leaf's dtype, read off the array where it has one (cheap for eager calls)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype if dtype is not None else jax.numpy.result_type(leaf)


def _quick_match(trees) -> bool:
    """True if every tree has the first's structure and leaf shapes."""
    leaves, treedef = jax.tree_util.tree_flatten(trees[0])
    shapes = [_shape(x) for x in leaves]
    for tree in trees[1:]:
        other, other_def = jax.tree_util.tree_flatten(tree)
        if other_def != treedef or [_shape(x) for x in other] != shapes:
            return False
    return True


def check_same_structure(names: tuple[str, ...], *trees: PyTree) -> None:
    """Raises ValueError unless all trees have the same structure and leaf shapes.

    `names` label the trees in the message (e.g. ("current", "source")).
    """
    if _quick_match(trees):  # the usual case, without rendering any path
        return
    reference = leaves_with_paths(trees[0])
    reference_paths = [path for path, _ in reference]
    for name, tree in zip(names[1:], trees[1:], strict=True):
        other = leaves_with_paths(tree)
        other_paths = [path for path, _ in other]
        if other_paths != reference_paths:
            in_other, in_reference = set(other_paths), set(reference_paths)
            missing = [p for p in reference_paths if p not in in_other]
            extra = [p for p in other_paths if p not in in_reference]
            if missing:
                detail = f"'{missing[0]}' is in {names[0]} but missing from {name}"
            elif extra:
                detail = f"'{extra[0]}' is in {name} but missing from {names[0]}"
            else:
                detail = "the same leaves appear in a different nesting or order"
            raise ValueError(
                f"{names[0]} and {name} have different tree structures: {detail}. "
                "Pass trees of the same model (e.g. both `variables['params']`)."
            )
        if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(trees[0]):
            raise ValueError(
                f"{names[0]} and {name} hold the same leaves in different container "
                "types (e.g. dict and FrozenDict, or list and tuple). Convert both to "
                "plain dicts, e.g. with `flax.core.unfreeze`."
            )
        for (path, a), (_, b) in zip(reference, other, strict=True):
            if jax.numpy.shape(a) != jax.numpy.shape(b):
                raise ValueError(
                    f"leaf '{path}' has shape {jax.numpy.shape(a)} in {names[0]} but "
                    f"{jax.numpy.shape(b)} in {name}. The two models differ in "
                    "architecture or head size; merge only trees of the same model."
                )


def check_floating(names: tuple[str, ...], *trees: PyTree) -> None:
    """Raises ValueError naming the first leaf that is not a floating-point array:
    gradients and parameters are; an integer leaf (a step counter, labels) is a
    tree that was not meant to be merged."""
    for name, tree in zip(names, trees, strict=True):
        dtypes = {dtype_of(x) for x in jax.tree_util.tree_leaves(tree)}
        if all(jax.numpy.issubdtype(d, jax.numpy.floating) for d in dtypes):
            continue  # the usual case: each distinct dtype checked once, no path rendered
        for path, leaf in leaves_with_paths(tree):
            dtype = jax.numpy.result_type(leaf)
            if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
                raise ValueError(
                    f"leaf '{path}' of {name} has dtype {dtype}; GRASP merges "
                    "floating-point parameters and gradients only (pass `params`)."
                )
