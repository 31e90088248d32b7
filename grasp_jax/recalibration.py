"""BatchNorm statistics re-estimated on other data, parameters untouched.

A model can fail on a domain because its features do not transfer, or only because its
normalisation statistics were fitted to other inputs (a shifted colour, a lighter
background). Comparing a model with and without recalibrated statistics tells the two
apart: the source matrix's BatchNorm diagnostic.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from grasp_jax import input_pipeline as ip
from grasp_jax import objective
from grasp_jax.tree_checks import PyTree


@functools.partial(
    jax.jit, static_argnames=("model", "pipeline"), donate_argnames="batch_stats"
)
def _update(model: nn.Module, pipeline, params: PyTree, batch_stats: PyTree, images, rng):
    # normalised inside the program: one dispatch per batch, not one per eager op
    images = ip.normalize(images, pipeline)
    return objective.forward(model, params, batch_stats, images, train=True, rng=rng)[1]


def recalibrate(
    model: nn.Module,
    variables: dict,
    split: Sequence,
    pipeline: ip.PipelineConfig,
    *,
    updates: int = 60,
    key: jax.Array | None = None,
) -> dict:
    """`variables` with BatchNorm running statistics re-estimated on `split`: train-mode
    passes over its centre-cropped batches (in order, repeated until `updates` batches),
    so the running averages forget the old statistics (PyTorch momentum 0.1: 0.9^60 <
    0.2 % of them is left). Parameters are not touched; dropout draws from `key`."""
    key = jax.random.key(0) if key is None else key
    stats = jax.tree.map(lambda x: x.copy(), variables.get("batch_stats", {}))
    done = 0
    while done < updates:
        batches = ip.dataset(split, pipeline, train=False, shard_index=0, shard_count=1)
        for batch in batches:
            rng = jax.random.fold_in(key, done)
            stats = _update(
                model, pipeline, variables["params"], stats, batch["image"], rng
            )
            done += 1
            if done == updates:
                break
        if done == 0:
            raise ValueError("recalibrate got an empty split; pass one with examples")
    return {"params": variables["params"], "batch_stats": stats}
