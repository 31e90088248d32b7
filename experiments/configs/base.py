"""The base of every experiment config, built from the library's dataclass defaults (the
reference's settings); a data set's config overrides only what differs."""

from __future__ import annotations

import dataclasses
import inspect

import ml_collections

from experiments.methods.fusion import FusionConfig
from experiments.methods.pearl import PearlConfig
from grasp_jax import merging
from grasp_jax.grasp import GraspConfig
from grasp_jax.input_pipeline import PipelineConfig
from grasp_jax.recipe import TrainConfig


def _section(dataclass_instance, **changes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dataclasses.asdict(dataclasses.replace(dataclass_instance, **changes))
    )


def _defaults(function) -> dict:
    """The keyword defaults of `function` (a merger's hyperparameters; DARE's key has
    none: the runner draws it)."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = ""
    config.dataset = ""
    config.data_dir = ""  # empty: <workdir>/tfds
    config.bins = ()
    config.num_classes = 0
    config.model = "mobilevit_xxs"
    config.model_overrides = ml_collections.ConfigDict()
    pipeline = dataclasses.asdict(PipelineConfig())
    config.pipeline = ml_collections.ConfigDict(
        {k: pipeline[k] for k in ("resize_size", "crop_size", "batch_size")}
    )
    # "imagenet": the weights imported into <workdir>/init/<model> (docs/models.md);
    # "pretrain": train once on the data set's `pretrain.data_config` and cache it; or the
    # folder of any checkpoint saved by grasp_jax.checkpoints.
    config.init = "imagenet"
    config.pretrain = _section(TrainConfig())
    config.pretrain.data_config = "pretrain"
    config.source_training = _section(TrainConfig())
    # The experiment (python -m experiments.main).
    config.methods = ("grasp", "ensemble", "finetune", "staged_finetune", "target_only")
    config.targets = ("all",)  # "all": leave-one-out over every bin
    config.sources = "all"  # "all" other bins (the reference), or "past" bins only
    config.trials = 3
    config.grasp = _section(GraspConfig())
    # The baselines (docs/experiments.md): the reference's FUSION and PEARL recipes, and the
    # weight-space merges with the literature's defaults (each merger's own).
    config.fusion = _section(FusionConfig())
    config.pearl = _section(PearlConfig())
    config.merging = ml_collections.ConfigDict()
    config.merging.finetune_epochs = -1  # -1: GRASP's budget, initial + finetune x (K-1)
    for name in ("task_arithmetic", "ties", "dare", "magmax", "fisher"):
        config.merging[name] = _defaults(getattr(merging.streaming, name))
    # Fisher merging's data: "expected_own_data" (FusionBench's: each source's own
    # training split, its own softmax) or "empirical_target" (the target's, true labels).
    config.merging.fisher.estimate = "expected_own_data"
    config.merging.fisher.examples = 256  # examples the Fisher is estimated on
    # Save GRASP's final model as the reference does (a PyTorch state dict, run folder's
    # checkpoints/); needs the torch extra and a model with a PyTorch layout.
    config.save_final = False
    # Keep every run's final model (single-model methods: not the ensembles, FUSION or
    # PEARL) as an Orbax checkpoint in the run folder's model/, which
    # experiments.evaluate reads; also as model.safetensors (PyTorch layout) if asked.
    config.save_models = False
    config.save_models_safetensors = False
    # The study (python -m experiments.study): GRASP at every (threshold, granularity,
    # mode), and with `controls` grasp_random at every threshold that moves a strict
    # subset. Staged fine-tuning (threshold 1.01, tensor, hard) always runs: the baseline.
    config.study = ml_collections.ConfigDict(
        {
            "thresholds": (-1.0, 0.0, 0.1, 0.3, 0.5, 0.7, 1.01),
            "granularities": ("tensor", "channel", "element"),
            "modes": ("hard", "soft"),
            "controls": True,
        }
    )
    # Devices a model is split over (FSDP-style, grasp_jax.sharding); the rest of the
    # devices replicate it for data parallelism. 1: every device holds the whole model.
    config.mesh = ml_collections.ConfigDict({"model": 1})
    # Runs (and source matrix rows) at once in threads of one process (experiments/
    # parallel_runs.py): the same numbers, sooner where one run leaves cores idle; 1 keeps
    # each run's peak memory its own. One process of several always runs one at a time.
    config.concurrent_runs = 1
    config.seed = 0
    return config
