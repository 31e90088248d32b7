"""`evaluation.evaluate` and `predict` against whole-split NumPy computations: batching,
padding and gathering must neither drop, repeat nor reorder an example, and padding rows
must count for nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grasp_jax import evaluation, models
from grasp_jax import input_pipeline as ip

CLASSES = 4
WEIGHTS = np.array(
    [[2.0, -1.0, 0.5, 0.0], [-1.5, 1.0, 0.0, 0.5], [0.5, 0.5, -2.0, 1.0]], np.float32
)


def _split(n: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n)
    return [{"image": images[i], "label": int(labels[i])} for i in range(n)]


def _numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _mean_colour_logits(images) -> np.ndarray:
    """A fixed linear "model" of each image's mean colour, in NumPy."""
    colours = np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1) / 255
    return colours @ WEIGHTS.astype(np.float64)


def _expected(split: list[dict]) -> dict:
    logits = _mean_colour_logits(np.stack([ex["image"] for ex in split]))
    labels = np.array([ex["label"] for ex in split])
    losses = -_numpy_log_softmax(logits)[np.arange(len(split)), labels]
    return {
        "logits": logits,
        "labels": labels,
        "loss": losses.mean(),
        "accuracy": np.mean(logits.argmax(-1) == labels),
    }


def _mean_colour_step(shapes: list, seen: list | None = None):
    """The same model as an eval step honouring the `valid` mask; records batch shapes
    (and, given `seen`, each batch's dtypes and valid mask)."""

    def step(variables, batch):
        shapes.append(batch["image"].shape)
        if seen is not None:
            seen.append(
                (batch["image"].dtype, batch["label"].dtype, np.asarray(batch["valid"]))
            )
        images = jnp.asarray(batch["image"], jnp.float32)
        colours = images.reshape(images.shape[0], -1, 3).mean(1) / 255
        logits = colours @ variables["w"]
        losses = -jnp.take_along_axis(
            jax.nn.log_softmax(logits), batch["label"][:, None], axis=1
        )[:, 0]
        valid = batch["valid"]
        return {
            "loss_sum": jnp.sum(losses * valid),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid),
            "count": jnp.sum(valid),
            "logits": logits,
        }

    return step


def test_pad_batch_adds_zero_rows_and_a_valid_mask():
    batch = {
        "image": np.full((3, 2, 2, 3), 7, np.uint8),
        "label": np.array([1, 2, 3], np.int32),
    }
    padded = evaluation.pad_batch(batch, 5)
    assert padded["image"].shape == (5, 2, 2, 3) and padded["image"].dtype == np.uint8
    np.testing.assert_array_equal(padded["image"][:3], 7)
    np.testing.assert_array_equal(padded["image"][3:], 0)
    np.testing.assert_array_equal(padded["label"], [1, 2, 3, 0, 0])
    assert padded["label"].dtype == np.int32
    np.testing.assert_array_equal(padded["valid"], [1, 1, 1, 0, 0])
    assert padded["valid"].dtype == np.float32
    full = evaluation.pad_batch(batch, 3)
    np.testing.assert_array_equal(full["valid"], [1, 1, 1])


@pytest.mark.parametrize("n", [23, 16, 5, 1])
def test_evaluate_equals_the_whole_split_at_once(n):
    """Partial last batch (23 = 2 x 8 + 7), exact batches, fewer examples than a batch."""
    split = _split(n, size=6, seed=n)
    pipeline = ip.PipelineConfig(resize_size=6, crop_size=6, batch_size=8)
    shapes = []
    _, batch_sharding = ip.data_parallel()
    got = evaluation.evaluate(
        _mean_colour_step(shapes), {"w": WEIGHTS}, split, pipeline, batch_sharding
    )
    want = _expected(split)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["labels"], want["labels"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert 0 < want["accuracy"] < 1 or n == 1  # the accuracy check is not vacuous
    # one batch shape throughout (no recompilation), ceil(n / 8) batches
    assert shapes == [(8, 6, 6, 3)] * -(-n // 8)


def test_evaluate_on_an_empty_split_reports_nothing():
    pipeline = ip.PipelineConfig(resize_size=6, crop_size=6, batch_size=8)
    shapes = []
    got = evaluation.evaluate(
        _mean_colour_step(shapes), {"w": WEIGHTS}, [], pipeline, ip.data_parallel()[1]
    )
    assert shapes == []
    assert got["loss"] == 0.0 and got["accuracy"] == 0.0
    assert got["logits"].shape == (0,) and got["labels"].shape == (0,)
    assert got["labels"].dtype == np.int32  # labels, even when there are none


def test_predict_equals_the_model_applied_to_every_image_at_once():
    split = _split(13, size=32, seed=7)
    pipeline = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=8)
    model = models.create("small_cnn", CLASSES)
    variables = models.init("small_cnn", CLASSES, jax.random.PRNGKey(1), (1, 32, 32, 3))
    got = evaluation.predict(model, variables, split, pipeline)

    images = ip.normalize(jnp.asarray(np.stack([ex["image"] for ex in split])), pipeline)
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    labels = np.array([ex["label"] for ex in split])
    losses = -_numpy_log_softmax(logits)[np.arange(len(split)), labels]
    np.testing.assert_allclose(got["logits"], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], labels)
    assert got["loss"] == pytest.approx(losses.mean(), rel=1e-4)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))


@pytest.mark.parametrize(
    ("process", "rows", "valid"), [(0, [0, 1, 2, 3, 8], 1), (1, [4, 5, 6, 7], 0)]
)
def test_a_process_whose_shard_ran_out_feeds_empty_batches(
    monkeypatch, process, rows, valid
):
    """Process `process` of 2 on 9 examples, global batch 8: rows [4p, 4p + 4) of the
    first batch, process 0 also row 8 of the last; both run 2 batches of 4 (so their
    collectives meet), process 1's second all padding. The gather is the identity here
    (one real process), so each sees its own rows."""
    split = _split(9, size=6, seed=3)
    pipeline = ip.PipelineConfig(resize_size=6, crop_size=6, batch_size=8)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(
        evaluation.multihost_utils, "process_allgather", lambda x, tiled: np.asarray(x)
    )
    shapes, seen = [], []
    got = evaluation.evaluate(
        _mean_colour_step(shapes, seen),
        {"w": WEIGHTS},
        split,
        pipeline,
        ip.data_parallel()[1],
    )
    assert shapes == [(4, 6, 6, 3)] * 2
    assert [(image, label) for image, label, _ in seen] == [(np.uint8, np.int32)] * 2
    np.testing.assert_array_equal(seen[1][2], [valid, 0, 0, 0])
    want = _expected([split[i] for i in rows])
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["labels"], want["labels"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
