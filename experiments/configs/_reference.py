"""The reference's recipe on its data sets (CLEAR-10, CLEAR-100 (30 classes), Yearbook),
shared by `clear10.py`, `clear100.py` and `yearbook.py`.

Settings are the reference's (REFERENCE.md 1.2-1.5, 2.4, 3): resize 256 / crop 224,
batch 32, sources trained 15 epochs with AdamW 3e-4 (head 10x, warmup 2 of 15 epochs,
clip 1.0, augmentation on), GRASP 3 initial + 3 per-source epochs at 5e-5, threshold 0.3,
one alignment batch, 3 trials. Sources start from ImageNet weights imported with
`python -m experiments.import_weights` (see the README), stored in `<workdir>/init/`.
The reference trains sources in 16-bit mixed precision; `model_overrides.dtype` picks
ours (bfloat16 on accelerators, float32 on CPU by default).
"""

from __future__ import annotations

import ml_collections

MODELS = ("mobilevit_xxs", "mobilevit_xs", "efficientnet_b1", "resnet50")


def reference_config(
    name: str, dataset: str, bins: tuple[str, ...], num_classes: int, model: str | None
) -> ml_collections.ConfigDict:
    """The reference's experiment on `dataset` with `model` (default MobileViT-XXS)."""
    model = model or "mobilevit_xxs"
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for {name}; choose one of {MODELS}")
    config = ml_collections.ConfigDict()
    config.name = f"{name}_{model}"
    config.dataset = dataset
    config.data_dir = ""  # empty: <workdir>/tfds (build with python -m data.build)
    config.bins = bins
    config.model = model
    config.model_overrides = ml_collections.ConfigDict({"dtype": "float32"})
    config.num_classes = num_classes
    config.pipeline = ml_collections.ConfigDict(
        {"resize_size": 256, "crop_size": 224, "batch_size": 32}
    )
    # "imagenet": the weights imported into <workdir>/init/<model> (README); or the
    # folder of any checkpoint saved by grasp_jax.checkpoints.
    config.init = "imagenet"
    config.pretrain = ml_collections.ConfigDict()  # unused: no pretraining split
    config.source_training = ml_collections.ConfigDict(
        {
            "epochs": 15,
            "learning_rate": 3e-4,
            "head_lr_multiplier": 10.0,
            "weight_decay": 0.01,
            "warmup_fraction": 2 / 15,
            "grad_clip_norm": 1.0,
            "schedule": "warmup_cosine",
            "augment": True,
        }
    )
    config.methods = ("grasp", "ensemble", "finetune", "target_only")
    config.targets = ("all",)
    config.sources = "all"
    config.trials = 3
    config.grasp = ml_collections.ConfigDict(
        {
            "initial_epochs": 3,
            "finetune_epochs": 3,
            "learning_rate": 5e-5,
            "weight_decay": 0.01,
            "num_alignment_batches": 1,
            "threshold": 0.3,
            "granularity": "tensor",
            "mode": "hard",
            "alignment_current_mode": "train",
            "augment": True,
        }
    )
    config.seed = 0
    return config
