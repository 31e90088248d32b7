"""Source models: one per bin, all fine-tuned from one shared pretrained initialisation:
where their checkpoints live, how a missing one is trained, how one is restored into
abstract shapes (`jax.eval_shape`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import ml_collections

from data.build import load_splits as load_data_splits
from experiments import console, report, settings
from experiments.report import tensorboard
from grasp_jax import checkpoints, loop, models


def data_dir(config: ml_collections.ConfigDict, workdir: Path) -> str:
    return config.data_dir or str(workdir / "tfds")


def load_splits(config: ml_collections.ConfigDict, workdir: Path, data_config: str):
    """The splits (train, validation, test) of one config (a bin) of the data set."""
    return load_data_splits(config.dataset, data_config, data_dir(config, workdir))


def fresh_variables(config: ml_collections.ConfigDict, seed: int) -> dict:
    """A newly initialised model of the config (the start of pretraining, target_only)."""
    size = config.pipeline.crop_size
    return models.init(
        config.model,
        config.num_classes,
        jax.random.PRNGKey(seed),
        (1, size, size, 3),
        **config.model_overrides.to_dict(),
    )


def model_and_abstract(config: ml_collections.ConfigDict):
    """The module and the shapes of its variables (no memory spent on an init)."""
    module = models.create(
        config.model, config.num_classes, **config.model_overrides.to_dict()
    )
    return module, jax.eval_shape(lambda: fresh_variables(config, 0))


def source_dir(config: ml_collections.ConfigDict, workdir: Path, bin_name: str) -> Path:
    return workdir / "sources" / config.dataset / config.model / bin_name


def restore_source(config, workdir: Path, bin_name: str, abstract=None) -> dict:
    """The variables of one trained source, restored into the model's abstract shapes."""
    if abstract is None:
        abstract = model_and_abstract(config)[1]
    return checkpoints.restore_variables(
        source_dir(config, workdir, bin_name), abstract, name=bin_name
    )


def source_dependencies(config, section: str, seed: int) -> dict:
    """Everything a source's weights depend on (`section`: its recipe, `source_training`
    or `pretrain`), saved with it and compared before it is reused or resumed."""
    out = settings.model_dependencies(config) | {
        "dataset": config.dataset,
        "recipe": config[section].to_dict(),
        "seed": seed,
    }
    if section == "source_training":
        out |= settings.start_dependencies(config)
    return out


def reuse_checked(config, workdir: Path, name: str, expected: dict) -> bool:
    """True if source `name` is trained (under `expected` settings, else ConfigError)."""
    path = source_dir(config, workdir, name)
    if not checkpoints.is_complete(path):
        return False
    metadata = checkpoints.read_metadata(path)
    if metadata.get("bin", name) != name:
        raise settings.ConfigError(
            f"{path} holds the source of bin {metadata['bin']}, not of {name} (copied "
            f"there?); delete {path} to retrain {name}"
        )
    settings.require_same(
        metadata.get("settings", {}),
        expected,
        f"source {path} was trained",
        f"use another --workdir for this configuration, or delete {path} to retrain it",
    )
    return True


