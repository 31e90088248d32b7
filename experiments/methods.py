"""The methods an experiment compares: one registry entry each.

An entry names the method and gives its run function, the hyperparameters its result
depends on (recorded with every run and compared before a finished run is reused), its
run-folder suffix and its FLOPs. Adding a method is adding one entry to `REGISTRY`.

grasp: the sequential driver. grasp_random: the same, but each merge moves as many units
as GRASP's rule would, chosen at random (what alignment adds beyond moving that much).
ensemble: mean logits of all sources (no training; sources are streamed, one in memory
at a time). finetune: the first source fine-tuned on the target for GRASP's total
epochs, no merging. target_only: trained from scratch on the target with the source
recipe.
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

from experiments import settings
from experiments import sources as src
from grasp_jax import evaluation, grasp, interop, loop, seeding
from grasp_jax import input_pipeline as ip


@dataclasses.dataclass
class Context:
    """What every method of one (target, trial) needs."""

    config: Any
    workdir: Path
    target: str
    source_bins: list[str]
    splits: dict
    seed: int
    progress: bool = True
    # Set by the runner for each run: where its files go, and a memory sample by name.
    out_dir: Path | None = None
    mark: Callable[[str], None] = lambda name: None

    @functools.cached_property
    def model_and_abstract(self):
        return src.model_and_abstract(self.config)

    @property
    def model(self):
        return self.model_and_abstract[0]

    @property
    def pipeline(self) -> ip.PipelineConfig:
        return settings.pipeline(self.config)

    def restore(self, bin_name: str) -> dict:
        """The trained source model of `bin_name`."""
        return src.restore_source(
            self.config, self.workdir, bin_name, self.model_and_abstract[1]
        )

    def predict(self, variables) -> tuple[dict, dict]:
        """Predictions of `variables` on the target's validation and test splits."""
        return tuple(
            evaluation.predict(self.model, variables, self.splits[s], self.pipeline)
            for s in ("validation", "test")
        )

    def fit(self, variables, recipe, description: str) -> loop.FitResult:
        """`loop.fit` on the target's train split, selecting on its validation split."""
        return loop.fit(
            self.model,
            variables,
            self.splits["train"],
            self.splits["validation"],
            config=recipe,
            pipeline=self.pipeline,
            seed=self.seed,
            progress=self.progress,
            description=description,
        )


@dataclasses.dataclass
class MethodResult:
    val: dict  # predictions on validation: accuracy, logits, labels
    test: dict
    history: list[dict]
    train_epochs: int
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """XLA's FLOPs of the compiled steps, measured once per experiment."""

    train_step: float
    eval_step: float
    batch_size: int
    params: int
    merge: float


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


def run_grasp(ctx: Context, merge=grasp.aligned_merge) -> MethodResult:
    cfg = settings.grasp(ctx.config)
    first, *later = ctx.source_bins
    steps = grasp.default_steps(
        ctx.model,
        ctx.splits,
        config=cfg,
        pipeline=ctx.pipeline,
        progress=ctx.progress,
        merge=merge,
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


def run_ensemble(ctx: Context) -> MethodResult:
    """Soft ensemble: the mean of the sources' logits, accumulated one source at a time."""
    sums: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name in ctx.source_bins:
        val, test = ctx.predict(ctx.restore(name))
        for split, out in (("val", val), ("test", test)):
            sums[split] = sums.get(split, 0) + out["logits"]
            labels[split] = out["labels"]
    ctx.mark("source_models_loaded")  # streamed: one source in memory at a time
    out = {}
    for split in ("val", "test"):
        logits = sums[split] / len(ctx.source_bins)
        out[split] = {
            "logits": logits,
            "labels": labels[split],
            "accuracy": float(np.mean(logits.argmax(1) == labels[split])),
        }
    ctx.mark("ensemble_created")
    extra = {"voting": "soft (mean logits)", "num_source_models": len(ctx.source_bins)}
    return MethodResult(out["val"], out["test"], [], 0, extra)


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


def training_flops(
    ctx: Context,
    result: MethodResult,
    costs: StepCosts,
    *,
    label: str,
    models_evaluated: int = 1,
    phases: Callable[[float], tuple[float, dict]] | None = None,
) -> dict:
    """Totals from XLA's per-step FLOPs and the steps each phase ran. `phases(training)`
    returns FLOPs spent beside the training epochs and the method's own report keys."""
    batch_size = ctx.pipeline.batch_size
    steps = ip.steps_per_epoch(ctx.splits["train"], batch_size)
    eval_batches = -(-len(ctx.splits["validation"]) // batch_size)
    test_batches = -(-len(ctx.splits["test"]) // batch_size)
    training = result.train_epochs * steps * costs.train_step
    evaluation_flops = (
        result.train_epochs * eval_batches
        + models_evaluated * (eval_batches + test_batches)
    ) * costs.eval_step
    out = {
        "method": label,
        "source": "XLA cost analysis of the compiled steps",
        "model_params_millions": costs.params / 1e6,
        "inference_gflops": costs.eval_step / costs.batch_size / 1e9,
        "train_step_gflops": costs.train_step / 1e9,
        "training_gflops": training / 1e9,
        "evaluation_gflops": evaluation_flops / 1e9,
        "n_sources": len(ctx.source_bins),
    }
    if phases is not None:
        extra, keys = phases(training)
        out |= keys
        training += extra
    out["total_gflops"] = (training + evaluation_flops) / 1e9
    return out


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


def ensemble_flops(ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
    """Every source's inference on validation and test plus averaging their logits
    (soft voting on logits: no softmax), with the reference's ensemble keys."""
    sources = len(ctx.source_bins)
    out = training_flops(ctx, result, costs, label="ensemble", models_evaluated=sources)
    per_image = costs.eval_step / costs.batch_size
    n_val, n_test = len(ctx.splits["validation"]), len(ctx.splits["test"])
    combination = sources * ctx.config.num_classes * (n_val + n_test)
    out["total_gflops"] += combination / 1e9
    out |= {
        "voting": "soft (mean logits)",
        "single_model_inference_gflops": per_image / 1e9,
        "val_inference_gflops": sources * per_image * n_val / 1e9,
        "test_inference_gflops": sources * per_image * n_test / 1e9,
        "combination_gflops": combination / 1e9,
        "softmax_gflops": 0.0,
        "n_val_samples": n_val,
        "n_test_samples": n_test,
    }
    out["breakdown"] = {
        f"{key}_percent": 100 * out[f"{key}_gflops"] / out["total_gflops"]
        for key in ("val_inference", "test_inference", "combination")
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
            functools.partial(run_grasp, merge=grasp.random_merge),
            _grasp_settings,
            folder_suffix=grasp_folder_suffix,
            flops=grasp_flops,
            reference_hyperparameters=_grasp_reference_keys,
        ),
        Method(
            "ensemble",
            run_ensemble,
            lambda config: {},
            flops=ensemble_flops,
        ),
        Method("finetune", run_finetune, _grasp_settings),
        Method(
            "target_only",
            run_target_only,
            lambda config: config.source_training.to_dict(),
        ),
    )
}
