"""CLEAR-100, the reference's 30-class subset, five two-year bins, reference recipe.

`--config=clear100` (MobileViT-XXS), `--config=clear100:efficientnet_b1` or
`--config=clear100:model=resnet50,trials=5`.
"""

from __future__ import annotations

from data.clear10 import CLEAR_BINS
from experiments.configs.reference import reference_config


def get_config(arg: str | None = None):
    return reference_config("clear100", CLEAR_BINS, 30, arg)
