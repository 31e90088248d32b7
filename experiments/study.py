"""The study of what alignment adds: `python -m experiments.study [--config=digits]`.

Runs GRASP on every target and trial of the config (paired seeds) at thresholds -1
(every tensor moves), 0, 0.1, 0.3, 0.5, 0.7 and 1.01 (nothing moves: staged
fine-tuning), at granularities tensor, channel and element, hard and soft; and the
control `grasp_random` (each merge moves as many units as GRASP's rule would, chosen at
random) at every threshold that moves a strict subset. Writes
`results/<dataset>/study.{json,md,png}`: per variant the test accuracy (mean and 95 %
Student t interval over runs), the mean share of parameters moved per merge, and the
paired difference to staged fine-tuning. Finished runs are reused, so it resumes.
Takes `--config` overrides and the multi-host flags like `main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import app

from experiments import cli, console, report, runner
from experiments.configs import expand_config_argument
from grasp_jax.alignment import GRANULARITIES
from grasp_jax.grasp import NOTHING_MOVES
from grasp_jax.transfer import MODES

THRESHOLDS = (-1.0, 0.0, 0.1, 0.3, 0.5, 0.7, NOTHING_MOVES)
STAGED = (
    "grasp",
    NOTHING_MOVES,
    "tensor",
    "hard",
)  # nothing moves: the baseline of the study


def variants() -> list[tuple[str, float, str, str]]:
    """(method, threshold, granularity, mode) of every run family of the study."""
    grid = [("grasp", t, g, m) for g in GRANULARITIES for m in MODES for t in THRESHOLDS]
    grid += [
        ("grasp_random", t, g, "hard")
        for g in GRANULARITIES
        for t in THRESHOLDS
        if -1.0 < t <= 1.0
    ]
    return grid


def run_study(config, workdir: Path, *, progress: bool = True) -> dict:
    """Every variant's runs (into the experiment's results folder), then the table."""
    records = {}
    grid = variants()
    for index, variant in enumerate(grid, start=1):
        method, threshold, granularity, mode = variant
        console.event(
            f"study {index}/{len(grid)}: {method}, threshold {threshold:g}, "
            f"{granularity}, {mode}"
        )
        changed = config.copy_and_resolve_references()
        changed.methods = (method,)
        changed.grasp.update(threshold=threshold, granularity=granularity, mode=mode)
        records[variant] = runner.run_methods(changed, workdir, progress=progress)
    staged = {(r["target"], r["trial"]): r for r in records[STAGED]}
    rows = []
    for (method, threshold, granularity, mode), runs in records.items():
        accuracy = [100 * r["test_metrics"]["accuracy"] for r in runs]
        moved = [s["fraction"] for r in runs for s in r["transfer_history"]]
        pairs = [
            100 * r["test_metrics"]["accuracy"]
            - 100 * staged[(r["target"], r["trial"])]["test_metrics"]["accuracy"]
            for r in runs
            if (r["target"], r["trial"]) in staged
        ]
        rows.append(
            {
                "method": method,
                "threshold": threshold,
                "granularity": granularity,
                "mode": mode,
                "test_accuracy": report.mean_with_interval(accuracy),
                "fraction_moved_mean": float(np.mean(moved)) if moved else 0.0,
                "paired_difference_to_staged_finetuning": report.mean_with_interval(pairs),
                "n_runs": len(runs),
            }
        )
    study = {"rows": rows, "config": config.to_dict(), "staged_finetuning": list(STAGED)}
    results_dir = workdir / "results" / config.dataset
    title = f"{config.dataset} / {config.model}: what alignment adds"
    report.write_study(results_dir, study, title)
    return study


def main(argv: list[str]) -> None:
    del argv
    config, workdir, study = cli.run_experiment_command("experiments.study", run_study)
    print(report.study_markdown(study, f"{config.dataset} / {config.model}"))
    print(f"results in {workdir / 'results' / config.dataset}/study.{{json,md,png}}")


if __name__ == "__main__":
    cli.define_experiment_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
