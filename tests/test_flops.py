"""FLOPs accounting: XLA's count of known programs, and no compilation spent on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grasp_jax import flops, models
from grasp_jax import input_pipeline as ip


def test_a_matrix_product_counts_two_flops_per_multiply_add():
    lowered = jax.jit(jnp.matmul).lower(jnp.ones((8, 16)), jnp.ones((16, 4)))
    assert flops.lowered_flops(lowered) == 2 * 8 * 16 * 4


def test_counting_a_models_steps_compiles_nothing(compile_count):
    """The runner counts every experiment's steps before it runs them: compiling the
    programs only to count them cost seconds an experiment (minutes on a GPU)."""
    model = models.create("small_cnn", 10)
    abstract = jax.eval_shape(
        lambda: models.init("small_cnn", 10, jax.random.key(0), (1, 16, 16, 3))
    )
    pipeline = ip.PipelineConfig(resize_size=16, crop_size=16, batch_size=4)
    before = compile_count()
    step = flops.step_flops(model, abstract, pipeline)
    merge = flops.merge_flops(abstract["params"])
    assert compile_count() == before
    # a train step is a forward and a backward pass: 2-4 forwards
    assert 2 * step["eval_step"] < step["train_step"] < 4 * step["eval_step"]
    assert merge > 0
