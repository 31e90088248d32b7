"""The train state and the two pure, jitted steps every training loop is built from.

`train_step(state, batch, ...)` applies one optimiser step (the state is donated);
`eval_step(variables, batch, ...)` scores a padded batch. The optimiser travels in the
state as a static field, as in Flax's own TrainState (`recipe.make_optimizer`, or
`recipe.optimizer_for` with the state's `learning_rates` fed in). Data parallelism needs
nothing here: place the state replicated and the batches sharded along "data"
(`input_pipeline.data_parallel`) and XLA partitions the same program. `loop.fit` wires
the steps into epochs.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from grasp_jax import input_pipeline as ip
from grasp_jax import objective
from grasp_jax.tree_checks import PyTree


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it is donated and checkpointed whole."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array  # a raw uint32 key: Orbax stores it like any array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    # Each parameter group's rate for the next step, for an optimiser that takes them
    # (`recipe.optimizer_for`); None for one with its schedule inside.
    learning_rates: dict | None = None

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


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
        tx=tx,
    )


@functools.partial(
    jax.jit, static_argnames=("model", "pipeline", "augment"), donate_argnums=0
)
def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    pipeline: ip.PipelineConfig,
    augment: bool,
) -> tuple[TrainState, dict]:
    """One optimiser step on a batch of uint8 `image`s and int `label`s.

    Augmentation (or plain normalisation) runs here, on device. The static (model,
    pipeline, augment) and the state's optimiser key the compilation cache, so every run
    with the same setup reuses one program."""
    rng, augment_rng, dropout_rng = jax.random.split(state.rng, 3)
    if augment:
        images = ip.augment(augment_rng, batch["image"], pipeline)
    else:
        images = ip.normalize(batch["image"], pipeline)
    inputs = {"image": images, "label": batch["label"], "rng": dropout_rng}
    loss_fn = objective.loss_fn(model, train=True)
    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, inputs
    )
    fed = {} if state.learning_rates is None else {"learning_rates": state.learning_rates}
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **fed)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=rng,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    }
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("model", "pipeline"))
def eval_step(
    variables: dict, batch: dict, *, model: nn.Module, pipeline: ip.PipelineConfig
) -> dict:
    """Sums over the batch's valid rows (padding rows count for nothing), and logits.

    `batch` holds uint8 `image`s, `label`s and a float `valid` mask
    (`evaluation.pad_batch`)."""
    images = ip.normalize(batch["image"], pipeline)
    logits, _ = objective.forward(
        model,
        variables["params"],
        variables.get("batch_stats", {}),
        images,
        train=False,
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
