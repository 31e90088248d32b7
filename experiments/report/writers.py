"""The one writer of result files: a run's folder, the summary, the source matrix and
the study, all through `grasp_jax.files.write_atomic`. In a multi-process job every
process computes the same records; only process 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from experiments.report import markdown, plots
from grasp_jax import files


def write_run(
    out_dir: Path,
    record: dict,
    profile: dict,
    class_names: list[str],
    title: str,
    resolved_config: dict,
) -> None:
    """Every file of one run; `metrics.json` last, as it marks the run finished.
    `config.json` is the record, as the reference writes it; `run_config.json` the
    whole config the run ran under."""
    if jax.process_index() != 0:
        return
    write_json(out_dir / "run_config.json", resolved_config)
    write_json(out_dir / "memory_profile.json", profile)
    write_json(out_dir / "flops_report.json", record["flops"])
    for split in ("test", "val"):
        plots.confusion_matrix_png(
            record[f"{split}_metrics"]["confusion_matrix"],
            class_names,
            out_dir / "confusion_matrices" / f"{split}_confusion_matrix.png",
            f"{title} ({split})",
        )
    if record["history"]:
        plots.training_curves_png(record["history"], out_dir / "training_curves.png", title)
    write_json(out_dir / "config.json", record)
    write_json(out_dir / "metrics.json", record)


def _write_result(results_dir: Path, stem: str, obj: dict, text, picture, title):
    """`<stem>.json`, `<stem>.md` (when `text` renders one) and `<stem>.png`."""
    if jax.process_index() != 0:
        return
    write_json(results_dir / f"{stem}.json", obj)
    if text is not None:
        write_text(results_dir / f"{stem}.md", text(obj, title))
    picture(obj, results_dir / f"{stem}.png", title)


def write_summary(results_dir: Path, summary: dict, title: str) -> None:
    """`summary.json`, `summary.md` and `summary.png` of an experiment."""
    _write_result(
        results_dir,
        "summary",
        summary,
        markdown.summary_markdown,
        plots.summary_bar_chart,
        title,
    )


def write_source_matrix(results_dir: Path, matrix: dict, title: str) -> None:
    """`source_matrix.json` and a heat map `source_matrix.png`."""
    _write_result(
        results_dir, "source_matrix", matrix, None, plots.source_matrix_png, title
    )


def write_study(results_dir: Path, study: dict, title: str) -> None:
    """`study.json`, `study.md` and `study.png` (accuracy against share moved)."""
    _write_result(
        results_dir, "study", study, markdown.study_markdown, plots.study_png, title
    )


def write_text(path: Path, text: str) -> None:
    """Writes text atomically (`grasp_jax.files.write_atomic`)."""
    files.write_text(path, text)


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
