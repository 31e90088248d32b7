"""`merge_step`: one GRASP transfer (score, then take the aligned units).

The reference's case (whole tensors, hard copies) decides before it writes anything: one
jitted program reads the two gradient trees and returns a score per leaf, and the merged
tree is then assembled from the leaves of `current` and `source` themselves, so no
parameter byte is read or written; the leaves that lose are freed. The finer and soft
cases run as one XLA program that fuses alignment and transfer and writes the merged
parameters into the donated buffer of `current`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.alignment import Granularity, alignment_scores_impl
from grasp_jax.transfer import Mode, check_pair, transfer_impl
from grasp_jax.tree_checks import PyTree, check_same_structure


class MergeStats(NamedTuple):
    """What a merge did. A NamedTuple, so it is a pytree and leaves `jit` as is."""

    scores: PyTree  # float32 alignment scores, shapes as `alignment_scores` gives them
    # bool, parameter shapes: taken from the source (soft: weight > 0). For tensor/hard,
    # read-only NumPy broadcasts of one decision per leaf (no memory), and the scores,
    # fraction and count are NumPy float32/int32 scalars read back in one transfer.
    mask: PyTree
    fraction: jax.Array  # float32 scalar: share of parameter elements taken (soft: mean w)
    nonfinite: jax.Array  # int32 scalar: number of leaves with a non-finite score


@functools.partial(
    jax.jit, static_argnames=("granularity", "mode"), donate_argnames=("current",)
)
def merge_program(
    current, source, grad_current, grad_source, threshold, eps, *, granularity, mode
):
    """The single XLA program behind `merge_step` (which also frees `source`): `merged`
    is written into the donated `current` buffer. Public for ahead-of-time lowering
    (`merge_program.lower(...)`, e.g. FLOPs); call `merge_step` to merge."""
    check_same_structure(
        ("current", "source", "grad_current"), current, source, grad_current
    )
    scores = alignment_scores_impl(grad_current, grad_source, granularity, eps)
    result = transfer_impl(current, source, scores, threshold, mode)
    nonfinite = sum(
        (jnp.any(~jnp.isfinite(s)).astype(jnp.int32) for s in jax.tree.leaves(scores)),
        jnp.int32(0),
    )
    return result.params, MergeStats(scores, result.mask, result.fraction, nonfinite)


def merge_step(
    current: PyTree,
    source: PyTree,
    grad_current: PyTree,
    grad_source: PyTree,
    *,
    threshold: float = 0.3,
    granularity: Granularity = "tensor",
    mode: Mode = "hard",
    eps: float = 1e-8,
) -> tuple[PyTree, MergeStats]:
    """Scores the gradients' alignment and transfers the agreeing units of `source`.

    Equivalent to `transfer(current, source, alignment_scores(grad_current,
    grad_source), ...)`. `current` and `source` are consumed: their leaves become the
    merged tree or are deleted, so no second model outlives the call (copy either tree
    first if you still need it). Tensor/hard takes whole leaves without copying them;
    the other cases donate `current`'s buffers to one XLA program that writes the merged
    tree. `threshold` and `eps` never recompile; `granularity` and `mode` are static.
    Pass `params` only: BatchNorm statistics are not parameters and must not move.
    """
    if granularity == "tensor" and mode == "hard":
        return _take_whole_leaves(
            current, source, grad_current, grad_source, threshold, eps
        )
    merged, stats = merge_program(
        current,
        source,
        grad_current,
        grad_source,
        threshold,
        eps,
        granularity=granularity,
        mode=mode,
    )
    for leaf in jax.tree.leaves(source):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
    return merged, stats


@jax.jit
def _score_vector(grad_current, grad_source, eps):
    """Per-leaf tensor scores stacked into one vector: one output buffer, one transfer."""
    scores = alignment_scores_impl(grad_current, grad_source, "tensor", eps)
    leaves = jax.tree.leaves(scores)
    return jnp.stack(leaves) if leaves else jnp.zeros((0,), jnp.float32)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# The byte every constant mask views; read-only too, so no view can be made writeable.
_ONE_BYTE = {value: _read_only(np.full((), value)) for value in (True, False)}


def _constant_mask(value, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only bool array of `shape` that is `value` everywhere, viewing one byte
    (what `np.broadcast_to` makes, without its ~4 us of Python per leaf)."""
    return _read_only(
        np.ndarray(shape, np.bool_, _ONE_BYTE[bool(value)], 0, (0,) * len(shape))
    )


def _take_whole_leaves(current, source, grad_current, grad_source, threshold, eps):
    """The reference's case: decide per leaf on the host from one score program, then
    hand back `source`'s leaf or `current`'s own (no copy), deleting the other."""
    check_pair(current, source)
    check_same_structure(("current", "grad_current"), current, grad_current)
    values = np.asarray(_score_vector(grad_current, grad_source, eps), np.float32)
    take = np.isfinite(values) & (values > np.float32(threshold))
    current_leaves, treedef = jax.tree.flatten(current)
    source_leaves = treedef.flatten_up_to(source)
    merged = []
    for c, s, t in zip(current_leaves, source_leaves, take, strict=True):
        kept, lost = (s, c) if t else (c, s)
        if isinstance(lost, jax.Array) and lost is not kept and not lost.is_deleted():
            lost.delete()
        merged.append(kept if isinstance(kept, jax.Array) else jnp.asarray(kept))
    sizes = np.array([np.size(c) for c in current_leaves], np.float64)
    total = sizes.sum()
    fraction = float(sizes[take].sum() / total) if total else 0.0
    mask = treedef.unflatten(
        [_constant_mask(t, np.shape(c)) for c, t in zip(current_leaves, take, strict=True)]
    )
    scores = treedef.unflatten(list(values))  # float32 scalars, one per leaf
    stats = MergeStats(
        scores, mask, np.float32(fraction), np.int32(np.sum(~np.isfinite(values)))
    )
    return treedef.unflatten(merged), stats


def random_merge_step(
    current: PyTree,
    source: PyTree,
    grad_current: PyTree,
    grad_source: PyTree,
    *,
    key: jax.Array,
    threshold: float = 0.3,
    granularity: Granularity = "tensor",
    eps: float = 1e-8,
) -> tuple[PyTree, MergeStats]:
    """The control for what alignment adds: moves as many units as `merge_step`'s hard
    rule would (finite `score > threshold`), chosen uniformly at random among all units
    (tensors, channels or elements as `granularity` makes them), copied whole.

    `MergeStats.scores` are the alignment scores the count came from; `mask` and
    `fraction` say what actually moved. Not donating: a study control, not a hot path.
    """
    scores = alignment_scores_impl(grad_current, grad_source, granularity, eps)
    leaves, treedef = jax.tree.flatten(scores)
    sizes = [int(jnp.size(s)) for s in leaves]
    count = int(sum(int(jnp.sum(jnp.isfinite(s) & (s > threshold))) for s in leaves))
    picked = jnp.zeros(sum(sizes), jnp.float32)
    picked = picked.at[jax.random.permutation(key, sum(sizes))[:count]].set(1.0)
    offsets = np.cumsum([0, *sizes])
    random_scores = treedef.unflatten(
        [
            picked[start:end].reshape(jnp.shape(s))
            for s, start, end in zip(leaves, offsets[:-1], offsets[1:], strict=True)
        ]
    )
    result = transfer_impl(current, source, random_scores, 0.5, "hard")
    nonfinite = sum(int(jnp.any(~jnp.isfinite(s))) for s in leaves)
    return result.params, MergeStats(
        scores, result.mask, result.fraction, jnp.int32(nonfinite)
    )
