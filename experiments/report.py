"""Result files: atomic JSON, confusion matrices, training curves and the summary."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(
            obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)
        )
    os.replace(tmp, path)


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
