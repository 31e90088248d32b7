"""FLOPs from XLA's cost analysis of the compiled steps, not hand-written layer hooks
(the reference's hooks miscount depthwise convolutions and attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grasp_jax import input_pipeline as ip
from grasp_jax import train


def cost_analysis(lowered) -> dict:
    """XLA's cost analysis of a lowered program (some versions wrap it in a list)."""
    analysis = lowered.compile().cost_analysis()
    return analysis[0] if isinstance(analysis, list) else analysis


def compiled_flops(jitted, *args) -> float:
    """FLOPs of one call of `jitted` on (abstract) `args`, per XLA."""
    return float(cost_analysis(jitted.lower(*args)).get("flops", 0.0))


def step_flops(model, abstract_variables: dict, pipeline: ip.PipelineConfig) -> dict:
    """FLOPs of one training step and one evaluation step on a full batch."""
    config = train.TrainConfig(augment=False)
    tx = train.make_optimizer(config, 1)
    state = jax.eval_shape(lambda v: train.create_train_state(v, tx, 0), abstract_variables)
    n, size = pipeline.batch_size, pipeline.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32),
    }
    eval_batch = dict(batch, valid=jax.ShapeDtypeStruct((n,), jnp.float32))
    return {
        "train_step": compiled_flops(
            train._train_step, model, pipeline, config, 1, state, batch
        ),
        "eval_step": compiled_flops(train._eval_step, model, pipeline, state, eval_batch),
        "batch_size": n,
        "params": sum(x.size for x in jax.tree.leaves(abstract_variables["params"])),
    }


def merge_flops(abstract_params) -> float:
    """FLOPs of one `merge_step` on trees of these shapes (tensor, hard)."""
    from grasp_jax.merge import _merge_program

    lowered = _merge_program.lower(
        *[abstract_params] * 4, 0.3, 1e-8, granularity="tensor", mode="hard"
    )
    return float(cost_analysis(lowered).get("flops", 0.0))
