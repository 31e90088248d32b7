"""A TFDS builder for image-folder data sets in the reference's layout, one config per bin.

Images are stored as the original encoded bytes (JPEG/PNG) and decoded in the input
pipeline: CLEAR's photos average tens of KB encoded but ~190 KB as 256x256 arrays, so
bytes keep the build small at the cost of a decode per read (docs/data.md has figures).
Written as array_record by default, so neither building nor reading needs TensorFlow.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data.folder_layout import Example, LayoutError, bin_examples

ARRAY_RECORD = "array_record"


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that writes array_record unless told otherwise."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or ARRAY_RECORD, **kwargs)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." before a build,
    # misleading for builders that download nothing; one line after it instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        print(
            f"built {self.name}/{self.builder_config.name} in {self.data_dir}", flush=True
        )


def check_image(data: bytes) -> None:
    """Decodes `data` fully; raises on a truncated, corrupt or non-image file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()


class ImageFolderBuilder(ArrayRecordBuilder, skip_registration=True):
    """One TFDS config per bin (`DOMAINS`, in temporal order); splits train/validation/test.

    Builder kwargs: `skip_corrupt` (skip and count unreadable images instead of failing)
    and `split_seed` (for bins in the unsplit layout; 42 as in the reference).
    """

    VERSION = tfds.core.Version("1.0.0")
    DOMAINS: tuple[str, ...] = ()
    CLASS_NAMES: tuple[str, ...] = ()
    IGNORED_FOLDERS: tuple[str, ...] = ()

    def __init__(self, *, skip_corrupt: bool = False, split_seed: int = 42, **kwargs):
        self.skip_corrupt = skip_corrupt
        self.split_seed = split_seed
        super().__init__(**kwargs)

    @classmethod
    def manual_instructions(cls) -> str:
        bins = ", ".join(cls.DOMAINS)
        return (
            f"Put one folder per bin ({bins}) in the manual directory, each either "
            "pre-split as <bin>/{train,val,test}/<class>/<images> (the reference's "
            "preprocessing output) or unsplit as <bin>/<class>/<images> (split here "
            "80/10/10 per class). Then run `python -m data.build "
            f"{cls.name} --manual_dir DIR`."
        )

    def class_names(self) -> list[str]:
        """Class folder names, sorted as the reference's ImageFolder orders labels."""
        return sorted(self.CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.ClassLabel(names=self.class_names()),
                    "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                domains=list(self.DOMAINS), skipped_corrupt=0, image_storage="encoded"
            ),
        )

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        splits = bin_examples(
            manual_dir / self.builder_config.name,
            self.class_names(),
            seed=self.split_seed,
            ignore=self.IGNORED_FOLDERS,
        )
        for split in [s for s, examples in splits.items() if not examples]:
            logging.warning(
                "%s: no images for the %s split; it is left out", manual_dir, split
            )
            del splits[split]
        return {
            split: self._generate_examples(examples, manual_dir)
            for split, examples in splits.items()
        }

    def _generate_examples(self, examples: list[Example], manual_dir: Path):
        for example in examples:
            data = example.path.read_bytes()
            try:
                check_image(data)
            except Exception as err:
                if not self.skip_corrupt:
                    raise LayoutError(
                        f"{example.path}: not a readable image ({err}). Delete or replace "
                        "it, or build with --skip_corrupt to skip (and count) such files."
                    ) from err
                self.info.metadata["skipped_corrupt"] += 1
                logging.warning("skipping unreadable image %s: %s", example.path, err)
                continue
            name = str(example.path.relative_to(manual_dir))
            yield name, {"image": data, "label": example.label, "file_name": name}
