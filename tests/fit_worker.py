"""Runs one small `train.fit` and saves its result; started in a subprocess by the tests
so that the device count (XLA_FLAGS) or distributed setup can differ from pytest's."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(data_dir: str, out: str, epochs: str, process: str = "", port: str = "") -> None:
    if process:  # one of two local processes, on JAX's own distributed runtime
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{port}", num_processes=2, process_id=int(process)
        )
        out = f"{out}.{process}"
    import tensorflow_datasets as tfds

    from grasp_jax import input_pipeline as ip
    from grasp_jax import loop, models, recipe

    data = tfds.data_source("digits_drift/d0", data_dir=data_dir)
    module = models.create("small_cnn", 10)
    variables = models.init("small_cnn", 10, jax.random.PRNGKey(0), (1, 32, 32, 3))
    result = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=recipe.TrainConfig(epochs=int(epochs), learning_rate=3e-3, augment=False),
        pipeline=ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32),
        seed=3,
        progress=False,
    )
    leaves = {
        str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.variables))
    }
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
