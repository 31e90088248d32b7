"""Input pipelines: grain on the host (decode, resize, crop), augmentation on device.

The reference's transforms (docs/reference.md §2): train = resize the shorter side to 256,
random 224 crop, horizontal flip, colour jitter (brightness/contrast/saturation 0.2, hue
0.1); eval = resize 256, centre crop 224; ImageNet mean/std. The host does only what
changes image sizes and ships uint8; flips, jitter and normalisation run batched inside
`jit`, where they cost little, so two CPU cores can feed a model.

Deviation: torchvision applies the four jitters in a random order per image; we apply
them in the fixed order brightness, contrast, saturation, hue.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from grasp_jax import presized

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Sizes and augmentation strengths; the defaults are the reference's."""

    resize_size: int = 256
    crop_size: int = 224
    batch_size: int = 32  # global: split evenly over the processes
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not 1 <= self.crop_size <= self.resize_size:
            raise ValueError(
                f"pipeline.crop_size={self.crop_size} must lie in [1, resize_size="
                f"{self.resize_size}]: the crop is taken from the resized image"
            )
        if self.batch_size < 1:
            raise ValueError(f"pipeline.batch_size={self.batch_size}; use at least 1")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"pipeline.{name}={getattr(self, name)}; use >= 0")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"pipeline.hue={self.hue}; a hue shift lies in [0, 0.5]")


def decode(image: Any) -> Image.Image:
    """An RGB PIL image from encoded bytes or a uint8 HWC array."""
    if isinstance(image, bytes | np.bytes_):
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the shorter side is `size` (torchvision's Resize(int))."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, max(1, int(size * height / width)))
    else:
        new = (max(1, int(size * width / height)), size)
    return image.resize(new, Image.Resampling.BILINEAR)


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A `size` x `size` crop: at a random offset given `rng`, else centred."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"image of {height}x{width} is smaller than the {size} crop")
    if rng is None:
        top, left = round((height - size) / 2), round((width - size) / 2)
    else:
        top, left = (
            int(rng.integers(height - size + 1)),
            int(rng.integers(width - size + 1)),
        )
    return image[top : top + size, left : left + size]


def host_transform(
    example: dict, config: PipelineConfig, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """Decode, resize, crop: uint8 [crop, crop, 3] and an int32 label."""
    image = example["image"]
    if not (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[-1] == 3
        and image.dtype == np.uint8
        and min(image.shape[:2]) == config.resize_size
    ):  # arrays already at size (e.g. digits_drift) skip PIL entirely
        image = np.asarray(resize_shorter_side(decode(image), config.resize_size))
    return {
        "image": crop(image, config.crop_size, rng),
        "label": np.int32(example["label"]),
    }


def dataset(
    split: Sequence,
    config: PipelineConfig,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.MapDataset:
    """This process's batches of one epoch of `split` (e.g. a `tfds.data_source` split).

    Train: shuffled, randomly cropped, remainder dropped; the order and crops depend on
    (seed, epoch) only, so a run can be replayed epoch by epoch. Eval: in order, centre
    crops, last partial batch kept. `config.batch_size` is the global batch: process `p`
    of `P` (`jax.process_index()` of `jax.process_count()` by default) reads rows
    `[p * B / P, (p + 1) * B / P)` of each global batch of the one global order, so the
    global batches (examples, crops and their order, hence dropout masks) are the same
    whatever `P` is.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    # Images already at the crop size need no host transform: shuffle and shard row
    # numbers alone, then gather the rows from memory (`presized`).
    held = None
    if config.crop_size == config.resize_size:
        held = presized.arrays(split, config.crop_size)
    local = local_batch_size(config.batch_size, shard_count)
    if held is not None:
        if train:
            rows = presized.shuffled_rows(len(split), hash_seed(seed, epoch, 0))
        else:
            rows = np.arange(len(split))
        if shard_count > 1:
            rows = _BatchRows(rows, shard_index, shard_count, local, partial=not train)
        return grain.MapDataset.source(presized.Batches(held, rows, local, train))
    ds = grain.MapDataset.source(split)
    if train:
        ds = ds.shuffle(seed=hash_seed(seed, epoch, 0)).random_map(
            lambda ex, rng: host_transform(ex, config, rng),
            seed=hash_seed(seed, epoch, 1),
        )
    else:
        ds = ds.map(lambda ex: host_transform(ex, config, None))
    if shard_count > 1:
        rows = _BatchRows(ds, shard_index, shard_count, local, partial=not train)
        ds = grain.MapDataset.source(rows)
    return ds.batch(local, drop_remainder=train)


class _BatchRows(Sequence):
    """Process `index`'s rows of every global batch of `parent` (`local` of them each),
    with its rows of the last, partial global batch if `partial`."""

    def __init__(self, parent: Sequence, index: int, count: int, local: int, partial: bool):
        self.parent, self.index, self.local, self.size = parent, index, local, local * count
        full, rest = divmod(len(parent), self.size)
        self.length = full * local
        if partial:
            self.length += min(local, max(0, rest - index * local))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int):
        if not 0 <= j < self.length:
            raise IndexError(j)
        batch, row = divmod(j, self.local)
        return self.parent[batch * self.size + self.index * self.local + row]


def local_batch_size(batch_size: int, process_count: int | None = None) -> int:
    """Each process's share of the global `batch_size`."""
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(
            f"pipeline.batch_size={batch_size} does not split evenly over "
            f"{process_count} processes; use a multiple of {process_count}"
        )
    return batch_size // process_count


def hash_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed for (seed, epoch, stream): every epoch and stream draws afresh."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def iterate(
    ds: grain.MapDataset, *, num_workers: int = 0, prefetch: int = 2
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates `ds`, decoding in `num_workers` processes (0: in this thread)."""
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=prefetch
            )
        )
    return iter(iter_ds)


def _grayscale(images: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale; keeps a channel axis."""
    weights = jnp.asarray([0.299, 0.587, 0.114], images.dtype)
    return jnp.sum(images * weights, axis=-1, keepdims=True)


def shift_hue(images: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the hue of RGB images in [0, 1] by `shift` turns (per image)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    maxc = jnp.max(images, axis=-1)
    minc = jnp.min(images, axis=-1)
    delta = maxc - minc
    safe = jnp.where(delta > 0, delta, 1.0)
    hue = jnp.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        jnp.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = jnp.where(delta > 0, hue / 6.0, 0.0)
    hue = (hue + shift[:, None, None]) % 1.0
    saturation = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    # HSV -> RGB: k = (n + 6h) mod 6, channel = v - v s max(0, min(k, 4 - k, 1)).
    k = (jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return maxc[..., None] * (1.0 - saturation[..., None] * ramp)


def color_jitter(rng: jax.Array, images: jax.Array, config: PipelineConfig) -> jax.Array:
    """torchvision's ColorJitter factors on float images in [0, 1], one draw per image."""
    n = images.shape[0]
    keys = jax.random.split(rng, 4)

    def factor(key, strength):
        return jax.random.uniform(
            key, (n, 1, 1, 1), minval=1 - strength, maxval=1 + strength
        )

    images = jnp.clip(images * factor(keys[0], config.brightness), 0.0, 1.0)
    mean = jnp.mean(_grayscale(images), axis=(1, 2, 3), keepdims=True)
    f = factor(keys[1], config.contrast)
    images = jnp.clip(f * images + (1 - f) * mean, 0.0, 1.0)
    f = factor(keys[2], config.saturation)
    images = jnp.clip(f * images + (1 - f) * _grayscale(images), 0.0, 1.0)
    shift = jax.random.uniform(keys[3], (n,), minval=-config.hue, maxval=config.hue)
    return shift_hue(images, shift)


def normalize(images: jax.Array, config: PipelineConfig) -> jax.Array:
    """uint8 or [0, 1] float images to float32 with the configured mean and std."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def augment(rng: jax.Array, images: jax.Array, config: PipelineConfig) -> jax.Array:
    """The device half of the train transform: flip, jitter, normalise (call in jit)."""
    flip_key, jitter_key = jax.random.split(rng)
    images = images.astype(jnp.float32) / 255.0
    flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
    return normalize(color_jitter(jitter_key, images, config), config)


def shard_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """Turns this process's batch into global arrays split along the batch axis.

    With `NamedSharding(mesh, PartitionSpec("data"))` each device gets its slice; on
    several hosts each process passes its own shard (see `dataset`).
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch
    )


def data_parallel() -> tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding]:
    """(replicated, batch-sharded) shardings over every device of every process."""
    # Auto axes: XLA propagates the batch sharding (explicit sharding-in-types would
    # demand annotations inside every model).
    mesh = jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return replicated, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def steps_per_epoch(split: Sequence, batch_size: int) -> int:
    """Full global training batches per epoch (the remainder is dropped)."""
    return len(split) // batch_size
