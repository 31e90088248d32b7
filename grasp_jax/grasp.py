"""The sequential GRASP driver: one source at a time, merged by gradient alignment.

As the reference codes it (REFERENCE.md 4): fine-tune the first source on the target for
`initial_epochs`; then for each further source: restore it, sum both models' gradients
over `num_alignment_batches` target-train batches (the current model in train mode, so
dropout is on and its BatchNorm statistics move, as in the reference; the source in eval
mode), `merge_step`, then fine-tune for `finetune_epochs` with a fresh AdamW and a
per-epoch cosine, keeping the best-validation state. BatchNorm statistics never transfer.
Only the current model and the one source being merged are alive at any time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grasp_jax import input_pipeline as ip
from grasp_jax import seeding, train
from grasp_jax.merge import merge_step
from grasp_jax.tree_checks import leaves_with_paths

Variables = dict[str, Any]
SourceLoader = Callable[[], Variables]  # restores one source's variables when called


@dataclasses.dataclass(frozen=True)
class GraspConfig:
    """GRASP's hyperparameters; defaults are the reference's (REFERENCE.md 1.5, 4)."""

    initial_epochs: int = 3
    finetune_epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    num_alignment_batches: int = 1
    threshold: float = 0.3
    granularity: str = "tensor"
    mode: str = "hard"
    alignment_current_mode: str = "train"  # the reference's; "eval" is the cleaner one
    augment: bool = True

    def stage_config(self, epochs: int) -> train.TrainConfig:
        """The reference's `fine_tune_model`: plain AdamW, cosine per epoch, no clipping."""
        return train.TrainConfig(
            epochs=epochs,
            learning_rate=self.learning_rate,
            head_lr_multiplier=1.0,
            weight_decay=self.weight_decay,
            grad_clip_norm=None,
            schedule="cosine_per_epoch",
            augment=self.augment,
        )


@dataclasses.dataclass
class StageStats:
    """What one stage did; `fraction_by_layer` maps parameter paths to the share taken."""

    source: str
    fraction: float = 0.0
    fraction_by_layer: dict[str, float] = dataclasses.field(default_factory=dict)
    n_transferred: int = 0
    nonfinite_leaves: int = 0
    val_accuracy_before_merge: float | None = None
    val_accuracy_after_merge: float | None = None
    val_accuracy_after_finetune: float | None = None
    history: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GraspResult:
    variables: Variables
    stages: list[StageStats]


@functools.partial(jax.jit, static_argnames=("model", "train_mode"))
def _loss_and_grads(model: nn.Module, params, batch_stats, images, labels, rng, train_mode):
    """Loss gradient on one batch; in train mode also the updated BatchNorm statistics."""

    def loss_fn(p):
        variables = {"params": p, "batch_stats": batch_stats}
        if train_mode:
            logits, updates = model.apply(
                variables,
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            return train.cross_entropy(logits, labels), updates.get(
                "batch_stats", batch_stats
            )
        return train.cross_entropy(model.apply(variables, images, train=False), labels), (
            batch_stats
        )

    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), new_stats


def alignment_gradients(
    model: nn.Module,
    variables: Variables,
    batches: Sequence[dict],
    *,
    train_mode: bool,
) -> tuple[Any, Any]:
    """Gradients summed over `batches` (preprocessed images) and the final BN statistics."""
    total, stats = None, variables.get("batch_stats", {})
    for batch in batches:
        grads, stats = _loss_and_grads(
            model,
            variables["params"],
            stats,
            batch["image"],
            batch["label"],
            batch["rng"],
            train_mode,
        )
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    return total, stats


def preprocess_alignment_batches(
    train_source, pipeline: ip.PipelineConfig, config: GraspConfig, key
) -> list[dict]:
    """The first `num_alignment_batches` of a fresh pass over the target train split,
    preprocessed once so both models see the same images (as in the reference). Each
    batch carries the dropout key (`rng`) its train-mode forward pass uses."""
    batches = ip.dataset(
        train_source,
        pipeline,
        train=True,
        seed=seeding.int_seed(seeding.stream(key, "data")),
    )
    chosen = list(itertools.islice(iter(batches), config.num_alignment_batches))
    out = []
    for i, batch in enumerate(chosen):
        augment_key = seeding.stream(key, "augment", i)
        images = (
            ip.augment(augment_key, batch["image"], pipeline)
            if config.augment
            else ip.normalize(batch["image"], pipeline)
        )
        out.append(
            {
                "image": images,
                "label": jnp.asarray(batch["label"]),
                "rng": seeding.stream(key, "dropout", i),
            }
        )
    return out


