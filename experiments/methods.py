"""The methods an experiment compares, each returning the same kind of result.

grasp: the sequential driver. ensemble: mean logits of all sources (no training; sources
are streamed, one in memory at a time). finetune: the first source fine-tuned on the
target for GRASP's total epochs, no merging (what alignment adds). target_only: trained
from scratch on the target with the source recipe.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from experiments import sources as src
from grasp_jax import grasp, seeding, train

METHODS = ("grasp", "ensemble", "finetune", "target_only")


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

    @functools.cached_property
    def model_and_abstract(self):
        return src.model_and_abstract(self.config)

    @property
    def model(self):
        return self.model_and_abstract[0]

    @property
    def pipeline(self):
        return src.pipeline_config(self.config)

    def restore(self, bin_name: str) -> dict:
        return src.restore_source(
            self.config, self.workdir, bin_name, self.model_and_abstract[1]
        )

    def grasp_config(self) -> grasp.GraspConfig:
        return grasp.GraspConfig(**self.config.grasp.to_dict())


@dataclasses.dataclass
class MethodResult:
    val: dict  # predictions on validation: accuracy, logits, labels
    test: dict
    history: list[dict]
    train_epochs: int
    extra: dict = dataclasses.field(default_factory=dict)


def _evaluate(ctx: Context, variables) -> tuple[dict, dict]:
    return tuple(
        grasp.predict(ctx.model, variables, ctx.splits[s], ctx.pipeline)
        for s in ("validation", "test")
    )


def run_grasp(ctx: Context) -> MethodResult:
    cfg = ctx.grasp_config()
    first, *later = ctx.source_bins
    result = grasp.run_grasp(
        ctx.model,
        ctx.restore(first),
        [(name, functools.partial(ctx.restore, name)) for name in later],
        ctx.splits,
        config=cfg,
        pipeline=ctx.pipeline,
        key=seeding.root_key(ctx.seed),
        first_name=first,
        progress=ctx.progress,
    )
    val, test = _evaluate(ctx, result.variables)
    stages = [dataclasses.asdict(s) for s in result.stages]
    history = [dict(h, stage=i) for i, s in enumerate(result.stages) for h in s.history]
    transfer = [
        {
            k: s[k]
            for k in (
                "source",
                "n_transferred",
                "fraction",
                "nonfinite_leaves",
                "val_accuracy_before_merge",
                "val_accuracy_after_merge",
                "val_accuracy_after_finetune",
                "fraction_by_layer",
            )
        }
        for s in stages[1:]
    ]
    return MethodResult(val, test, history, len(history), {"transfer_history": transfer})


def run_ensemble(ctx: Context) -> MethodResult:
    """Soft ensemble: the mean of the sources' logits, accumulated one source at a time."""
    sums: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name in ctx.source_bins:
        val, test = _evaluate(ctx, ctx.restore(name))
        for split, out in (("val", val), ("test", test)):
            sums[split] = sums.get(split, 0) + out["logits"]
            labels[split] = out["labels"]
    out = {}
    for split in ("val", "test"):
        logits = sums[split] / len(ctx.source_bins)
        out[split] = {
            "logits": logits,
            "labels": labels[split],
            "accuracy": float(np.mean(logits.argmax(1) == labels[split])),
        }
    return MethodResult(out["val"], out["test"], [], 0, {"voting": "soft (mean logits)"})


def run_finetune(ctx: Context) -> MethodResult:
    cfg = ctx.grasp_config()
    epochs = cfg.initial_epochs + cfg.finetune_epochs * (len(ctx.source_bins) - 1)
    fit = train.fit(
        ctx.model,
        ctx.restore(ctx.source_bins[0]),
        ctx.splits["train"],
        ctx.splits["validation"],
        config=cfg.stage_config(epochs),
        pipeline=ctx.pipeline,
        seed=ctx.seed,
        progress=ctx.progress,
        description=f"finetune {ctx.source_bins[0]}",
    )
    val, test = _evaluate(ctx, fit.variables)
    return MethodResult(val, test, fit.history, epochs)


def run_target_only(ctx: Context) -> MethodResult:
    config = ctx.config
    init_seed = seeding.int_seed(seeding.stream(seeding.root_key(ctx.seed), "init"))
    fresh = src.fresh_variables(config, init_seed)
    section = src.train_config(config.source_training)
    fit = train.fit(
        ctx.model,
        fresh,
        ctx.splits["train"],
        ctx.splits["validation"],
        config=section,
        pipeline=ctx.pipeline,
        seed=ctx.seed,
        progress=ctx.progress,
        description="target_only",
    )
    val, test = _evaluate(ctx, fit.variables)
    return MethodResult(val, test, fit.history, section.epochs)


RUNNERS = {
    "grasp": run_grasp,
    "ensemble": run_ensemble,
    "finetune": run_finetune,
    "target_only": run_target_only,
}
