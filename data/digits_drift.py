"""digits_drift: the embedded default data set, built offline from scikit-learn's digits.

The 1,797 8x8 handwritten digits are partitioned once (per class, fixed seed) into
identities for training (1,078), validation (269) and test (450), 60/15/25 % of each
class. No test identity is ever drawn into a train, validation or pretraining split, so
test accuracy is never measured on a digit any model saw.

Every image is one rendering of an identity under nuisance factors: rotation, shift,
scale, stroke width, ink colour (white toward orange) and background grey. Configs:
  - `pretrain`: one rendering of every identity, its factors drawn independently, each
    over its whole range (it plays ImageNet's role: every source starts from the same
    network pretrained on it, and that network has seen every look a domain can have);
  - `d0`..`d4`: temporal domains. Domain k draws each image's drift strength s from
    [0.2 k - 0.05, 0.2 k + 0.25] (clipped to [0, 1]), so neighbouring domains overlap;
    s sets the rotation (30 s degrees), the ink colour (s of the way to orange), the
    background (0.3 s grey) and the chance of thick strokes (s), plus a per-image jitter
    (rotation +-6 degrees, shift +-1 pixel, scale 0.9-1.1). Each domain renders 300 train
    identities twice and 120 validation identities once (random subsets per domain), and
    every test identity once.
Every image is 32x32 RGB so all models accept it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from data.image_folder_builder import ArrayRecordBuilder

DOMAINS = ("d0", "d1", "d2", "d3", "d4")
IMAGE_SIZE = 32
PARTITION_SEED = 2026
INK_DRIFT = np.array([1.0, 0.55, 0.15])
MAX_ROTATION = 30.0  # degrees at full drift
MAX_BACKGROUND = 0.3  # grey level at full drift
FRACTIONS = {"train": 0.60, "validation": 0.15}  # test: the rest
# (identities, renderings of each) per domain split; test: every test identity once
PER_DOMAIN = {"train": (300, 2), "validation": (120, 1)}
DRIFT_WINDOW = (-0.05, 0.25)  # domain k's strengths: 0.2 k + this, clipped to [0, 1]


class Look(NamedTuple):
    """The nuisance factors of one rendering."""

    angle: float  # degrees, counter-clockwise
    dx: int
    dy: int
    scale: float
    thick: bool  # strokes dilated by 3 pixels
    ink: float  # 0 white .. 1 orange
    background: float  # grey level


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


def draw(config: str, labels: np.ndarray) -> dict[str, list[tuple[int, int]]]:
    """The (identity, rendering) pairs each split of `config` holds, sorted."""
    parts = identities(labels)
    if config == "pretrain":
        return {split: [(int(i), 0) for i in idx] for split, idx in parts.items()}
    domain = DOMAINS.index(config)
    out = {"test": [(int(i), 0) for i in parts["test"]]}
    for split, (count, renderings) in PER_DOMAIN.items():
        rng = np.random.default_rng([PARTITION_SEED, 1 + domain, len(split)])
        chosen = np.sort(rng.choice(parts[split], size=count, replace=False))
        out[split] = [(int(i), r) for i in chosen for r in range(renderings)]
    return out


def look_of(config: str, identity: int, rendering: int) -> Look:
    """The factors of one rendering: independent and full-range in the pool, drawn from
    domain k's strength window otherwise. Fixed by (config, identity, rendering)."""
    stream = 0 if config == "pretrain" else 1 + DOMAINS.index(config)
    rng = np.random.default_rng([PARTITION_SEED, 100 + stream, identity, rendering])
    if config == "pretrain":
        return Look(
            angle=float(rng.uniform(-6.0, MAX_ROTATION + 6.0)),
            dx=int(rng.integers(-2, 3)),
            dy=int(rng.integers(-2, 3)),
            scale=float(rng.uniform(0.85, 1.15)),
            thick=bool(rng.random() < 0.5),
            ink=float(rng.uniform(0.0, 1.0)),
            background=float(rng.uniform(0.0, MAX_BACKGROUND)),
        )
    low, high = (0.2 * (stream - 1) + edge for edge in DRIFT_WINDOW)
    s = float(np.clip(rng.uniform(low, high), 0.0, 1.0))
    return Look(
        angle=MAX_ROTATION * s + float(rng.uniform(-6.0, 6.0)),
        dx=int(rng.integers(-1, 2)),
        dy=int(rng.integers(-1, 2)),
        scale=float(rng.uniform(0.9, 1.1)),
        thick=bool(rng.random() < s),
        ink=s,
        background=MAX_BACKGROUND * s,
    )


def render(digit: np.ndarray, look: Look) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a 32x32x3 uint8 image with the factors `look`."""
    grey = Image.fromarray((digit / 16.0 * 255).astype(np.uint8))
    size = round(IMAGE_SIZE * look.scale)
    grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    offset = (IMAGE_SIZE - size) // 2
    canvas.paste(grey, (offset, offset))  # a larger digit is cut at the border
    canvas = canvas.rotate(
        look.angle, resample=Image.Resampling.BILINEAR, translate=(look.dx, look.dy)
    )
    ink = np.asarray(canvas, np.float64) / 255.0
    if look.thick:
        ink = ndimage.grey_dilation(ink, size=(3, 3))
    colour = (1 - look.ink) * np.ones(3) + look.ink * INK_DRIFT
    rgb = look.background + ink[..., None] * (colour - look.background)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def describe(config: str) -> str:
    if config == "pretrain":
        return "every nuisance factor over its whole range"
    k = DOMAINS.index(config)
    low, high = (max(0.0, min(1.0, 0.2 * k + edge)) for edge in DRIFT_WINDOW)
    return f"drift strength {low:.2f}-{high:.2f}"


class DigitsDrift(ArrayRecordBuilder):
    """Embedded default: handwritten digits under gradual drift (see the module doc)."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Milder strongest drift (30 degrees, 0.3 background): d4 stays learnable.",
        "2.0.0": "Train/validation/test identities partitioned once; every domain draws "
        "its own jittered copies; 450 test images per domain, none seen in training.",
        "3.0.0": "The pretraining pool varies every nuisance factor over its whole range; "
        "domains overlap (each image's drift strength drawn from a window); 600 train "
        "images (300 identities x 2 renderings) and 120 validation images per domain.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=n, description=describe(n))
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
                drift=describe(self.builder_config.name),
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

    def _generate_examples(self, digits, chosen: list[tuple[int, int]], config: str):
        for i, rendering in chosen:
            image = render(digits.images[i], look_of(config, i, rendering))
            yield (
                f"{i}-{rendering}",
                {
                    "image": image,
                    "label": digits.target[i],
                    "identity": i,
                },
            )
