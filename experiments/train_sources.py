"""Trains one source model per bin: `python -m experiments.train_sources --config=digits`.

Every source starts from one shared pretrained initialisation (as in the paper) and is
saved under `<workdir>/sources/<dataset>/<model>/<bin>/`. Trained bins are skipped; an
interrupted bin resumes from its last epoch checkpoint. Takes the multi-host flags of
`experiments.distributed`.
"""

from __future__ import annotations

import sys
import time

from absl import app

from experiments import cli
from experiments.configs import expand_config_argument


def checked_train_sources(config, workdir):
    """`sources.train_sources` after checking the config and the data set."""
    from experiments import data_checks, settings, sources

    targets = settings.check(config)
    data_checks.check(config, workdir, targets, aligning=False)
    return sources.train_sources(config, workdir)


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    _, workdir, summary = cli.run_experiment_command(
        "experiments.train_sources", checked_train_sources
    )
    print(f"\n{'bin':<12}{'best val acc':>14}{'epoch':>7}{'seconds':>9}")
    for bin_name, meta in summary.items():
        print(
            f"{bin_name:<12}{meta['best_val_accuracy']:>14.3f}{meta['best_epoch']:>7}"
            f"{meta['seconds']:>9.1f}"
        )
    from grasp_jax import memory

    peak = memory.peak_host_memory_bytes()
    print(
        f"sources in {workdir / 'sources'}; {time.perf_counter() - start:.1f} s, "
        f"peak host memory {peak / 2**20 if peak else float('nan'):.0f} MiB"
    )


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__)
    cli.define_experiment_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
