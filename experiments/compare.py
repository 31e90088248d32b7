"""Our results next to the official PyTorch code's, in one table:

    python -m experiments.compare --reference=REF_RESULTS --ours=runs/clear10/results \\
        [--out=comparison.md]

Both trees are read the same way (`<dataset>/<run>/metrics.json`, docs/reference.md §6);
runs are matched by (dataset, model, target, method, trial), model names are accepted as
our zoo names, the reference's short names or its HF ids, and GRASP runs are told apart
by threshold. Per (dataset, model, method, target): test accuracy, F1 and AUROC as mean
± population std over trials, wall time, peak memory, the trial count on each side and
the accuracy difference (ours minus reference, in points). A side without runs shows
`missing`, never a zero. Also writes `<out>.csv` and `<out>.png`. Needs no torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from experiments import cli

SIDES = ("ours", "reference")
METRICS = ("accuracy", "f1_score", "auroc")


def read_runs(root: Path) -> dict[tuple, dict]:
    """(dataset, model, method, target, trial) -> metrics.json of every run under
    `root` (a `results/` folder, or the folder holding it)."""
    from experiments.settings import ConfigError

    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder of results; pass a results/ folder")
    if (root / "results").is_dir():
        root = root / "results"
    runs, paths = {}, {}
    for path in sorted(root.glob("*/*/metrics.json")):
        try:
            record = json.loads(path.read_text())
            key = run_key(record)
            accuracy = float(record["test_metrics"]["accuracy"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path} is not a run's metrics.json ({err!r})") from None
        if key in runs:
            raise ConfigError(
                f"{paths[key].parent} and {path.parent} are the same run {key}; keep one "
                "of them, or compare their folders separately"
            )
        if not math.isfinite(accuracy):
            logging.warning("%s: test accuracy is %s (a diverged run?)", path, accuracy)
        runs[key], paths[key] = record, path
    if not runs:
        raise ConfigError(f"no <dataset>/<run>/metrics.json under {root}")
    return runs


def run_key(record: dict) -> tuple:
    """(dataset, model, method variant, target, trial). The variant names what puts
    two runs of one method in different folders: GRASP's threshold, and its granularity
    and mode where they are not the reference's (tensor, hard)."""
    from grasp_jax.models import zoo_name

    if not isinstance(record, dict):
        raise TypeError(f"a JSON object, not {type(record).__name__}")
    model = record.get("zoo_model") or zoo_name(record["model"])
    hyperparameters = record.get("hyperparameters", {})
    variant = []
    if "alignment_threshold" in hyperparameters:
        variant.append(f"threshold {hyperparameters['alignment_threshold']:g}")
    unit = (
        hyperparameters.get("granularity", "tensor"),
        hyperparameters.get("mode", "hard"),
    )
    if unit != ("tensor", "hard"):
        variant.append(" ".join(unit))
    method = record["method"] + (f" ({', '.join(variant)})" if variant else "")
    return (record["dataset"], model, method, record["target"], int(record["trial"]))


def compare(ours: dict[tuple, dict], reference: dict[tuple, dict]) -> list[dict]:
    """One row per (dataset, model, method, target) present on either side."""
    groups = sorted({k[:4] for k in (*ours, *reference)})
    rows = []
    for group in groups:
        row = dict(zip(("dataset", "model", "method", "target"), group, strict=True))
        for side, runs in zip(SIDES, (ours, reference), strict=True):
            records = [r for k, r in sorted(runs.items()) if k[:4] == group]
            row[f"{side}_trials"] = len(records)
            for name in METRICS:
                values = [r["test_metrics"].get(name) for r in records]
                values = [v for v in values if v is not None]
                row[f"{side}_{name}_mean"] = float(np.mean(values)) if values else None
                row[f"{side}_{name}_std"] = float(np.std(values)) if values else None
            row[f"{side}_minutes"] = _mean([r.get("total_time_minutes") for r in records])
            row[f"{side}_peak_gb"] = _mean([_peak_gb(r) for r in records])
        a, b = row["ours_accuracy_mean"], row["reference_accuracy_mean"]
        row["accuracy_difference_points"] = None if None in (a, b) else 100 * (a - b)
        rows.append(row)
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _peak_gb(record: dict) -> float | None:
    return record.get("gpu_memory", {}).get("peak_gpu_memory_gb")


def markdown(rows: list[dict]) -> str:
    lines = [
        "Test metrics in %, mean ± population std over trials (n); Δ: ours minus the "
        "reference, in points; time in minutes, peak memory in GiB.",
        "",
        "| dataset | model | method | target | accuracy ours | accuracy reference | Δ "
        "| F1 ours | F1 reference | AUROC ours | AUROC reference | minutes ours / ref "
        "| peak GB ours / ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["dataset"], r["model"], r["method"], r["target"]]
        cells += [_metric(r, side, "accuracy") for side in SIDES]
        difference = r["accuracy_difference_points"]
        cells.append("missing" if difference is None else f"{difference:+.1f}")
        for name in ("f1_score", "auroc"):
            cells += [_metric(r, side, name) for side in SIDES]
        for key in ("minutes", "peak_gb"):
            cells.append(" / ".join(_number(r[f"{side}_{key}"]) for side in SIDES))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric(row: dict, side: str, name: str) -> str:
    mean = row[f"{side}_{name}_mean"]
    if mean is None:
        return "missing"
    std, trials = row[f"{side}_{name}_std"], row[f"{side}_trials"]
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({trials})"


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return out.getvalue()


def accuracy_png(rows: list[dict], path: Path) -> None:
    """Test accuracy per target, ours beside the reference, one panel per (dataset,
    model, method), four panels a row; a missing side has no bar."""
    from experiments.report import plots

    plt = plots.pyplot()
    panels = sorted({(r["dataset"], r["model"], r["method"]) for r in rows})
    columns = min(4, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        lines, columns, figsize=(4.5 * columns, 3.4 * lines), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        group = [r for r in rows if (r["dataset"], r["model"], r["method"]) == panel]
        x = np.arange(len(group))
        for offset, side in ((-0.2, "ours"), (0.2, "reference")):
            means = [r[f"{side}_accuracy_mean"] for r in group]
            present = [i for i, m in enumerate(means) if m is not None]
            ax.bar(
                x[present] + offset,
                [100 * means[i] for i in present],
                0.4,
                yerr=[100 * group[i][f"{side}_accuracy_std"] for i in present],
                label=side,
                capsize=3,
            )
        ax.set_xticks(x, [r["target"] for r in group], rotation=30, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(" / ".join(panel), fontsize=9)
    for row in axes:
        row[0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    plots.save_figure(fig, path)


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module next
    to the other commands does not define a flag twice)."""
    flags.DEFINE_string("reference", None, "The reference's results folder.")
    flags.DEFINE_string("ours", None, "Our results folder.")
    flags.DEFINE_string("out", None, "Markdown file to write (also .csv and .png).")


def main(argv: list[str]) -> None:
    del argv
    from experiments import report
    from experiments.settings import ConfigError

    given = flags.FLAGS
    with cli.one_line_errors("experiments.compare"):
        if not given.reference or not given.ours:
            raise ConfigError("pass --reference=DIR and --ours=DIR (results folders)")
        rows = compare(read_runs(Path(given.ours)), read_runs(Path(given.reference)))
        text = markdown(rows)
        if given.out:
            out = Path(given.out)
            report.write_text(out, text)
            report.write_text(out.with_suffix(".csv"), csv_text(rows))
            accuracy_png(rows, out.with_suffix(".png"))
    sys.stdout.write(text)


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__, define_flags, takes_config=False)
    define_flags()
    app.run(main)
