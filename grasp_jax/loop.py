"""`fit`: the train and eval steps wired into epochs, as every method trains.

Each epoch: one pass of `train.train_step` over the shuffled train split, validation with
`evaluation.evaluate`, best-epoch selection (strict `>`, so ties keep the earlier epoch,
as the reference does), TensorBoard scalars and a progress bar. With a `workdir` the run
is checkpointed after every epoch and resumes from the last one. An epoch whose training
loss is not finite stops the run: its state is never kept or checkpointed, the best
earlier epoch (or the starting variables) is returned, and `FitResult.stopped` says why.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from grasp_jax import evaluation, recipe, train
from grasp_jax import input_pipeline as ip
from grasp_jax.checkpoints import TrainProgress


@dataclasses.dataclass
class FitResult:
    """The best-validation variables of a run and its per-epoch history."""

    variables: dict
    best_val_accuracy: float
    best_epoch: int
    history: list[dict]
    seconds: float
    stopped: str | None = None  # why training stopped early (a non-finite loss)


def fit(
    model: nn.Module,
    variables: dict,
    train_split: Sequence,
    val_split: Sequence,
    *,
    config: recipe.TrainConfig,
    pipeline: ip.PipelineConfig,
    seed: int = 0,
    workdir: str | Path | None = None,
    writer: Any = None,
    progress: bool = True,
    description: str = "train",
    optimizer: optax.GradientTransformation | None = None,
) -> FitResult:
    """Trains from `variables` for `config.epochs`; returns the best-validation variables.

    `optimizer` replaces the recipe's (which still sets the epochs, the augmentation and
    the logged learning rate); build it once and reuse it, as it keys the compiled step
    (the recipe's own is fed its rates and serves every schedule).

    With `workdir`, the state is checkpointed after every epoch and a rerun resumes from
    the last finished epoch (same seed: the same result as an uninterrupted run).
    """
    start = time.perf_counter()
    steps = ip.steps_per_epoch(train_split, pipeline.batch_size)
    if steps == 0:
        raise ValueError(
            f"{description}: {len(train_split)} training examples make no full batch of "
            f"{pipeline.batch_size}; lower the batch size."
        )
    schedule = recipe.make_schedule(config, steps)
    # The recipe's rates are fed into the step, which then serves every schedule.
    tx = optimizer if optimizer is not None else recipe.optimizer_for(config)
    rates = recipe.learning_rates(config, steps) if optimizer is None else None
    replicated, batch_sharding = ip.data_parallel()
    # The state is donated step after step: copy, so the caller's variables survive.
    state = train.create_train_state(device_copy(variables), tx, seed)
    state = jax.device_put(state, jax.tree.map(lambda x: placement(x, replicated), state))
    if rates is not None:  # set before every step; here so checkpoints hold them too
        state = state.replace(learning_rates=rates(state.step))

    def train_step(state, batch):
        return train.train_step(
            state, batch, model=model, pipeline=pipeline, augment=config.augment
        )

    def eval_step(variables, batch):
        return train.eval_step(variables, batch, model=model, pipeline=pipeline)

    best = {"accuracy": -math.inf, "epoch": -1, "variables": None}
    stopped = None
    history: list[dict] = []
    first_epoch = 0
    saved = TrainProgress(workdir) if workdir is not None else None
    if saved is not None and saved.last_epoch() is not None:
        state, best, history = saved.restore(state)
        first_epoch = saved.last_epoch() + 1

    bar = tqdm(
        total=config.epochs * steps,
        initial=first_epoch * steps,
        desc=description,
        disable=not progress,
        leave=False,
    )
    try:
        for epoch in range(first_epoch, config.epochs):
            epoch_start = time.perf_counter()
            learning_rate = float(schedule(epoch * steps))
            step_metrics = []  # stays on device: one host sync per epoch, not per step
            batches = ip.dataset(train_split, pipeline, train=True, seed=seed, epoch=epoch)
            for batch in itertools.islice(batches, steps):  # shards may differ by a batch
                if rates is not None:
                    state = state.replace(learning_rates=rates(state.step))
                state, metrics = train_step(state, ip.shard_batch(batch, batch_sharding))
                step_metrics.append(metrics)
                bar.update(1)
            means = {
                k: float(np.mean([m[k] for m in jax.device_get(step_metrics)]))
                for k in ("loss", "accuracy")
            }
            if not math.isfinite(means["loss"]):
                kept = f"epoch {best['epoch']}" if best["epoch"] >= 0 else "the start"
                stopped = (
                    f"{description}: training loss {means['loss']} in epoch {epoch}; "
                    f"stopped there, keeping the variables of {kept}"
                )
                warnings.warn(stopped, RuntimeWarning, stacklevel=2)
                history.append({"epoch": epoch, "stopped": stopped})
                break
            val = evaluation.evaluate(
                eval_step, state.variables, val_split, pipeline, batch_sharding
            )
            record = {
                "epoch": epoch,
                "train_loss": means["loss"],
                "train_accuracy": means["accuracy"],
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "learning_rate": learning_rate,
                "images_per_second": steps
                * pipeline.batch_size
                / (time.perf_counter() - epoch_start),
            }
            history.append(record)
            if val["accuracy"] > best["accuracy"]:
                best = {
                    "accuracy": val["accuracy"],
                    "epoch": epoch,
                    "variables": device_copy(state.variables),
                }
            bar.set_postfix(
                epoch=epoch,
                loss=f"{record['train_loss']:.3f}",
                val=f"{val['accuracy']:.3f}",
            )
            if writer is not None:
                for key, value in record.items():
                    if key != "epoch":
                        writer.add_scalar(f"{description}/{key}", value, epoch)
                writer.flush()
            if saved is not None:
                saved.save(epoch, state, best, history)
    finally:
        # An interrupted run still finishes its pending (asynchronous) checkpoint
        # save, so a rerun never reads a half-written epoch.
        bar.close()
        if saved is not None:
            saved.close()
    if best["variables"] is None:  # stopped in the first epoch: keep the start
        start_val = evaluation.evaluate(
            eval_step, variables, val_split, pipeline, batch_sharding
        )
        best = {
            "accuracy": start_val["accuracy"],
            "epoch": -1,
            "variables": device_copy(variables),
        }
    return FitResult(
        stopped=stopped,
        variables=best["variables"],
        best_val_accuracy=float(best["accuracy"]),
        best_epoch=int(best["epoch"]),
        history=history,
        seconds=time.perf_counter() - start,
    )


def placement(leaf, replicated: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """Where a state leaf lives: as the caller laid it out when it spans several devices
    (e.g. parameters sharded over a "model" axis), else replicated for data parallelism."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
        return sharding
    return replicated


@jax.jit
def device_copy(tree):
    """A copy of `tree` on the devices (and with the shardings) it has: the best epoch's
    variables outlive the donated state without a trip to the host."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
