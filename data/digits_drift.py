"""digits_drift: the embedded default data set, built offline from scikit-learn's digits.

The 1,797 8x8 handwritten digits are partitioned once (per class, fixed seed) into
identities for training (1,078), validation (269) and test (450), 60/15/25 % of each
class. No test identity is ever drawn into a train, validation or pretraining split, so
test accuracy is never measured on a digit any model saw. Configs:
  - `pretrain`: every train/validation/test identity, clean (it plays ImageNet's role:
    every source starts from the same network pretrained on it);
  - `d0`..`d4`: temporal domains, each drawing its own transformed copies: 250 train
    identities and 60 validation identities (a random subset per domain), and all 450
    test identities. Domain k has drift strength s = (k + 1) / 5:
      - rotation by 30 * s degrees,
      - strokes thickened by a (1 + 2 round(s)) pixel grey dilation,
      - ink fading from white toward orange (1.0, 0.55, 0.15) by s,
      - background lifted from black to 0.3 * s grey,
    plus a small per-copy jitter (rotation within +-6 degrees, shift within +-1 pixel),
    so each domain's copy of a digit is its own image.
Every image is upsampled to 32x32 RGB so all models accept it.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from data.image_folder_builder import ArrayRecordBuilder

DOMAINS = ("d0", "d1", "d2", "d3", "d4")
IMAGE_SIZE = 32
PARTITION_SEED = 2026
INK_DRIFT = np.array([1.0, 0.55, 0.15])
FRACTIONS = {"train": 0.60, "validation": 0.15}  # test: the rest
PER_DOMAIN = {"train": 250, "validation": 60}  # test: every test identity


def drift_strength(config: str) -> float:
    """0 for the clean pool, (k + 1) / 5 for domain dk."""
    return 0.0 if config == "pretrain" else (DOMAINS.index(config) + 1) / len(DOMAINS)


def identities(labels: np.ndarray, seed: int = PARTITION_SEED) -> dict[str, np.ndarray]:
    """Disjoint, sorted image indices per split, stratified by class."""
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(10):
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng([seed, label]).permutation(members)
        n_train = round(FRACTIONS["train"] * len(members))
        n_val = round(FRACTIONS["validation"] * len(members))
        parts["train"] += order[:n_train].tolist()
        parts["validation"] += order[n_train : n_train + n_val].tolist()
        parts["test"] += order[n_train + n_val :].tolist()
    return {split: np.sort(np.asarray(idx)) for split, idx in parts.items()}


def draw(config: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The identities each split of `config` renders (sorted)."""
    parts = identities(labels)
    if config == "pretrain":
        return parts
    domain = DOMAINS.index(config)
    out = {"test": parts["test"]}
    for split, count in PER_DOMAIN.items():
        rng = np.random.default_rng([PARTITION_SEED, 1 + domain, len(split)])
        out[split] = np.sort(rng.choice(parts[split], size=count, replace=False))
    return out


def render(
    digit: np.ndarray, strength: float, jitter: tuple[float, int, int] = (0.0, 0, 0)
) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a drifted 32x32x3 uint8 image; `jitter` is an
    extra (degrees, dx, dy)."""
    angle, dx, dy = jitter
    grey = Image.fromarray((digit / 16.0 * 255).astype(np.uint8))
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    grey = grey.rotate(
        30.0 * strength + angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy)
    )
    ink = np.asarray(grey, np.float64) / 255.0
    width = 1 + 2 * round(strength)
    if width > 1:
        ink = ndimage.grey_dilation(ink, size=(width, width))
    colour = (1 - strength) * np.ones(3) + strength * INK_DRIFT
    background = 0.3 * strength
    rgb = background + ink[..., None] * (colour - background)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def jitter_of(config: str, index: int) -> tuple[float, int, int]:
    """The per-copy jitter of identity `index` in domain `config` (none in the pool)."""
    if config == "pretrain":
        return (0.0, 0, 0)
    rng = np.random.default_rng([PARTITION_SEED, 100 + DOMAINS.index(config), index])
    return (float(rng.uniform(-6, 6)), int(rng.integers(-1, 2)), int(rng.integers(-1, 2)))


class DigitsDrift(ArrayRecordBuilder):
    """Embedded default: handwritten digits under growing drift (see the module doc)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Milder strongest drift (30 degrees, 0.3 background): d4 stays learnable.",
        "2.0.0": "Train/validation/test identities partitioned once; every domain draws "
        "its own jittered copies; 450 test images per domain, none seen in training.",
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
                    "identity": tfds.features.Scalar(dtype=np.int32),
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
        config = self.builder_config.name
        return {
            split: self._generate_examples(digits, chosen, config)
            for split, chosen in draw(config, digits.target).items()
        }

    def _generate_examples(self, digits, chosen: np.ndarray, config: str):
        strength = drift_strength(config)
        for i in chosen.tolist():
            image = render(digits.images[i], strength, jitter_of(config, i))
            yield i, {"image": image, "label": digits.target[i], "identity": i}
