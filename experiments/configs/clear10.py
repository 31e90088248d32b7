"""CLEAR-10 (10 classes, five two-year bins) with the reference's recipe.

`--config=clear10` (MobileViT-XXS), `--config=clear10:resnet50` or
`--config=clear10:model=resnet50,trials=5`.
"""

from __future__ import annotations

from data.clear10 import CLEAR_BINS
from experiments.configs.reference import reference_config


def get_config(arg: str | None = None):
    return reference_config("clear10", CLEAR_BINS, 10, arg)