def train_one(
    config,
    workdir: Path,
    name: str,
    data_config: str,
    section: str,
    init_variables,
    seed,
    writer,
) -> loop.FitResult:
    """Trains into `<workdir>/sources/.../<name>`; resumes an interrupted run (only
    under the settings it started with)."""
    module, _ = model_and_abstract(config)
    splits = load_splits(config, workdir, data_config)
    run_dir = workdir / "train_state" / config.dataset / config.model / name
    recipe = settings.recipe(config[section])
    expected = source_dependencies(config, section, seed)
    _check_resume(run_dir, expected)
    result = loop.fit(
        module,
        init_variables,
        splits["train"],
        splits["validation"],
        config=recipe,
        pipeline=settings.pipeline(config),
        seed=seed,
        workdir=run_dir,
        writer=writer,
        description=f"{config.dataset}/{name}",
        progress=console.on_terminal(),
    )
    console.event(
        f"{config.dataset}/{name}: trained, best validation accuracy "
        f"{100 * result.best_val_accuracy:.1f} % in epoch {result.best_epoch} "
        f"({result.seconds:.0f} s)"
    )
    checkpoints.save_variables(
        source_dir(config, workdir, name),
        result.variables,
        {
            "bin": name,
            "dataset": config.dataset,
            "model": config.model,
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "seed": seed,
            "seconds": result.seconds,
            "history": result.history,
            "train_config": dataclasses.asdict(recipe),
            "settings": expected,
            "config": config.to_dict(),
            "versions": checkpoints.library_versions(),
        },
    )
    if jax.process_index() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _check_resume(run_dir: Path, expected: dict) -> None:
    """An interrupted training resumes only under its own settings (recorded first)."""
    recorded = run_dir / "settings.json"
    if recorded.is_file():
        settings.require_same(
            json.loads(recorded.read_text()),
            expected,
            f"the interrupted training in {run_dir} was started",
            f"rerun with those settings to finish it, or delete {run_dir} to start over",
        )
    elif jax.process_index() == 0:
        report.write_json(recorded, expected)


def imported_weights_dir(config, workdir: Path) -> Path:
    """Where `config.init = "imagenet"` finds the imported pretrained weights."""
    return Path(workdir) / "init" / config.model


def import_instructions(config, workdir: Path) -> str:
    """How to put the weights `config.init = "imagenet"` reads in place."""
    return (
        "download the official ImageNet weights, then run `python -m "
        f"experiments.import_weights --model={config.model} --weights=PATH "
        f"--num_classes={config.num_classes} --out={imported_weights_dir(config, workdir)}`"
        " (docs/models.md, 'Starting from pretrained weights')"
    )


def initial_variables(config, workdir: Path, writer) -> dict:
    """The shared starting point of every source: cached pretraining or a checkpoint."""
    _, abstract = model_and_abstract(config)
    if config.init == "imagenet":
        path = imported_weights_dir(config, workdir)
        fix = import_instructions(config, workdir)
        return checkpoints.restore_variables(path, abstract, name="init", fix=fix)
    if config.init != "pretrain":
        return checkpoints.restore_variables(
            settings.init_path(config), abstract, name="init", fix=settings.INIT_CHOICES
        )
    name = "_pretrained"
    seed = settings.config_seed(config, "pretrain")
    if not reuse_checked(
        config, workdir, name, source_dependencies(config, "pretrain", seed)
    ):
        fresh = fresh_variables(config, settings.config_seed(config, "pretrain_init"))
        train_one(
            config,
            workdir,
            name,
            config.pretrain.data_config,
            "pretrain",
            fresh,
            seed,
            writer,
        )
    return restore_source(config, workdir, name, abstract)


def train_sources(config, workdir: Path) -> dict[str, dict]:
    """Trains the missing sources of `config`; returns each bin's metadata."""
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [settings.source_seed(config, b) for b in config.bins]
    missing = [
        (index, b)
        for index, b in enumerate(config.bins)
        if not reuse_checked(
            config, workdir, b, source_dependencies(config, "source_training", seeds[index])
        )
    ]
    # One process writes the event files, and only when something trains; every
    # process trains.
    writer = None
    if missing and jax.process_index() == 0:
        writer = tensorboard.summary_writer(workdir / "tensorboard")
    try:
        init = initial_variables(config, workdir, writer) if missing else None
        for index, bin_name in missing:
            train_one(
                config,
                workdir,
                bin_name,
                bin_name,
                "source_training",
                init,
                seeds[index],
                writer,
            )
    finally:
        if writer is not None:
            writer.close()
    return {
        b: checkpoints.read_metadata(source_dir(config, workdir, b)) for b in config.bins
    }
