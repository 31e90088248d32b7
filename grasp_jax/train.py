"""Training library: the reference's recipe as pure, jitted steps over a TrainState.

`train_step(state, batch)` and `eval_step(state, batch)` are pure functions (the state is
donated); `fit` wires them into epochs with validation, best-checkpoint selection, Orbax
resume, TensorBoard metrics and a progress bar. Data parallelism needs nothing here:
place the state replicated and the batches sharded along "data" (`data_parallel`) and XLA
partitions the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from grasp_jax import input_pipeline as ip
from grasp_jax.tree_checks import PyTree, path_str

HEAD_KEYS = ("head", "classifier", "fc")  # the reference's head-parameter name markers


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The source-training recipe; defaults are the reference's (REFERENCE.md 3.2)."""

    epochs: int = 15
    learning_rate: float = 3e-4
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    warmup_fraction: float = 2 / 15  # warmup_epochs / max_epochs
    grad_clip_norm: float | None = 1.0
    schedule: str = "warmup_cosine"  # per step; "cosine_per_epoch" is GRASP's stage recipe
    augment: bool = True


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it is donated and checkpointed whole."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array  # a raw uint32 key: Orbax stores it like any array


def reference_schedule(
    base_lr: float, total_steps: int, warmup_steps: int
) -> Callable[[jax.Array], jax.Array]:
    """LR at step s: base * s / W while s < W (step 0 runs at 0), then cosine to 0."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return base_lr * jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def epoch_cosine_schedule(
    base_lr: float, epochs: int, steps_per_epoch: int
) -> Callable[[jax.Array], jax.Array]:
    """CosineAnnealingLR(T_max=epochs) stepped per epoch: constant within an epoch."""

    def schedule(step):
        epoch = jnp.floor(jnp.asarray(step, jnp.float32) / max(steps_per_epoch, 1))
        return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max(epochs, 1)))

    return schedule


def head_labels(params: PyTree) -> PyTree:
    """'head' for parameters under a module named head/classifier/fc, else 'backbone'."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels = []
    for path, _ in flat:
        parts = path_str(path).split("/")
        labels.append("head" if any(p in HEAD_KEYS for p in parts) else "backbone")
    return jax.tree_util.tree_unflatten(treedef, labels)


def make_schedule(config: TrainConfig, steps_per_epoch: int):
    """The per-step learning rate of the backbone (the head's is a multiple)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "warmup_cosine":
        return reference_schedule(
            config.learning_rate, total, int(total * config.warmup_fraction)
        )
    if config.schedule == "cosine_per_epoch":
        return epoch_cosine_schedule(config.learning_rate, config.epochs, steps_per_epoch)
    raise ValueError(
        f"schedule={config.schedule!r}; use 'warmup_cosine' or 'cosine_per_epoch'"
    )


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


def create_train_state(
    variables: PyTree, tx: optax.GradientTransformation, seed: int
) -> TrainState:
    """A state at step 0 from model variables (`params`, optional `batch_stats`)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy, in float32 whatever the compute dtype."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=4)
def _train_step(
    model: nn.Module,
    pipeline: ip.PipelineConfig,
    config: TrainConfig,
    steps_per_epoch: int,
    state: TrainState,
    batch: dict,
) -> tuple[TrainState, dict]:
    """One optimiser step. The hashable (model, pipeline, config, steps_per_epoch) are
    static, so every run with the same setup reuses one compiled program."""
    schedule = make_schedule(config, steps_per_epoch)
    tx = make_optimizer(config, steps_per_epoch)
    rng, augment_rng, dropout_rng = jax.random.split(state.rng, 3)
    if config.augment:
        images = ip.augment(augment_rng, batch["image"], pipeline)
    else:
        images = ip.normalize(batch["image"], pipeline)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        return cross_entropy(logits, batch["label"]), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
        rng=rng,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": schedule(state.step),
    }
    return new_state, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(
    model: nn.Module, pipeline: ip.PipelineConfig, state: TrainState, batch: dict
) -> dict:
    """Sums over the batch's valid rows (padding rows count for nothing), and logits."""
    images = ip.normalize(batch["image"], pipeline)
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    labels, valid = batch["label"], batch["valid"]
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    return {
        "loss_sum": jnp.sum(losses * valid),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
        "count": jnp.sum(valid),
        "logits": logits.astype(jnp.float32),
    }


