"""Evaluation every method shares: padded batches, all processes, logits gathered.

`predict(model, variables, split, pipeline)` is what a method calls to score a model on a
split; `evaluate` is the loop behind it (and behind `loop.fit`'s validation).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from grasp_jax import input_pipeline as ip
from grasp_jax import train

Variables = dict[str, Any]


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a (last, partial) batch to `size` rows with a `valid` mask, so every batch
    has one shape (no recompilation) and splits evenly over devices and processes."""
    n = len(batch["label"])
    padded = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    padded["valid"] = (np.arange(size) < n).astype(np.float32)
    return padded


def evaluate(
    eval_step: Callable[[Variables, dict], dict],
    variables: Variables,
    split: Sequence,
    pipeline: ip.PipelineConfig,
    batch_sharding: jax.sharding.Sharding,
) -> dict[str, Any]:
    """Loss, accuracy, logits and labels of one eval pass over `split`, all processes.

    Every process runs the same number of batches of one padded shape (a process whose
    shard ran out feeds empty ones), so their collectives always meet.
    """
    devices = jax.local_device_count()
    local_batch = ip.local_batch_size(pipeline.batch_size)
    size = -(-local_batch // devices) * devices
    per_process = -(-len(split) // jax.process_count())
    num_batches = -(-per_process // local_batch)
    crop = pipeline.crop_size
    empty = {
        "image": np.zeros((0, crop, crop, 3), np.uint8),
        "label": np.zeros((0,), np.int32),
    }
    batches = itertools.chain(
        ip.dataset(split, pipeline, train=False), itertools.repeat(empty)
    )
    # Every batch is dispatched before any result is read: an accelerator runs them
    # back to back while the host prepares the next, instead of waiting for a read-back
    # after each. The host then sums in batch order, as it always did.
    dispatched = []
    for batch in itertools.islice(batches, num_batches):
        padded = pad_batch(batch, size)
        out = eval_step(variables, ip.shard_batch(padded, batch_sharding))
        dispatched.append((out, padded["valid"], padded["label"]))  # not the images
    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    logits, labels = [], []
    for out, valid, label in dispatched:
        for key in total:
            total[key] += out[key].item()
        global_logits = multihost_utils.process_allgather(out["logits"], tiled=True)
        global_valid = multihost_utils.process_allgather(valid, tiled=True) > 0
        logits.append(np.asarray(global_logits)[global_valid])
        labels.append(multihost_utils.process_allgather(label, tiled=True)[global_valid])
    count = max(total["count"], 1.0)
    return {
        "loss": total["loss_sum"] / count,
        "accuracy": total["correct"] / count,
        "logits": np.concatenate(logits) if logits else np.zeros((0,)),
        "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int32),
    }


def predict(
    model: nn.Module, variables: Variables, split: Sequence, pipeline: ip.PipelineConfig
) -> dict[str, Any]:
    """Loss, accuracy, logits and labels of `variables` on a split (eval mode)."""
    replicated, batch_sharding = ip.data_parallel()
    return evaluate(
        lambda v, b: train.eval_step(v, b, model=model, pipeline=pipeline),
        jax.device_put(variables, replicated),
        split,
        pipeline,
        batch_sharding,
    )
