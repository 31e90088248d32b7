"""The training recipe: its settings, learning-rate schedules and the optimiser.

`make_optimizer` computes the schedule inside the step: one optimiser (and compiled step)
per (recipe, steps per epoch), cached. `loop.fit` feeds the rates in instead: the
optimiser of `optimizer_for` takes each group's rate as an argument, which
`train.train_step` takes from the state, where the loop puts what a small program of
the schedule computes (`learning_rates`). Recipes that differ only in their schedule (a
stage's epochs, a baseline's learning rate, another split's steps) then share one
compiled training step. The fed rates are the in-step schedule's to the bit: the same
operations, which XLA folds with the same constants, compute them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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

    return _clipped_groups(
        {"backbone": adamw(1.0), "head": adamw(config.head_lr_multiplier)},
        config.grad_clip_norm,
    )


def _clipped_groups(by_group: dict, grad_clip_norm: float | None):
    """Each parameter group (`head_labels`) through its optimiser, after clipping the
    gradients by their global norm (none with no norm)."""
    optimizer = optax.multi_transform(by_group, head_labels)
    if grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), optimizer)
    return optimizer


def scale_by_fed_learning_rate(group: str) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_learning_rate` with `group`'s rate handed to `update` as an extra
    argument (`learning_rates`, a dict of group rates; `train.train_step` passes the
    state's)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, learning_rates, **extra_args):
        del params, extra_args
        step_size = -1 * learning_rates[group]
        return jax.tree.map(lambda g: jnp.array(step_size, g.dtype) * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


@functools.cache
def fed_optimizer(
    weight_decay: float, grad_clip_norm: float | None
) -> optax.GradientTransformationExtraArgs:
    """`make_optimizer`'s optimiser with each group's rate fed in: one object, and so
    one compiled step, per (weight decay, clipping)."""

    def adamw(group: str):  # optax.adamw's chain, with its defaults
        return optax.chain(
            optax.scale_by_adam(),
            optax.add_decayed_weights(weight_decay),
            scale_by_fed_learning_rate(group),
        )

    return _clipped_groups({g: adamw(g) for g in ("backbone", "head")}, grad_clip_norm)


def optimizer_for(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The fed optimiser of `config` (`fed_optimizer`); its rates: `learning_rates`."""
    return fed_optimizer(config.weight_decay, config.grad_clip_norm or None)


@functools.cache
def learning_rates(config: TrainConfig, steps_per_epoch: int):
    """A jitted function of the step count giving each group's rate for the fed
    optimiser, computed as `make_optimizer`'s step computes it (the same operations,
    which XLA folds with the same constants: the same floats)."""
    schedule = make_schedule(config, steps_per_epoch)
    multipliers = {"backbone": 1.0, "head": config.head_lr_multiplier}
    return jax.jit(lambda step: {g: schedule(step) * m for g, m in multipliers.items()})