def fraction_by_layer(mask) -> dict[str, float]:
    return {path: float(np.mean(np.asarray(m))) for path, m in leaves_with_paths(mask)}


def run_grasp(
    model: nn.Module,
    first_source: Variables,
    later_sources: Iterable[tuple[str, SourceLoader]],
    target: dict,
    *,
    config: GraspConfig,
    pipeline: ip.PipelineConfig,
    key: jax.Array,
    first_name: str = "source_0",
    progress: bool = True,
    evaluate_merges: bool = True,
) -> GraspResult:
    """Runs GRASP on `target` (a dict with `train` and `validation` splits).

    `later_sources` yields `(name, loader)` pairs in merge order; each loader restores one
    source's variables when called (e.g. from Orbax), so only one source is in memory.
    A stage of 0 epochs skips its fine-tuning (to study the merges alone). Every random
    stream (data order, augmentation, dropout) derives from `key` by name and stage.
    """

    def finetune(variables, epochs: int, stage: int, label: str):
        if epochs == 0:
            return variables, None, []
        fit = train.fit(
            model,
            variables,
            target["train"],
            target["validation"],
            config=config.stage_config(epochs),
            pipeline=pipeline,
            seed=seeding.int_seed(seeding.stream(key, "finetune", stage)),
            progress=progress,
            description=label,
        )
        return fit.variables, fit.best_val_accuracy, fit.history

    current, best, history = finetune(
        first_source, config.initial_epochs, 0, f"grasp stage 0 ({first_name})"
    )
    stages = [
        StageStats(source=first_name, val_accuracy_after_finetune=best, history=history)
    ]
    for stage, (name, load) in enumerate(later_sources, start=1):
        stats = StageStats(source=name)
        batches = preprocess_alignment_batches(
            target["train"], pipeline, config, seeding.stream(key, "alignment", stage)
        )
        if evaluate_merges:
            stats.val_accuracy_before_merge = validation_accuracy(
                model, current, target, pipeline
            )
        grad_current, current_stats = alignment_gradients(
            model,
            current,
            batches,
            train_mode=config.alignment_current_mode == "train",
        )
        source = load()
        grad_source, _ = alignment_gradients(model, source, batches, train_mode=False)
        merged, merge_stats = merge_step(
            jax.tree.map(jnp.array, current["params"]),  # a copy: merge_step consumes it
            source["params"],
            grad_current,
            grad_source,
            threshold=config.threshold,
            granularity=config.granularity,
            mode=config.mode,
        )
        del source, grad_source  # the source's arrays were consumed by merge_step
        current = {"params": merged, "batch_stats": current_stats}
        stats.fraction = float(merge_stats.fraction)
        stats.fraction_by_layer = fraction_by_layer(merge_stats.mask)
        stats.n_transferred = int(
            sum(int(np.sum(m)) for m in jax.tree.leaves(merge_stats.mask))
        )
        stats.nonfinite_leaves = int(merge_stats.nonfinite)
        if evaluate_merges:
            stats.val_accuracy_after_merge = validation_accuracy(
                model, current, target, pipeline
            )
        current, stats.val_accuracy_after_finetune, stats.history = finetune(
            current, config.finetune_epochs, stage, f"grasp stage {stage} ({name})"
        )
        stages.append(stats)
    return GraspResult(variables=current, stages=stages)


def validation_accuracy(model, variables, target, pipeline) -> float:
    return predict(model, variables, target["validation"], pipeline)["accuracy"]


def predict(model: nn.Module, variables: Variables, source, pipeline) -> dict[str, Any]:
    """Accuracy, logits and labels of `variables` on a split (eval mode)."""
    state = train.create_train_state(variables, optax.identity(), 0)
    _, eval_step = train.make_steps(model, pipeline, train.TrainConfig(augment=False), 1)
    replicated, batch_sharding = train.data_parallel()
    return train.evaluate(
        eval_step,
        jax.device_put(state, replicated),
        ip.dataset(source, pipeline, train=False),
        batch_sharding,
    )
