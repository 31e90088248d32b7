"""The fine-tuning baselines. `finetune`: the first source fine-tuned on the target for
GRASP's whole budget in one schedule, nothing merged. `target_only`: a model trained from
scratch on the target with the source recipe (what the sources add at all)."""

from __future__ import annotations

from experiments import settings, sources
from experiments.context import Context, Method, MethodResult
from experiments.methods.grasp import grasp_settings
from grasp_jax import seeding


def run_finetune(ctx: Context) -> MethodResult:
    cfg = settings.grasp(ctx.config)
    epochs = cfg.total_epochs(len(ctx.source_bins))
    first = ctx.source_bins[0]
    fit = ctx.fit(ctx.restore(first), cfg.stage_config(epochs), f"finetune {first}")
    val, test = ctx.predict_final(fit.variables)
    return MethodResult(val, test, fit.history, epochs)


def run_target_only(ctx: Context) -> MethodResult:
    init_seed = seeding.int_seed(seeding.stream(seeding.root_key(ctx.seed), "init"))
    recipe = settings.recipe(ctx.config.source_training)
    fit = ctx.fit(sources.fresh_variables(ctx.config, init_seed), recipe, "target_only")
    val, test = ctx.predict_final(fit.variables)
    return MethodResult(val, test, fit.history, recipe.epochs)


def _source_training(config) -> dict:
    return config.source_training.to_dict()


METHODS = (
    Method(
        "finetune",
        run_finetune,
        grasp_settings,
        description="the first source fine-tuned for GRASP's total epochs, no merging",
    ),
    Method(
        "target_only",
        run_target_only,
        _source_training,
        description="trained from scratch on the target with the source recipe",
    ),
)
