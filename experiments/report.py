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

from experiments import reference_format
from grasp_jax import files, metrics


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
        "model": reference_format.model_string(ctx.config.model),
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


def write_source_matrix(results_dir: Path, matrix: dict, title: str) -> None:
    """`source_matrix.json` and a heat map `source_matrix.png`."""
    if jax.process_index() != 0:
        return
    write_json(results_dir / "source_matrix.json", matrix)
    plt = pyplot()
    values = np.asarray(matrix["accuracy"])
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * values.shape[1], 1.2 + 0.5 * len(values)))
    ax.imshow(values, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            color = "white" if value > 0.5 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(values.shape[1]), matrix["columns"])
    ax.set_yticks(range(len(values)), matrix["rows"])
    ax.set_xlabel("test split of bin")
    ax.set_ylabel("model")
    pool = matrix.get("pretrained_pool_test_accuracy")
    subtitle = f" (start: {pool:.2f} on the pool's test split)" if pool is not None else ""
    ax.set_title(f"{title}: test accuracy{subtitle}", fontsize=9)
    save_figure(fig, results_dir / "source_matrix.png")


class OutputError(OSError):
    """A result file could not be written (disk full, no permission)."""


def write_text(path: Path, text: str) -> None:
    """Writes text atomically: a temp file in the same folder, then rename. On failure
    the temp file is removed and what `path` held before is untouched."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, files.public_mode())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(
            f"could not write {path} ({err.strerror or err}); free some space or choose a "
            "writable --workdir, then rerun (finished work is kept and resumed)"
        ) from None


def write_text_once(path: Path, text: str) -> None:
    """`write_text` from process 0 only (the others computed the same text)."""
    if jax.process_index() == 0:
        write_text(path, text)


def write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically (numbers as Python numbers, anything else as text)."""
    text = json.dumps(
        obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)
    )
    write_text(path, text)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    os.replace(tmp, path)
    pyplot().close(fig)


