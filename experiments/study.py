"""The study of what alignment adds: `python -m experiments.study [--config=digits]`.

Runs GRASP on every target and trial of the config (paired seeds) over the grid of
`config.study`: by default thresholds -1 (every tensor moves), 0, 0.1, 0.3, 0.5, 0.7 and
1.01 (nothing moves: staged fine-tuning), granularities tensor, channel and element, hard
and soft; and the control `grasp_random` (each merge moves as many units as GRASP's rule
would, chosen at random) at every threshold that moves a strict subset. A smaller study:
`--config=digits:study.thresholds=0.3+1.01,study.granularities=tensor,study.modes=hard`.
Writes `results/<dataset>/study.{json,md,png}`: per variant the test accuracy (mean and
95 % Student t interval over runs), the mean share of parameters moved per merge, and
the paired difference to staged fine-tuning. The variants' runs go a (target, trial)
at a time, sharing its first stage. Finished runs are reused, so it resumes.
Takes `--config` overrides and the multi-host flags like `main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app

from experiments import cli
from experiments.configs import expand_config_argument

# Nothing moves (grasp_jax.grasp.NOTHING_MOVES; a test keeps them equal): the baseline.
STAGED = ("grasp", 1.01, "tensor", "hard")


def variants(study) -> list[tuple[str, float, str, str]]:
    """(method, threshold, granularity, mode) of every run family of `config.study`,
    staged fine-tuning first."""
    grid = [STAGED]
    grid += [
        ("grasp", float(t), g, m)
        for g in study.granularities
        for m in study.modes
        for t in study.thresholds
    ]
    if study.controls:
        grid += [
            ("grasp_random", float(t), g, "hard")
            for g in study.granularities
            for t in study.thresholds
            if -1.0 < t <= 1.0
        ]
    return list(dict.fromkeys(grid))


def variant_configs(config) -> list:
    """The config of each variant (`variants`): its one method and GRASP's settings."""
    configs = []
    for method, threshold, granularity, mode in variants(config.study):
        changed = config.copy_and_resolve_references()
        changed.methods = (method,)
        changed.grasp.update(threshold=threshold, granularity=granularity, mode=mode)
        configs.append(changed)
    return configs


def check(config) -> None:
    """One line naming the `config.study` key that cannot work."""
    from experiments.settings import ConfigError
    from grasp_jax.alignment import GRANULARITIES
    from grasp_jax.arguments import NOTHING_MOVES, threshold_in_range
    from grasp_jax.transfer import MODES

    study = config.study
    for key, allowed in (("granularities", GRANULARITIES), ("modes", MODES)):
        unknown = [v for v in study[key] if v not in allowed]
        if unknown or not study[key]:
            raise ConfigError(
                f"study.{key}={'+'.join(study[key])}: choose from {'+'.join(allowed)}"
            )
    bad = [t for t in study.thresholds if not threshold_in_range(float(t))]
    if bad or not study.thresholds:
        raise ConfigError(
            f"study.thresholds: {bad or 'empty'}; cosine thresholds lie in "
            f"[-1, {NOTHING_MOVES}] ({NOTHING_MOVES}: nothing moves)"
        )


def run_study(config, workdir: Path, *, progress: bool | None = None) -> dict:
    """Every variant's runs (into the experiment's results folder), then the table.
    `progress`: bars (default: on a terminal only, as `runner.run_methods`)."""
    import numpy as np

    from experiments import console, report, runner

    check(config)
    grid = variants(config.study)
    configs = variant_configs(config)

    def announce(number, total, index, target, trial):
        method, threshold, granularity, mode = grid[index]
        console.event(
            f"study run {number}/{total}: {method}, threshold {threshold:g}, "
            f"{granularity}, {mode} (variant {index + 1}/{len(grid)}) on {target}, "
            f"trial {trial}"
        )

    # One plan, a (target, trial) at a time: the variants share its first stage.
    per_variant = runner.run_variants(
        configs, workdir, progress=progress, announce=announce
    )
    records = dict(zip(grid, per_variant, strict=True))
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
    report.write_study(results_dir, study, title(config))
    return study


def title(config) -> str:
    """The heading of study.md and study.png, and of the table the command prints."""
    return f"{config.dataset} / {config.model}: what alignment adds"


def main(argv: list[str]) -> None:
    del argv
    from experiments import report

    config, workdir, study = cli.run_experiment_command(
        "experiments.study", run_study, check
    )
    print(report.study_markdown(study, title(config)))
    print(f"results in {workdir / 'results' / config.dataset}/study.{{json,md,png}}")


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    cli.exit_on_config_error(sys.argv, "experiments.study")
    cli.define_experiment_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
