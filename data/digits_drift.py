"""digits_drift: the embedded default data set, built offline from scikit-learn's digits.

All 1,797 8x8 handwritten digits are partitioned at random (fixed seed) into a clean
pretraining pool (a third; it plays ImageNet's role, so every source starts from the same
pretrained network) and five disjoint temporal domains d0..d4. Domain k is drawn with drift
strength s = (k + 1) / 5, growing over time:
  - rotation by 30 * s degrees,
  - strokes thickened by a (1 + 2 round(s)) pixel grey dilation,
  - ink fading from white toward orange (1.0, 0.55, 0.15) by s,
  - background lifted from black to 0.3 * s grey,
and every image is upsampled to 32x32 RGB so all models accept it. Each config is split
80/10/10 per class (sorted indices, seeded), like the reference's splits.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from data.folder_layout import split_indices
from data.image_folder_builder import ArrayRecordBuilder

DOMAINS = ("d0", "d1", "d2", "d3", "d4")
IMAGE_SIZE = 32
PARTITION_SEED = 2026
INK_DRIFT = np.array([1.0, 0.55, 0.15])


def drift_strength(config: str) -> float:
    """0 for the clean pool, (k + 1) / 5 for domain dk."""
    return 0.0 if config == "pretrain" else (DOMAINS.index(config) + 1) / len(DOMAINS)


def partition(n: int, seed: int = PARTITION_SEED) -> dict[str, np.ndarray]:
    """Disjoint image indices: a third for `pretrain`, the rest in five equal domains."""
    order = np.random.default_rng(seed).permutation(n)
    n_pretrain = n // 3
    parts = {"pretrain": order[:n_pretrain]}
    for name, chunk in zip(DOMAINS, np.array_split(order[n_pretrain:], 5), strict=True):
        parts[name] = chunk
    return parts


def render(digit: np.ndarray, strength: float) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a drifted 32x32x3 uint8 image."""
    grey = Image.fromarray((digit / 16.0 * 255).astype(np.uint8))
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    grey = grey.rotate(30.0 * strength, resample=Image.Resampling.BILINEAR)
    ink = np.asarray(grey, np.float64) / 255.0
    width = 1 + 2 * round(strength)
    if width > 1:
        ink = ndimage.grey_dilation(ink, size=(width, width))
    colour = (1 - strength) * np.ones(3) + strength * INK_DRIFT
    background = 0.3 * strength
    rgb = background + ink[..., None] * (colour - background)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


class DigitsDrift(ArrayRecordBuilder):
    """Embedded default: handwritten digits under growing drift (see the module doc)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Milder strongest drift (30 degrees, 0.3 background): d4 stays learnable.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=n, description=f"drift strength {drift_strength(n)}")
        for n in ("pretrain", *DOMAINS)
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(
                domains=list(DOMAINS),
                drift_strength=drift_strength(self.builder_config.name),
                image_storage="uint8 arrays",
            ),
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits  # ships its data: no download

        digits = load_digits()
        indices = partition(len(digits.target))[self.builder_config.name]
        strength = drift_strength(self.builder_config.name)
        splits: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
        for label in range(10):
            members = np.sort(indices[digits.target[indices] == label])
            rng = np.random.default_rng([PARTITION_SEED, label])
            for split, idx in split_indices(len(members), rng).items():
                splits[split] += sorted(members[idx].tolist())
        return {
            split: self._generate_examples(digits, chosen, strength)
            for split, chosen in splits.items()
        }

    def _generate_examples(self, digits, chosen: list[int], strength: float):
        for i in chosen:
            yield (
                i,
                {"image": render(digits.images[i], strength), "label": digits.target[i]},
            )
