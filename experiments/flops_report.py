"""A run's FLOPs from XLA's cost analysis of the steps' programs (counted once per
experiment) times the steps each phase ran, with the reference's report keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from grasp_jax import input_pipeline as ip


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """XLA's FLOPs of the steps' programs, counted once per experiment."""

    train_step: float
    eval_step: float
    batch_size: int
    params: int
    merge: float


def training_flops(
    ctx: Any,
    result: Any,
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
        "source": "XLA cost analysis of the lowered steps",
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


def percent_breakdown(report: dict, keys: dict[str, str]) -> dict:
    """`{<part>_percent: 100 * report[key] / report["total_gflops"]}` for each part: the
    reference's `breakdown` block of a FLOPs report."""
    total = report["total_gflops"]
    return {f"{part}_percent": 100 * report[key] / total for part, key in keys.items()}