def make_steps(
    model: nn.Module, pipeline: ip.PipelineConfig, config: TrainConfig, steps_per_epoch: int
):
    """`train_step(state, batch) -> (state, metrics)` (state donated) and
    `eval_step(state, batch) -> metrics`, jitted. Batches hold uint8 `image` and int
    `label`; eval batches also a float `valid` mask (see `pad_batch`). The optimiser is
    `make_optimizer(config, steps_per_epoch)`, built inside the compiled step."""
    return (
        functools.partial(_train_step, model, pipeline, config, steps_per_epoch),
        functools.partial(_eval_step, model, pipeline),
    )


def data_parallel() -> tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding]:
    """(replicated, batch-sharded) shardings over every device of every process."""
    # Auto axes: XLA propagates the batch sharding (explicit sharding-in-types would
    # demand annotations inside every model).
    mesh = jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return replicated, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


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


def evaluate(eval_step, state: TrainState, batches, batch_sharding) -> dict[str, Any]:
    """Loss, accuracy, logits and labels over all batches of every process."""
    from jax.experimental import multihost_utils

    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    logits, labels = [], []
    size = None
    for batch in batches:
        if size is None:  # the first batch is the largest: round up to split evenly
            per_device = -(-len(batch["label"]) // jax.local_device_count())
            size = per_device * jax.local_device_count()
        local = pad_batch(batch, size)
        out = eval_step(state, ip.shard_batch(local, batch_sharding))
        for key in total:
            total[key] += out[key].item()
        global_logits = multihost_utils.process_allgather(out["logits"], tiled=True)
        global_valid = multihost_utils.process_allgather(local["valid"], tiled=True) > 0
        logits.append(np.asarray(global_logits)[global_valid])
        labels.append(
            multihost_utils.process_allgather(local["label"], tiled=True)[global_valid]
        )
    count = max(total["count"], 1.0)
    return {
        "loss": total["loss_sum"] / count,
        "accuracy": total["correct"] / count,
        "logits": np.concatenate(logits) if logits else np.zeros((0,)),
        "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int32),
    }


@dataclasses.dataclass
class FitResult:
    """The best-validation variables of a run and its per-epoch history."""

    variables: dict
    best_val_accuracy: float
    best_epoch: int
    history: list[dict]
    seconds: float


def _to_host(tree: PyTree) -> PyTree:
    return jax.tree.map(np.asarray, tree)


def fit(
    model: nn.Module,
    variables: dict,
    train_source: Sequence,
    val_source: Sequence,
    *,
    config: TrainConfig,
    pipeline: ip.PipelineConfig,
    seed: int = 0,
    workdir: str | Path | None = None,
    writer: Any = None,
    progress: bool = True,
    description: str = "train",
) -> FitResult:
    """Trains from `variables` for `config.epochs`; returns the best-validation variables.

    With `workdir`, the state is checkpointed after every epoch and a rerun resumes from
    the last finished epoch (same seed: the same result as an uninterrupted run).
    Selection is strict (`>`), so ties keep the earlier epoch, as the reference does.
    """
    start = time.perf_counter()
    steps_per_epoch = len(train_source) // jax.process_count() // pipeline.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{description}: {len(train_source)} training examples make no full batch of "
            f"{pipeline.batch_size}; lower the batch size."
        )
    schedule = make_schedule(config, steps_per_epoch)
    tx = make_optimizer(config, steps_per_epoch)
    replicated, batch_sharding = data_parallel()
    # The state is donated step after step: copy, so the caller's variables survive.
    own = jax.tree.map(lambda x: jnp.array(x, copy=True), variables)
    state = jax.device_put(create_train_state(own, tx, seed), replicated)
    train_step, eval_step = make_steps(model, pipeline, config, steps_per_epoch)

    best = {"accuracy": -math.inf, "epoch": -1, "variables": None}
    history: list[dict] = []
    first_epoch = 0
    manager = None
    if workdir is not None:
        manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )
        if manager.latest_step() is not None:
            state, best, history = _restore(manager, state, replicated)
            first_epoch = manager.latest_step() + 1

    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=first_epoch * steps_per_epoch,
        desc=description,
        disable=not progress,
        leave=False,
    )
    for epoch in range(first_epoch, config.epochs):
        epoch_start = time.perf_counter()
        learning_rate = float(schedule(epoch * steps_per_epoch))
        step_metrics = []  # stays on device: one host sync per epoch, not per step
        batches = ip.dataset(train_source, pipeline, train=True, seed=seed, epoch=epoch)
        for batch in batches:
            state, metrics = train_step(state, ip.shard_batch(batch, batch_sharding))
            step_metrics.append(metrics)
            bar.update(1)
        means = {
            k: float(np.mean([m[k] for m in jax.device_get(step_metrics)]))
            for k in ("loss", "accuracy")
        }
        val = evaluate(
            eval_step, state, ip.dataset(val_source, pipeline, train=False), batch_sharding
        )
        record = {
            "epoch": epoch,
            "train_loss": means["loss"],
            "train_accuracy": means["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "learning_rate": learning_rate,
            "images_per_second": steps_per_epoch
            * pipeline.batch_size
            / (time.perf_counter() - epoch_start),
        }
        history.append(record)
        if val["accuracy"] > best["accuracy"]:
            best = {
                "accuracy": val["accuracy"],
                "epoch": epoch,
                "variables": _to_host(
                    {"params": state.params, "batch_stats": state.batch_stats}
                ),
            }
        bar.set_postfix(
            epoch=epoch, loss=f"{record['train_loss']:.3f}", val=f"{val['accuracy']:.3f}"
        )
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(f"{description}/{key}", value, epoch)
            writer.flush()
        if manager is not None:
            _save(manager, epoch, state, best, history)
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return FitResult(
        variables=best["variables"],
        best_val_accuracy=float(best["accuracy"]),
        best_epoch=int(best["epoch"]),
        history=history,
        seconds=time.perf_counter() - start,
    )


def _save(manager, epoch: int, state: TrainState, best: dict, history: list) -> None:
    """One epoch's checkpoint: state, best variables (separate items) and bookkeeping."""
    manager.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best_params=ocp.args.StandardSave(best["variables"]["params"]),
            best_batch_stats=ocp.args.StandardSave(best["variables"]["batch_stats"]),
            progress=ocp.args.JsonSave(
                {
                    "best_accuracy": best["accuracy"],
                    "best_epoch": best["epoch"],
                    "history": history,
                }
            ),
        ),
    )


def _restore(manager, state: TrainState, sharding) -> tuple[TrainState, dict, list]:
    """Restores the latest epoch into the shapes (and shardings) of `state`."""
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
    )
    host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            best_params=ocp.args.StandardRestore(host.params),
            best_batch_stats=ocp.args.StandardRestore(host.batch_stats),
            progress=ocp.args.JsonRestore(),
        ),
    )
    progress = restored.progress
    best = {
        "accuracy": progress["best_accuracy"],
        "epoch": progress["best_epoch"],
        "variables": _to_host(
            {"params": restored.best_params, "batch_stats": restored.best_batch_stats}
        ),
    }
    return restored.state, best, progress["history"]


def library_versions() -> dict[str, str]:
    """Versions recorded with every checkpoint, for reproducibility."""
    import flax as flax_module
    import optax as optax_module

    return {
        "jax": jax.__version__,
        "flax": flax_module.__version__,
        "optax": optax_module.__version__,
        "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "unknown",
    }
