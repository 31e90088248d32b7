"""The sequential GRASP driver against a hand-checked two-source run."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from grasp_jax import evaluation, grasp, models, seeding
from grasp_jax import input_pipeline as ip
from grasp_jax.tree_checks import leaves_with_paths
from tests import numpy_reference as ref

PIPE = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
MERGE_ONLY = grasp.GraspConfig(
    initial_epochs=0, finetune_epochs=0, augment=False, alignment_current_mode="eval"
)


def library_steps(model, splits, config):
    return grasp.default_steps(model, splits, config=config, pipeline=PIPE, progress=False)


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
def splits(digits_dir):
    return tfds.data_source("digits_drift/d1", data_dir=str(digits_dir))


def test_two_sources_move_exactly_the_aligned_tensors(splits):
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
        current,
        [(n, loader(n)) for n in sources],
        library_steps(model, splits, MERGE_ONLY),
        config=MERGE_ONLY,
        key=jax.random.PRNGKey(5),
    )
    assert loaded == ["near", "far"]  # lazily, one source per stage, in order
    expected_state = current
    for stage, name in enumerate(sources, start=1):
        (batch,) = grasp.alignment_batches(
            splits["train"],
            PIPE,
            MERGE_ONLY,
            seeding.stream(jax.random.PRNGKey(5), "alignment", stage),
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


@pytest.mark.parametrize(("threshold", "fraction"), [(-1.0, 1.0), (1.0, 0.0)])
def test_threshold_extremes_take_everything_or_nothing(splits, threshold, fraction):
    model = models.create("small_cnn", 10)
    config = MERGE_ONLY.__class__(**{**MERGE_ONLY.__dict__, "threshold": threshold})
    source = variables(3)
    result = grasp.run_grasp(
        variables(0),
        [("s", lambda: variables(3))],
        library_steps(model, splits, config),
        config=config,
        key=jax.random.PRNGKey(0),
    )
    assert result.stages[1].fraction == pytest.approx(fraction)
    expected = source if fraction else variables(0)
    jax.tree.map(
        np.testing.assert_array_equal, result.variables["params"], expected["params"]
    )


def test_no_alignment_batches_moves_nothing_and_never_reads_the_source(splits):
    """As the reference: zero batches give no scores, so even threshold -1 moves nothing."""
    model = models.create("small_cnn", 10)
    fields = {**MERGE_ONLY.__dict__, "threshold": -1.0, "num_alignment_batches": 0}
    config = MERGE_ONLY.__class__(**fields)

    def never_loaded():
        raise AssertionError("the source was read")

    result = grasp.run_grasp(
        variables(0),
        [("s", never_loaded)],
        library_steps(model, splits, config),
        config=config,
        key=jax.random.PRNGKey(0),
    )
    assert result.stages[1].fraction == 0.0 and result.stages[1].n_transferred == 0
    assert set(result.stages[1].fraction_by_layer.values()) == {0.0}
    jax.tree.map(np.testing.assert_array_equal, result.variables, variables(0))


def test_train_mode_alignment_moves_the_current_batch_stats_as_the_reference(splits):
    model = models.create("small_cnn", 10)
    config = MERGE_ONLY.__class__(
        **{**MERGE_ONLY.__dict__, "alignment_current_mode": "train"}
    )
    current = variables(0)
    result = grasp.run_grasp(
        current,
        [("s", lambda: variables(5))],
        library_steps(model, splits, config),
        config=config,
        key=jax.random.PRNGKey(0),
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


def test_full_run_fine_tunes_and_records_every_stage(splits):
    model = models.create("small_cnn", 10)
    config = grasp.GraspConfig(
        initial_epochs=1, finetune_epochs=1, learning_rate=1e-3, augment=False
    )
    result = grasp.run_grasp(
        variables(0),
        [("a", lambda: variables(1)), ("b", lambda: variables(2))],
        library_steps(model, splits, config),
        config=config,
        key=jax.random.PRNGKey(0),
        first_name="first",
    )
    assert [s.source for s in result.stages] == ["first", "a", "b"]
    for stats in result.stages[1:]:
        assert 0.0 <= stats.fraction <= 1.0
        assert stats.val_accuracy_before_merge is not None
        assert stats.val_accuracy_after_merge is not None
        assert len(stats.history) == 1
    logits = evaluation.predict(model, result.variables, splits["test"], PIPE)["logits"]
    assert logits.shape == (len(splits["test"]), 10) and np.isfinite(logits).all()


def test_alignment_batches_are_the_first_of_a_fresh_pass(splits):
    batches = grasp.alignment_batches(
        splits["train"],
        PIPE,
        grasp.GraspConfig(num_alignment_batches=2, augment=False),
        jax.random.PRNGKey(0),
    )
    seed = seeding.int_seed(seeding.stream(jax.random.PRNGKey(0), "data"))
    raw = list(
        itertools.islice(iter(ip.dataset(splits["train"], PIPE, train=True, seed=seed)), 2)
    )
    assert len(batches) == 2
    for got, want in zip(batches, raw, strict=True):
        np.testing.assert_allclose(
            got["image"], ip.normalize(want["image"], PIPE), rtol=1e-6
        )


def test_stages_run_in_the_reference_order_from_the_right_state():
    """Spies on every step: fine-tune, then per source: align (current, train mode;
    source, eval mode), merge, fine-tune the merged model; each from the last result."""
    calls = []
    sources = {"a": 10.0, "b": 20.0}

    def model_vars(w):
        return {"params": {"w": np.full(3, w, np.float32)}, "batch_stats": {"n": w}}

    keys = []

    def finetune(variables, epochs, key, label):
        w = float(variables["params"]["w"][0])
        calls.append(("finetune", w, epochs, label))
        keys.append(key)
        return grasp.FineTuned(model_vars(w + 1), best_val_accuracy=w, history=[{"w": w}])

    def validate(variables):  # a "validation accuracy" that names the model
        return float(variables["params"]["w"][0]) / 100

    def gradients(variables, batches, train_mode):
        w = float(variables["params"]["w"][0])
        calls.append(("gradients", w, train_mode, tuple(batches)))
        # Equal gradient directions: everything transfers at threshold 0.3.
        return {"w": np.ones(3, np.float32)}, {"n": -w}

    def load(name):
        def restore():
            calls.append(("load", name))
            return model_vars(sources[name])

        return restore

    steps = grasp.GraspSteps(
        finetune=finetune,
        alignment_batches=lambda key: (int(key[-1]),),
        gradients=gradients,
        validate=validate,
    )
    config = grasp.GraspConfig(initial_epochs=2, finetune_epochs=1)
    result = grasp.run_grasp(
        model_vars(0.0),
        [(n, load(n)) for n in sources],
        steps,
        config=config,
        key=jax.random.PRNGKey(0),
        first_name="first",
    )
    batch = {
        s: (int(seeding.stream(jax.random.PRNGKey(0), "alignment", s)[-1]),) for s in (1, 2)
    }
    assert calls == [
        ("finetune", 0.0, 2, "grasp stage 0 (first)"),
        ("gradients", 1.0, True, batch[1]),  # the fine-tuned model, train mode
        ("load", "a"),  # the source is restored only after the current model's pass
        ("gradients", 10.0, False, batch[1]),
        ("finetune", 10.0, 1, "grasp stage 1 (a)"),  # the merged model: all of source a
        ("gradients", 11.0, True, batch[2]),
        ("load", "b"),
        ("gradients", 20.0, False, batch[2]),
        ("finetune", 20.0, 1, "grasp stage 2 (b)"),
    ]
    np.testing.assert_array_equal(result.variables["params"]["w"], 21.0)
    # BatchNorm statistics: the current model's after its own alignment pass, never the
    # source's, then whatever fine-tuning made of them.
    assert [s.val_accuracy_after_finetune for s in result.stages] == [0.0, 10.0, 20.0]
    assert [s.fraction for s in result.stages[1:]] == [1.0, 1.0]
    # each stage fine-tunes with its own key, stream(key, "finetune", stage)
    for stage, key in enumerate(keys):
        expected = seeding.stream(jax.random.PRNGKey(0), "finetune", stage)
        np.testing.assert_array_equal(key, expected)
    # validation before and after each merge: the fine-tuned, then the merged model
    assert [
        (s.val_accuracy_before_merge, s.val_accuracy_after_merge) for s in result.stages[1:]
    ] == [(0.01, 0.1), (0.11, 0.2)]
    assert [s.source for s in result.stages] == ["first", "a", "b"]
    assert [s.history for s in result.stages] == [
        [{"w": 0.0}],
        [{"w": 10.0}],
        [{"w": 20.0}],
    ]


def test_merged_batch_stats_are_the_current_models_after_alignment():
    kept = []

    def finetune(variables, epochs, key, label):
        kept.append(variables["batch_stats"])
        return grasp.FineTuned(variables)

    steps = grasp.GraspSteps(
        finetune=finetune,
        alignment_batches=lambda key: [None],
        gradients=lambda v, b, train_mode: (
            {"w": np.ones(2, np.float32)},
            {"mean": v["batch_stats"]["mean"] + (100 if train_mode else 1000)},
        ),
    )
    start = {"params": {"w": np.zeros(2, np.float32)}, "batch_stats": {"mean": 1.0}}
    source = {"params": {"w": np.ones(2, np.float32)}, "batch_stats": {"mean": 7.0}}
    grasp.run_grasp(
        start,
        [("s", lambda: source)],
        steps,
        config=grasp.GraspConfig(initial_epochs=1, finetune_epochs=1),
        key=jax.random.PRNGKey(0),
    )
    assert kept == [{"mean": 1.0}, {"mean": 101.0}]


def test_the_readme_example_runs_as_written():
    """The README's "GRASP in your own training loop" block, executed verbatim."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- own-loop-example -->")[1].split("```python")[1]
    code = block.split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert [s.source for s in result.stages] == ["source_0", "s1", "s2"]
    assert all(0.0 <= s.fraction <= 1.0 for s in result.stages[1:])
