"""FUSION (the paper's "Multi-Source"): all K sources fine-tuned jointly on the target
through the mean of their logits, as the reference codes it (docs/reference.md §5; not
parameter averaging: that is `soup`). The K models and their optimiser state are held
together: memory grows with K, and inference needs all K models.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from experiments.context import Context, MethodResult, section_method
from experiments.flops_report import StepCosts, percent_breakdown, training_flops
from grasp_jax import logit_average, recipe


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The reference's recipe: AdamW 5e-5, weight decay 0.01, cosine per epoch, no
    clipping, 3 epochs, best-validation epoch kept."""

    epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    augment: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"fusion.epochs={self.epochs}; train at least one epoch")
        if not self.learning_rate > 0:
            raise ValueError(f"fusion.learning_rate={self.learning_rate}; must be > 0")

    def recipe(self) -> recipe.TrainConfig:
        return recipe.fine_tuning(
            self.epochs, self.learning_rate, self.weight_decay, self.augment
        )


def recipe_of(config) -> FusionConfig:
    return FusionConfig(**config.fusion.to_dict())


def run_fusion(ctx: Context) -> MethodResult:
    cfg = recipe_of(ctx.config)
    stacked = logit_average.stack(
        [functools.partial(ctx.restore, name) for name in ctx.source_bins]
    )
    ctx.mark("source_models_loaded")
    model = logit_average.LogitAverage(ctx.model)
    ctx.mark("fusion_model_created")
    fused = jax.tree.leaves(stacked)[0].shape[0]  # what is fused, not what was asked
    fit = ctx.fit(stacked, cfg.recipe(), "fusion", model=model)
    ctx.mark("finetuning_complete")
    val, test = ctx.predict(fit.variables, model=model)
    extra = {"num_source_models": fused}
    return MethodResult(val, test, fit.history, cfg.epochs, extra)


def fusion_flops(ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
    """K models' training and inference steps (a step over K members costs K single
    ones) plus averaging the logits, with the reference's FUSION keys."""
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
    out["breakdown"] = percent_breakdown(
        out | {"inference_gflops_total": inference},
        {
            "fusion": "fusion_gflops",
            "finetune": "finetune_gflops",
            "inference": "inference_gflops_total",
        },
    )
    return out


METHODS = (
    section_method(
        "fusion",
        run_fusion,
        flops=fusion_flops,
        recipe=recipe_of,
        reference_names={
            "finetune_epochs": "epochs",
            "learning_rate": "learning_rate",
            "weight_decay": "weight_decay",
        },
        description="the K sources fine-tuned jointly through their mean logits",
    ),
)
