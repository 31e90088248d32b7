"""Yearbook portraits in four periods, each a binary earlier/later-decade task."""

from __future__ import annotations

import tensorflow_datasets as tfds

from data.image_folder_builder import ImageFolderBuilder

# Period -> its two decade folders: label 0 the earlier, 1 the later (docs/reference.md §2).
PERIODS = {
    "before_1950s": ("1930s", "1940s"),
    "1950s_1960s": ("1950s", "1960s"),
    "1970s_1980s": ("1970s", "1980s"),
    "1990s_and_later": ("1990s", "2000s"),
}


class Yearbook(ImageFolderBuilder):
    """Yearbook decades (the task is the decade, not gender)."""

    DOMAINS = tuple(PERIODS)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=p) for p in PERIODS]

    def class_names(self) -> list[str]:
        return list(PERIODS[self.builder_config.name])


Yearbook.MANUAL_DOWNLOAD_INSTRUCTIONS = Yearbook.manual_instructions()
