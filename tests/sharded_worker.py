"""Run with 8 forced CPU devices: the kernels, a GRASP stage, `train_step` and `loop.fit`
on a model sharded FSDP-style over 4 "model" devices (x 2 "data") keep every parameter's
sharding and give the one-device results. Asserts; exit status 0 means all held. The
stage's result is written to a file: the test compares it with the one-device stage it
computes once for this and tests/stage_worker.py."""

from __future__ import annotations

import sys

import jax
import numpy as np
import tensorflow_datasets as tfds

import grasp_jax as gj
from grasp_jax import input_pipeline as ip
from grasp_jax import loop, models, recipe, sharding, train
from tests import stage_worker, worker_files

PIPE = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)


def on_one_device(tree):
    """A fresh copy on the first device (merges donate their first argument)."""
    return jax.device_put(jax.tree.map(np.array, tree), jax.devices()[0])


def assert_same_shardings(got, want, what):
    for (path, a), (_, b) in zip(
        gj.tree_checks.leaves_with_paths(got),
        gj.tree_checks.leaves_with_paths(want),
        strict=True,
    ):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), f"{what}: {path}"


def close(got, want, what, **tolerance):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, err_msg=what, **tolerance), got, want
    )


def main(data_dir: str, start: str, out: str) -> None:
    """`start`: the file of `tests.worker_files`; the stage's result goes to `out`."""
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.model_mesh(4)
    steps, current, source, batches, key = stage_worker.stage_inputs(data_dir, start)
    sharded = [sharding.shard_model(v, mesh) for v in (current, source)]
    split = [
        leaf
        for leaf in jax.tree.leaves(sharded[0]["params"])
        if len(leaf.sharding.spec) and any(leaf.sharding.spec)
    ]
    assert len(split) >= 4, "the test model must really be split"

    # merge_step, top level and inside a jit: shardings kept, one-device values
    rng = np.random.default_rng(0)
    g_cur = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), current["params"]
    )
    g_src = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), g_cur)
    g_sharded = [sharding.shard_model(g, mesh) for g in (g_cur, g_src)]
    for granularity, mode in (("tensor", "hard"), ("channel", "soft")):
        kwargs = {"threshold": 0.7, "granularity": granularity, "mode": mode}
        want, want_stats = gj.merge_step(
            on_one_device(current["params"]),
            on_one_device(source["params"]),
            on_one_device(g_cur),
            on_one_device(g_src),
            **kwargs,
        )
        copy = jax.tree.map(lambda x: x.copy(), sharded[0]["params"])
        got, stats = gj.merge_step(copy, sharded[1]["params"], *g_sharded, **kwargs)
        assert_same_shardings(got, sharded[0]["params"], f"merge_step {granularity}")
        # hard: the same copies; soft: blend weights from scores that a sharded sum
        # rounds differently
        close(
            got,
            want,
            f"merge_step {granularity}/{mode}",
            rtol=0,
            atol=0 if mode == "hard" else 1e-5,
        )
        assert 0 < float(want_stats.fraction) < 1
        assert abs(float(stats.fraction) - float(want_stats.fraction)) < 1e-6

    # one GRASP stage of the library (train-mode alignment, BatchNorm threaded): the
    # test compares it with the one-device stage
    got, stats = steps.stage(
        jax.tree.map(lambda x: x.copy(), sharded[0]), source, batches, key, key
    )
    assert_same_shardings(got, sharded[0], "stage")
    worker_files.save_tree(out, {"variables": got, "scores": stats.scores})

    # train_step and loop.fit keep the layout
    splits = tfds.data_source("digits_drift/d1", data_dir=data_dir)
    tx = recipe.make_optimizer(recipe.TrainConfig(augment=False), 10)
    state = train.create_train_state(jax.tree.map(lambda x: x.copy(), sharded[0]), tx, 0)
    batch = next(iter(ip.dataset(splits["train"], PIPE, train=True, seed=0)))
    model = models.create("small_cnn", 10)
    new_state, _ = train.train_step(state, batch, model=model, pipeline=PIPE, augment=False)
    assert_same_shardings(new_state.params, sharded[0]["params"], "train_step")
    fit_config = recipe.fine_tuning(2, 1e-3, 0.01, False)
    sharded_fit = loop.fit(
        model,
        sharded[0],
        splits["train"],
        splits["validation"],
        config=fit_config,
        pipeline=PIPE,
        progress=False,
    )
    replicated_fit = loop.fit(
        model,
        current,
        splits["train"],
        splits["validation"],
        config=fit_config,
        pipeline=PIPE,
        progress=False,
    )
    assert_same_shardings(sharded_fit.variables, sharded[0], "loop.fit")
    for a, b in zip(sharded_fit.history, replicated_fit.history, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3, (a, b)
        assert a["val_accuracy"] == b["val_accuracy"], (a, b)
    print("sharded: all checks held")


if __name__ == "__main__":
    main(*sys.argv[1:])
