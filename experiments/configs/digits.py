"""The embedded default: digits_drift with the small CNN (runs on 2 CPU cores).

Training settings differ from the reference's ImageNet-scale recipe where a 32x32 data set
of 600 training images per domain needs it (10x the reference's fine-tuning LR, no colour
jitter, since colour is part of the drift); the recipe's structure (warmup, cosine, head
10x, clipping) is kept.
`--config=digits:trials=1,grasp.threshold=0.5` overrides keys.
"""

from __future__ import annotations

import ml_collections

from data import digits_drift
from experiments.configs import override, parse_arg
from experiments.configs.base import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "digits"
    config.dataset = "digits_drift"
    config.data_dir = ""  # empty: <workdir>/tfds, built on first use
    config.bins = digits_drift.DOMAINS
    config.num_classes = 10
    config.model = "small_cnn"
    config.pipeline.update(resize_size=32, crop_size=32)
    config.init = "pretrain"  # train once on the clean pool and cache it
    config.pretrain.update(
        epochs=40, learning_rate=1e-3, head_lr_multiplier=1.0, augment=False
    )
    # the reference's 5e-5 is for ImageNet-scale models: every fine-tuning recipe gets
    # the same 10x (the sources, GRASP's stages, FUSION, PEARL's adapters)
    config.source_training.update(epochs=10, learning_rate=5e-4, augment=False)
    config.grasp.update(learning_rate=5e-4, augment=False)
    config.fusion.update(learning_rate=5e-4, augment=False)
    config.pearl.update(learning_rate=5e-4, augment=False)
    # A small CNN's step leaves a core idle: two runs at once, same numbers.
    config.concurrent_runs = 2
    return override(config, parse_arg(arg))
