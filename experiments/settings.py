"""Reads an experiment config into the library's typed settings, checking every option
before any work starts: an unknown name is one ConfigError that lists the valid ones."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import jax
import ml_collections

from data.build import BUILDERS
from grasp_jax import interop, models, seeding
from grasp_jax.grasp import GraspConfig
from grasp_jax.input_pipeline import PipelineConfig
from grasp_jax.recipe import TrainConfig

SOURCE_CHOICES = ("all", "past")


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and the valid choices."""


def pipeline(config: ml_collections.ConfigDict) -> PipelineConfig:
    return PipelineConfig(**config.pipeline.to_dict())


def recipe(section: ml_collections.ConfigDict) -> TrainConfig:
    """A training section (`source_training`, `pretrain`) as the library's recipe."""
    values = section.to_dict()
    values.pop("data_config", None)  # where pretraining reads from, not how it trains
    return TrainConfig(**values)


def grasp(config: ml_collections.ConfigDict) -> GraspConfig:
    return GraspConfig(**config.grasp.to_dict())


def requested_methods(config: ml_collections.ConfigDict) -> list[str]:
    """`config.methods` as names: a tuple, or one string of names separated by `,` or
    `+` (`--config.methods=grasp,fusion` on the command line)."""
    items = [config.methods] if isinstance(config.methods, str) else config.methods
    return [n.strip() for item in items for n in re.split("[,+]", item) if n.strip()]


INIT_CHOICES = (
    "config.init must be 'pretrain', 'imagenet' or a checkpoint folder written by "
    "experiments.import_weights or experiments.train_sources"
)


def init_path(config) -> Path:
    """The checkpoint folder `config.init` names (`~` is the home folder)."""
    return Path(config.init).expanduser()


def check(config: ml_collections.ConfigDict, registry=None) -> list[str]:
    """Validates the whole config; returns the targets. `registry`: the methods (name ->
    `Method`), whose names are the valid ones and whose checks read their sections."""
    method_checks = dict.fromkeys(m.check for m in (registry or {}).values())
    try:
        for read in (
            lambda: pipeline(config),
            lambda: recipe(config.source_training),
            lambda: recipe(config.pretrain),
            lambda: grasp(config),
            *(functools.partial(method_check, config) for method_check in method_checks),
        ):
            read()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if config.dataset not in BUILDERS:
        raise ConfigError(
            f"config.dataset={config.dataset!r}; choose one of {sorted(BUILDERS)}"
        )
    if config.model not in models.names():
        raise ConfigError(f"config.model={config.model!r}; choose one of {models.names()}")
    if config.init == "imagenet" and config.model not in interop.LAYOUTS:
        raise ConfigError(
            f"config.init='imagenet': there are no official weights for {config.model} "
            f"(only for {sorted(interop.LAYOUTS)}); use init=pretrain or a checkpoint path"
        )
    if config.init not in ("pretrain", "imagenet") and not init_path(config).is_dir():
        raise ConfigError(f"config.init={config.init!r}: no such folder; {INIT_CHOICES}")
    if config.trials < 1:
        raise ConfigError(f"config.trials={config.trials}; run at least one trial")
    if config.concurrent_runs < 1:
        raise ConfigError(
            f"config.concurrent_runs={config.concurrent_runs}; run at least one at once"
        )
    if config.save_final:
        _check_save_final(config)
    if config.save_models_safetensors and config.model not in interop.LAYOUTS:
        raise ConfigError(
            f"config.save_models_safetensors: {config.model} has no PyTorch layout (only "
            f"{sorted(interop.LAYOUTS)}); keep its Orbax checkpoint (save_models=True)"
        )
    if config.save_models_safetensors and not config.save_models:
        raise ConfigError("config.save_models_safetensors needs save_models=True")
    _check_mesh(config)
    _check_training(config)
    if registry is not None:
        _check_methods(config, registry)
    if config.sources not in SOURCE_CHOICES:
        raise ConfigError(
            f"config.sources={config.sources!r}; use one of {list(SOURCE_CHOICES)}"
        )
    return _checked_targets(config)


def _duplicates(names) -> list[str]:
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


def _check_methods(config, registry) -> None:
    """Known names, each once (an alias and its method count as one)."""
    requested = requested_methods(config)
    if not requested:
        raise ConfigError("config.methods is empty; name at least one method, or all")
    unknown = sorted(set(requested) - {"all", *registry})
    if unknown:
        raise ConfigError(
            f"unknown method(s) {unknown}; choose from {list(registry)} or all"
        )
    if requested == ["all"]:
        return
    if "all" in requested:
        raise ConfigError(
            f"config.methods={'+'.join(requested)}: all already runs every method; pass "
            "all alone or a list of methods"
        )
    if twice := _duplicates([registry[n].alias_of or n for n in requested]):
        raise ConfigError(
            f"config.methods={'+'.join(requested)} names {twice} more than once "
            "(ensemble is ensemble_soft); list each method once"
        )


