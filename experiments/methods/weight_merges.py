"""The weight-space merges as methods: merge all sources, then fine-tune.

Each method streams the sources through its `grasp_jax.merging.streaming` merger
(`merge_streaming`: one source in memory; TIES restores them twice), merges the
BatchNorm statistics by their plain mean (they are not parameters, and a task-vector rule
could make a variance negative), then fine-tunes the merged model on the target with
GRASP's stage recipe for GRASP's total budget (`GraspConfig.total_epochs`) unless
`merging.finetune_epochs` (-1: that budget) says otherwise. Task vectors are taken from
the shared start every source was trained from (`Context.base`). Hyperparameters:
`config.merging.<method>`, the literature's defaults (docs/experiments.md).
"""

from __future__ import annotations

import functools

import jax

from experiments import reference_format, settings
from experiments.context import Context, Method, MethodResult
from experiments.methods import fisher_estimate
from grasp_jax import evaluation, merging, seeding

NAMES = ("soup", "task_arithmetic", "ties", "dare", "magmax", "fisher")
# Ranges the merge hyperparameters must lie in (DARE's rate < 1: it divides by 1 - rate).
BOUNDS = {
    "task_arithmetic": {"scale": (0.0, 10.0)},
    "ties": {"keep": (0.0, 1.0), "scale": (0.0, 10.0)},
    "dare": {"rate": (0.0, 0.999), "scale": (0.0, 10.0)},
    "magmax": {"scale": (0.0, 10.0)},
    "fisher": {"floor": (0.0, 1.0)},
}


def merger_hyperparameters(config, name: str) -> dict:
    """`config.merging.<name>` (soup has none)."""
    section = config.merging.get(name)
    return section.to_dict() if section is not None else {}


def merger_of(config, name: str, key: jax.Array) -> merging.StreamingMerger:
    """The merger `name` with the config's hyperparameters (DARE: drawing from `key`)."""
    hyperparameters = merger_hyperparameters(config, name)
    for data_key in ("examples", "estimate"):  # Fisher's data, not the merger's
        hyperparameters.pop(data_key, None)
    if name == "dare":
        hyperparameters["key"] = key
    return getattr(merging.streaming, name)(**hyperparameters)


def finetune_epochs(config, sources: int) -> int:
    """`merging.finetune_epochs`, or GRASP's total budget where it is -1."""
    if config.merging.finetune_epochs >= 0:
        return config.merging.finetune_epochs
    return settings.grasp(config).total_epochs(sources)


def merge_sources(ctx: Context, name: str) -> dict:
    """The merged variables of all sources: params by the method, statistics by mean
    (summed while the params' first pass restores each source)."""
    key = seeding.stream(seeding.root_key(ctx.seed), f"merge_{name}")
    merger = merger_of(ctx.config, name, key)
    # The running sums start laid out as the sources restore: every update is then one
    # program (a state placed otherwise compiles the first update apart).
    layout = ctx.source_layout
    stats = merging.streaming.soup()
    stats_update = jax.jit(stats.update, static_argnums=4, donate_argnums=0)
    stats_state = stats.init(layout.get("batch_stats", {}))
    seen: set[int] = set()

    def load(index: int, bin_name: str):
        nonlocal stats_state
        variables = ctx.restore(bin_name)
        if index not in seen:
            seen.add(index)
            stats = variables.get("batch_stats", {})
            stats_state = stats_update(stats_state, stats, None, index, 0)
        if name == "fisher":
            return variables["params"], fisher_estimate.of_source(ctx, variables, bin_name)
        return variables["params"]

    start = layout["params"]
    if merger.from_base:
        start = jax.device_put(
            ctx.base()["params"], jax.tree.map(lambda x: x.sharding, start)
        )
    loaders = [functools.partial(load, i, b) for i, b in enumerate(ctx.source_bins)]
    params = merging.merge_streaming(merger, start, loaders)
    merged_stats = stats.finish(stats_state, layout.get("batch_stats", {}))
    return {"params": params, "batch_stats": merged_stats}


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
    val, test = ctx.predict_final(merged)
    extra = {
        "num_source_models": len(ctx.source_bins),
        "val_accuracy_after_merge": after_merge,
        "finetune_epochs": epochs,
    }
    return MethodResult(val, test, history, epochs, extra)


def hyperparameters(config, name: str) -> dict:
    """What a merge run's numbers depend on: its merger's settings, the fine-tuning
    epochs and the fields of GRASP's stage recipe that fine-tune it."""
    stage = ("initial_epochs", "finetune_epochs", "learning_rate", "weight_decay")
    return {
        name: merger_hyperparameters(config, name),
        "finetune_epochs_setting": config.merging.finetune_epochs,
        "stage_recipe": {key: config.grasp[key] for key in (*stage, "augment")},
    }


def check(config) -> None:
    """`config.merging`: the fine-tuning epochs and each merger's ranges."""
    section = config.merging
    if section.finetune_epochs < -1:
        raise ValueError(
            f"merging.finetune_epochs={section.finetune_epochs}; use -1 (GRASP's "
            "budget), 0 (no fine-tuning) or a number of epochs"
        )
    for name, bounds in BOUNDS.items():
        for key, (low, high) in bounds.items():
            value = section[name][key]
            if not low <= value <= high:
                raise ValueError(
                    f"merging.{name}.{key}={value}; use a value in [{low}, {high}]"
                )
    if section.fisher.estimate not in fisher_estimate.ESTIMATES:
        raise ValueError(
            f"merging.fisher.estimate={section.fisher.estimate!r}; use one of "
            f"{list(fisher_estimate.ESTIMATES)}"
        )
    if section.fisher.examples < 1:
        raise ValueError(f"merging.fisher.examples={section.fisher.examples}; use >= 1")
    if section.ties.aggregate not in merging.kernels.TIES_AGGREGATES:
        raise ValueError(
            f"merging.ties.aggregate={section.ties.aggregate!r}; use one of "
            f"{list(merging.kernels.TIES_AGGREGATES)}"
        )


METHODS = tuple(
    Method(
        name,
        functools.partial(run_weight_merge, name=name),
        functools.partial(hyperparameters, name=name),
        memory_marks=reference_format.MEMORY_CHECKPOINTS["weight_merge"],
        check=check,
        description=f"weight-space merge ({name}) of the sources, then fine-tuned",
    )
    for name in NAMES
)
