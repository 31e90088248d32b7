"""Checks of a request against the built data set, before any training: what the config
alone cannot tell (label count, split sizes) but would waste or corrupt the work."""

from __future__ import annotations

from pathlib import Path

from experiments import sources
from experiments.settings import ConfigError
from grasp_jax import input_pipeline as ip


def check(config, workdir: Path, targets: list[str], *, aligning: bool) -> None:
    """Every check below; `aligning`: a selected method computes alignment gradients."""
    imported = sources.imported_weights_dir(config, workdir)
    if config.init == "imagenet" and not imported.is_dir():  # before the data is built
        raise ConfigError(
            f"config.init='imagenet': no weights in {imported}; "
            f"{sources.import_instructions(config, workdir)}"
        )
    first = sources.load_splits(config, workdir, config.bins[0])["train"]
    check_label_count(config, first.dataset_info.features["label"].num_classes)
    check_batch_size(config, workdir)
    if aligning:
        check_alignment_batches(config, workdir, targets)


def check_label_count(config, count: int) -> None:
    """`config.num_classes` must be the data set's: a 5-class head on 10-label data
    trains to NaN and was once saved as a source."""
    if config.num_classes != count:
        raise ConfigError(
            f"config.num_classes={config.num_classes}, but {config.dataset} has {count} "
            f"classes; set num_classes={count}"
        )


def check_batch_size(config, workdir: Path) -> None:
    """Training drops the last partial batch: a batch larger than a train split trains
    on nothing (and saves the start as if trained)."""
    names = list(config.bins)
    if config.init == "pretrain":
        names.append(config.pretrain.data_config)
    batch = config.pipeline.batch_size
    for name in names:
        size = len(sources.load_splits(config, workdir, name)["train"])
        if batch > size:
            raise ConfigError(
                f"pipeline.batch_size={batch}, but {config.dataset}/{name}'s train split "
                f"holds {size} examples; use at most {size}"
            )


def check_alignment_batches(config, workdir: Path, targets: list[str]) -> None:
    """GRASP's alignment batches come from a target's train split in full batches: ask
    for no more than the smallest target holds (1000 with 7 there used 7, recorded 1000)."""
    wanted, batch = config.grasp.num_alignment_batches, config.pipeline.batch_size
    for target in targets:
        held = ip.steps_per_epoch(
            sources.load_splits(config, workdir, target)["train"], batch
        )
        if wanted > held:
            raise ConfigError(
                f"grasp.num_alignment_batches={wanted}: target {target}'s train split "
                f"holds {held} full batches of {batch}; use at most {held}"
            )
