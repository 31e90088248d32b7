"""The Markdown tables of an experiment (`summary.md`) and of the study (`study.md`)."""

from __future__ import annotations


def _difference_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    interval = entry["ci95"]
    ci = f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else ""
    return f"{entry['mean']:+.1f}{ci}"


def summary_markdown(summary: dict, title: str) -> str:
    methods = summary["methods"]
    baseline = summary.get("baseline", "grasp")
    shown = "GRASP" if baseline == "grasp" else baseline
    targets = sorted({t for m in methods.values() for t in m["per_target"]})
    lines = [
        f"# {title}",
        "",
        f"Test accuracy in %, mean ± population std over trials (n runs); Δ {baseline}: "
        f"the paired difference to {shown} in points over (target, trial) pairs with "
        "the same seed, mean [95 % Student t interval].",
        "",
        f"| rank | method | all targets | Δ {baseline} | " + " | ".join(targets) + " |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    for name, m in methods.items():
        cells = [
            f"{100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f}"
            f" ({m['n_runs']})",
            _difference_cell(m.get(f"paired_difference_to_{baseline}")),
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


def _interval_text(entry: dict, digits: int = 1) -> str:
    if entry["mean"] is None:
        return "-"
    interval = entry["ci95"]
    ci = f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else ""
    return f"{entry['mean']:.{digits}f}{ci}"


def study_markdown(study: dict, title: str) -> str:
    """The study's table: one row per variant."""
    lines = [
        f"# {title}",
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
