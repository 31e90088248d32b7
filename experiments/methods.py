"""The methods an experiment compares: one registry entry each.

An entry names the method and gives its run function, the hyperparameters its result
depends on (recorded with every run and compared before a finished run is reused), its
run-folder suffix and its FLOPs. Adding a method is adding one entry to `REGISTRY`.

grasp: the sequential driver. grasp_random: the same, but each merge moves as many units
as GRASP's rule would, chosen at random (what alignment adds beyond moving that much).
ensemble_soft (alias ensemble), ensemble_prob, ensemble_vote: output-space ensembles
(`ensembles`). fusion: the K sources fine-tuned jointly through their mean logits
(`fusion`). pearl: adapters per source and learned composition weights (`pearl`).
soup, task_arithmetic, ties, dare, magmax, fisher: weight-space merges, then GRASP's
fine-tuning budget (`weight_merges`). finetune: the first source fine-tuned on the
target for GRASP's total epochs, no merging. target_only: trained from scratch on the
target with the source recipe. `--config.methods=all` runs every one but the alias.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import ensembles, fusion, pearl, settings, weight_merges
from experiments import sources as src
from experiments.context import Context, MethodResult, StepCosts, training_flops
from grasp_jax import grasp, interop, seeding
from grasp_jax import input_pipeline as ip

TRANSFER_KEYS = (
    "source",
    "n_transferred",
    "fraction",
    "nonfinite_leaves",
    "val_accuracy_before_merge",
    "val_accuracy_after_merge",
    "val_accuracy_after_finetune",
    "fraction_by_layer",
)


def run_grasp(ctx: Context, rule: str = "aligned") -> MethodResult:
    cfg = settings.grasp(ctx.config)
    first, *later = ctx.source_bins
    steps = grasp.default_steps(
        ctx.model,
        ctx.splits,
        config=cfg,
        pipeline=ctx.pipeline,
        progress=ctx.progress,
        rule=rule,
    )

    def finetune(variables, epochs, key, label):  # the reference's memory samples
        tuned = steps.finetune(variables, epochs, key, label)
        if "initial_finetuning_complete" not in marked:
            marked.add("initial_finetuning_complete")
            ctx.mark("initial_finetuning_complete")
        return tuned

    marked: set[str] = set()
    initial = ctx.restore(first)
    ctx.mark("initial_model_loaded")
    result = grasp.run_grasp(
        initial,
        [(name, functools.partial(ctx.restore, name)) for name in later],
        steps._replace(finetune=finetune),
        config=cfg,
        key=seeding.root_key(ctx.seed),
        first_name=first,
    )
    if ctx.config.save_final:
        save_final(ctx, result.variables)
    val, test = ctx.predict(result.variables)
    history = [dict(h, stage=i) for i, s in enumerate(result.stages) for h in s.history]
    transfer = [
        {k: dataclasses.asdict(s)[k] for k in TRANSFER_KEYS} for s in result.stages[1:]
    ]
    return MethodResult(val, test, history, len(history), {"transfer_history": transfer})


def save_final(ctx: Context, variables) -> Path:
    """GRASP's final model where the reference saves it, as its raw PyTorch state dict
    (`checkpoints/<run folder>_final.ckpt`; `torch.load(weights_only=True)` reads it)."""
    import torch

    path = (
        ctx.out_dir
        / "checkpoints"
        / f"{ctx.out_dir.name.rsplit('_trial', 1)[0]}_final.ckpt"
    )
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in interop.export_numpy(ctx.config.model, variables).items()
    }
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return path


def run_finetune(ctx: Context) -> MethodResult:
    cfg = settings.grasp(ctx.config)
    epochs = cfg.initial_epochs + cfg.finetune_epochs * (len(ctx.source_bins) - 1)
    first = ctx.source_bins[0]
    fit = ctx.fit(ctx.restore(first), cfg.stage_config(epochs), f"finetune {first}")
    val, test = ctx.predict(fit.variables)
    return MethodResult(val, test, fit.history, epochs)


def run_target_only(ctx: Context) -> MethodResult:
    init_seed = seeding.int_seed(seeding.stream(seeding.root_key(ctx.seed), "init"))
    recipe = settings.recipe(ctx.config.source_training)
    fit = ctx.fit(src.fresh_variables(ctx.config, init_seed), recipe, "target_only")
    val, test = ctx.predict(fit.variables)
    return MethodResult(val, test, fit.history, recipe.epochs)


def grasp_flops(ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
    """Training FLOPs split as the reference reports them: initial, alignment, transfer
    and fine-tuning."""
    cfg = settings.grasp(ctx.config)
    stages = len(ctx.source_bins) - 1
    steps = ip.steps_per_epoch(ctx.splits["train"], ctx.pipeline.batch_size)
    # one alignment batch costs about a training step's forward+backward, per model
    alignment = 2 * stages * cfg.num_alignment_batches * costs.train_step
    initial = cfg.initial_epochs * steps * costs.train_step

    def phases(training: float) -> tuple[float, dict]:
        return alignment + stages * costs.merge, {
            "initial_training_gflops": initial / 1e9,
            "alignment_gflops_total": alignment / 1e9,
            "transfer_gflops_total": stages * costs.merge / 1e9,
            "finetune_gflops_total": (training - initial) / 1e9,
        }

    out = training_flops(ctx, result, costs, label="GRASP", phases=phases)
    parts = ("initial_training", "alignment", "transfer", "finetune")
    keys = ("initial_training_gflops", "alignment_gflops_total", "transfer_gflops_total")
    keys += ("finetune_gflops_total",)
    out["breakdown"] = {  # the reference's, as percent of the total
        f"{part}_percent": 100 * out[key] / out["total_gflops"]
        for part, key in zip(parts, keys, strict=True)
    }
    return out


@dataclasses.dataclass(frozen=True)
class Method:
    """One comparable method; see the module docstring."""

    name: str
    run: Callable[[Context], MethodResult]
    hyperparameters: Callable[[Any], dict]
    folder_suffix: Callable[[Any], str] = lambda config: ""
    flops: Callable[[Context, MethodResult, StepCosts], dict] | None = None
    # Keys the reference's metrics.json has beside ours (e.g. `alignment_threshold`).
    reference_hyperparameters: Callable[[Any], dict] = lambda config: {}

    def report_flops(self, ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
        if self.flops is not None:
            return self.flops(ctx, result, costs)
        return training_flops(ctx, result, costs, label=self.name)


def _grasp_settings(config) -> dict:
    return config.grasp.to_dict()


def _grasp_reference_keys(config) -> dict:
    return {"alignment_threshold": config.grasp.threshold}


def grasp_folder_suffix(config) -> str:
    """`_<round(100 threshold)>` as the reference names GRASP's folders, then the
    granularity and mode where they are not the reference's (tensor, hard)."""
    suffix = f"_{round(config.grasp.threshold * 100)}"
    if (config.grasp.granularity, config.grasp.mode) != ("tensor", "hard"):
        suffix += f"_{config.grasp.granularity}_{config.grasp.mode}"
    return suffix


