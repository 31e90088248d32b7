"""The weight-space merges as runner methods: merge all sources, then fine-tune.

Each method streams the sources through its `grasp_jax.merging` merger (one source in
memory; TIES restores them twice), merges the BatchNorm statistics by their plain mean
(they are not parameters, and a task-vector rule could make a variance negative), then
fine-tunes the merged model on the target with GRASP's stage recipe for GRASP's total
budget, `initial_epochs + finetune_epochs * (K - 1)`, unless `merging.finetune_epochs`
(-1: that budget) says otherwise. Task vectors are taken from the shared start every
source was trained from (`Context.base`). Hyperparameters: `config.merging.<method>`,
the literature's defaults (README, "Methods").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from experiments import settings
from experiments.context import Context, MethodResult
from grasp_jax import evaluation, merging, objective, seeding
from grasp_jax import input_pipeline as ip

MERGERS = {
    "soup": merging.Soup,
    "task_arithmetic": merging.TaskArithmetic,
    "ties": merging.Ties,
    "dare": merging.Dare,
    "magmax": merging.MagMax,
    "fisher": merging.Fisher,
}
FROM_BASE = ("task_arithmetic", "ties", "dare", "magmax")  # work on task vectors


def settings_of(config, name: str) -> dict:
    """`config.merging.<name>` (soup has none)."""
    section = config.merging.get(name)
    return section.to_dict() if section is not None else {}


def merger_of(config, name: str, key: jax.Array):
    """The merger `name` with the config's hyperparameters (DARE: drawing from `key`)."""
    hyperparameters = settings_of(config, name)
    hyperparameters.pop("examples", None)  # Fisher's data, not the merger's
    if name == "dare":
        hyperparameters["key"] = key
    return MERGERS[name](**hyperparameters)


@functools.cache
def _example_loss(model):
    """Cross-entropy of one preprocessed example in eval mode (the Fisher's loss)."""

    def loss(params, example, batch_stats):
        logits, _ = objective.forward(
            model, params, batch_stats, example["image"][None], train=False
        )
        return objective.cross_entropy(logits, example["label"][None])

    return loss


def source_fisher(ctx: Context, variables: dict, examples: int):
    """The source's diagonal Fisher on the first `examples` target training examples
    (in order, centre crops)."""
    pipeline = ctx.pipeline
    batches = ip.dataset(
        ctx.splits["train"], pipeline, train=False, shard_index=0, shard_count=1
    )
    chosen, seen = [], 0
    for batch in batches:
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
    return merging.fisher_diagonal(
        _example_loss(ctx.model), variables["params"], chosen, variables["batch_stats"]
    )


def finetune_epochs(config, sources: int) -> int:
    """`merging.finetune_epochs`, or GRASP's total budget where it is -1."""
    if config.merging.finetune_epochs >= 0:
        return config.merging.finetune_epochs
    grasp = settings.grasp(config)
    return grasp.initial_epochs + grasp.finetune_epochs * (sources - 1)


def merge_sources(ctx: Context, name: str) -> dict:
    """The merged variables of all sources: params by the method, statistics by mean."""
    key = seeding.stream(seeding.root_key(ctx.seed), f"merge_{name}")
    merger = merger_of(ctx.config, name, key)
    abstract = ctx.model_and_abstract[1]
    state = merger.init(ctx.base()["params"] if name in FROM_BASE else abstract["params"])
    stats = merging.Soup()
    stats_state = stats.init(abstract.get("batch_stats", {}))
    for pass_index in range(merger.passes):
        for index, bin_name in enumerate(ctx.source_bins):
            variables = ctx.restore(bin_name)
            tree = variables["params"]
            if name == "fisher":
                examples = ctx.config.merging.fisher.examples
                tree = (tree, source_fisher(ctx, variables, examples))
            state = merger.update(state, tree, index, pass_index)
            if pass_index == 0:
                stats_state = stats.update(
                    stats_state, variables.get("batch_stats", {}), index, 0
                )
            del variables, tree
    return {"params": merger.finish(state), "batch_stats": stats.finish(stats_state)}


def run_weight_merge(ctx: Context, name: str) -> MethodResult:
    merged = merge_sources(ctx, name)
    ctx.mark("models_merged")
    after_merge = evaluation.predict(
        ctx.model, merged, ctx.splits["validation"], ctx.pipeline
    )["accuracy"]
    epochs = finetune_epochs(ctx.config, len(ctx.source_bins))
    history: list[dict] = []
    if epochs > 0:
        recipe = settings.grasp(ctx.config).stage_config(epochs)
        fit = ctx.fit(merged, recipe, f"{name} fine-tune")
        merged, history = fit.variables, fit.history
    ctx.mark("finetuning_complete")
    val, test = ctx.predict(merged)
    extra = {
        "num_source_models": len(ctx.source_bins),
        "val_accuracy_after_merge": after_merge,
        "finetune_epochs": epochs,
    }
    return MethodResult(val, test, history, epochs, extra)


def hyperparameters(config, name: str) -> dict:
    """What a merge run's numbers depend on: its merger's settings, the fine-tuning
    epochs and the fields of GRASP's stage recipe that fine-tune it."""
    stage = (
        "initial_epochs",
        "finetune_epochs",
        "learning_rate",
        "weight_decay",
        "augment",
    )
    return {
        name: settings_of(config, name),
        "finetune_epochs_setting": config.merging.finetune_epochs,
        "stage_recipe": {key: config.grasp[key] for key in stage},
    }
