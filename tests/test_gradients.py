"""summed_gradients against hand-derived gradients."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj


def squared_error(params, batch, scale):
    x, y = batch
    prediction = x @ params["w"] + params["b"]
    return scale * jnp.mean((prediction - y) ** 2)


def test_sum_over_batches_matches_the_analytic_gradient():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    batches = [
        (
            rng.normal(size=(5, 3)).astype(np.float32),
            rng.normal(size=(5, 2)).astype(np.float32),
        )
        for _ in range(4)
    ]
    got = gj.summed_gradients(squared_error, params, iter(batches), 0.5)
    w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
    want_w, want_b = np.zeros((3, 2)), np.zeros(2)
    for x, y in batches:
        residual = x @ w + b - y  # d/dpred of 0.5 * mean(r**2) is r / r.size
        want_w += x.T @ residual / residual.size
        want_b += residual.sum(axis=0) / residual.size
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-5, atol=1e-6)


def dot_loss(params, batch):
    return jnp.sum(params["w"] * batch)


def test_accumulates_in_float32_for_bfloat16_parameters():
    # 512 gradients of 1.0: a bfloat16 running sum stalls at 256 (8 mantissa bits).
    params = {"w": jnp.zeros((2,), jnp.bfloat16)}
    got = gj.summed_gradients(dot_loss, params, [jnp.ones(2, jnp.bfloat16)] * 512)
    assert got["w"].dtype == jnp.float32
    np.testing.assert_array_equal(got["w"], 512.0)


def test_one_compilation_for_all_batches(compile_count):
    params = {"w": jnp.zeros(3)}
    batches = [jnp.full(3, float(i)) for i in range(5)]
    gj.summed_gradients(dot_loss, params, batches[:1])
    before = compile_count()
    gj.summed_gradients(dot_loss, params, batches)
    assert compile_count() == before


def test_params_are_not_donated():
    params = {"w": jnp.zeros(3)}
    gj.summed_gradients(dot_loss, params, [jnp.ones(3)])
    assert not params["w"].is_deleted()


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        gj.summed_gradients(dot_loss, {"w": jnp.zeros(3)}, [])
