"""CLEAR-10: 10 classes in 5 two-year bins (Lin et al. 2021), the reference's layout."""

from __future__ import annotations

import tensorflow_datasets as tfds

from data.image_folder_builder import ImageFolderBuilder

CLEAR_BINS = ("year_1-2", "year_3-4", "year_5-6", "year_7-8", "year_9-10")


class Clear10(ImageFolderBuilder):
    """CLEAR-10. `BACKGROUND` is excluded unless `keep_background=True`.

    The reference's preprocessing keeps BACKGROUND by mistake (docs/reference.md §2); its
    models assume the 10 classes. A build with `keep_background=True` has 11 labels: give
    it its own `data_dir`, and pass the same kwarg to `tfds.builder` when reading it.
    """

    DOMAINS = CLEAR_BINS
    CLASS_NAMES = (
        "baseball", "bus", "camera", "cosplay", "dress",
        "hockey", "laptop", "racing", "soccer", "sweater",
    )  # fmt: skip
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=b) for b in CLEAR_BINS]

    def __init__(self, *, keep_background: bool = False, **kwargs):
        self.keep_background = keep_background
        super().__init__(**kwargs)

    @property
    def IGNORED_FOLDERS(self) -> tuple[str, ...]:
        return () if self.keep_background else ("BACKGROUND",)

    def class_names(self) -> list[str]:
        extra = ["BACKGROUND"] if self.keep_background else []
        return sorted([*self.CLASS_NAMES, *extra])


Clear10.MANUAL_DOWNLOAD_INSTRUCTIONS = Clear10.manual_instructions()
