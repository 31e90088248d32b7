"""Fast tests for plausible bugs that hand-made mutations found every other test let
through (issue #26): each targets one of them and was watched failing on it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from experiments.configs import digits
from experiments.methods import weight_merges
from grasp_jax import adapters, merging
from grasp_jax import input_pipeline as ip


def test_weight_merges_fine_tune_for_graspss_budget():
    """initial + finetune x (K - 1), by hand: 3 + 3 x 3 = 12 for four sources (a stage
    too many would give 15); a set `merging.finetune_epochs` wins, 0 included."""
    config = digits.get_config()
    assert (config.grasp.initial_epochs, config.grasp.finetune_epochs) == (3, 3)
    assert weight_merges.finetune_epochs(config, 4) == 12
    assert weight_merges.finetune_epochs(config, 1) == 3
    config.merging.finetune_epochs = 0
    assert weight_merges.finetune_epochs(config, 4) == 0


class WideHead(nn.Module):
    """A 32-channel body and a 32-class head: both above the adapters' minimum."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(32, (3, 3), name="body")(x)
        return nn.Dense(32, name="classifier")(x.mean(axis=(1, 2)))


def test_pearl_adapters_never_go_on_the_head():
    """Every zoo test model's head was below the 16-channel minimum, so dropping the
    head-name exclusion passed every test."""
    model = WideHead()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 32)))
    sites = adapters.find_sites(model, variables, (1, 8, 8, 32))
    assert [s.path for s in sites] == ["body"]


def test_merge_step_keeps_a_tensor_whose_score_equals_the_threshold():
    """Hard transfer is strict (score > threshold): at equality nothing moves."""
    current, source = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    g_current, g_source = (
        {"w": jnp.array([1.0, 2.0, 0.5])},
        {"w": jnp.array([2.0, 1.0, 1.0])},
    )
    score = gj.alignment_scores(g_current, g_source)["w"]  # the float32 cosine
    merged, stats = gj.merge_step(current, source, g_current, g_source, threshold=score)
    np.testing.assert_array_equal(merged["w"], 0.0)
    assert int(stats.taken["w"]) == 0
    below = jnp.nextafter(score, -jnp.inf)
    merged, _ = gj.merge_step(
        {"w": jnp.zeros(3)}, source, g_current, g_source, threshold=below
    )
    np.testing.assert_array_equal(merged["w"], 1.0)


def test_random_crops_change_with_the_epoch():
    """Every end-to-end config crops as much as it resizes, and the unit test saw only
    the shuffle: crops that ignored the epoch passed."""
    rng = np.random.default_rng(0)
    split = [{"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": 0}]
    config = ip.PipelineConfig(resize_size=32, crop_size=16, batch_size=1)
    crops = [
        next(iter(ip.dataset(split, config, train=True, seed=3, epoch=e)))["image"]
        for e in range(4)
    ]
    assert len({c.tobytes() for c in crops}) > 1


def test_fisher_merge_of_an_element_no_source_is_sensitive_to():
    """All Fishers zero at an element: the plain mean without normalisation, the mean
    weighted by each model's 1 / (|F| + 1e-6) with it (hand-computed)."""
    sources = [{"w": jnp.array([1.0, 10.0])}, {"w": jnp.array([3.0, 20.0])}]
    fishers = [{"w": jnp.array([0.0, 3.0])}, {"w": jnp.array([0.0, 4.0])}]
    plain = merging.fisher(sources, fishers, normalize=False)["w"]
    assert float(plain[0]) == 2.0
    c = [1 / (3.0 + 1e-6), 1 / (4.0 + 1e-6)]
    weighted = (c[0] * 1.0 + c[1] * 3.0) / (c[0] + c[1])
    normalised = merging.fisher(sources, fishers)["w"]
    np.testing.assert_allclose(normalised[0], weighted, rtol=1e-6)
