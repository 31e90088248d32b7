"""`merge_step`: one GRASP transfer (score, then take aligned units) as one XLA program.

Fusing alignment and transfer lets XLA read each gradient once and write the merged
parameters into the donated buffer of `current`, so a merge costs about one pass over the
four input trees plus the output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax.alignment import Granularity, alignment_scores_impl
from grasp_jax.transfer import Mode, transfer_impl
from grasp_jax.tree_checks import PyTree, check_same_structure


class MergeStats(NamedTuple):
    """What a merge did. A NamedTuple, so it is a pytree and leaves `jit` as is."""

    scores: PyTree  # float32 alignment scores, shapes as `alignment_scores` gives them
    mask: PyTree  # bool, parameter shapes: taken from the source (soft: weight > 0)
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
    grad_source), ...)` in one jitted program. `current` and `source` are consumed:
    `current`'s buffers are donated to XLA and become the merged tree, and `source`'s
    arrays are deleted once the merge has read them, so no second model outlives the
    call (copy either tree first if you still need it). `threshold` and `eps` are
    traced (changing them does not recompile); `granularity` and `mode` are static.
    Pass `params` only: BatchNorm statistics are not parameters and must not move.
    """
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
