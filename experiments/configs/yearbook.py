"""Yearbook decades: four periods, each a binary earlier/later-decade task.

`--config=yearbook` (MobileViT-XXS) or `--config=yearbook:mobilevit_xs`.
"""

from __future__ import annotations

from data.yearbook import PERIODS
from experiments.configs._reference import reference_config


def get_config(model: str | None = None):
    return reference_config("yearbook", "yearbook", tuple(PERIODS), 2, model)
