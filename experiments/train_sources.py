"""Trains one source model per bin: `python -m experiments.train_sources --config=digits`.

Every source starts from one shared pretrained initialisation (as in the paper) and is
saved under `<workdir>/sources/<dataset>/<model>/<bin>/`. Trained bins are skipped; an
interrupted bin resumes from its last epoch checkpoint. Takes the multi-host flags of
`experiments.distributed`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, distributed, settings
from experiments.configs import CONFIG_DIR, expand_config_argument
from experiments.sources import train_sources
from grasp_jax import memory

_CONFIG = config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config>).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    distributed.initialize()
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value or f"runs/{config.name}")
    start = time.perf_counter()
    with cli.one_line_errors("experiments.train_sources"):
        settings.check(config)
        cli.check_workdir(workdir)
        summary = train_sources(config, workdir)
    print(f"\n{'bin':<12}{'best val acc':>14}{'epoch':>7}{'seconds':>9}")
    for bin_name, meta in summary.items():
        print(
            f"{bin_name:<12}{meta['best_val_accuracy']:>14.3f}{meta['best_epoch']:>7}"
            f"{meta['seconds']:>9.1f}"
        )
    peak = memory.peak_host_memory_bytes()
    print(
        f"sources in {workdir / 'sources'}; {time.perf_counter() - start:.1f} s, "
        f"peak host memory {peak / 2**20 if peak else float('nan'):.0f} MiB"
    )


if __name__ == "__main__":
    app.run(main, argv=expand_config_argument(sys.argv))
