"""`grasp_stage`: one GRASP stage (alignment gradients of both models, then the merge) as
one XLA program.

The reference runs a stage as two backward passes per alignment batch, a Python loop with
one host read per tensor, and a copy of the whole state. Here the N alignment batches
are stacked on a leading axis and `lax.scan` sums both models' gradients over them, the
current model's state (BatchNorm statistics) threaded from batch to batch and the
source's left as it is; the merge follows in the same program and writes the merged
parameters into `current`'s donated buffers. Nothing is read back to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from grasp_jax.arguments import check_merge_arguments, checked
from grasp_jax.merge import MergeStats, merge_step, random_merge_step
from grasp_jax.tree_checks import PyTree

# `loss(params, state, batch) -> (loss, (new_state, aux))`, as `objective.loss_fn` makes.
StatefulLoss = Callable[[PyTree, PyTree, Any], tuple[jax.Array, tuple[PyTree, Any]]]
Rule = Literal["aligned", "random"]
RULES = ("aligned", "random")


def scanned_gradients(
    loss_fn: StatefulLoss,
    params: PyTree,
    state: PyTree,
    batches: PyTree,
    unroll: int | bool = True,
) -> tuple[PyTree, PyTree]:
    """Sum of `loss_fn`'s parameter gradients over the leading axis of `batches`, in
    float32, and the state after the last batch. Traceable; batches are added in order,
    as the reference's summed `.grad` does.

    `unroll=True` (default) lays the batches out one after another in the program:
    XLA:CPU runs convolutions inside a while loop about 20x slower (small_cnn, 2
    batches of 32 at 64 px: 6.8 s against 0.31 s), and alignment uses few batches. For
    many batches pass an int (iterations per loop step) to bound the program's size."""

    def add_batch(carry, batch):
        total, state = carry
        grads, (state, _) = jax.grad(loss_fn, has_aux=True)(params, state, batch)
        total = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)
        return (total, state), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    (total, state), _ = jax.lax.scan(add_batch, (zeros, state), batches, unroll=unroll)
    return total, state


@checked(check_merge_arguments)
@functools.partial(
    jax.jit,
    static_argnames=(
        "current_loss",
        "source_loss",
        "granularity",
        "mode",
        "rule",
        "unroll",
    ),
    donate_argnames=("current",),
)
def grasp_stage(
    current: dict,
    source: dict,
    batches: PyTree,
    *,
    current_loss: StatefulLoss,
    source_loss: StatefulLoss,
    threshold: float | jax.Array = 0.3,
    granularity: str = "tensor",
    mode: str = "hard",
    eps: float | jax.Array = 1e-8,
    rule: Rule = "aligned",
    key: jax.Array | None = None,
    unroll: int | bool = True,
) -> tuple[dict, MergeStats]:
    """Aligns `current` with `source` on `batches` and merges: one GRASP stage.

    `current` and `source` are Flax variables (`params`, optional `batch_stats`);
    `batches` is a pytree whose leaves stack N batches on axis 0, each handed to the
    losses whole. `current_loss` (the reference's: train mode) threads the current
    model's `batch_stats`; `source_loss` (eval mode) leaves the source's alone. `rule`
    "aligned" is `merge_step`; "random" is `random_merge_step` with `key` (the control:
    as many units, chosen at random; `mode` is then hard). Returns the current
    model's variables with merged `params` and its `batch_stats` after the batches
    (statistics never transfer), and the merge's `MergeStats`. `current` is donated;
    the losses, `granularity`, `mode`, `rule` and `unroll` (`scanned_gradients`) are
    static, the rest traced.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; use one of {RULES}")
    stats_in = current.get("batch_stats", {})
    grad_current, stats_out = scanned_gradients(
        current_loss, current["params"], stats_in, batches, unroll
    )
    grad_source, _ = scanned_gradients(
        source_loss, source["params"], source.get("batch_stats", {}), batches, unroll
    )
    trees = (current["params"], source["params"], grad_current, grad_source)
    common = {"threshold": threshold, "granularity": granularity, "eps": eps}
    if rule == "aligned":
        merged, stats = merge_step(*trees, mode=mode, **common)
    else:
        if key is None:
            raise ValueError('rule="random" draws its units: pass key=')
        merged, stats = random_merge_step(*trees, key=key, **common)
    variables = {**current, "params": merged}
    if "batch_stats" in current:
        variables["batch_stats"] = stats_out
    return variables, stats
