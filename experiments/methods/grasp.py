"""GRASP and its two controls, all run by the same driver. `grasp_random`: each merge
moves as many units as GRASP's rule would, chosen at random (what alignment adds beyond
moving that much). `staged_finetune`: GRASP's stages, restarts and best-validation
restores with a threshold nothing passes (what alignment adds beyond the staging)."""

from __future__ import annotations

import dataclasses
import functools

from experiments import final_model, reference_format, settings
from experiments.context import Context, Method, MethodResult
from experiments.flops_report import StepCosts, percent_breakdown, training_flops
from grasp_jax import grasp, seeding
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
MARKS = reference_format.MEMORY_CHECKPOINTS["grasp"]


def run_grasp(
    ctx: Context, rule: str = "aligned", threshold: float | None = None
) -> MethodResult:
    cfg = settings.grasp(ctx.config)
    if threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=threshold)
    first, *later = ctx.source_bins
    steps = grasp.default_steps(
        ctx.model,
        ctx.splits,
        config=cfg,
        pipeline=ctx.pipeline,
        progress=ctx.progress,
        rule=rule,
    )
    marked: set[str] = set()
    initial = ctx.restore(first)
    ctx.mark("initial_model_loaded")

    def finetune(variables, epochs, key, label):
        if variables is initial:  # the first stage: one for every run of the trial
            shared = (first, epochs, cfg.stage_config(epochs), seeding.int_seed(key))
            tuned = ctx.first_stage.get(
                shared, lambda: steps.finetune(variables, epochs, key, label)
            )
        else:
            tuned = steps.finetune(variables, epochs, key, label)
        if "initial_finetuning_complete" not in marked:  # the reference's memory samples
            marked.add("initial_finetuning_complete")
            ctx.mark("initial_finetuning_complete")
        return tuned

    result = grasp.run_grasp(
        initial,
        [(name, functools.partial(ctx.restore, name)) for name in later],
        steps._replace(finetune=finetune),
        config=cfg,
        key=seeding.root_key(ctx.seed),
        first_name=first,
    )
    if ctx.config.save_final:
        final_model.save_pytorch(ctx.config, ctx.out_dir, result.variables)
    val, test = ctx.predict_final(result.variables)
    history = [dict(h, stage=i) for i, s in enumerate(result.stages) for h in s.history]
    transfer = [
        {k: dataclasses.asdict(s)[k] for k in TRANSFER_KEYS} for s in result.stages[1:]
    ]
    return MethodResult(val, test, history, len(history), {"transfer_history": transfer})


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
    out["breakdown"] = percent_breakdown(
        out,
        {
            "initial_training": "initial_training_gflops",
            "alignment": "alignment_gflops_total",
            "transfer": "transfer_gflops_total",
            "finetune": "finetune_gflops_total",
        },
    )
    return out


def grasp_settings(config) -> dict:
    """GRASP's hyperparameters: also the budget and recipe `finetune` trains with."""
    return config.grasp.to_dict()


def folder_suffix(config) -> str:
    """`_<round(100 threshold)>` as the reference names GRASP's folders, then the
    granularity and mode where they are not the reference's (tensor, hard)."""
    suffix = f"_{round(config.grasp.threshold * 100)}"
    if (config.grasp.granularity, config.grasp.mode) != ("tensor", "hard"):
        suffix += f"_{config.grasp.granularity}_{config.grasp.mode}"
    return suffix


def _reference_keys(config) -> dict:
    return {"alignment_threshold": config.grasp.threshold}


def _entry(name: str, rule: str, description: str) -> Method:
    return Method(
        name,
        functools.partial(run_grasp, rule=rule),
        grasp_settings,
        folder_suffix=folder_suffix,
        flops=grasp_flops,
        reference_hyperparameters=_reference_keys,
        memory_marks=MARKS,
        description=description,
        shares_first_stage=True,
    )


def staged_settings(config) -> dict:
    """GRASP's settings with the threshold nothing passes."""
    return grasp_settings(config) | {"threshold": grasp.NOTHING_MOVES}


METHODS = (
    _entry("grasp", "aligned", "sequential transfer of gradient-aligned parameters"),
    Method(
        "staged_finetune",
        functools.partial(run_grasp, threshold=grasp.NOTHING_MOVES),
        staged_settings,
        flops=grasp_flops,
        memory_marks=MARKS,
        description="GRASP's stages and restores with nothing moved (the exact control)",
        shares_first_stage=True,
    ),
    _entry(
        "grasp_random",
        "random",
        "GRASP's stages moving as many units as GRASP would, chosen at random",
    ),
)