def _checked_targets(config) -> list[str]:
    """The bins (each once, all of the data set's) and the targets among them."""
    bins = list(config.bins)
    known = [c.name for c in BUILDERS[config.dataset].BUILDER_CONFIGS]
    if missing := [b for b in bins if b not in known]:
        raise ConfigError(
            f"config.bins: {config.dataset} has no bin(s) {missing}; its bins are "
            f"{list(known)}"
        )
    targets = bins if "all" in config.targets else list(config.targets)
    for what, names in (("bins", bins), ("targets", targets)):
        if twice := _duplicates(names):
            raise ConfigError(f"config.{what} names {twice} more than once; list each once")
    bad = sorted(set(targets) - set(bins))
    if bad:
        raise ConfigError(f"unknown target(s) {bad}; the bins are {bins}")
    return targets


def _check_training(config) -> None:
    """Training that must produce a model trains; every rate is a finite number."""
    sections = ["source_training"] + (["pretrain"] if config.init == "pretrain" else [])
    for section in sections:
        if config[section].epochs < 1:
            raise ConfigError(
                f"{section}.epochs={config[section].epochs}: it must produce a trained "
                "model; use at least 1"
            )
    for name in ("source_training", "pretrain", "grasp", "fusion", "pearl"):
        for key, value in config[name].items():
            if "learning_rate" in key and not math.isfinite(value):
                raise ConfigError(f"{name}.{key}={value}; use a finite positive number")


def _check_mesh(config) -> None:
    model, count = config.mesh.model, jax.device_count()
    if not isinstance(model, int) or model < 1 or count % model:
        raise ConfigError(
            f"config.mesh.model={model!r}; use a whole number that divides the {count} "
            "device(s) (1: no model sharding)"
        )
    if model > 1 and jax.process_count() > 1:
        raise ConfigError(
            f"config.mesh.model={model} with {jax.process_count()} processes: the "
            "experiment runner checksums whole arrays on each host, so it shards the "
            "model within one process only; use mesh.model=1 (data parallel) here"
        )


def _check_save_final(config) -> None:
    if config.model not in interop.LAYOUTS:
        raise ConfigError(
            f"config.save_final: {config.model} has no PyTorch layout (only "
            f"{sorted(interop.LAYOUTS)}); set save_final=False"
        )
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "config.save_final writes a PyTorch checkpoint: install the torch extra "
            "(pip install -e '.[torch]') or set save_final=False"
        ) from None


def model_dependencies(config: ml_collections.ConfigDict) -> dict:
    """What any model's numbers depend on beside its own recipe and seed: part of the
    settings recorded with every source and run and compared before either is reused."""
    return {
        "data_version": str(BUILDERS[config.dataset].VERSION),
        "model": config.model,
        "model_overrides": config.model_overrides.to_dict(),
        "num_classes": config.num_classes,
        "pipeline": config.pipeline.to_dict(),
    }


def start_dependencies(config: ml_collections.ConfigDict) -> dict:
    """The shared start the sources were trained from."""
    pretrain = config.pretrain.to_dict() if config.init == "pretrain" else None
    return {"init": config.init, "pretrain": pretrain}


def config_seed(config: ml_collections.ConfigDict, name: str, *indices: int) -> int:
    """The integer seed of stream `name` (then `indices`) under `config.seed`."""
    return seeding.int_seed(seeding.stream(seeding.root_key(config.seed), name, *indices))


def run_seed(config: ml_collections.ConfigDict, target: str, trial: int) -> int:
    """The seed of every method's run on (`target`, `trial`): by the target's name, so a
    run of `targets=d1` reproduces the d1 cells of the full run."""
    return config_seed(config, f"run/{target}", trial)


def source_seed(config: ml_collections.ConfigDict, bin_name: str) -> int:
    """The seed of the source trained on `bin_name`, by name (any `bins=` list)."""
    return config_seed(config, f"source/{bin_name}")


def source_bins(config: ml_collections.ConfigDict, target: str) -> list[str]:
    """The bins whose source models serve `target`, in merge order."""
    bins = list(config.bins)
    if config.sources == "past":
        return bins[: bins.index(target)]
    return [b for b in bins if b != target]


def require_same(stored: dict, expected: dict, what: str, fix: str) -> None:
    """Raises ConfigError naming the dotted keys where `stored` differs from `expected`:
    finished work is reused only under the settings it was made with."""
    differ = sorted(_differences(stored, expected))
    if differ:
        raise ConfigError(f"{what} with other settings ({differ[:8]}); {fix}.")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def at_once(config: ml_collections.ConfigDict, jobs: int) -> int:
    """How many of `jobs` independent jobs (runs, source matrix rows) run at once
    (threads, `experiments.parallel_runs`): `config.concurrent_runs`, never more than
    there are, and one where several processes train each model together."""
    if jax.process_count() > 1:
        return 1
    return max(1, min(config.concurrent_runs, jobs))
