"""alignment_scores against the NumPy reference, and its edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grasp_jax as gj
from tests import numpy_reference as ref
from tests.trees import related_gradients, tree_specs


@pytest.mark.parametrize("granularity", gj.GRANULARITIES)
@pytest.mark.parametrize("use_jit", [True, False])
@given(spec=tree_specs())
def test_scores_match_numpy(granularity, use_jit, spec):
    leaves, seed = spec
    g_current, g_source = related_gradients(leaves, np.random.default_rng(seed))
    if use_jit:
        scores = gj.alignment_scores(g_current, g_source, granularity=granularity)
    else:
        with jax.disable_jit():
            scores = gj.alignment_scores(g_current, g_source, granularity=granularity)
    expected = jax.tree.map(lambda a, b: ref.cosine(a, b, granularity), g_current, g_source)
    for got, want in zip(jax.tree.leaves(scores), jax.tree.leaves(expected), strict=True):
        assert got.dtype == jnp.float32
        assert got.shape == np.shape(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("shape", "granularity", "score_shape"),
    [
        ((), "tensor", ()),
        ((3, 3, 4, 8), "tensor", ()),
        ((), "channel", ()),
        ((5,), "channel", (5,)),
        ((2, 5), "channel", (5,)),
        ((3, 3, 4, 8), "channel", (8,)),
        ((3, 3, 4, 8), "element", (3, 3, 4, 8)),
    ],
)
def test_score_shapes(shape, granularity, score_shape):
    g = {"w": jnp.ones(shape)}
    assert gj.alignment_scores(g, g, granularity=granularity)["w"].shape == score_shape


@pytest.mark.parametrize("granularity", gj.GRANULARITIES)
def test_identical_opposite_and_zero_gradients(granularity):
    g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)}

    def score(other):
        return gj.alignment_scores(g, other, granularity=granularity)["w"]

    same = score(g)
    opposite = score(jax.tree.map(jnp.negative, g))
    zero = score(jax.tree.map(jnp.zeros_like, g))
    np.testing.assert_allclose(same, 1.0, atol=1e-5)
    np.testing.assert_allclose(opposite, -1.0, atol=1e-5)
    np.testing.assert_array_equal(zero, 0.0)


def test_low_precision_gradients_are_scored_in_float32():
    # 2**16 bfloat16 elements: a bfloat16 accumulator would be off by percent.
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(256, 256)) + np.asarray(a, np.float64), jnp.bfloat16)
    got = gj.alignment_scores({"w": a}, {"w": b})["w"]
    want = ref.cosine(np.asarray(a), np.asarray(b), "tensor")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_give_non_finite_scores(bad):
    g = np.ones((3, 4), np.float32)
    g_bad = g.copy()
    g_bad[1, 2] = bad
    tensor = gj.alignment_scores({"w": g}, {"w": g_bad})["w"]
    channel = gj.alignment_scores({"w": g}, {"w": g_bad}, granularity="channel")["w"]
    assert not np.isfinite(tensor)
    assert not np.isfinite(channel[2])
    assert np.isfinite(np.delete(np.asarray(channel), 2)).all()


def test_empty_trees():
    assert gj.alignment_scores({}, {}) == {}


def test_missing_leaf_names_the_path():
    g = {"encoder": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}
    g_missing = {"encoder": {"Dense_0": {"kernel": jnp.ones((2, 3))}}}
    with pytest.raises(ValueError, match="encoder/Dense_0/bias"):
        gj.alignment_scores(g, g_missing)


def test_shape_mismatch_names_the_path():
    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(8, 10\)"):
        gj.alignment_scores(
            {"head": {"kernel": jnp.ones((8, 10))}}, {"head": {"kernel": jnp.ones((8, 2))}}
        )


def test_broadcastable_shapes_are_not_broadcast():
    with pytest.raises(ValueError, match="shape"):
        gj.alignment_scores({"w": jnp.ones((4, 1))}, {"w": jnp.ones((4, 4))})


def test_unknown_granularity():
    with pytest.raises(ValueError, match="granularity='layer'"):
        gj.alignment_scores({}, {}, granularity="layer")


@given(st.floats(1e-12, 1e-3))
def test_eps_regularises_the_denominator(eps):
    g = {"w": jnp.full((4,), 1e-3, jnp.float32)}
    got = gj.alignment_scores(g, g, eps=eps)["w"]
    np.testing.assert_allclose(got, ref.cosine(g["w"], g["w"], "tensor", eps), rtol=1e-5)