def _section(name: str) -> Callable[[Any], dict]:
    return lambda config: config[name].to_dict()


def _ensemble(voting: str) -> dict:
    return {
        "run": functools.partial(ensembles.run_ensemble, voting=voting),
        "hyperparameters": lambda config: {"voting": voting},
        "flops": functools.partial(ensembles.ensemble_flops, voting=voting),
    }


def _weight_merge(name: str) -> Method:
    return Method(
        name,
        functools.partial(weight_merges.run_weight_merge, name=name),
        functools.partial(weight_merges.hyperparameters, name=name),
    )


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "grasp",
            run_grasp,
            _grasp_settings,
            folder_suffix=grasp_folder_suffix,
            flops=grasp_flops,
            reference_hyperparameters=_grasp_reference_keys,
        ),
        Method(
            "grasp_random",
            functools.partial(run_grasp, rule="random"),
            _grasp_settings,
            folder_suffix=grasp_folder_suffix,
            flops=grasp_flops,
            reference_hyperparameters=_grasp_reference_keys,
        ),
        Method("ensemble", **_ensemble("soft")),  # the alias of ensemble_soft
        Method("ensemble_soft", **_ensemble("soft")),
        Method("ensemble_prob", **_ensemble("prob")),
        Method("ensemble_vote", **_ensemble("vote")),
        Method(
            "fusion",
            fusion.run_fusion,
            _section("fusion"),
            flops=fusion.fusion_flops,
            reference_hyperparameters=lambda config: {
                "finetune_epochs": config.fusion.epochs,
                "learning_rate": config.fusion.learning_rate,
                "weight_decay": config.fusion.weight_decay,
            },
        ),
        Method(
            "pearl",
            pearl.run_pearl,
            _section("pearl"),
            flops=pearl.pearl_flops,
            reference_hyperparameters=lambda config: {
                "finetune_epochs": config.pearl.adapter_epochs,
                "composition_epochs": config.pearl.composition_epochs,
                "adapter_dim": config.pearl.rank,
                "learning_rate": config.pearl.learning_rate,
            },
        ),
        *(_weight_merge(name) for name in weight_merges.MERGERS),
        Method("finetune", run_finetune, _grasp_settings),
        Method("target_only", run_target_only, _section("source_training")),
    )
}
# Names that run another entry's method under the name earlier results used.
ALIASES = {"ensemble": "ensemble_soft"}


def selected(config) -> list[str]:
    """The methods `config.methods` asks for, "all" expanded (aliases left out)."""
    names = settings.requested_methods(config)
    if "all" in names:
        return [name for name in REGISTRY if name not in ALIASES]
    return names
