"""Reads an experiment config into the library's typed settings, checking every option
before any work starts: an unknown name is one ConfigError that lists the valid ones."""

from __future__ import annotations

import re

import jax
import ml_collections

from data.build import BUILDERS
from experiments.baseline_settings import FusionConfig, PearlConfig
from grasp_jax import interop, models, seeding
from grasp_jax.grasp import GraspConfig
from grasp_jax.input_pipeline import PipelineConfig
from grasp_jax.recipe import TrainConfig

SOURCE_CHOICES = ("all", "past")
# Ranges the merge hyperparameters must lie in (DARE's rate < 1: it divides by 1 - rate).
MERGING_BOUNDS = {
    "task_arithmetic": {"scale": (0.0, 10.0)},
    "ties": {"keep": (0.0, 1.0), "scale": (0.0, 10.0)},
    "dare": {"rate": (0.0, 0.999), "scale": (0.0, 10.0)},
    "magmax": {"scale": (0.0, 10.0)},
    "fisher": {"floor": (0.0, 1.0)},
}


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


def merging_settings(config: ml_collections.ConfigDict) -> dict:
    """`config.merging` checked: the fine-tuning epochs and each merger's settings."""
    section = config.merging
    if section.finetune_epochs < -1:
        raise ValueError(
            f"merging.finetune_epochs={section.finetune_epochs}; use -1 (GRASP's "
            "budget), 0 (no fine-tuning) or a number of epochs"
        )
    for name, bounds in MERGING_BOUNDS.items():
        for key, (low, high) in bounds.items():
            value = section[name][key]
            if not low <= value <= high:
                raise ValueError(
                    f"merging.{name}.{key}={value}; use a value in [{low}, {high}]"
                )
    if section.fisher.examples < 1:
        raise ValueError(f"merging.fisher.examples={section.fisher.examples}; use >= 1")
    return section.to_dict()


def check(config: ml_collections.ConfigDict, method_names=None) -> list[str]:
    """Validates the whole config; returns the targets. `method_names`: the registry's."""
    try:
        for read in (
            lambda: pipeline(config),
            lambda: recipe(config.source_training),
            lambda: recipe(config.pretrain),
            lambda: grasp(config),
            lambda: FusionConfig(**config.fusion.to_dict()),
            lambda: PearlConfig(**config.pearl.to_dict()),
            lambda: merging_settings(config),
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
    if config.trials < 1:
        raise ConfigError(f"config.trials={config.trials}; run at least one trial")
    if config.save_final:
        _check_save_final(config)
    _check_mesh(config)
    if method_names is not None:
        unknown = sorted(set(requested_methods(config)) - {"all", *method_names})
        if unknown:
            raise ConfigError(
                f"unknown method(s) {unknown}; choose from {list(method_names)} or all"
            )
    if config.sources not in SOURCE_CHOICES:
        raise ConfigError(
            f"config.sources={config.sources!r}; use one of {list(SOURCE_CHOICES)}"
        )
    targets = list(config.bins) if "all" in config.targets else list(config.targets)
    bad = sorted(set(targets) - set(config.bins))
    if bad:
        raise ConfigError(f"unknown target(s) {bad}; the bins are {list(config.bins)}")
    return targets


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


def config_seed(config: ml_collections.ConfigDict, name: str, *indices: int) -> int:
    """The integer seed of stream `name` (then `indices`) under `config.seed`."""
    return seeding.int_seed(seeding.stream(seeding.root_key(config.seed), name, *indices))


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
