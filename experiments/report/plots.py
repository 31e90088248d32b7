"""The pictures of an experiment: confusion matrices, training curves, the summary chart,
the source matrix and the study (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grasp_jax import files

CONFUSION_CELL_PX = 44  # a cell of the confusion matrix pictures, in pixels


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Saves `fig` atomically (a half-written PNG never replaces a good one)."""
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"))
    pyplot().close(fig)


def confusion_matrix_png(
    matrix: list[list[int]], class_names: list[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix with two-decimal cells, as the reference draws it.

    Drawn with PIL in matplotlib's colours and font: matplotlib lays out every cell's
    label as an artist (0.24 s a 10-class matrix on a 2-core CPU, two a run: a tenth of
    `make run`'s job), PIL writes the same picture in a few milliseconds."""
    from matplotlib import colormaps, font_manager
    from PIL import Image, ImageDraw, ImageFont

    counts = np.asarray(matrix, np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    font_file = font_manager.findfont("DejaVu Sans")
    font, big = ImageFont.truetype(font_file, 14), ImageFont.truetype(font_file, 18)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = max(measure.textlength(str(name), font=font) for name in class_names)
    cell, pad, line = CONFUSION_CELL_PX, 8, 22
    left = int(line + pad + names + pad)  # the axis title, then the row names
    top = line + 2 * pad
    grid = n * cell
    width = max(left + grid + pad, int(measure.textlength(title, font=big)) + 2 * pad)
    height = top + grid + pad + int(names) + pad + line + pad
    image = Image.new("RGB", (width, height), "white")
    colours = (colormaps["Blues"](rows)[..., :3] * 255).round().astype(np.uint8)
    cells = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(cells), (left, top))
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            centre = (left + j * cell + cell // 2, top + i * cell + cell // 2)
            ink = "white" if rows[i, j] > 0.5 else "black"
            draw.text(centre, f"{rows[i, j]:.2f}", fill=ink, font=font, anchor="mm")
        name_at = (left - pad, top + i * cell + cell // 2)
        draw.text(name_at, str(class_names[i]), fill="black", font=font, anchor="rm")
    draw.text((width // 2, pad), title, fill="black", font=big, anchor="mt")
    # column names read upwards under their columns, as matplotlib's rotation=90
    columns = Image.new("RGB", (int(names) + pad, grid), "white")
    column_draw = ImageDraw.Draw(columns)
    for j, name in enumerate(class_names):
        at = (columns.width, j * cell + cell // 2)
        column_draw.text(at, str(name), fill="black", font=font, anchor="rm")
    image.paste(columns.rotate(90, expand=True), (left, top + grid + pad // 2))
    draw.text(
        (left + grid // 2, height - pad), "predicted", fill="black", font=font, anchor="md"
    )
    axis_title = Image.new("RGB", (grid, line), "white")
    ImageDraw.Draw(axis_title).text(
        (grid // 2, line // 2), "true", fill="black", font=font, anchor="mm"
    )
    image.paste(axis_title.rotate(90, expand=True), (pad, top))
    files.write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def training_curves_png(history: list[dict], path: Path, title: str) -> None:
    """Losses and validation accuracy over the concatenated epochs of all stages (an
    epoch without a value, e.g. one that diverged, leaves a gap); with GRASP's stages
    a dashed line marks each merge, just before the first epoch after it."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = np.arange(len(history))
    left.plot(x, [h.get("train_loss", np.nan) for h in history], label="train")
    left.plot(x, [h.get("val_loss", np.nan) for h in history], label="val")
    left.set_ylabel("loss")
    accuracy = [100 * h.get("val_accuracy", np.nan) for h in history]
    right.plot(x, accuracy, color="tab:green")
    right.set_ylabel("val accuracy (%)")
    stages = [h.get("stage") for h in history]
    merges = [i for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
    for ax in (left, right):
        ax.set_xlabel("epoch (all stages)")
        for k, i in enumerate(merges, start=1):
            ax.axvline(i - 0.5, color="grey", ls="--", lw=0.8)
            if ax is right:
                ax.annotate(
                    f"merge {k}",
                    (i - 0.45, 1),
                    xycoords=("data", "axes fraction"),
                    va="top",
                    fontsize=7,
                    color="grey",
                )
    left.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def summary_bar_chart(summary: dict, path: Path, title: str) -> None:
    """Accuracy per method, and each method's paired difference to the summary's
    baseline (GRASP by default) with its CI."""
    plt = pyplot()
    names = list(summary["methods"])
    means = [summary["methods"][n]["test_accuracy_mean"] for n in names]
    stds = [summary["methods"][n]["test_accuracy_std"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(names), 4.2))
    left.bar(names, [100 * m for m in means], yerr=[100 * s for s in stds], capsize=4)
    left.tick_params(axis="x", labelrotation=45)
    left.set_ylim(0, 100)
    left.set_ylabel("test accuracy (%, ± std)")
    baseline = summary.get("baseline", "grasp")
    key = f"paired_difference_to_{baseline}"
    diffs = {n: m[key] for n, m in summary["methods"].items() if m.get(key)}
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
    right.set_ylabel(f"minus {baseline}, points (95 % CI)")
    fig.suptitle(title)
    save_figure(fig, path)


def source_matrix_png(matrix: dict, path: Path, title: str) -> None:
    """Heat map of every model's test accuracy on every bin."""
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
    save_figure(fig, path)


def study_png(study: dict, path: Path, title: str) -> None:
    """Accuracy against the share of parameters moved, one panel per granularity
    (tensor, channel, element), each point labelled by its threshold; the staged
    fine-tuning baseline (nothing moves) as a line with its interval."""
    from grasp_jax.alignment import GRANULARITIES

    plt = pyplot()
    present = {r["granularity"] for r in study["rows"]}
    granularities = [g for g in GRANULARITIES if g in present]
    baseline = tuple(study.get("staged_finetuning") or ())
    staged = [
        r
        for r in study["rows"]
        if (r["method"], r["threshold"], r["granularity"], r["mode"]) == baseline
    ]
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
            for xi, yi, r in zip(x, y, rows, strict=True):
                ax.annotate(
                    f"{r['threshold']:g}",
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                    color=color,
                )
        if staged:
            base = staged[0]["test_accuracy"]
            low, high = base["ci95"] or (base["mean"], base["mean"])
            ax.axhspan(low, high, color="grey", alpha=0.15, lw=0)
            ax.axhline(
                base["mean"],
                color="grey",
                ls="--",
                lw=0.8,
                label="staged fine-tuning (nothing moves)",
            )
        ax.set_title(f"granularity: {granularity}", fontsize=9)
        ax.set_xlabel("parameters moved per merge (%)")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%, 95 % CI)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
