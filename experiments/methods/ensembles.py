"""Output-space ensembles of the sources: no training, sources streamed one at a time.

`soft` averages the logits (the reference's default, and our `ensemble`). `prob` averages
the softmax probabilities: what the reference calls "hard" (docs/reference.md §5).
`vote` is a real majority vote of the sources' predicted classes, ties broken by the mean
probability. Each source adds its logits, probabilities and one vote per example to
running sums, so memory holds one model and O(examples x classes) numbers.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments import reference_format
from experiments.context import Context, Method, MethodResult
from experiments.flops_report import StepCosts, percent_breakdown, training_flops
from grasp_jax import metrics

VOTING = {
    "soft": "soft (mean logits)",
    "prob": "prob (mean softmax probabilities; the reference's 'hard')",
    "vote": "vote (majority of predicted classes, ties by mean probability)",
}


def accumulate(sums: dict | None, logits: np.ndarray) -> dict:
    """Adds one source's logits (examples x classes) to the running sums."""
    logits = np.asarray(logits, np.float64)
    votes = np.zeros_like(logits)
    votes[np.arange(len(logits)), logits.argmax(axis=1)] = 1
    if sums is None:
        return {"logits": logits, "probs": metrics.softmax(logits), "votes": votes, "k": 1}
    return {
        "logits": sums["logits"] + logits,
        "probs": sums["probs"] + metrics.softmax(logits),
        "votes": sums["votes"] + votes,
        "k": sums["k"] + 1,
    }


def combine(sums: dict, voting: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores as logits, predicted classes) of the ensemble. For `prob` and `vote` the
    scores are log(mean probability + 1e-10), the reference's output, so that softmax
    gives the mean probability back for AUROC."""
    if voting == "soft":
        logits = sums["logits"] / sums["k"]
        return logits, logits.argmax(axis=1)
    probs = sums["probs"] / sums["k"]
    scores = np.log(probs + 1e-10)
    if voting == "prob":
        return scores, probs.argmax(axis=1)
    most = sums["votes"].max(axis=1, keepdims=True)
    return scores, np.where(sums["votes"] == most, probs, -1.0).argmax(axis=1)


def run_ensemble(ctx: Context, voting: str) -> MethodResult:
    sums: dict[str, dict | None] = {"val": None, "test": None}
    labels = {}
    for name in ctx.source_bins:
        val, test = ctx.predict(ctx.restore(name))
        for split, out in (("val", val), ("test", test)):
            sums[split] = accumulate(sums[split], out["logits"])
            labels[split] = out["labels"]
    ctx.mark("source_models_loaded")  # streamed: one source in memory at a time
    out = {}
    for split in ("val", "test"):
        scores, predictions = combine(sums[split], voting)
        out[split] = {
            "logits": scores,
            "predictions": predictions,
            "labels": labels[split],
            "accuracy": float(np.mean(predictions == labels[split])),
        }
    ctx.mark("ensemble_created")
    extra = {"voting": VOTING[voting], "num_source_models": len(ctx.source_bins)}
    return MethodResult(out["val"], out["test"], [], 0, extra)


def ensemble_flops(
    ctx: Context, result: MethodResult, costs: StepCosts, voting: str
) -> dict:
    """Every source's inference on validation and test plus the combination (a sum per
    logit; `prob`/`vote` add a softmax, ~3 FLOPs per logit), with the reference's keys."""
    sources = len(ctx.source_bins)
    out = training_flops(ctx, result, costs, label="ensemble", models_evaluated=sources)
    per_image = costs.eval_step / costs.batch_size
    n_val, n_test = len(ctx.splits["validation"]), len(ctx.splits["test"])
    logits = sources * ctx.config.num_classes * (n_val + n_test)
    softmax = 0.0 if voting == "soft" else 3.0 * logits
    out["total_gflops"] += (logits + softmax) / 1e9
    out |= {
        "voting": VOTING[voting],
        "single_model_inference_gflops": per_image / 1e9,
        "val_inference_gflops": sources * per_image * n_val / 1e9,
        "test_inference_gflops": sources * per_image * n_test / 1e9,
        "combination_gflops": logits / 1e9,
        "softmax_gflops": softmax / 1e9,
        "n_val_samples": n_val,
        "n_test_samples": n_test,
    }
    parts = ("val_inference", "test_inference", "combination")
    out["breakdown"] = percent_breakdown(out, {p: f"{p}_gflops" for p in parts})
    return out


def _entry(name: str, voting: str, alias_of: str | None = None) -> Method:
    return Method(
        name,
        functools.partial(run_ensemble, voting=voting),
        lambda config: {"voting": voting},
        flops=functools.partial(ensemble_flops, voting=voting),
        memory_marks=reference_format.MEMORY_CHECKPOINTS["ensemble"],
        description=f"output-space ensemble of the sources: {VOTING[voting]}",
        alias_of=alias_of,
    )


METHODS = (
    _entry("ensemble", "soft", alias_of="ensemble_soft"),
    _entry("ensemble_soft", "soft"),
    _entry("ensemble_prob", "prob"),
    _entry("ensemble_vote", "vote"),
)
