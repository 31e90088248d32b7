"""One of two local processes (2 CPU devices each, gloo collectives): a GRASP stage of
the library on small_cnn sharded FSDP-style over all 4 devices, so each parameter is
split across both processes. Writes the merged model, gathered, to `<out>.<process>.npz`
and what it saw to `<out>.<process>.json`; tests/test_data_parallel.py compares them
with the same stage on one device (`stage_inputs` makes both sides' inputs)."""

from __future__ import annotations

import json
import sys

import jax


def stage_inputs(data_dir: str, start: str):
    """(steps, current, source, batches, key) of the stage: small_cnn's two start
    models (`tests.worker_files`) and two alignment batches of bin d1."""
    import tensorflow_datasets as tfds

    from grasp_jax import grasp, models
    from grasp_jax import input_pipeline as ip
    from tests import worker_files

    pipeline = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
    splits = tfds.data_source("digits_drift/d1", data_dir=data_dir)
    config = grasp.GraspConfig(num_alignment_batches=2, threshold=0.0)
    steps = grasp.default_steps(
        models.create("small_cnn", 10), splits, config=config, pipeline=pipeline
    )
    starts = worker_files.load_start(start)
    current, source = starts[0], starts[1]
    key = jax.random.PRNGKey(3)
    return steps, current, source, steps.alignment_batches(key), key


def main(data_dir: str, start: str, out: str, process: str, port: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}", num_processes=2, process_id=int(process)
    )
    from jax.experimental import multihost_utils

    from grasp_jax import sharding
    from tests import worker_files

    steps, current, source, batches, key = stage_inputs(data_dir, start)
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
    got = multihost_utils.process_allgather(merged, tiled=True)
    worker_files.save_tree(f"{out}.{process}.npz", got)
    with open(f"{out}.{process}.json", "w") as f:
        json.dump(
            {
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "processes_per_parameter": len(spans),
                "split_across_processes": split,
                "fraction": float(stats.fraction),
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
