"""The sequential GRASP driver against a hand-checked two-source run."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from grasp_jax import grasp, models, seeding
from grasp_jax import input_pipeline as ip
from grasp_jax.tree_checks import leaves_with_paths
from tests import numpy_reference as ref

PIPE = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
MERGE_ONLY = grasp.GraspConfig(
    initial_epochs=0, finetune_epochs=0, augment=False, alignment_current_mode="eval"
)


def variables(seed):
    return models.init("small_cnn", 10, jax.random.PRNGKey(seed), (1, 32, 32, 3))


def perturbed(base, scale, seed):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
    return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), base)


def expected_moves(model, current, source, batch, threshold):
    """Which leaves should move, from jax.grad of a loss written here and NumPy cosines."""

    def loss(params, stats):
        logits = model.apply({"params": params, "batch_stats": stats}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]
        ).mean()

    g_cur = jax.grad(loss)(current["params"], current["batch_stats"])
    g_src = jax.grad(loss)(source["params"], source["batch_stats"])
    moves = {}
    for (path, a), (_, b) in zip(
        leaves_with_paths(g_cur), leaves_with_paths(g_src), strict=True
    ):
        score = ref.cosine(np.asarray(a), np.asarray(b), "tensor")
        assert abs(score - threshold) > 1e-4, "too close to call; pick other seeds"
        moves[path] = bool(score > threshold)
    return moves


@pytest.fixture
def target(digits_dir):
    return tfds.data_source("digits_drift/d1", data_dir=str(digits_dir))


def test_two_sources_move_exactly_the_aligned_tensors(target):
    model = models.create("small_cnn", 10)
    current = variables(0)
    sources = {"near": perturbed(current, 0.02, 1), "far": variables(2)}
    loaded = []

    def loader(name):
        def load():
            loaded.append(name)
            return jax.tree.map(lambda x: jax.numpy.array(x, copy=True), sources[name])

        return load

    result = grasp.run_grasp(
        model,
        current,
        [(n, loader(n)) for n in sources],
        target,
        config=MERGE_ONLY,
        pipeline=PIPE,
        key=jax.random.PRNGKey(4),
        progress=False,
    )
    assert loaded == ["near", "far"]  # lazily, one source per stage, in order
    expected_state = current
    for stage, name in enumerate(sources, start=1):
        (batch,) = grasp.preprocess_alignment_batches(
            target["train"],
            PIPE,
            MERGE_ONLY,
            seeding.stream(jax.random.PRNGKey(4), "alignment", stage),
        )
        moves = expected_moves(model, expected_state, sources[name], batch, 0.3)
        stats = result.stages[stage]
        assert stats.fraction_by_layer == {p: float(m) for p, m in moves.items()}
        merged = {}
        for (path, cur), (_, src) in zip(
            leaves_with_paths(expected_state["params"]),
            leaves_with_paths(sources[name]["params"]),
            strict=True,
        ):
            merged[path] = np.asarray(src if moves[path] else cur)
        expected_state = {
            "params": jax.tree_util.tree_unflatten(
                jax.tree.structure(current["params"]), list(merged.values())
            ),
            "batch_stats": current["batch_stats"],
        }
    near_moves = result.stages[1].fraction_by_layer
    assert sum(near_moves.values()) > len(near_moves) / 2  # a near copy mostly agrees
    for (path, got), (_, want) in zip(
        leaves_with_paths(result.variables["params"]),
        leaves_with_paths(expected_state["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
    # BatchNorm statistics never transfer (eval-mode alignment leaves them as they were).
    jax.tree.map(
        np.testing.assert_array_equal,
        result.variables["batch_stats"],
        current["batch_stats"],
    )


@pytest.mark.parametrize(("threshold", "fraction"), [(-1.01, 1.0), (1.0, 0.0)])
def test_threshold_extremes_take_everything_or_nothing(target, threshold, fraction):
    model = models.create("small_cnn", 10)
    config = MERGE_ONLY.__class__(**{**MERGE_ONLY.__dict__, "threshold": threshold})
    source = variables(3)
    result = grasp.run_grasp(
        model,
        variables(0),
        [("s", lambda: variables(3))],
        target,
        config=config,
        pipeline=PIPE,
        key=jax.random.PRNGKey(0),
        progress=False,
    )
    assert result.stages[1].fraction == pytest.approx(fraction)
    expected = source if fraction else variables(0)
    jax.tree.map(
        np.testing.assert_array_equal, result.variables["params"], expected["params"]
    )


def test_train_mode_alignment_moves_the_current_batch_stats_as_the_reference(target):
    model = models.create("small_cnn", 10)
    config = MERGE_ONLY.__class__(
        **{**MERGE_ONLY.__dict__, "alignment_current_mode": "train"}
    )
    current = variables(0)
    result = grasp.run_grasp(
        model,
        current,
        [("s", lambda: variables(5))],
        target,
        config=config,
        pipeline=PIPE,
        key=jax.random.PRNGKey(0),
        progress=False,
    )
    moved = [
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(result.variables["batch_stats"]),
            jax.tree.leaves(current["batch_stats"]),
            strict=True,
        )
    ]
    assert all(moved)


def test_full_run_fine_tunes_and_records_every_stage(target):
    model = models.create("small_cnn", 10)
    config = grasp.GraspConfig(
        initial_epochs=1, finetune_epochs=1, learning_rate=1e-3, augment=False
    )
    result = grasp.run_grasp(
        model,
        variables(0),
        [("a", lambda: variables(1)), ("b", lambda: variables(2))],
        target,
        config=config,
        pipeline=PIPE,
        key=jax.random.PRNGKey(0),
        progress=False,
        first_name="first",
    )
    assert [s.source for s in result.stages] == ["first", "a", "b"]
    for stats in result.stages[1:]:
        assert 0.0 <= stats.fraction <= 1.0
        assert stats.val_accuracy_before_merge is not None
        assert stats.val_accuracy_after_merge is not None
        assert len(stats.history) == 1
    logits = grasp.predict(model, result.variables, target["test"], PIPE)["logits"]
    assert logits.shape == (len(target["test"]), 10) and np.isfinite(logits).all()


def test_alignment_batches_are_the_first_of_a_fresh_pass(target):
    batches = grasp.preprocess_alignment_batches(
        target["train"],
        PIPE,
        grasp.GraspConfig(num_alignment_batches=2, augment=False),
        jax.random.PRNGKey(0),
    )
    seed = seeding.int_seed(seeding.stream(jax.random.PRNGKey(0), "data"))
    raw = list(
        itertools.islice(iter(ip.dataset(target["train"], PIPE, train=True, seed=seed)), 2)
    )
    assert len(batches) == 2
    for got, want in zip(batches, raw, strict=True):
        np.testing.assert_allclose(
            got["image"], ip.normalize(want["image"], PIPE), rtol=1e-6
        )
