"""Yearbook decades: four periods, each a binary earlier/later-decade task.

`--config=yearbook` (MobileViT-XXS), `--config=yearbook:mobilevit_xs` or
`--config=yearbook:model=resnet50,grasp.threshold=0.5`.
"""

from __future__ import annotations

from data.yearbook import PERIODS
from experiments.configs.reference import reference_config


def get_config(arg: str | None = None):
    return reference_config("yearbook", tuple(PERIODS), 2, arg)
