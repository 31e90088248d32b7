"""Runs one small `train.fit` and saves its result; started in a subprocess by the tests
so that the device count (XLA_FLAGS) or distributed setup can differ from pytest's."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(
    data_dir: str, start: str, out: str, epochs: str, process: str = "", port: str = ""
) -> None:
    """Trains from `start` (`tests.worker_files`, seed 0) on bin d0."""
    if process:  # one of two local processes, on JAX's own distributed runtime
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{port}", num_processes=2, process_id=int(process)
        )
        out = f"{out}.{process}"
    import tensorflow_datasets as tfds

    from grasp_jax import input_pipeline as ip
    from grasp_jax import loop, models, recipe
    from tests import worker_files

    data = tfds.data_source("digits_drift/d0", data_dir=data_dir)
    module = models.create("small_cnn", 10)
    variables = worker_files.load_start(start)[0]
    pipeline = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
    result = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=recipe.TrainConfig(epochs=int(epochs), learning_rate=3e-3, augment=False),
        pipeline=pipeline,
        seed=3,
        progress=False,
    )
    leaves = {
        str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.variables))
    }
    # One batch's gradients and BatchNorm statistics, the batch sharded over all devices.
    from grasp_jax import objective

    replicated, batch_sharding = ip.data_parallel()
    batch = next(iter(ip.dataset(data["train"], pipeline, train=True, seed=0)))
    batch = ip.shard_batch(batch, batch_sharding)
    inputs = dict(batch, image=ip.normalize(batch["image"], pipeline))
    grads, (stats, _) = jax.jit(
        jax.grad(objective.loss_fn(module, train=True), has_aux=True)
    )(
        jax.device_put(variables["params"], replicated),
        jax.device_put(variables["batch_stats"], replicated),
        dict(inputs, rng=jax.random.PRNGKey(0)),
    )
    for i, x in enumerate(jax.tree.leaves((grads, stats))):
        leaves[f"step{i}"] = np.asarray(x)
    np.savez(out, **leaves)
    with open(out + ".json", "w") as f:
        json.dump(
            {
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "history": result.history,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
