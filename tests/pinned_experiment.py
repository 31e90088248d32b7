"""A small embedded experiment whose per-run numbers are pinned in `golden/`.

Refactors must leave them identical. XLA:CPU generates different code for different CPU
features, so floats (and a test image or two) differ between machines: each machine
kind has its own file, keyed by CPU model and flags (`machine_key`), and a machine
without one is held to the reference file within a stated tolerance.
`python -m tests.pinned_experiment` re-measures and writes this machine's file: do that
only in a commit that changes numbers on purpose (a new seed derivation, say) or adds a
machine, and say so in its message.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "pinned_experiment.json"  # the reference


def machine_golden() -> Path:
    """This machine kind's pinned numbers (present once someone pinned them here)."""
    from experiments.machine import machine_key

    return GOLDEN.with_name(f"pinned_experiment.{machine_key()}.json")


def small_config(data_dir, *, targets: str, trials: int):
    """digits with three bins and one epoch per phase: every code path in seconds.
    `targets` as the config argument writes them (`d1+d2`)."""
    from experiments.configs.digits import get_config

    config = get_config(
        f"bins=d0+d1+d2,targets={targets},trials={trials},pretrain.epochs=1,"
        "source_training.epochs=1,grasp.initial_epochs=1,grasp.finetune_epochs=1"
    )
    config.data_dir = str(data_dir)
    return config


def with_sources(prepared: Path, workdir: Path) -> Path:
    """`workdir` holding a copy of the sources and the source matrix in `prepared` (the
    `small_sources` fixture); `workdir` may exist, its `sources` and `results` may not.
    Returns `workdir`."""
    shutil.copytree(prepared / "sources", workdir / "sources")
    shutil.copytree(prepared / "results", workdir / "results")  # the matrix's files
    return workdir


@contextlib.contextmanager
def recorded_fits():
    """A list that receives the description of every `loop.fit` call made inside."""
    import pytest

    from grasp_jax import loop

    fits, real = [], loop.fit

    def fit(*args, **kwargs):
        fits.append(kwargs["description"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "fit", fit)
        yield fits


def pinned_config(data_dir):
    """Two leave-one-out targets, one trial."""
    return small_config(data_dir, targets="d1+d2", trials=1)


def measure(data_dir, workdir) -> dict:
    """Per run: test and validation accuracy, validation losses, GRASP's fractions."""
    from experiments import runner

    runner.run_experiment(pinned_config(data_dir), Path(workdir), progress=False)
    runs = {}
    for path in sorted((Path(workdir) / "results" / "digits_drift").glob("*/metrics.json")):
        record = json.loads(path.read_text())
        runs[path.parent.name] = {
            "test_accuracy": record["test_metrics"]["accuracy"],
            "val_accuracy": record["val_metrics"]["accuracy"],
            "val_losses": [h["val_loss"] for h in record["history"]],
            "fractions": [s["fraction"] for s in record.get("transfer_history", [])],
        }
    return runs


def main() -> None:
    from data.build import build

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "tfds"
        build("digits_drift", data_dir=data_dir)
        runs = measure(data_dir, Path(tmp) / "run")
    machine_golden().write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps({k: v["test_accuracy"] for k, v in runs.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
