"""A small embedded experiment whose per-run numbers are pinned in `golden/`.

Refactors must leave them identical. `python -m tests.pinned_experiment` re-measures and
rewrites the golden file: do that only in a commit that changes numbers on purpose (a
new seed derivation, say), and say so in its message.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "pinned_experiment.json"


def pinned_config(data_dir):
    """Three bins, two leave-one-out targets, one trial, one epoch per phase."""
    from experiments.configs.digits import get_config

    config = get_config()
    config.data_dir = str(data_dir)
    config.bins = ("d0", "d1", "d2")
    config.targets = ("d1", "d2")
    config.trials = 1
    config.pretrain.epochs = 1
    config.source_training.epochs = 1
    config.grasp.initial_epochs = 1
    config.grasp.finetune_epochs = 1
    return config


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
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps({k: v["test_accuracy"] for k, v in runs.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
