"""transfer against the NumPy reference: bit-exact copies, strict thresholds, soft blend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grasp_jax as gj
from tests import numpy_reference as ref
from tests.trees import make_tree, tree_specs


def random_scores(tree, granularity, rng):
    """Scores of the shape each granularity produces, with some NaN/Inf."""

    def one(leaf):
        if granularity == "tensor":
            shape = ()
        elif granularity == "channel":
            shape = np.shape(leaf)[-1:]
        else:
            shape = np.shape(leaf)
        s = rng.uniform(-1, 1, size=shape).astype(np.float32)
        if rng.random() < 0.2:
            s = np.where(rng.random(size=shape) < 0.5, np.nan, np.inf).astype(np.float32)
        return s

    return jax.tree.map(one, tree)


@pytest.mark.parametrize("mode", gj.MODES)
@pytest.mark.parametrize("granularity", gj.GRANULARITIES)
@pytest.mark.parametrize("use_jit", [True, False])
@given(spec=tree_specs(), threshold=st.floats(-0.9, 0.9))
def test_transfer_matches_numpy(mode, granularity, use_jit, spec, threshold):
    leaves, seed = spec
    rng = np.random.default_rng(seed)
    current, source = make_tree(leaves, rng), make_tree(leaves, rng, scale=3.0)
    scores = random_scores(current, granularity, rng)
    if use_jit:
        merged = gj.transfer(current, source, scores, threshold=threshold, mode=mode)
    else:
        with jax.disable_jit():
            merged = gj.transfer(current, source, scores, threshold=threshold, mode=mode)
    assert jax.tree.structure(merged) == jax.tree.structure(current)
    for got, c, s, sc in zip(
        *(jax.tree.leaves(t) for t in (merged, current, source, scores)), strict=True
    ):
        want, weight = ref.transfer_leaf(c, s, sc, threshold, mode)
        assert got.dtype == c.dtype and got.shape == c.shape
        # Taken units are bit-identical to the source, kept ones to current.
        np.testing.assert_array_equal(ref.bits(got)[weight >= 1], ref.bits(s)[weight >= 1])
        np.testing.assert_array_equal(ref.bits(got)[weight <= 0], ref.bits(c)[weight <= 0])
        partial = (weight > 0) & (weight < 1)
        if mode == "soft" and partial.any():
            tol = float(jnp.finfo(c.dtype).eps) * 4 * (1 + np.abs(want[partial]).max())
            np.testing.assert_allclose(
                np.asarray(got, np.float64)[partial],
                np.asarray(want, np.float64)[partial],
                atol=tol,
            )


@pytest.mark.parametrize("mode", gj.MODES)
def test_threshold_is_strict(mode):
    current, source = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    at = gj.transfer(current, source, {"w": jnp.float32(0.5)}, threshold=0.5, mode=mode)
    np.testing.assert_array_equal(at["w"], 0.0)
    above = gj.transfer(
        current, source, {"w": jnp.nextafter(jnp.float32(0.5), 1)}, threshold=0.5, mode=mode
    )
    assert (np.asarray(above["w"]) > 0).all()


def test_zero_score_with_zero_threshold_keeps_current():
    merged = gj.transfer({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, {"w": 0.0}, threshold=0.0)
    np.testing.assert_array_equal(merged["w"], 0.0)


@pytest.mark.parametrize("mode", gj.MODES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_never_transfer(mode, bad):
    merged = gj.transfer(
        {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, {"w": jnp.float32(bad)}, mode=mode
    )
    np.testing.assert_array_equal(merged["w"], 0.0)


def test_soft_weights_by_hand():
    # threshold 0.2: w = (s - 0.2) / 0.8 -> s=0.6 gives 0.5, s=1 gives 1, s=0.1 gives 0.
    scores = {"w": jnp.array([0.6, 1.0, 0.1], jnp.float32)}
    merged = gj.transfer(
        {"w": jnp.zeros(3)}, {"w": jnp.full(3, 10.0)}, scores, threshold=0.2, mode="soft"
    )
    np.testing.assert_allclose(merged["w"], [5.0, 10.0, 0.0], rtol=1e-6)


def test_score_of_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="scores for 'w' have shape"):
        gj.transfer({"w": jnp.zeros((3, 4))}, {"w": jnp.ones((3, 4))}, {"w": jnp.zeros(3)})


def test_dtype_mismatch_is_an_error():
    with pytest.raises(ValueError, match="'w' is float32 in current but bfloat16"):
        gj.transfer({"w": jnp.zeros(2)}, {"w": jnp.ones(2, jnp.bfloat16)}, {"w": 1.0})


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode='average'"):
        gj.transfer({}, {}, {}, mode="average")


def test_empty_trees():
    assert gj.transfer({}, {}, {}) == {}
