"""Runs a whole experiment from a config: `python -m experiments.main --config=digits`.

Flags and config in, `runner.run_experiment` out: sources, every method of
`config.methods` on every target and trial, results and summary under
`<workdir>/results/<dataset>/`. Takes the multi-host flags of `experiments.distributed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, distributed, report, runner
from experiments.configs import CONFIG_DIR, expand_config_argument

_CONFIG = config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config>).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    distributed.initialize()
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value or f"runs/{config.name}")
    with cli.one_line_errors("experiments.main"):
        cli.check_workdir(workdir)
        summary = runner.run_experiment(config, workdir)
    print()
    print(report.summary_markdown(summary, f"{config.dataset} / {config.model}"))
    print(f"results in {workdir / 'results' / config.dataset}; {summary['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main, argv=expand_config_argument(sys.argv))
