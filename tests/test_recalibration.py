"""BatchNorm statistics re-estimated on a split: checked against the split's own
statistics, computed by hand in NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax import input_pipeline as ip
from grasp_jax.models.layers import BatchNorm
from grasp_jax.recalibration import recalibrate

PIPELINE = ip.PipelineConfig(resize_size=8, crop_size=8, batch_size=4)
COLOURS = np.array([[10, 200, 40], [90, 20, 250], [160, 120, 0], [240, 60, 130]])


class Normalised(nn.Module):
    """BatchNorm straight on the image, then a head: its statistics are the images'."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(2)(BatchNorm()(x, train).mean(axis=(1, 2)))


def test_statistics_become_the_splits_and_parameters_stay():
    # Every batch of 4 holds the same four flat colours, so every batch mean equals the
    # split's mean and the running averages converge to it exactly.
    split = [
        {"image": np.full((8, 8, 3), COLOURS[i % 4], np.uint8), "label": 0}
        for i in range(16)
    ]
    model = Normalised()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    stale = {"BatchNorm_0": {"mean": jnp.full(3, 100.0), "var": jnp.full(3, 50.0)}}
    variables = {"params": variables["params"], "batch_stats": stale}
    out = recalibrate(model, variables, split, PIPELINE, updates=200)
    values = (COLOURS / 255.0 - np.array(PIPELINE.mean)) / np.array(PIPELINE.std)
    count = 4 * 8 * 8  # elements per channel in one batch
    np.testing.assert_allclose(
        out["batch_stats"]["BatchNorm_0"]["mean"], values.mean(axis=0), atol=1e-5
    )
    np.testing.assert_allclose(
        out["batch_stats"]["BatchNorm_0"]["var"],
        values.var(axis=0) * count / (count - 1),
        rtol=1e-4,
    )
    jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])
    np.testing.assert_array_equal(stale["BatchNorm_0"]["mean"], 100.0)  # not donated
