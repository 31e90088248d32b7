"""FLOPs from XLA's cost analysis of the steps' programs, not hand-written layer hooks
(the reference's hooks miscount depthwise convolutions and attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grasp_jax import input_pipeline as ip
from grasp_jax import recipe, train
from grasp_jax.merge import merge_step


def cost_analysis(lowered) -> dict:
    """XLA's cost analysis of the compiled program (what runs: bytes accessed after
    fusion)."""
    return _first(lowered.compile().cost_analysis())


def lowered_flops(lowered) -> float:
    """FLOPs of one call of a lowered program: XLA's count before it optimises the
    program, which needs no compilation (compiling small_cnn's train step for the count
    took 2.8 s on a 2-core CPU, ResNet-50's at 64 px 11 s; the two counts differ by
    1-2 %). A platform that cannot count a lowered program compiles it."""
    analysis = _first(lowered.cost_analysis()) or cost_analysis(lowered)
    return float(analysis.get("flops", 0.0))


def _first(analysis):
    return analysis[0] if isinstance(analysis, list) else analysis  # some versions wrap it


def step_flops(model, abstract_variables: dict, pipeline: ip.PipelineConfig) -> dict:
    """FLOPs of one training step and one evaluation step on a full batch."""
    tx = recipe.make_optimizer(recipe.TrainConfig(augment=False), 1)
    state = jax.eval_shape(lambda v: train.create_train_state(v, tx, 0), abstract_variables)
    n, size = pipeline.batch_size, pipeline.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32),
    }
    eval_batch = dict(batch, valid=jax.ShapeDtypeStruct((n,), jnp.float32))
    statics = {"model": model, "pipeline": pipeline}
    train_lowered = train.train_step.lower(state, batch, augment=False, **statics)
    eval_lowered = train.eval_step.lower(state.variables, eval_batch, **statics)
    return {
        "train_step": lowered_flops(train_lowered),
        "eval_step": lowered_flops(eval_lowered),
        "batch_size": n,
        "params": sum(x.size for x in jax.tree.leaves(abstract_variables["params"])),
    }


def merge_flops(abstract_params, granularity: str = "tensor", mode: str = "hard") -> float:
    """FLOPs of one `merge_step` on trees of these shapes (its compiled program)."""
    lowered = merge_step.lower(
        *[abstract_params] * 4, threshold=0.3, granularity=granularity, mode=mode
    )
    return lowered_flops(lowered)
