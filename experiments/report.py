"""Result records and files: what one run reports, the summary over runs, and writing
them (atomic JSON, confusion matrices, training curves, the summary table and chart).

In a multi-process job every process computes the same records; only process 0 writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grasp_jax import metrics


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
        "model": ctx.config.model,
        "method": method.name,
        "seed": ctx.seed,
        "val_metrics": metrics.classification_metrics(
            result.val["logits"], result.val["labels"]
        ),
        "test_metrics": metrics.classification_metrics(
            result.test["logits"], result.test["labels"]
        ),
        "total_time_seconds": seconds,
        "total_time_minutes": seconds / 60,
        "hyperparameters": method.hyperparameters(ctx.config),
        "dataset_sizes": {
            f"n_{k}_samples": len(v)
            for k, v in (
                ("train", splits["train"]),
                ("val", splits["validation"]),
                ("test", splits["test"]),
            )
        },
        "history": result.history,
        **result.extra,
    }
    record["flops"] = method.report_flops(ctx, result, costs)
    peak = max((c["host_peak_mb"] or 0) for c in memory_log.values())
    profile = {
        "checkpoints": memory_log,
        "peak": {
            "host_peak_mb": peak,
            "host_peak_gb": peak / 1024,
            "device_peak_mb": memory_log["experiment_end"]["device_peak_mb"],
        },
        "device": jax.devices()[0].platform,
        "note": "host peak is this process's VmHWM so far (all earlier runs)",
    }
    record["memory"] = profile["peak"]
    return record, profile


def write_run(
    out_dir: Path, record: dict, profile: dict, class_names: list[str], title: str
) -> None:
    """Every file of one run; `metrics.json` last, as it marks the run finished."""
    if jax.process_index() != 0:
        return
    write_json(out_dir / "memory_profile.json", profile)
    write_json(out_dir / "flops_report.json", record["flops"])
    for split in ("test", "val"):
        confusion_matrix_png(
            record[f"{split}_metrics"]["confusion_matrix"],
            class_names,
            out_dir / "confusion_matrices" / f"{split}_confusion_matrix.png",
            f"{title} ({split})",
        )
    if record["history"]:
        training_curves_png(record["history"], out_dir / "training_curves.png", title)
    write_json(out_dir / "config.json", record)
    write_json(out_dir / "metrics.json", record)


def write_summary(results_dir: Path, summary: dict, title: str) -> None:
    """`summary.json`, `summary.md` and `summary.png` of an experiment."""
    if jax.process_index() != 0:
        return
    write_json(results_dir / "summary.json", summary)
    write_text(results_dir / "summary.md", summary_markdown(summary, title))
    summary_bar_chart(summary, results_dir / "summary.png", title)


def write_text(path: Path, text: str) -> None:
    """Writes text atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically (numbers as Python numbers, anything else as text)."""
    text = json.dumps(
        obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)
    )
    write_text(path, text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)


def confusion_matrix_png(
    matrix: list[list[int]], class_names: list[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix with two-decimal cells, as the reference draws it."""
    plt = _pyplot()
    counts = np.asarray(matrix, np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(
        figsize=(1 + 0.5 * len(class_names), 1 + 0.45 * len(class_names))
    )
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{rows[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rows[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def training_curves_png(history: list[dict], path: Path, title: str) -> None:
    """Losses and validation accuracy over the concatenated epochs of all stages."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = np.arange(len(history))
    left.plot(x, [h["train_loss"] for h in history], label="train")
    left.plot(x, [h["val_loss"] for h in history], label="val")
    left.set_xlabel("epoch (all stages)")
    left.set_ylabel("loss")
    left.legend()
    right.plot(x, [h["val_accuracy"] for h in history], color="tab:green")
    right.set_xlabel("epoch (all stages)")
    right.set_ylabel("val accuracy")
    fig.suptitle(title)
    save_figure(fig, path)


def summarize(results: list[dict]) -> dict:
    """Per method: test accuracy mean/std (population std, as the reference) over all
    targets and trials, the run count, and the same per target."""
    summary: dict = {"methods": {}}
    for method in sorted({r["method_label"] for r in results}):
        runs = [r for r in results if r["method_label"] == method]
        accs = [r["test_metrics"]["accuracy"] for r in runs]
        per_target = {}
        for target in sorted({r["target"] for r in runs}):
            t_accs = [r["test_metrics"]["accuracy"] for r in runs if r["target"] == target]
            per_target[target] = {
                "test_accuracy_mean": float(np.mean(t_accs)),
                "test_accuracy_std": float(np.std(t_accs)),
                "n_runs": len(t_accs),
            }
        summary["methods"][method] = {
            "test_accuracy_mean": float(np.mean(accs)),
            "test_accuracy_std": float(np.std(accs)),
            "n_runs": len(accs),
            "per_target": per_target,
        }
    return summary


def summary_markdown(summary: dict, title: str) -> str:
    methods = summary["methods"]
    targets = sorted({t for m in methods.values() for t in m["per_target"]})
    lines = [
        f"# {title}",
        "",
        "Test accuracy, mean ± std over trials (n runs).",
        "",
        "| method | all targets | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for name, m in methods.items():
        cells = [
            f"{100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f}"
            f" ({m['n_runs']})"
        ]
        for t in targets:
            pt = m["per_target"].get(t)
            cells.append(
                f"{100 * pt['test_accuracy_mean']:.1f} ± "
                f"{100 * pt['test_accuracy_std']:.1f}"
                if pt
                else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_bar_chart(summary: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(summary["methods"])
    means = [summary["methods"][n]["test_accuracy_mean"] for n in names]
    stds = [summary["methods"][n]["test_accuracy_std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 3.2))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    save_figure(fig, path)
