"""FLOPs accounting: XLA's count of known programs, no compilation spent on it, and the
baselines' reports from those counts, by hand."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import digits
from experiments.flops_report import StepCosts
from experiments.methods import ensembles, fusion, pearl
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


def fake_run(train_epochs: int, **extra):
    """A (target, trial) of 95 train, 23 validation and 41 test images in batches of
    10 (9 full train batches; 3 and 5 evaluation batches, the last ones partial), two
    sources, ten classes, and a run that trained `train_epochs` epochs."""
    config = digits.get_config()
    ctx = types.SimpleNamespace(
        config=config,
        pipeline=types.SimpleNamespace(batch_size=10),
        splits={"train": range(95), "validation": range(23), "test": range(41)},
        source_bins=["d0", "d1"],
    )
    result = types.SimpleNamespace(train_epochs=train_epochs, extra=extra)
    return ctx, result


def rounded(expected):
    """Equal up to float rounding (a relative 1e-12: a figure divided by 1e9 + 1 instead
    of 1e9 is off by 1e-9)."""
    return pytest.approx(expected, rel=1e-12, abs=0)


# 3 GFLOP a train step, 1 an evaluation batch of 10
COSTS = StepCosts(train_step=3e9, eval_step=1e9, batch_size=10, params=2e6, merge=0.0)


def test_the_ensembles_flops_by_hand():
    ctx, result = fake_run(0)
    soft = ensembles.ensemble_flops(ctx, result, COSTS, voting="soft")
    # two sources over 3 + 5 evaluation batches; one sum per logit: 2 x 10 x (23 + 41)
    assert soft["evaluation_gflops"] == 16.0
    assert soft["combination_gflops"] == rounded(1280e-9)
    assert soft["softmax_gflops"] == 0.0
    assert soft["total_gflops"] == rounded(16 + 1280e-9)
    assert soft["single_model_inference_gflops"] == rounded(0.1)
    assert soft["val_inference_gflops"] == rounded(2 * 0.1 * 23)
    assert soft["test_inference_gflops"] == rounded(2 * 0.1 * 41)
    assert (soft["n_val_samples"], soft["n_test_samples"], soft["n_sources"]) == (23, 41, 2)
    assert soft["training_gflops"] == 0.0 and soft["method"] == "ensemble"
    assert soft["breakdown"] == rounded(
        {
            "val_inference_percent": 100 * 4.6 / soft["total_gflops"],
            "test_inference_percent": 100 * 8.2 / soft["total_gflops"],
            "combination_percent": 100 * 1280e-9 / soft["total_gflops"],
        }
    )
    prob = ensembles.ensemble_flops(ctx, result, COSTS, voting="prob")
    assert prob["softmax_gflops"] == rounded(3 * 1280e-9)  # ~3 FLOPs a logit
    assert prob["total_gflops"] == rounded(16 + 4 * 1280e-9)
    assert prob["voting"] == ensembles.VOTING["prob"]
    # a million classes, where combining the logits is a share of the total that
    # rounding does not hide
    ctx.config.num_classes = 10**6
    wide = ensembles.ensemble_flops(ctx, result, COSTS, voting="soft")
    assert wide["total_gflops"] == rounded(16 + 2 * 10**6 * 64 / 1e9)


def test_fusions_flops_by_hand():
    """K = 2 models in every step, 3 epochs, plus one sum per logit of every image
    each epoch trains and validates on, and of the final evaluation."""
    ctx, result = fake_run(3, num_source_models=2)
    out = fusion.fusion_flops(ctx, result, COSTS)
    assert out["training_gflops"] == out["finetune_gflops"] == 3 * 9 * 2 * 3  # 162
    assert out["evaluation_gflops"] == (3 * 3 + 3 + 5) * 2 * 1  # 34
    logits = 2 * 10 * (3 * (95 + 23) + 23 + 41)
    assert out["fusion_gflops"] == rounded(logits / 1e9)
    assert out["total_gflops"] == rounded(196 + logits / 1e9)
    assert out["single_model_inference_gflops"] == rounded(0.1)
    assert out["val_inference_gflops"] == rounded(4.6)
    assert out["test_inference_gflops"] == rounded(8.2)
    assert (out["finetune_epochs"], out["method"], out["n_sources"]) == (3, "FUSION", 2)
    assert (out["n_train_samples"], out["n_val_samples"], out["n_test_samples"]) == (
        95, 23, 41
    )  # fmt: skip
    assert out["breakdown"] == rounded(
        {
            "fusion_percent": 100 * (logits / 1e9) / out["total_gflops"],
            "finetune_percent": 100 * 162 / out["total_gflops"],
            "inference_percent": 100 * 34 / out["total_gflops"],
        }
    )
    ctx.config.num_classes = 10**6  # averaging the logits a visible share of the total
    wide = fusion.fusion_flops(ctx, result, COSTS)
    assert wide["total_gflops"] == rounded(196 + 2 * 10**6 * 418 / 1e9)


def test_pearls_flops_by_hand():
    """Two adapter sets of 3 epochs each and 3 composition epochs: 9 epochs of the
    base model's train step, two thirds of them the adapters'."""
    ctx, result = fake_run(9, adapter_params_per_source=4608, n_adapted_layers=2)
    ctx.config.pearl.update(adapter_epochs=3, composition_epochs=3, rank=16)
    out = pearl.pearl_flops(ctx, result, COSTS)
    assert out["training_gflops"] == 9 * 9 * 3  # 243
    assert out["adapter_training_gflops"] == 81
    assert out["adapter_training_gflops_total"] == 162
    assert out["composition_learning_gflops"] == 81
    assert out["total_gflops"] == 243 + (9 * 3 + 3 + 5)  # 278
    assert out["adapter_params_millions"] == rounded(2 * 4608 / 1e6)
    assert (out["adapter_params_per_source"], out["lora_rank"]) == (4608, 16)
    assert (out["n_adapted_layers"], out["method"]) == (2, "PEARL")
    assert out["breakdown"] == rounded(
        {
            "adapter_training_percent": 100 * 162 / 278,
            "composition_learning_percent": 100 * 81 / 278,
        }
    )
