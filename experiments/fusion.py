"""FUSION (the paper's "Multi-Source"): all K sources fine-tuned jointly on the target
through the mean of their logits, as the reference codes it (REFERENCE.md 5.2; it is not
parameter averaging: that is `soup`). The K models and their optimiser state are held
together: memory grows with K, and inference needs all K models.
"""

from __future__ import annotations

import dataclasses
import functools

from experiments.baseline_settings import FusionConfig
from experiments.context import Context, MethodResult, StepCosts, training_flops
from grasp_jax import logit_average


def run_fusion(ctx: Context) -> MethodResult:
    cfg = FusionConfig(**ctx.config.fusion.to_dict())
    stacked = logit_average.stack(
        [functools.partial(ctx.restore, name) for name in ctx.source_bins]
    )
    ctx.mark("source_models_loaded")
    model = logit_average.LogitAverage(ctx.model)
    ctx.mark("fusion_model_created")
    fit = ctx.fit(stacked, cfg.recipe(), "fusion", model=model)
    ctx.mark("finetuning_complete")
    val, test = ctx.predict(fit.variables, model=model)
    extra = {"num_source_models": len(ctx.source_bins)}
    return MethodResult(val, test, fit.history, cfg.epochs, extra)


def fusion_flops(ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
    """K models' training and inference steps (a vmapped step costs K single ones) plus
    averaging the logits, with the reference's FUSION keys."""
    k = len(ctx.source_bins)
    scaled = dataclasses.replace(
        costs, train_step=k * costs.train_step, eval_step=k * costs.eval_step
    )
    out = training_flops(ctx, result, scaled, label="FUSION")
    per_image = costs.eval_step / costs.batch_size
    n_train, n_val, n_test = (len(ctx.splits[s]) for s in ("train", "validation", "test"))
    fusion = (
        k
        * ctx.config.num_classes
        * (result.train_epochs * (n_train + n_val) + n_val + n_test)
    )
    out["total_gflops"] += fusion / 1e9
    out |= {
        "single_model_inference_gflops": per_image / 1e9,
        "fusion_gflops": fusion / 1e9,
        "finetune_gflops": out["training_gflops"],
        "val_inference_gflops": k * per_image * n_val / 1e9,
        "test_inference_gflops": k * per_image * n_test / 1e9,
        "finetune_epochs": result.train_epochs,
        "n_train_samples": n_train,
        "n_val_samples": n_val,
        "n_test_samples": n_test,
    }
    inference = out["total_gflops"] - out["fusion_gflops"] - out["finetune_gflops"]
    out["breakdown"] = {
        "fusion_percent": 100 * out["fusion_gflops"] / out["total_gflops"],
        "finetune_percent": 100 * out["finetune_gflops"] / out["total_gflops"],
        "inference_percent": 100 * inference / out["total_gflops"],
    }
    return out
