"""merge_step: score and transfer in one donating program, checked against NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grasp_jax as gj
from tests import numpy_reference as ref
from tests.trees import make_tree, related_gradients, tree_specs


def copy_tree(tree):
    """Device copies, since merge_step donates its first two arguments."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@pytest.mark.parametrize("mode", gj.MODES)
@pytest.mark.parametrize("granularity", gj.GRANULARITIES)
@given(spec=tree_specs(), threshold=st.floats(-0.9, 0.9))
def test_merge_step_matches_numpy(mode, granularity, spec, threshold):
    leaves, seed = spec
    threshold = float(np.float32(threshold))  # the kernel traces it as float32
    rng = np.random.default_rng(seed)
    current, source = make_tree(leaves, rng), make_tree(leaves, rng, scale=3.0)
    g_current, g_source = related_gradients(leaves, rng)
    merged, stats = gj.merge_step(
        copy_tree(current),
        copy_tree(source),
        g_current,
        g_source,
        threshold=threshold,
        granularity=granularity,
        mode=mode,
    )
    taken, total, unclear, nonfinite = 0.0, 0, 0, 0
    for got, mask, c, s, a, b in zip(
        *(jax.tree.leaves(t) for t in (merged, stats.mask(current), current, source)),
        *(jax.tree.leaves(t) for t in (g_current, g_source)),
        strict=True,
    ):
        score = ref.movable_score(a, b, granularity)
        want, weight = ref.transfer_leaf(c, s, score, threshold, mode)
        # float32 vs float64 scores may fall on either side of a threshold they touch.
        clear = np.broadcast_to(np.abs(score - threshold) > 1e-4, c.shape)
        assert got.dtype == c.dtype and mask.dtype == jnp.bool_ and mask.shape == c.shape
        np.testing.assert_array_equal(np.asarray(mask)[clear], (weight > 0)[clear])
        if mode == "hard":
            np.testing.assert_array_equal(ref.bits(got)[clear], ref.bits(want)[clear])
        else:
            np.testing.assert_allclose(
                np.asarray(got, np.float64)[clear],
                np.asarray(want, np.float64)[clear],
                atol=1e-3 * (1 + np.abs(np.asarray(want, np.float64)).max()),
            )
        taken += weight.sum()
        total += c.size
        unclear += int((~clear).sum())
        nonfinite += int(not np.isfinite(ref.cosine(a, b, granularity)).all())
    # Each unit near the threshold may count either way.
    assert abs(float(stats.fraction) - taken / total) <= (unclear + 1e-3) / total
    assert int(stats.nonfinite) == nonfinite


def test_merge_step_by_hand():
    """Two tensors: one aligned (moves), one opposed (stays); fraction counts elements."""
    current = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    source = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
    g = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
    g_source = {"a": jnp.full((2, 3), 2.0), "b": -jnp.ones(4)}
    merged, stats = gj.merge_step(current, source, g, g_source)
    np.testing.assert_array_equal(merged["a"], 1.0)
    np.testing.assert_array_equal(merged["b"], 0.0)
    mask = stats.mask(merged)
    assert mask["a"].all() and not mask["b"].any()
    assert mask["a"].shape == (2, 3) and mask["b"].shape == (4,)
    # Whole tensors: one weight and one count per leaf, nothing parameter-sized.
    assert {k: np.shape(w) for k, w in stats.weights.items()} == {"a": (), "b": ()}
    assert {k: int(t) for k, t in stats.taken.items()} == {"a": 6, "b": 0}
    assert float(stats.fraction) == pytest.approx(6 / 10)
    np.testing.assert_allclose(stats.scores["a"], 1.0, atol=1e-6)
    np.testing.assert_allclose(stats.scores["b"], -1.0, atol=1e-6)
    assert int(stats.nonfinite) == 0


def test_nan_gradient_is_counted_and_never_transfers():
    g = {"a": jnp.ones(3), "b": jnp.ones(3)}
    g_source = {"a": jnp.array([1.0, jnp.nan, 1.0]), "b": jnp.ones(3)}
    merged, stats = gj.merge_step(
        {"a": jnp.zeros(3), "b": jnp.zeros(3)},
        {"a": jnp.ones(3), "b": jnp.ones(3)},
        g,
        g_source,
    )
    np.testing.assert_array_equal(merged["a"], 0.0)
    np.testing.assert_array_equal(merged["b"], 1.0)
    assert int(stats.nonfinite) == 1


@pytest.mark.parametrize(("granularity", "mode"), [("tensor", "hard"), ("channel", "soft")])
def test_donates_current_only(granularity, mode):
    """At top level the merged tree is written into current's buffers (deleted after
    the call); source and the gradients stay the caller's."""
    current = {"w": jnp.zeros(8), "v": jnp.zeros(3)}
    source = {"w": jnp.ones(8), "v": jnp.ones(3)}
    g_current = {"w": jnp.ones(8), "v": jnp.ones(3)}
    g_source = {"w": jnp.ones(8), "v": -jnp.ones(3)}  # w aligned, v opposed
    merged, stats = gj.merge_step(
        current, source, g_current, g_source, granularity=granularity, mode=mode
    )
    np.testing.assert_array_equal(merged["w"], 1.0)
    np.testing.assert_array_equal(merged["v"], 0.0)
    assert float(stats.fraction) == pytest.approx(8 / 11)
    assert all(x.is_deleted() for x in jax.tree.leaves(current))
    assert not any(x.is_deleted() for x in jax.tree.leaves((source, g_current, g_source)))


