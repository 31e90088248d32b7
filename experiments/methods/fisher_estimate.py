"""The diagonal Fishers that Fisher merging weights the sources by, two ways.

`expected_own_data` (default, FusionBench's): on the first `merging.fisher.examples`
examples of the source's **own** training split, each batch's gradient of
sum_i sum_c sqrt(p_ic) log p_ic under the source's own softmax p (held constant), squared,
summed over batches and divided by the number of examples. `empirical_target` (ours
before): on the target's training split, the mean over examples of the squared gradient
of the cross-entropy with the true label.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from experiments import sources
from experiments.context import Context
from grasp_jax import input_pipeline as ip
from grasp_jax import merging, objective

ESTIMATES = ("expected_own_data", "empirical_target")


@functools.cache
def _expected_batch_loss(model):
    """FusionBench's classification Fisher loss of one batch (`item["image"]` holds the
    batch): its gradient squared is the batch's Fisher contribution."""

    def loss(params, item, batch_stats):
        logits, _ = objective.forward(
            model, params, batch_stats, item["image"], train=False
        )
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        weight = jnp.sqrt(jax.lax.stop_gradient(jnp.exp(log_p)))
        return jnp.sum(weight * log_p)

    return loss


@functools.cache
def _empirical_example_loss(model):
    """Cross-entropy of one example with its true label (the empirical Fisher's loss)."""

    def loss(params, example, batch_stats):
        logits, _ = objective.forward(
            model, params, batch_stats, example["image"][None], train=False
        )
        return objective.cross_entropy(logits, example["label"][None])

    return loss


def _first_examples(split, pipeline, examples: int) -> list[dict]:
    """The first `examples` examples of `split` (in order, centre crops), preprocessed,
    in the pipeline's batches."""
    chosen, seen = [], 0
    for batch in ip.dataset(split, pipeline, train=False, shard_index=0, shard_count=1):
        if seen >= examples:
            break
        take = min(len(batch["label"]), examples - seen)
        seen += take
        chosen.append(
            {
                "image": ip.normalize(batch["image"][:take], pipeline),
                "label": jnp.asarray(batch["label"][:take]),
            }
        )
    return chosen


def of_source(ctx: Context, variables: dict, bin_name: str):
    """The Fisher of the source trained on `bin_name`, as `merging.fisher.estimate` says."""
    section = ctx.config.merging.fisher
    params, stats = variables["params"], variables["batch_stats"]
    if section.estimate == "empirical_target":
        chosen = _first_examples(ctx.splits["train"], ctx.pipeline, section.examples)
        loss = _empirical_example_loss(ctx.model)
        return merging.fisher_diagonal(loss, params, chosen, stats)
    own = sources.load_splits(ctx.config, ctx.workdir, bin_name)["train"]
    chosen = _first_examples(own, ctx.pipeline, section.examples)
    # One scanned item per batch: fisher_diagonal's mean over items is the mean over
    # batches of the squared batch gradients; FusionBench divides by examples instead.
    items = [jax.tree.map(lambda x: x[None], batch) for batch in chosen]
    per_batch = merging.fisher_diagonal(
        _expected_batch_loss(ctx.model), params, items, stats
    )
    examples = sum(len(batch["label"]) for batch in chosen)
    return jax.tree.map(lambda f: f * len(chosen) / examples, per_batch)
