"""The training recipe: its settings, learning-rate schedules and the optimiser.

Built once per (recipe, steps per epoch) and cached, so every run with the same setup
hands the same optimiser object to the jitted step, which then compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from grasp_jax.tree_checks import PyTree, path_str

HEAD_KEYS = ("head", "classifier", "fc")  # the reference's head-parameter name markers
SCHEDULES = ("warmup_cosine", "cosine_per_epoch", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The source-training recipe; defaults are the reference's (docs/reference.md §3)."""

    epochs: int = 15
    learning_rate: float = 3e-4
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    warmup_fraction: float = 2 / 15  # warmup_epochs / max_epochs
    grad_clip_norm: float | None = 1.0
    # per step; "cosine_per_epoch" is GRASP's stage recipe; "constant" PEARL's composition
    schedule: str = "warmup_cosine"
    augment: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {list(SCHEDULES)}")


def fine_tuning(
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    augment: bool,
    schedule: str = "cosine_per_epoch",
) -> TrainConfig:
    """The reference's `fine_tune_model` shape (GRASP's stages, FUSION, PEARL): plain
    AdamW over all parameters alike, no clipping, cosine stepped per epoch."""
    return TrainConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        head_lr_multiplier=1.0,
        weight_decay=weight_decay,
        grad_clip_norm=None,
        schedule=schedule,
        augment=augment,
    )


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The reference's per-step LambdaLR: base * s / W while s < W (step 0 runs at 0),
    then a cosine from base to 0 over the remaining steps."""
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, base_lr, max(warmup_steps, 1)),
            optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1)),
        ],
        [warmup_steps],
    )


def cosine_per_epoch(base_lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """CosineAnnealingLR(T_max=epochs) stepped once per epoch: constant within an epoch."""
    cosine = optax.cosine_decay_schedule(base_lr, max(epochs, 1))
    return lambda step: cosine(step // max(steps_per_epoch, 1))


@functools.cache
def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The per-step learning rate of the backbone (the head's is a multiple)."""
    if config.schedule == "warmup_cosine":
        total = config.epochs * steps_per_epoch
        return warmup_cosine(
            config.learning_rate, total, int(total * config.warmup_fraction)
        )
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    return cosine_per_epoch(config.learning_rate, config.epochs, steps_per_epoch)


def head_labels(params: PyTree) -> PyTree:
    """'head' for parameters under a module named head/classifier/fc, else 'backbone'."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels = [
        "head" if set(path_str(path).split("/")) & set(HEAD_KEYS) else "backbone"
        for path, _ in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, labels)


@functools.cache
def make_optimizer(
    config: TrainConfig, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decay on all parameters) with a faster head."""
    schedule = make_schedule(config, steps_per_epoch)

    def adamw(multiplier: float):
        return optax.adamw(
            lambda step: schedule(step) * multiplier, weight_decay=config.weight_decay
        )

    optimizer = optax.multi_transform(
        {"backbone": adamw(1.0), "head": adamw(config.head_lr_multiplier)}, head_labels
    )
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer
