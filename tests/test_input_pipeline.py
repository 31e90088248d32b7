"""The grain pipeline and the on-device augmentation, against hand computations."""

from __future__ import annotations

import colorsys
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from grasp_jax import input_pipeline as ip
from grasp_jax import presized

SMALL = ip.PipelineConfig(resize_size=20, crop_size=16, batch_size=4)


def fake_source(n: int = 10, encoded: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        pixels = rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
        if encoded:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            pixels = buffer.getvalue()
        examples.append({"image": pixels, "label": i})
    return examples


@pytest.mark.parametrize(
    ("size", "expected"), [((300, 200), (384, 256)), ((200, 500), (256, 640))]
)
def test_resize_shorter_side(size, expected):
    image = Image.new("RGB", size)
    assert ip.resize_shorter_side(image, 256).size == expected  # PIL sizes are (w, h)


def test_centre_crop_is_torchvision_centre():
    image = np.arange(10 * 7).reshape(10, 7)[..., None]
    # torchvision: top = round((10 - 4) / 2) = 3, left = round((7 - 4) / 2) = 2 (banker's).
    np.testing.assert_array_equal(ip.crop(image, 4, None), image[3:7, 2:6])


def test_crop_smaller_than_image_is_an_error():
    with pytest.raises(ValueError, match="smaller than the 16 crop"):
        ip.crop(np.zeros((8, 8, 3)), 16, None)


def batches(source, **kwargs):
    return list(ip.dataset(source, SMALL, **kwargs))


@pytest.mark.parametrize("encoded", [False, True])
def test_train_batches_shapes_and_remainder(encoded):
    train = batches(fake_source(10, encoded), train=True, seed=1)
    assert len(train) == 2  # 10 // 4, remainder dropped
    assert train[0]["image"].shape == (4, 16, 16, 3) and train[0]["image"].dtype == np.uint8
    evaluation = batches(fake_source(10, encoded), train=False)
    assert [len(b["label"]) for b in evaluation] == [4, 4, 2]
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in evaluation]), range(10)
    )


def test_train_order_depends_only_on_seed_and_epoch():
    source = fake_source(12)

    def run(seed, epoch):
        return [b["image"] for b in batches(source, train=True, seed=seed, epoch=epoch)]

    same = run(3, 0), run(3, 0)
    for a, b in zip(*same, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(run(3, 0), run(3, 1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(run(3, 0), run(4, 0), strict=True))


def test_eval_is_deterministic_centre_crops():
    source = fake_source(4)
    (batch,) = batches(source, train=False)
    # Heights 24..27, width 30: the shorter side becomes 20 (torchvision's Resize(20):
    # width int(20 * 30 / h)), then the centred 16 x 16 (top round(4 / 2) = 2).
    widths = [25, 24, 23, 22]
    lefts = [round((w - 16) / 2) for w in widths]  # 4, 4, 4, 3 (round half to even)
    assert lefts == [4, 4, 4, 3]
    for image, example, width, left in zip(
        batch["image"], source, widths, lefts, strict=True
    ):
        resized = np.asarray(
            Image.fromarray(example["image"]).resize((width, 20), Image.Resampling.BILINEAR)
        )
        np.testing.assert_array_equal(image, resized[2:18, left : left + 16])


def test_shards_are_disjoint_and_cover_the_source():
    source = fake_source(10)
    shards = [batches(source, train=False, shard_index=i, shard_count=2) for i in range(2)]
    seen = [np.concatenate([b["label"] for b in shard]) for shard in shards]
    assert sorted(np.concatenate(seen).tolist()) == list(range(10))
    assert not set(seen[0]) & set(seen[1])


def test_global_batches_do_not_depend_on_the_process_count():
    """Two processes each read half of every global batch: put side by side, their
    halves are the one-process batches (same examples, crops and order)."""
    source = fake_source(10)
    whole = batches(source, train=True, seed=4)
    halves = [
        batches(source, train=True, seed=4, shard_index=i, shard_count=2) for i in range(2)
    ]
    assert len(whole) == 2 and [len(h) for h in halves] == [2, 2]
    for b, batch in enumerate(whole):
        for key in ("image", "label"):
            joined = np.concatenate([halves[0][b][key], halves[1][b][key]])
            np.testing.assert_array_equal(joined, batch[key])
    with pytest.raises(ValueError, match=r"batch_size=4 does not split evenly over 3"):
        batches(source, train=True, shard_index=0, shard_count=3)


def test_hue_shift_matches_colorsys():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(size=(3, 5, 5, 3)).astype(np.float32)
    shifts = np.array([0.07, -0.1, 0.5], np.float32)
    got = np.asarray(ip.shift_hue(jnp.asarray(pixels), jnp.asarray(shifts)))
    for n in range(3):
        for y in range(5):
            for x in range(5):
                h, s, v = colorsys.rgb_to_hsv(*pixels[n, y, x])
                want = colorsys.hsv_to_rgb((h + shifts[n]) % 1.0, s, v)
                np.testing.assert_allclose(got[n, y, x], want, atol=2e-5)


def test_color_jitter_matches_numpy_given_the_same_draws():
    """Brightness, contrast (towards each image's mean luma), saturation (towards each
    pixel's luma, ITU-R 601-2 weights) and hue, each clipped to [0, 1], in torchvision's
    order; the draws are the four keys' factors. Only ranges were checked before: luma
    weights or axes, a clip bound or a swapped key all passed."""
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(4, 5, 5, 3)).astype(np.float32)
    key = jax.random.key(7)
    config = dataclasses.replace(SMALL, brightness=0.6, contrast=0.8, saturation=0.7)
    keys = jax.random.split(key, 4)

    def draw(k, strength):
        return np.asarray(jax.random.uniform(k, (4, 1, 1, 1), minval=1 - strength,
                                             maxval=1 + strength))  # fmt: skip

    luma = np.array([0.299, 0.587, 0.114], np.float32)
    x = np.clip(images * draw(keys[0], config.brightness), 0, 1)
    mean = (x @ luma).mean(axis=(1, 2))[:, None, None, None]
    c = draw(keys[1], config.contrast)
    x = np.clip(c * x + (1 - c) * mean, 0, 1)
    s = draw(keys[2], config.saturation)
    x = np.clip(s * x + (1 - s) * (x @ luma)[..., None], 0, 1)
    shift = jax.random.uniform(keys[3], (4,), minval=-config.hue, maxval=config.hue)
    want = np.asarray(ip.shift_hue(jnp.asarray(x), shift))  # checked against colorsys
    got = np.asarray(ip.color_jitter(key, jnp.asarray(images), config))
    assert (x == 0).any() and (x == 1).any()  # both clip bounds are reached
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_jitter_factors_stay_in_range():
    images = jnp.full((64, 4, 4, 3), 0.5, jnp.float32)
    only_brightness = dataclasses.replace(SMALL, contrast=0.0, saturation=0.0, hue=0.0)
    out = np.asarray(ip.color_jitter(jax.random.key(0), images, only_brightness))
    factors = out[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert factors.std() > 0.05  # one draw per image
    nothing = dataclasses.replace(
        SMALL, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
    )
    pixels = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    np.testing.assert_allclose(
        ip.color_jitter(jax.random.key(2), pixels, nothing), pixels, atol=1e-5
    )


def test_augment_flips_about_half_and_normalises():
    no_jitter = dataclasses.replace(
        SMALL, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
    )
    images = np.random.default_rng(0).integers(0, 256, (200, 6, 6, 3), dtype=np.uint8)
    out = np.asarray(
        jax.jit(lambda k, x: ip.augment(k, x, no_jitter))(jax.random.key(0), images)
    )
    plain = (images / 255.0 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD)
    flipped = np.array(
        [np.allclose(o, p[:, ::-1], atol=1e-4) for o, p in zip(out, plain, strict=True)]
    )
    kept = np.array([np.allclose(o, p, atol=1e-4) for o, p in zip(out, plain, strict=True)])
    assert (flipped | kept).all()
    assert 70 <= flipped.sum() <= 130


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    want = (images / 255.0 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD)
    np.testing.assert_allclose(ip.normalize(jnp.asarray(images), SMALL), want, rtol=1e-5)


def test_normalize_gives_float32_even_with_x64_enabled():
    """Images reach the model in float32 whatever JAX's default float: with x64 on, a
    mean or std made without a dtype, or a float64 input kept as it is, gave float64."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for images in (
            rng.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8),
            rng.random((2, 3, 3, 3)),
        ):
            assert ip.normalize(jnp.asarray(images), SMALL).dtype == jnp.float32


def test_shard_batch_places_the_batch_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = {"image": np.zeros((4, 2, 2, 3), np.uint8), "label": np.arange(4)}
    out = ip.shard_batch(batch, sharding)
    assert out["image"].sharding == sharding and out["image"].shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(out["label"], np.arange(4))


def test_iterate_in_thread_yields_the_dataset():
    source = fake_source(8)
    direct = batches(source, train=True, seed=2)
    through = list(ip.iterate(ip.dataset(source, SMALL, train=True, seed=2)))
    assert len(through) == len(direct) == 2
    for a, b in zip(through, direct, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shard_count", [1, 2])
def test_presized_rows_give_the_batches_of_the_per_example_path(
    train, shard_count, monkeypatch
):
    """Images already at the crop size are gathered from memory (`presized`): the same
    examples, order, shards and remainder as grain's per-example transform."""
    rng = np.random.default_rng(1)
    rows = [
        {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3, "id": i}
        for i in range(23)
    ]
    config = ip.PipelineConfig(resize_size=8, crop_size=8, batch_size=4)

    def epoch(source, index):
        ds = ip.dataset(
            source,
            config,
            train=train,
            seed=7,
            epoch=2,
            shard_index=index,
            shard_count=shard_count,
        )
        return [ds[b] for b in range(len(ds))]

    fast = [epoch(rows, i) for i in range(shard_count)]
    assert presized.arrays(rows, 8) is not None  # the in-memory path was taken
    monkeypatch.setattr(presized, "MAX_BYTES", 0)  # too big: grain's per-example path
    slow = [epoch(list(rows), i) for i in range(shard_count)]
    if train:  # 23 rows: 5 full global batches, the remainder dropped
        assert [len(shard) for shard in fast] == [5] * shard_count
    for fast_shard, slow_shard in zip(fast, slow, strict=True):
        assert len(fast_shard) == len(slow_shard) > 0
        for a, b in zip(fast_shard, slow_shard, strict=True):
            assert set(a) == set(b) == {"image", "label"}
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
            assert a["label"].dtype == b["label"].dtype


def test_images_at_the_crop_size_are_resized_when_the_resize_is_larger():
    """The in-memory path takes images already at the crop size, which is right only
    where nothing resizes them: with resize 12 and crop 8, 8-pixel images are resized up
    and centre-cropped, as each example's own transform does."""
    rng = np.random.default_rng(3)
    rows = [
        {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i}
        for i in range(4)
    ]
    config = ip.PipelineConfig(resize_size=12, crop_size=8, batch_size=4)
    [batch] = list(ip.dataset(rows, config, train=False, shard_index=0, shard_count=1))
    expected = [ip.host_transform(row, config, None)["image"] for row in rows]
    np.testing.assert_array_equal(batch["image"], expected)
    assert not np.array_equal(batch["image"], [row["image"] for row in rows])


class _CountingRows(list):
    """A split that counts its row reads."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def _rows(shape=(8, 8, 3), dtype=np.uint8, seed=2) -> _CountingRows:
    rng = np.random.default_rng(seed)
    return _CountingRows(
        {"image": rng.integers(0, 256, shape).astype(dtype), "label": i} for i in range(5)
    )


def test_presized_arrays_read_a_split_once_and_only_uint8_images_at_the_size(
    monkeypatch,
):
    split = _rows()
    held = presized.arrays(split, 8)
    reads = split.reads
    np.testing.assert_array_equal(held["image"], np.stack([r["image"] for r in split]))
    np.testing.assert_array_equal(held["label"], np.arange(5))
    other = _rows()
    assert presized.arrays(other, 8) is not held  # another split held beside it
    assert presized.arrays(split, 8) is held and split.reads == reads  # kept, not reread
    assert presized.arrays(_rows(dtype=np.float32), 8) is None
    assert presized.arrays(_rows(shape=(10, 10, 3)), 8) is None
    assert presized.arrays(_rows(shape=(8, 8, 1)), 8) is None
    assert presized.arrays([(r["image"], r["label"]) for r in _rows()], 8) is None
    monkeypatch.setattr(presized, "MAX_BYTES", 5 * 8 * 8 * 3)  # exactly the split's
    assert presized.arrays(_rows(), 8) is not None
    monkeypatch.setattr(presized, "MAX_BYTES", 5 * 8 * 8 * 3 - 1)
    assert presized.arrays(_rows(), 8) is None


def test_presized_arrays_hold_only_the_latest_splits(monkeypatch):
    monkeypatch.setattr(presized, "_CACHE", {})
    monkeypatch.setattr(presized, "_CACHE_ENTRIES", 2)
    splits = [_rows() for _ in range(3)]
    for split in splits:
        presized.arrays(split, 8)
    assert len(presized._CACHE) == 2
    reads = [split.reads for split in splits]
    presized.arrays(splits[0], 8)  # the oldest was let go: read again
    presized.arrays(splits[2], 8)
    assert splits[0].reads > reads[0] and splits[2].reads == reads[2]


@pytest.mark.parametrize(("drop_remainder", "expected"), [(False, 3), (True, 2)])
def test_presized_batches_are_a_sequence_of_the_order_given(drop_remainder, expected):
    data = {
        "image": np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
        * np.ones((1, 2, 2, 3), np.uint8),
        "label": np.arange(10, dtype=np.int32),
    }
    batches = presized.Batches(data, np.arange(10)[::-1], 4, drop_remainder)
    labels = [batch["label"].tolist() for batch in batches]  # iterates to IndexError
    assert labels == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]][:expected]
    assert len(batches) == expected
    assert batches[1]["image"][:, 0, 0, 0].tolist() == [5, 4, 3, 2]
    with pytest.raises(IndexError):
        batches[expected]


def test_grayscale_images_decode_to_three_equal_channels():
    """Raw 2-D arrays and encoded one-channel images become RGB, each channel the gray."""
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    want = np.stack([gray, gray, gray], axis=-1)
    np.testing.assert_array_equal(np.asarray(ip.decode(gray)), want)
    png = io.BytesIO()
    Image.fromarray(gray).save(png, format="PNG")  # a one-channel ("L") PNG
    decoded = ip.decode(png.getvalue())
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), want)


def test_pipeline_values_at_the_edges_of_their_ranges():
    """The documented ranges are closed: a 1-pixel crop and a hue shift of 0.5 are
    accepted; a negative jitter strength names its key."""
    ip.PipelineConfig(resize_size=1, crop_size=1, hue=0.5)
    for name in ("brightness", "contrast", "saturation"):
        with pytest.raises(ValueError, match=rf"^pipeline\.{name}=-0\.1; use >= 0$"):
            ip.PipelineConfig(**{name: -0.1})


def test_only_rgb_uint8_arrays_at_the_resize_size_skip_pil(monkeypatch):
    """An HWC uint8 RGB array whose shorter side is already `resize_size` goes straight to
    the crop; any other image (longer side at that size, float, RGBA, grayscale, a list)
    is decoded and resized first, as PIL alone would do it (the reference here)."""
    config = ip.PipelineConfig(resize_size=8, crop_size=8)
    rgb = np.random.default_rng(5).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    short = rgb[:6, :8]  # 6 x 8: the longer side is at the size, the shorter is not
    resized = []
    real = ip.resize_shorter_side
    monkeypatch.setattr(
        ip,
        "resize_shorter_side",
        lambda image, size: resized.append(1) or real(image, size),
    )

    out = ip.host_transform({"image": rgb, "label": 3}, config, None)
    assert not resized
    np.testing.assert_array_equal(out["image"], rgb[:, 2:10])  # centred: (12 - 8) / 2
    assert out["label"] == 3 and out["label"].dtype == np.int32

    def pil(array):
        return np.asarray(Image.fromarray(array).convert("RGB"))

    upscaled = np.asarray(Image.fromarray(short).resize((10, 8), Image.Resampling.BILINEAR))
    others = {
        "shorter side 6": (short, upscaled[:, 1:9]),
        "float32": (rgb.astype(np.float32), rgb[:, 2:10]),
        "rgba": (np.dstack([rgb, np.full((8, 12), 9, np.uint8)]), rgb[:, 2:10]),
        "grayscale": (rgb[..., 0], pil(rgb[..., 0])[:, 2:10]),
        "list": (rgb.tolist(), rgb[:, 2:10]),
    }
    for name, (image, expected) in others.items():
        resized.clear()
        out = ip.host_transform({"image": image, "label": 1}, config, None)
        assert resized == [1], name
        assert out["image"].dtype == np.uint8, name
        np.testing.assert_array_equal(out["image"], expected, err_msg=name)
