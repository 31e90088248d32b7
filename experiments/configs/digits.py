"""The embedded default: digits_drift with the small CNN (runs on 2 CPU cores).

Training settings differ from the reference's ImageNet-scale recipe where a 32x32 data set
of ~190 training images per domain needs it (higher LR, no colour jitter, since colour is
part of the drift); the recipe's structure (warmup, cosine, head 10x, clipping) is kept.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` is unused; kept for the `--config=path:arg` convention."""
    del arg
    config = ml_collections.ConfigDict()
    config.name = "digits"
    config.dataset = "digits_drift"
    config.data_dir = ""  # empty: <workdir>/tfds, built on first use
    config.bins = ("d0", "d1", "d2", "d3", "d4")
    config.model = "small_cnn"
    config.model_overrides = ml_collections.ConfigDict()
    config.num_classes = 10
    config.pipeline = ml_collections.ConfigDict(
        {"resize_size": 32, "crop_size": 32, "batch_size": 32}
    )
    # "pretrain": train once on the data set's `pretrain` config and cache it; or the
    # folder of a checkpoint saved by grasp_jax.checkpoints (e.g. imported weights).
    config.init = "pretrain"
    config.pretrain = ml_collections.ConfigDict(
        {
            "config": "pretrain",
            "epochs": 10,
            "learning_rate": 1e-3,
            "head_lr_multiplier": 1.0,
            "weight_decay": 0.01,
            "warmup_fraction": 2 / 15,
            "grad_clip_norm": 1.0,
            "schedule": "warmup_cosine",
            "augment": False,
        }
    )
    config.source_training = ml_collections.ConfigDict(
        {
            "epochs": 10,
            "learning_rate": 1e-3,
            "head_lr_multiplier": 10.0,
            "weight_decay": 0.01,
            "warmup_fraction": 2 / 15,
            "grad_clip_norm": 1.0,
            "schedule": "warmup_cosine",
            "augment": False,
        }
    )
    # The experiment (python -m experiments.main).
    config.methods = ("grasp", "ensemble", "finetune", "target_only")
    config.targets = ("all",)  # "all": leave-one-out over every bin
    config.sources = "all"  # "all" other bins (the reference), or "past" bins only
    config.trials = 3
    config.grasp = ml_collections.ConfigDict(
        {
            "initial_epochs": 3,
            "finetune_epochs": 3,
            "learning_rate": 5e-4,  # the reference's 5e-5 is for ImageNet-scale models
            "weight_decay": 0.01,
            "num_alignment_batches": 1,
            "threshold": 0.3,
            "granularity": "tensor",
            "mode": "hard",
            "alignment_current_mode": "train",
            "augment": False,
        }
    )
    config.seed = 0
    return config
