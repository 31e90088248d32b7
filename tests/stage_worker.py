"""One of two local processes (2 CPU devices each, gloo collectives): a GRASP stage of
the library on small_cnn sharded FSDP-style over all 4 devices, so each parameter is
split across both processes. Checks the merged model against the same stage on one
local device and writes `<out>.<process>.json`; started by tests/test_data_parallel.py."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(data_dir: str, out: str, process: str, port: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}", num_processes=2, process_id=int(process)
    )
    import tensorflow_datasets as tfds
    from jax.experimental import multihost_utils

    from grasp_jax import grasp, models, sharding
    from grasp_jax import input_pipeline as ip

    pipeline = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
    splits = tfds.data_source("digits_drift/d1", data_dir=data_dir)
    config = grasp.GraspConfig(num_alignment_batches=2, threshold=0.0)
    steps = grasp.default_steps(
        models.create("small_cnn", 10), splits, config=config, pipeline=pipeline
    )
    current, source = (
        jax.tree.map(
            np.asarray, models.init("small_cnn", 10, jax.random.PRNGKey(s), (1, 32, 32, 3))
        )
        for s in (0, 1)
    )
    key = jax.random.PRNGKey(3)
    batches = steps.alignment_batches(key)
    mesh = sharding.model_mesh(4)
    merged, stats = steps.stage(
        sharding.shard_model(current, mesh),
        sharding.shard_model(source, mesh),
        batches,
        key,
        key,
    )
    spans = {
        d.process_index
        for x in jax.tree.leaves(merged["params"])
        for d in x.sharding.device_set
    }
    split = sum(
        len(x.addressable_shards) < len(x.sharding.device_set)
        for x in jax.tree.leaves(merged["params"])
    )
    here = jax.local_devices()[0]
    want, want_stats = steps.stage(
        jax.device_put(current, here), jax.device_put(source, here), batches, key, key
    )
    got = multihost_utils.process_allgather(merged, tiled=True)
    same_params = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]), strict=True
        )
    )
    stats_error = max(
        float(np.max(np.abs(a - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(got["batch_stats"]),
            jax.tree.leaves(want["batch_stats"]),
            strict=True,
        )
    )
    with open(f"{out}.{process}.json", "w") as f:
        json.dump(
            {
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "processes_per_parameter": len(spans),
                "split_across_processes": split,
                "fraction": float(stats.fraction),
                "one_device_fraction": float(want_stats.fraction),
                "same_params": same_params,
                "batch_stats_max_error": stats_error,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
