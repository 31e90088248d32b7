"""The official PyTorch code's output format (docs/reference.md §6), so that scripts
written for its results read ours unchanged: its model strings in folder and file names,
its memory keys, its multi-trial summary text. Our own keys stay beside its keys.

Deliberate deviations (docs/reference.md §9): the summary text
files go to `results/<dataset>/`, not the working directory; threshold folders use
`round`, not the reference's truncating `int`; on CPU the memory keys hold this
process's host memory (VmRSS/VmHWM) and `memory_source` says so.
"""

from __future__ import annotations

import numpy as np

from grasp_jax import models

# The memory checkpoints the reference samples, per method (docs/reference.md §6).
MEMORY_CHECKPOINTS = {
    "grasp": (
        "experiment_start",
        "data_loaded",
        "initial_model_loaded",
        "initial_finetuning_complete",
        "experiment_end",
    ),
    "ensemble": (
        "experiment_start",
        "data_loaded",
        "source_models_loaded",
        "ensemble_created",
        "experiment_end",
    ),
    "fusion": (
        "experiment_start",
        "data_loaded",
        "source_models_loaded",
        "fusion_model_created",
        "finetuning_complete",
        "experiment_end",
    ),
    "pearl": (
        "experiment_start",
        "data_loaded",
        "base_model_created",
        "adapters_trained",
        "composition_learned",
        "experiment_end",
    ),
    # Ours: the weight-space merges have no reference runner.
    "weight_merge": (
        "experiment_start",
        "data_loaded",
        "models_merged",
        "finetuning_complete",
        "experiment_end",
    ),
}


def memory_fields(memory_log: dict[str, dict], device: str) -> dict:
    """`gpu_memory`, `memory_checkpoints` and the `memory_profile.json` body, with the
    reference's keys. `memory_log[name]` holds our samples (`host_rss_mb`,
    `host_peak_mb`, `device_peak_mb`, MiB). On an accelerator the device peak fills the
    GPU keys; on CPU the host figures do."""
    on_device = any(c.get("device_peak_mb") is not None for c in memory_log.values())
    source = (
        "device peak_bytes_in_use (JAX memory_stats)"
        if on_device
        else "host memory of this process (VmRSS now, VmHWM peak): CPU has no device"
    )

    def now(c):
        return c["device_peak_mb"] if on_device else c["host_rss_mb"]

    def peak(c):
        return c["device_peak_mb"] if on_device else c["host_peak_mb"]

    checkpoints = {
        name: {
            "pytorch_allocated_mb": now(c),
            "pytorch_reserved_mb": now(c),
            "pytorch_max_allocated_mb": peak(c),
            "pytorch_max_reserved_mb": peak(c),
            "actual_gpu_memory_mb": now(c),
            "baseline_overhead_mb": 0.0,
        }
        for name, c in memory_log.items()
    }
    top = max((peak(c) or 0.0) for c in memory_log.values())
    gpu_memory = {"memory_source": source, "baseline_overhead_mb": 0.0}
    for key in (
        "peak_gpu_memory",
        "peak_allocated",
        "pytorch_peak_allocated",
        "peak_reserved",
        "pytorch_peak_reserved",
    ):  # MB = MiB, GB = GiB, as the reference
        gpu_memory |= {f"{key}_mb": top, f"{key}_gb": top / 1024}
    gpu_memory |= {
        "baseline_overhead_gb": 0.0,
        "device": device,
        "gpu_id": 0 if on_device else None,
        "is_cuda": device == "gpu",
    }
    profile = _profile(checkpoints, top, device, gpu_memory, source)
    return {"gpu_memory": gpu_memory, "memory_checkpoints": checkpoints, "profile": profile}


def _profile(checkpoints: dict, top, device: str, gpu_memory: dict, source: str) -> dict:
    """The body of `memory_profile.json`."""
    return {
        "checkpoints": checkpoints,
        "peak": {
            "pytorch_peak_allocated_mb": top,
            "pytorch_peak_allocated_gb": top / 1024,
            "pytorch_peak_reserved_mb": top,
            "pytorch_peak_reserved_gb": top / 1024,
            "actual_peak_gpu_memory_mb": top,
            "actual_peak_gpu_memory_gb": top / 1024,
            "baseline_overhead_mb": 0.0,
            "baseline_overhead_gb": 0.0,
        },
        "device": device,
        "gpu_id": gpu_memory["gpu_id"],
        "is_cuda": gpu_memory["is_cuda"],
        "baseline_overhead_mb": 0.0,
        "memory_source": source,
    }


def summary_file_name(method: str, folder_suffix: str, model: str, dataset: str) -> str:
    """`grasp_30_mobilevit-xxs_clear10_summary.txt`, `ensemble_resnet-50_yearbook_...`."""
    return f"{method}{folder_suffix}_{models.reference_name(model)}_{dataset}_summary.txt"


def summary_text(method: str, records: list[dict], dataset: str, model: str) -> str:
    """The reference's multi-trial summary (docs/reference.md §6): per target (sorted), test
    accuracy (%, 2 decimals), precision, recall, F1 (4 decimals) as mean ± population
    std over trials, the first trial's FLOPs, memory and time; then all targets pooled."""
    lines = [
        f"{method.upper()} results: {dataset}, {models.reference_name(model)}",
        "=" * 60,
    ]
    by_target: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["target"], r["trial"])):
        by_target.setdefault(r["target"], []).append(r)
    for target, runs in by_target.items():
        lines += ["", f"Target: {target} ({len(runs)} trials)"]
        for key, scale, digits in (
            ("accuracy", 100, 2),
            ("precision", 1, 4),
            ("recall", 1, 4),
            ("f1_score", 1, 4),
        ):
            values = scale * np.array([r["test_metrics"][key] for r in runs])
            unit = "%" if scale == 100 else ""
            lines.append(
                f"  Test {key}: {values.mean():.{digits}f}{unit} ± "
                f"{values.std():.{digits}f}{unit}"
            )
        flops = runs[0].get("flops", {})
        if "total_gflops" in flops:
            lines.append(
                f"  FLOPs (trial {runs[0]['trial']}): {flops['total_gflops']:.2f} G"
            )
        lines.append("  " + _memory_line(runs))
        minutes = np.array([r["total_time_minutes"] for r in runs])
        lines.append(f"  Time: {minutes.mean():.2f} ± {minutes.std():.2f} min")
    accuracy = 100 * np.array([r["test_metrics"]["accuracy"] for r in records])
    minutes = np.array([r["total_time_minutes"] for r in records])
    lines += [
        "",
        f"Overall ({len(records)} runs, all targets and trials pooled)",
        f"  Test accuracy: {accuracy.mean():.2f}% ± {accuracy.std():.2f}% "
        f"(min {accuracy.min():.2f}%, max {accuracy.max():.2f}%)",
        f"  Time: {minutes.mean():.2f} min mean, {minutes.sum():.2f} min "
        f"({minutes.sum() / 60:.2f} h) total",
    ]
    return "\n".join(lines) + "\n"


def _memory_line(runs: list[dict]) -> str:
    peaks = np.array([r["gpu_memory"]["peak_gpu_memory_gb"] for r in runs])
    where = "" if runs[0]["gpu_memory"]["is_cuda"] else " (host memory, CPU mode)"
    return (
        f"Peak memory{where}: {peaks.mean():.3f} ± {peaks.std():.3f} GB "
        f"(min {peaks.min():.3f}, max {peaks.max():.3f})"
    )
