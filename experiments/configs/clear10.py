"""CLEAR-10 (10 classes, five two-year bins) with the reference's recipe.

`--config=clear10` (MobileViT-XXS) or `--config=clear10:resnet50` (any zoo model).
"""

from __future__ import annotations

from data.clear10 import CLEAR_BINS
from experiments.configs._reference import reference_config


def get_config(model: str | None = None):
    return reference_config("clear10", "clear10", CLEAR_BINS, 10, model)
