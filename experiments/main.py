"""Runs a whole experiment from a config: `python -m experiments.main --config=digits`.

Flags and config in, `runner.run_experiment` out: sources, every method of
`config.methods` on every target and trial, results and summary under
`<workdir>/results/<dataset>/`. Takes the multi-host flags of `experiments.distributed`.
`--list` prints the configs and the methods with their hyperparameters; `--dry_run`
prints the resolved config and the runs it would do, and trains nothing.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import cli
from experiments.configs import expand_config_argument


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.list:
        print(listing(flags.FLAGS.config))
        return
    if flags.FLAGS.dry_run:
        cli.quiet_logs()
        config, workdir = cli.config_and_workdir()
        with cli.one_line_errors("experiments.main"):
            print(dry_run(config, workdir))
        return
    from experiments import report, runner  # after the flags: --help stays fast

    config, workdir, summary = cli.run_experiment_command(
        "experiments.main", runner.run_experiment
    )
    print()
    print(report.summary_markdown(summary, f"{config.dataset} / {config.model}"))
    print(f"results in {workdir / 'results' / config.dataset}; {summary['seconds']:.0f} s")


def listing(config) -> str:
    """The configs, and every method with its one-line description and the
    hyperparameters it reads (their values under `config`)."""
    from experiments import methods
    from experiments.configs import available

    lines = [f"configs: {', '.join(available())} (--config=NAME[:key=value,...])", ""]
    lines.append(f"methods (config.methods=a+b, or all; values under {config.name}):")
    for name, method in methods.REGISTRY.items():
        alias = f" (the name earlier results used for {method.alias_of})"
        lines.append(f"  {name}: {method.description}{alias if method.alias_of else ''}")
        for key, value in method.hyperparameters(config).items():
            lines.append(f"      {key} = {value}")
    return "\n".join(lines)


def dry_run(config, workdir) -> str:
    """The resolved config and the runs `main` would do in `workdir`, checked as a
    real run checks them; nothing is trained or written."""
    from experiments import methods, runner, settings

    targets = settings.check(config, methods.REGISTRY)
    runs = runner.plan(config, workdir, targets)
    lines = [config.to_json_best_effort(indent=2, sort_keys=True), ""]
    lines += [
        f"{target} trial {trial}: {name}{' (finished earlier)' if finished else ''}"
        for target, trial, name, finished in runs
    ]
    lines.append(f"{runner.plan_line(config, workdir, runs)} in {workdir}; nothing was run")
    return "\n".join(lines)


def define_flags() -> None:
    """The experiment flags and `--list`, `--dry_run`."""
    cli.define_experiment_flags()
    flags.DEFINE_bool("list", False, "Print configs and methods with their keys; exit.")
    flags.DEFINE_bool("dry_run", False, "Print the resolved config and the runs; exit.")


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    cli.exit_on_config_error(sys.argv, "experiments.main")
    define_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
