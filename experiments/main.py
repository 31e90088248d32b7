"""Runs a whole experiment from a config: `python -m experiments.main --config=digits`.

Flags and config in, `runner.run_experiment` out: sources, every method of
`config.methods` on every target and trial, results and summary under
`<workdir>/results/<dataset>/`. Takes the multi-host flags of `experiments.distributed`.
"""

from __future__ import annotations

import sys

from absl import app

from experiments import cli
from experiments.configs import expand_config_argument


def main(argv: list[str]) -> None:
    del argv
    from experiments import report, runner  # after the flags: --help stays fast

    config, workdir, summary = cli.run_experiment_command(
        "experiments.main", runner.run_experiment
    )
    print()
    print(report.summary_markdown(summary, f"{config.dataset} / {config.model}"))
    print(f"results in {workdir / 'results' / config.dataset}; {summary['seconds']:.0f} s")


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    cli.define_experiment_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
