"""CLEAR-100, the reference's 30-class subset, in 5 two-year bins."""

from __future__ import annotations

import tensorflow_datasets as tfds

from data.clear10 import CLEAR_BINS
from data.image_folder_builder import ImageFolderBuilder


class Clear100(ImageFolderBuilder):
    """The 30 classes of the reference's preprocessing (with `bookstore`, not `billiard`:
    its data module's name list disagrees, but labels follow the sorted folder names)."""

    DOMAINS = CLEAR_BINS
    CLASS_NAMES = (
        "airplane", "aquarium", "baseball", "beer", "boat", "bookstore", "bowling_ball",
        "bridge", "bus", "camera", "castle", "chocolate", "coins", "diving",
        "field_hockey", "food_truck", "football", "guitar", "hair_salon", "helicopter",
        "horse_riding", "motorcycle", "pet_store", "racing_car", "shopping_mall",
        "skyscraper", "soccer", "stadium", "train", "video_game",
    )  # fmt: skip
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=b) for b in CLEAR_BINS]


Clear100.MANUAL_DOWNLOAD_INSTRUCTIONS = Clear100.manual_instructions()
