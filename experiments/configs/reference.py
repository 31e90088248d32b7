"""The reference's recipe on its data sets (CLEAR-10, CLEAR-100 (30 classes), Yearbook),
shared by `clear10.py`, `clear100.py` and `yearbook.py`.

`base.base_config()` already holds the reference's settings (docs/reference.md §1-§3):
resize 256 / crop 224, batch 32, sources trained 15 epochs with AdamW 3e-4 (head 10x,
warmup 2 of 15 epochs, clip 1.0, augmentation on), GRASP 3 initial + 3 per-source epochs
at 5e-5, threshold 0.3, one alignment batch, 3 trials. Sources start from ImageNet
weights imported with `python -m experiments.import_weights` (docs/models.md), stored in
`<workdir>/init/`. The reference trains sources in 16-bit mixed precision;
`model_overrides.dtype` picks ours (float32 by default).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import override, parse_arg
from experiments.configs.base import base_config

MODELS = ("mobilevit_xxs", "mobilevit_xs", "efficientnet_b1", "resnet50")


def reference_config(
    dataset: str, bins: tuple[str, ...], num_classes: int, arg: str | None
) -> ml_collections.ConfigDict:
    """`dataset` with the reference's recipe; `arg` as `configs.parse_arg` reads it."""
    pairs = parse_arg(arg)
    model = pairs.pop("model", "mobilevit_xxs")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for {dataset}; choose one of {MODELS}")
    config = base_config()
    config.name = f"{dataset}_{model}"
    config.dataset = dataset
    config.bins = bins
    config.num_classes = num_classes
    config.model = model
    config.model_overrides = ml_collections.ConfigDict({"dtype": "float32"})
    return override(config, pairs)
