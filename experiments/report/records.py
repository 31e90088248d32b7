"""What one run reports: its `metrics.json` record and its `memory_profile.json`."""

from __future__ import annotations

import jax

from experiments import reference_format
from grasp_jax import metrics, models


def run_record(
    ctx,
    method,
    trial: int,
    result,
    seconds: float,
    costs,
    memory_log: dict[str, dict],
) -> tuple[dict, dict]:
    """The run's `metrics.json` record and its `memory_profile.json`."""
    splits = ctx.splits
    record = {
        "dataset": ctx.config.dataset,
        "target": ctx.target,
        "sources": ctx.source_bins,
        "trial": trial,
        "model": models.reference_name(ctx.config.model),
        "zoo_model": ctx.config.model,
        "method": method.name,
        "seed": ctx.seed,
        "val_metrics": metrics.classification_metrics(
            result.val["logits"], result.val["labels"], result.val.get("predictions")
        ),
        "test_metrics": metrics.classification_metrics(
            result.test["logits"], result.test["labels"], result.test.get("predictions")
        ),
        "total_time_seconds": seconds,
        "total_time_minutes": seconds / 60,
        "hyperparameters": {
            **method.hyperparameters(ctx.config),
            **method.reference_hyperparameters(ctx.config),
            "batch_size": ctx.pipeline.batch_size,
        },
        "dataset_sizes": {
            f"n_{k}_samples": len(v)
            for k, v in (
                ("train", splits["train"]),
                ("val", splits["validation"]),
                ("test", splits["test"]),
            )
        },
        "history": result.history,
        # Why training stopped early (a non-finite loss), per stage; empty if it never did.
        "diverged": [h["stopped"] for h in result.history if "stopped" in h],
        **result.extra,
    }
    record["flops"] = method.report_flops(ctx, result, costs)
    peak = max((c["host_peak_mb"] or 0) for c in memory_log.values())
    record["memory"] = {
        "host_peak_mb": peak,
        "host_peak_gb": peak / 1024,
        "device_peak_mb": memory_log["experiment_end"]["device_peak_mb"],
        "note": "host peak: VmHWM, reset when the run starts where Linux allows",
    }
    fields = reference_format.memory_fields(memory_log, jax.devices()[0].platform)
    record["gpu_memory"] = fields["gpu_memory"]
    record["memory_checkpoints"] = fields["memory_checkpoints"]
    return record, fields["profile"]