def test_threshold_and_values_do_not_recompile(compile_count):
    def args(seed):
        rng = np.random.default_rng(seed)
        return [{"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)} for _ in range(4)]

    gj.merge_step(*args(0), threshold=0.3, granularity="channel")
    before = compile_count()
    for seed, threshold in enumerate([0.1, 0.5, -0.2, 0.99]):
        gj.merge_step(*args(seed + 1), threshold=threshold, granularity="channel")
    assert compile_count() == before
    # The counter does see compilations: a new static granularity compiles once.
    gj.merge_step(*args(9), threshold=0.3, granularity="element")
    assert compile_count() == before + 1


class _ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_flax_params_merge_and_batch_stats_stay():
    model = _ConvBN()
    x = jnp.ones((2, 8, 8, 3))
    current = model.init(jax.random.key(0), x, train=False)
    source = model.init(jax.random.key(1), x, train=False)
    stats_before = jax.tree.map(np.asarray, current["batch_stats"])

    def loss(params, variables):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(logits**2)

    g_current = jax.grad(loss)(current["params"], current)
    g_source = jax.grad(loss)(source["params"], source)
    merged, _ = gj.merge_step(
        copy_tree(current["params"]), copy_tree(source["params"]), g_current, g_source
    )
    assert jax.tree.structure(merged) == jax.tree.structure(current["params"])
    assert "batch_stats" not in merged
    jax.tree.map(np.testing.assert_array_equal, current["batch_stats"], stats_before)
    logits = model.apply(
        {"params": merged, "batch_stats": current["batch_stats"]}, x, False
    )
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


def test_empty_trees():
    merged, stats = gj.merge_step({}, {}, {}, {})
    assert merged == {} and float(stats.fraction) == 0.0 and int(stats.nonfinite) == 0


@pytest.mark.parametrize("which", ["source", "grad_current", "grad_source"])
def test_a_leaf_missing_from_any_tree_is_named(which):
    full = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
    trees = {name: copy_tree(full) for name in ("current", "source", "grad_current")}
    trees["grad_source"] = copy_tree(full)
    del trees[which]["conv"]["bias"]
    with pytest.raises(ValueError, match="conv/bias"):
        gj.merge_step(
            trees["current"], trees["source"], trees["grad_current"], trees["grad_source"]
        )


@pytest.mark.parametrize("granularity", ["tensor", "channel", "element"])
def test_random_merge_moves_as_many_units_as_grasp_would(granularity):
    """The grasp_random control against NumPy: the count of units GRASP's rule takes
    (cosines written here), the same count moved, each a whole copy of the source."""
    rng = np.random.default_rng(7)
    shapes = [(3, 4), (5,), (2, 3, 6), (), (4, 4)]
    current = {f"p{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    source = {k: v + 1.0 for k, v in current.items()}  # every element differs
    g_cur = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in current.items()}
    g_src = {k: v + rng.normal(size=v.shape) * 0.8 for k, v in g_cur.items()}
    expected = 0
    for k in current:
        score = ref.cosine(np.asarray(g_cur[k]), np.asarray(g_src[k]), granularity)
        expected += int(np.sum(np.asarray(score) > 0.3))
    assert expected > 0
    merged, stats = gj.random_merge_step(
        dict(current),
        source,
        g_cur,
        g_src,
        key=jax.random.PRNGKey(1),
        threshold=0.3,
        granularity=granularity,
    )
    moved_units = 0
    for k, cur in current.items():
        got = np.asarray(merged[k])
        taken = got == source[k]
        assert np.array_equal(taken | (got == cur), np.ones_like(taken))  # copies only
        if granularity == "tensor" or cur.ndim == 0:
            assert taken.all() or not taken.any()
            moved_units += int(taken.all())
        elif granularity == "channel" and cur.ndim > 1:
            per_channel = taken.reshape(-1, cur.shape[-1])
            assert (per_channel.all(axis=0) | ~per_channel.any(axis=0)).all()
            moved_units += int(per_channel.all(axis=0).sum())
        else:
            moved_units += int(taken.sum())
        np.testing.assert_array_equal(np.asarray(stats.mask(current)[k]), taken)
        assert int(stats.taken[k]) == taken.sum()
    assert moved_units == expected
    total = sum(v.size for v in current.values())
    moved = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(stats.mask(current)))
    assert float(stats.fraction) == pytest.approx(moved / total)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "element"])
def test_units_without_a_gradient_never_move(granularity):
    """The reference scores only parameters with a gradient in both models; a zero
    gradient here (an unused parameter) must not move even at threshold -1, where every
    scored unit does. Hand-made: `used` has gradients in both models, `unused_here` has
    none in the current model, `unused` none in either."""
    ones = jnp.ones((2, 3))
    current = {"used": ones, "unused_here": ones, "unused": ones}
    source = jax.tree.map(lambda x: 5 * x, current)
    grads = {"used": ones, "unused_here": jnp.zeros((2, 3)), "unused": jnp.zeros((2, 3))}
    grad_source = {"used": ones, "unused_here": ones, "unused": jnp.zeros((2, 3))}
    for step in (gj.merge_step, gj.random_merge_step):
        extra = {"key": jax.random.key(0)} if step is gj.random_merge_step else {}
        merged, stats = step(
            jax.tree.map(jnp.copy, current),
            source,
            grads,
            grad_source,
            threshold=-1.0,
            granularity=granularity,
            **extra,
        )
        np.testing.assert_array_equal(merged["used"], 5 * ones)  # cosine 1: moves
        np.testing.assert_array_equal(merged["unused_here"], ones)
        np.testing.assert_array_equal(merged["unused"], ones)
        assert int(stats.taken["unused"]) == int(stats.taken["unused_here"]) == 0
