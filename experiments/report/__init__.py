"""Result records and files, one job per module: `records` (what a run reports),
`statistics` (means and paired intervals over runs), `markdown` (tables), `plots`
(pictures) and `writers` (the one place result files are written)."""

from experiments.report.markdown import study_markdown, summary_markdown
from experiments.report.records import run_record
from experiments.report.statistics import mean_with_interval, summarize
from experiments.report.writers import (
    write_json,
    write_run,
    write_source_matrix,
    write_study,
    write_summary,
    write_text,
    write_text_once,
)
from grasp_jax.files import OutputError

__all__ = [
    "OutputError",
    "mean_with_interval",
    "run_record",
    "study_markdown",
    "summarize",
    "summary_markdown",
    "write_json",
    "write_run",
    "write_source_matrix",
    "write_study",
    "write_summary",
    "write_text",
    "write_text_once",
]