def confusion_matrix_png(
    matrix: list[list[int]], class_names: list[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix with two-decimal cells, as the reference draws it."""
    plt = pyplot()
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
    plt = pyplot()
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


def mean_with_interval(differences: list[float]) -> dict:
    """Mean and two-sided 95 % Student t interval of `differences` (e.g. paired, in points);
    the interval is None for fewer than two pairs."""
    from scipy import stats

    n = len(differences)
    mean = float(np.mean(differences)) if n else None
    interval = None
    if n >= 2:
        half = stats.t.ppf(0.975, n - 1) * np.std(differences, ddof=1) / np.sqrt(n)
        interval = [mean - float(half), mean + float(half)]
    return {"mean": mean, "ci95": interval, "n_pairs": n, "interval": "student t"}


def summarize(results: list[dict], baseline: str = "grasp") -> dict:
    """Per method, ranked by mean test accuracy (best first, `rank` 1): test accuracy
    mean/std (population std, as the reference) over all targets and trials, the run
    count, the same per target, and the paired difference
    to `baseline` (method minus baseline, in points, over the (target, trial) pairs both
    ran: they share a seed)."""
    summary: dict = {"methods": {}}
    accuracy = {
        (r["method_label"], r["target"], r["trial"]): r["test_metrics"]["accuracy"]
        for r in results
    }
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
        pairs = [
            100 * (accuracy[key] - accuracy[(baseline, *key[1:])])
            for key in sorted(k for k in accuracy if k[0] == method)
            if (baseline, *key[1:]) in accuracy
        ]
        if method != baseline and pairs:
            summary["methods"][method][f"paired_difference_to_{baseline}"] = (
                mean_with_interval(pairs)
            )
    ranked = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["test_accuracy_mean"])
    summary["methods"] = {name: dict(m, rank=i + 1) for i, (name, m) in enumerate(ranked)}
    return summary


def _difference_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    interval = entry["ci95"]
    ci = f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else ""
    return f"{entry['mean']:+.1f}{ci}"


def summary_markdown(summary: dict, title: str) -> str:
    methods = summary["methods"]
    targets = sorted({t for m in methods.values() for t in m["per_target"]})
    lines = [
        f"# {title}",
        "",
        "Test accuracy in %, mean ± population std over trials (n runs); Δ grasp: the "
        "paired difference to GRASP in points over (target, trial) pairs with the same "
        "seed, mean [95 % Student t interval].",
        "",
        "| rank | method | all targets | Δ grasp | " + " | ".join(targets) + " |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    for name, m in methods.items():
        cells = [
            f"{100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f}"
            f" ({m['n_runs']})",
            _difference_cell(m.get("paired_difference_to_grasp")),
        ]
        for t in targets:
            pt = m["per_target"].get(t)
            cells.append(
                f"{100 * pt['test_accuracy_mean']:.1f} ± "
                f"{100 * pt['test_accuracy_std']:.1f}"
                if pt
                else "-"
            )
        lines.append(f"| {m['rank']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_bar_chart(summary: dict, path: Path, title: str) -> None:
    """Accuracy per method, and each method's paired difference to GRASP with its CI."""
    plt = pyplot()
    names = list(summary["methods"])
    means = [summary["methods"][n]["test_accuracy_mean"] for n in names]
    stds = [summary["methods"][n]["test_accuracy_std"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(names), 4.2))
    left.bar(names, means, yerr=stds, capsize=4, color="tab:blue")
    left.tick_params(axis="x", labelrotation=45)
    left.set_ylim(0, 1)
    left.set_ylabel("test accuracy (± std)")
    diffs = {
        n: m["paired_difference_to_grasp"]
        for n, m in summary["methods"].items()
        if m.get("paired_difference_to_grasp")
    }
    for i, entry in enumerate(diffs.values()):
        low, high = entry["ci95"] or (entry["mean"], entry["mean"])
        right.errorbar(
            i,
            entry["mean"],
            yerr=[[entry["mean"] - low], [high - entry["mean"]]],
            fmt="o",
            capsize=4,
            color="tab:red",
        )
    right.axhline(0, color="grey", lw=0.8)
    right.set_xticks(range(len(diffs)), list(diffs), rotation=45)
    right.set_xlim(-0.6, max(len(diffs), 1) - 0.4)
    right.set_ylabel("minus GRASP, points (95 % CI)")
    fig.suptitle(title)
    save_figure(fig, path)


def _interval_text(entry: dict, digits: int = 1) -> str:
    if entry["mean"] is None:
        return "-"
    interval = entry["ci95"]
    ci = f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else ""
    return f"{entry['mean']:.{digits}f}{ci}"


def study_markdown(study: dict, title: str) -> str:
    """The study's table: one row per variant."""
    lines = [
        f"# {title}: what alignment adds",
        "",
        "Test accuracy in % (mean [95 % Student t interval] over targets x trials), the "
        "mean share of parameters moved per merge, and the paired difference to staged "
        "fine-tuning (threshold 1.01: nothing moves) in points.",
        "",
        "| method | granularity | mode | threshold | moved | test accuracy | Δ staged |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for row in study["rows"]:
        lines.append(
            f"| {row['method']} | {row['granularity']} | {row['mode']} | "
            f"{row['threshold']:g} | {100 * row['fraction_moved_mean']:.1f} % | "
            f"{_interval_text(row['test_accuracy'])} | "
            f"{_interval_text(row['paired_difference_to_staged_finetuning'])} |"
        )
    return "\n".join(lines) + "\n"


def write_study(results_dir: Path, study: dict, title: str) -> None:
    """`study.json`, `study.md` and `study.png` (accuracy against share moved)."""
    if jax.process_index() != 0:
        return
    write_json(results_dir / "study.json", study)
    write_text(results_dir / "study.md", study_markdown(study, title))
    plt = pyplot()
    granularities = sorted({r["granularity"] for r in study["rows"]})
    fig, axes = plt.subplots(
        1, len(granularities), figsize=(4.2 * len(granularities), 3.6), sharey=True
    )
    styles = {
        ("grasp", "hard"): ("tab:blue", "o", "GRASP hard"),
        ("grasp", "soft"): ("tab:green", "s", "GRASP soft"),
        ("grasp_random", "hard"): ("tab:red", "x", "random units (control)"),
    }
    for ax, granularity in zip(np.atleast_1d(axes), granularities, strict=True):
        for (method, mode), (color, marker, label) in styles.items():
            rows = [
                r
                for r in study["rows"]
                if (r["granularity"], r["method"], r["mode"]) == (granularity, method, mode)
            ]
            rows.sort(key=lambda r: r["fraction_moved_mean"])
            x = [100 * r["fraction_moved_mean"] for r in rows]
            y = [r["test_accuracy"]["mean"] for r in rows]
            bounds = [
                r["test_accuracy"]["ci95"] or (m, m) for m, r in zip(y, rows, strict=True)
            ]
            err = [
                [m - low for m, (low, _) in zip(y, bounds, strict=True)],
                [high - m for m, (_, high) in zip(y, bounds, strict=True)],
            ]
            ax.errorbar(
                x, y, yerr=err, fmt=marker + "-", color=color, capsize=3, label=label
            )
        ax.set_title(f"granularity: {granularity}", fontsize=9)
        ax.set_xlabel("parameters moved per merge (%)")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%, 95 % CI)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, results_dir / "study.png")
