"""Evaluates one checkpoint on a bin's validation and test splits with our pipeline:

    python -m experiments.evaluate --checkpoint=PATH --config=clear10 [--bin=year_1-2] \\
        [--out=metrics.json]

PATH: the reference's Lightning `.ckpt`, a `.pth`/`.bin`/safetensors file or HF folder
(read with `weights_only=True` or safetensors), one of our checkpoint folders (a source,
imported weights), or one of our run folders: its `model/` (`config.save_models`) or
its `checkpoints/*_final.ckpt` (`config.save_final`). Writes the reference's metric
keys (`val_metrics`, `test_metrics`: accuracy, weighted precision/recall/F1/AUROC,
confusion matrix) and prints the accuracies. `--bin` defaults to the config's first target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from experiments.configs import CONFIG_DIR, expand_config_argument


def define_flags() -> None:
    """The command's flags (defined when it runs: `config`, `workdir` and `out` are the
    other commands' names too)."""
    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
    define_own_flags()


def define_own_flags() -> None:
    """The flags beside `--config` (defining these imports nothing: --help uses them)."""
    flags.DEFINE_string("checkpoint", None, "What to evaluate (see above).")
    flags.DEFINE_string("bin", None, "The bin whose splits to evaluate on.")
    flags.DEFINE_string("out", None, "JSON file to write (default: print only).")
    flags.DEFINE_string("workdir", None, "Where the data is built (as for main).")


def load_variables(config, path: Path) -> dict:
    """The variables in `path`, shaped for `config.model` with its number of classes."""
    from experiments import final_model, settings
    from experiments import sources as src
    from grasp_jax import checkpoints, interop

    if not path.exists():
        raise settings.ConfigError(f"--checkpoint={path} does not exist")
    run = path.is_dir() and (path / "metrics.json").is_file()  # a run: its final model
    if run and checkpoints.is_complete(path / final_model.MODEL_FOLDER):
        path = path / final_model.MODEL_FOLDER
    if checkpoints.is_complete(path):
        return checkpoints.restore_variables(path, src.model_and_abstract(config)[1])
    if run:
        finals = sorted((path / "checkpoints").glob("*_final.ckpt"))
        if not finals:
            raise settings.ConfigError(
                f"{path} is a run folder without its model; rerun it in a new workdir "
                "with --config.save_models=True, or pass a checkpoint file"
            )
        path = finals[0]
    return interop.import_torch(config.model, path)  # a file or an HF model folder


def evaluate_checkpoint(config, path: Path, bin_name: str, workdir: Path) -> dict:
    """The reference's result keys for `path` on `bin_name`'s validation and test."""
    from experiments import settings
    from experiments import sources as src
    from grasp_jax import evaluation, metrics, models

    model, _ = src.model_and_abstract(config)
    variables = load_variables(config, path)
    splits = src.load_splits(config, workdir, bin_name)
    pipeline = settings.pipeline(config)
    out = {
        "checkpoint": str(path),
        "dataset": config.dataset,
        "target": bin_name,
        "model": models.reference_name(config.model),
        "zoo_model": config.model,
    }
    for key, split in (("val_metrics", "validation"), ("test_metrics", "test")):
        predicted = evaluation.predict(model, variables, splits[split], pipeline)
        out[key] = metrics.classification_metrics(predicted["logits"], predicted["labels"])
    return out


def main(argv: list[str]) -> None:
    del argv
    import jax  # after the flags: --help stays fast

    from experiments import report, settings

    cli.quiet_logs()
    given = flags.FLAGS
    config = given.config
    with cli.one_line_errors("experiments.evaluate"):
        if not given.checkpoint:
            raise settings.ConfigError("pass --checkpoint=PATH")
        targets = settings.check(config)
        bin_name = given.bin or targets[0]
        if bin_name not in config.bins:
            raise settings.ConfigError(
                f"--bin={bin_name}; the bins are {list(config.bins)}"
            )
        workdir = Path(given.workdir or f"runs/{config.name}")
        result = evaluate_checkpoint(config, Path(given.checkpoint), bin_name, workdir)
        if given.out and jax.process_index() == 0:
            report.write_json(Path(given.out), result)
    for key in ("val_metrics", "test_metrics"):
        sys.stdout.write(f"{key}: accuracy {result[key]['accuracy']:.4f}\n")
    sys.stdout.write(json.dumps({"target": bin_name, "checkpoint": given.checkpoint}))
    sys.stdout.write("\n")


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__, define_own_flags)
    cli.exit_on_config_error(sys.argv, "experiments.evaluate")
    define_flags()
    app.run(main, argv=expand_config_argument(sys.argv))
