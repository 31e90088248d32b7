"""The sequential GRASP driver against a hand-checked two-source run."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import grasp_jax as gj
from grasp_jax import evaluation, grasp, models, seeding
from grasp_jax import input_pipeline as ip
from grasp_jax.merge import MergeStats
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
        batches = grasp.alignment_batches(
            splits["train"],
            PIPE,
            MERGE_ONLY,
            seeding.stream(jax.random.PRNGKey(5), "alignment", stage),
        )
        batch = {
            "image": ip.normalize(batches["image"][0], PIPE),  # augment=False
            "label": batches["label"][0],
        }
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
    """The first batches of a shuffled training pass seeded by the stage key's "data"
    stream, stacked raw (uint8): the stage program preprocesses them."""
    key = jax.random.PRNGKey(3)
    batches = grasp.alignment_batches(
        splits["train"], PIPE, grasp.GraspConfig(num_alignment_batches=2), key
    )
    seed = seeding.int_seed(seeding.stream(key, "data"))
    raw = list(
        itertools.islice(iter(ip.dataset(splits["train"], PIPE, train=True, seed=seed)), 3)
    )
    in_order = next(iter(ip.dataset(splits["train"], PIPE, train=False)))
    assert not np.array_equal(raw[0]["label"], in_order["label"][: PIPE.batch_size])
    assert set(batches) == {"image", "label"} and batches["image"].dtype == np.uint8
    assert batches["image"].shape == (2, PIPE.batch_size, 32, 32, 3)
    for i, want in enumerate(raw[:2]):
        np.testing.assert_array_equal(batches["image"][i], want["image"])
        np.testing.assert_array_equal(batches["label"][i], want["label"])


def test_alignment_batches_refuse_a_split_without_a_full_batch():
    rows = [{"image": np.zeros((32, 32, 3), np.uint8), "label": 0}] * 5
    with pytest.raises(ValueError, match="5 training examples make no alignment batch"):
        grasp.alignment_batches(rows, PIPE, grasp.GraspConfig(), jax.random.PRNGKey(0))


def _hand_written_gradients(model, variables, images, labels, train, dropout_keys):
    """Sum over batches of jax.grad of a cross-entropy written here (BatchNorm statistics
    threaded in train mode), and the statistics after the last batch."""
    params, stats = variables["params"], variables["batch_stats"]
    total = jax.tree.map(np.zeros_like, params)
    for image, label, rng in zip(images, labels, dropout_keys, strict=True):

        def loss(p, stats=stats, image=image, label=label, rng=rng):
            if not train:
                logits = model.apply({"params": p, "batch_stats": stats}, image)
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, label
                ).mean(), stats
            logits, new = model.apply(
                {"params": p, "batch_stats": stats},
                image,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
            return ce, new["batch_stats"]

        grads, stats = jax.grad(loss, has_aux=True)(params)
        total = jax.tree.map(lambda t, g: t + np.asarray(g, np.float64), total, grads)
    return total, stats


@pytest.mark.parametrize("augment", [False, True])
def test_the_library_stage_scores_both_models_on_the_same_prepared_batches(splits, augment):
    """`default_steps`' stage, one program: batch i augmented with its stage key's
    ("augment", i) stream and dropped out with ("dropout", i), the current model in train
    mode (its statistics threaded), the source in eval mode; scores and moves against
    gradients written here and NumPy cosines."""
    model = models.create("small_cnn", 10)
    config = grasp.GraspConfig(num_alignment_batches=2, augment=augment, threshold=0.0)
    steps = library_steps(model, splits, config)
    key = jax.random.PRNGKey(3)
    batches = steps.alignment_batches(key)
    current, source = variables(0), perturbed(variables(0), 0.05, 1)
    images = []
    for i in range(2):
        raw = batches["image"][i]
        images.append(
            ip.augment(seeding.stream(key, "augment", i), raw, PIPE)
            if augment
            else ip.normalize(raw, PIPE)
        )
    dropout = [seeding.stream(key, "dropout", i) for i in range(2)]
    g_cur, want_stats = _hand_written_gradients(
        model, current, images, batches["label"], True, dropout
    )
    g_src, _ = _hand_written_gradients(
        model, source, images, batches["label"], False, dropout
    )
    merged, stats = steps.stage(
        jax.tree.map(jax.numpy.array, current),
        source,
        batches,
        key,
        jax.random.PRNGKey(0),
    )
    moved = 0
    for (path, score), (_, a), (_, b) in zip(
        leaves_with_paths(stats.scores),
        leaves_with_paths(g_cur),
        leaves_with_paths(g_src),
        strict=True,
    ):
        want = ref.cosine(np.asarray(a), np.asarray(b), "tensor")
        np.testing.assert_allclose(score, want, atol=2e-4, err_msg=path)
        moved += int(want > 0.0)
    assert 0 < moved < len(jax.tree.leaves(g_cur))  # a real split
    for (path, got), (_, want) in zip(
        leaves_with_paths(merged["batch_stats"]), leaves_with_paths(want_stats), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
    mask = stats.mask(merged["params"])
    for (path, got), (_, cur), (_, src), (_, taken) in zip(
        *(leaves_with_paths(t) for t in (merged["params"], current["params"])),
        leaves_with_paths(source["params"]),
        leaves_with_paths(mask),
        strict=True,
    ):
        np.testing.assert_array_equal(got, src if taken.all() else cur, err_msg=path)


def test_stages_run_in_the_reference_order_from_the_right_state(monkeypatch):
    """Spies on every step: fine-tune, then per source: load it, one stage (alignment
    and merge) from the fine-tuned model with the stage's keys, fine-tune the merged
    model; each from the last result. Each fine-tune starts by trimming the C heap."""
    calls = []
    monkeypatch.setattr(grasp.memory, "trim_host_heap", lambda: calls.append(("trim",)))
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

    def stage(current, source, batches, alignment_key, merge_key):
        w, w_source = (float(v["params"]["w"][0]) for v in (current, source))
        calls.append(("stage", w, w_source, batches))
        calls.append(("keys", np.asarray(alignment_key), np.asarray(merge_key)))
        # Everything transfers; the statistics stay the current model's.
        merged = {"params": source["params"], "batch_stats": current["batch_stats"]}
        ones = {"w": np.ones((), np.float32)}
        return merged, MergeStats(ones, ones, {"w": 3}, np.float32(1.0), np.int32(0))

    def load(name):
        def restore():
            calls.append(("load", name))
            return model_vars(sources[name])

        return restore

    steps = grasp.GraspSteps(
        finetune=finetune,
        alignment_batches=lambda key: int(key[-1]),
        stage=stage,
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
    stream = functools.partial(seeding.stream, jax.random.PRNGKey(0))
    batch = {s: int(stream("alignment", s)[-1]) for s in (1, 2)}
    stage_calls = [c for c in calls if c[0] != "keys"]
    assert stage_calls == [
        ("trim",),
        ("finetune", 0.0, 2, "grasp stage 0 (first)"),
        ("load", "a"),
        ("stage", 1.0, 10.0, batch[1]),  # the fine-tuned model meets source a
        ("trim",),
        ("finetune", 10.0, 1, "grasp stage 1 (a)"),  # the merged model: all of source a
        ("load", "b"),
        ("stage", 11.0, 20.0, batch[2]),
        ("trim",),
        ("finetune", 20.0, 1, "grasp stage 2 (b)"),
    ]
    stage_keys = [c[1:] for c in calls if c[0] == "keys"]
    for s, (alignment_key, merge_key) in enumerate(stage_keys, start=1):
        np.testing.assert_array_equal(alignment_key, stream("alignment", s))
        np.testing.assert_array_equal(merge_key, stream("merge", s))
    np.testing.assert_array_equal(result.variables["params"]["w"], 21.0)
    assert [s.val_accuracy_after_finetune for s in result.stages] == [0.0, 10.0, 20.0]
    assert [s.fraction for s in result.stages[1:]] == [1.0, 1.0]
    # each stage fine-tunes with its own key, stream(key, "finetune", stage)
    for stage_index, key in enumerate(keys):
        np.testing.assert_array_equal(key, stream("finetune", stage_index))
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


def test_the_stage_result_is_what_the_next_fine_tune_starts_from():
    kept = []

    def finetune(variables, epochs, key, label):
        kept.append(variables["batch_stats"])
        return grasp.FineTuned(variables)

    def stage(current, source, batches, alignment_key, merge_key):
        moved = {"mean": current["batch_stats"]["mean"] + 100}
        stats = MergeStats({}, {}, {"w": 0}, np.float32(0.0), np.int32(0))
        return {"params": current["params"], "batch_stats": moved}, stats

    steps = grasp.GraspSteps(finetune, alignment_batches=lambda key: None, stage=stage)
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


def test_the_docs_own_loop_example_runs_as_written():
    """docs/api.md's "GRASP in your own training loop" block, executed verbatim."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = readme.split("<!-- own-loop-example -->")[1].split("```python")[1]
    code = block.split("```")[0]
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    result = namespace["result"]
    assert [s.source for s in result.stages] == ["source_0", "s1", "s2"]
    assert all(0.0 <= s.fraction <= 1.0 for s in result.stages[1:])


def test_default_steps_fine_tune_and_validate_on_the_right_splits(monkeypatch):
    """`default_steps` wires the library: each fine-tune is `loop.fit` on the train split
    with selection on validation, the stage recipe for its epochs, the stage key's seed
    and its label; validation is the model's accuracy on the validation split."""
    from grasp_jax import loop

    calls = []

    def fake_fit(model, variables, train_split, val_split, **kwargs):
        calls.append((model, variables, train_split, val_split, kwargs))
        return loop.FitResult({"fitted": variables}, 0.5, 1, [{"epoch": 0}], 1.0)

    predicted = []

    def fake_predict(model, variables, split, pipeline):
        predicted.append((model, variables, split, pipeline))
        return {"accuracy": 0.25, "loss": 1.0}

    monkeypatch.setattr(loop, "fit", fake_fit)
    monkeypatch.setattr(evaluation, "predict", fake_predict)
    model = object()
    splits = {"train": ["t"], "validation": ["v"], "test": ["x"]}
    config = grasp.GraspConfig(learning_rate=2e-4, weight_decay=0.5, augment=True)
    steps = grasp.default_steps(model, splits, config=config, pipeline=PIPE, progress=False)
    key = jax.random.PRNGKey(9)
    tuned = steps.finetune({"w": 1}, 4, key, "grasp stage 2 (b)")
    assert tuned == grasp.FineTuned({"fitted": {"w": 1}}, 0.5, [{"epoch": 0}])
    ((got_model, got_vars, train_split, val_split, kwargs),) = calls
    assert (got_model, got_vars, train_split, val_split) == (model, {"w": 1}, ["t"], ["v"])
    assert kwargs == {
        "config": config.stage_config(4),
        "pipeline": PIPE,
        "seed": seeding.int_seed(key),
        "progress": False,
        "description": "grasp stage 2 (b)",
    }
    stage = kwargs["config"]
    assert (stage.epochs, stage.learning_rate, stage.weight_decay) == (4, 2e-4, 0.5)
    assert stage.augment is True
    assert steps.validate({"w": 2}) == 0.25
    assert predicted == [(model, {"w": 2}, ["v"], PIPE)]
    other = grasp.default_steps(
        model, splits, config=config, pipeline=PIPE, validate_merges=False
    )
    assert other.validate is None
    with pytest.raises(
        ValueError, match=r"rule='best'; use one of \('aligned', 'random'\)"
    ):
        grasp.default_steps(model, splits, config=config, pipeline=PIPE, rule="best")


def test_every_process_aligns_on_the_whole_global_batches(splits, monkeypatch):
    """In a multi-process run each process scores the full batches (then all merge
    alike), not its shard of them: as process 1 of 2 it gets what one process gets."""
    config = grasp.GraspConfig(num_alignment_batches=2, augment=False)
    key = jax.random.PRNGKey(6)
    alone = grasp.alignment_batches(splits["train"], PIPE, config, key)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    second = grasp.alignment_batches(splits["train"], PIPE, config, key)
    assert second["image"].shape[:2] == (2, PIPE.batch_size)
    np.testing.assert_array_equal(second["image"], alone["image"])
    np.testing.assert_array_equal(second["label"], alone["label"])


def test_a_stage_of_a_model_without_batch_norm_keeps_its_collections():
    """`grasp_stage` on variables without `batch_stats` returns none; its gradients are
    jax.grad of a loss written here, summed over the stacked batches."""
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    model = Linear()
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))["params"]
    source = model.init(jax.random.PRNGKey(1), np.zeros((1, 4), np.float32))["params"]
    rng = np.random.default_rng(0)
    batches = {
        "x": rng.normal(size=(3, 2, 4)).astype(np.float32),
        "y": rng.integers(0, 3, (3, 2)),
    }

    def loss(p, state, batch):
        logits = model.apply({"params": p}, batch["x"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce, (state, logits)

    def summed(p):
        return sum(
            loss(p, {}, jax.tree.map(lambda x, i=i: x[i], batches))[0] for i in range(3)
        )

    want = [
        ref.cosine(np.asarray(a), np.asarray(b), "tensor")
        for a, b in zip(
            jax.tree.leaves(jax.grad(summed)(params)),
            jax.tree.leaves(jax.grad(summed)(source)),
            strict=True,
        )
    ]
    merged, stats = gj.grasp_stage(
        {"params": jax.tree.map(jax.numpy.array, params)},
        {"params": source},
        batches,
        current_loss=loss,
        source_loss=loss,
        threshold=-1.0,
    )
    assert set(merged) == {"params"}
    np.testing.assert_allclose(jax.tree.leaves(stats.scores), want, rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, merged["params"], source)  # all moved


def _leaf_trees(seed: int, count: int = 12) -> tuple[dict, ...]:
    """current, source and both gradients: `count` random float32 leaves of ranks 1-3."""
    rng = np.random.default_rng(seed)
    shapes = [((5,), (3, 4), (2, 2, 3))[i % 3] for i in range(count)]

    def tree():
        return {
            f"p{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)
        }

    return tree(), tree(), tree(), tree()


def _on_device(tree: dict) -> dict:
    return jax.tree.map(jax.numpy.array, tree)


def _linear_stage(current, source, g_cur, g_src, **kwargs):
    """`grasp_stage` with losses whose parameter gradients are the given trees (one
    stacked batch carries them); returns the merged parameters and the statistics."""

    def loss(name):
        def f(params, state, batch):
            leaves = zip(*map(jax.tree.leaves, (params, batch[name])), strict=True)
            return sum(jax.numpy.vdot(p, g) for p, g in leaves), (state, None)

        return f

    batches = {
        "cur": jax.tree.map(lambda g: g[None], g_cur),
        "src": jax.tree.map(lambda g: g[None], g_src),
    }
    merged, stats = gj.grasp_stage(
        {"params": _on_device(current)},
        {"params": source},
        batches,
        current_loss=loss("cur"),
        source_loss=loss("src"),
        **kwargs,
    )
    return merged["params"], stats


@pytest.mark.parametrize(
    ("granularity", "mode"), [("channel", "soft"), ("element", "hard"), ("tensor", "soft")]
)
def test_a_stage_follows_its_threshold_granularity_and_mode(granularity, mode):
    current, source, g_cur, g_src = _leaf_trees(1)
    merged, _ = _linear_stage(
        current, source, g_cur, g_src, threshold=0.1, granularity=granularity, mode=mode
    )
    for name in current:
        score = ref.movable_score(g_cur[name], g_src[name], granularity)
        want, _ = ref.transfer_leaf(current[name], source[name], score, 0.1, mode)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def _moved_units(merged, current, source, granularity) -> int:
    """How many units (tensors, or channels: last-axis columns) hold the source's values;
    every unit must hold exactly one model's."""
    moved = 0
    for name in current:
        got, cur, src = (np.asarray(t[name]) for t in (merged, current, source))
        if granularity == "channel":
            got, cur, src = (t.reshape(-1, t.shape[-1]) for t in (got, cur, src))
            took = np.all(got == src, axis=0)
            assert np.all(took | np.all(got == cur, axis=0)), name
            moved += int(took.sum())
        else:
            took = np.array_equal(got, src)
            assert took or np.array_equal(got, cur), name
            moved += int(took)
    return moved


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_random_stage_moves_as_many_units_as_grasp_would_chosen_by_the_key(granularity):
    current, source, g_cur, g_src = _leaf_trees(2)
    aligned = sum(
        int(np.sum(ref.movable_score(g_cur[n], g_src[n], granularity) > 0.0))
        for n in current
    )
    units = sum(
        1 if granularity == "tensor" else (t.shape[-1] if t.ndim >= 2 else t.size)
        for t in current.values()
    )
    assert 0 < aligned < units  # some units move, not all: a choice to make
    chosen = []
    for seed in (0, 1, 2, 0):
        merged, _ = _linear_stage(
            current,
            source,
            g_cur,
            g_src,
            threshold=0.0,
            granularity=granularity,
            rule="random",
            key=jax.random.PRNGKey(seed),
        )
        assert _moved_units(merged, current, source, granularity) == aligned
        chosen.append(jax.tree.map(np.asarray, merged))
    jax.tree.map(np.testing.assert_array_equal, chosen[0], chosen[3])  # same key
    assert any(
        not np.array_equal(chosen[0][n], chosen[i][n]) for i in (1, 2) for n in current
    )
    with pytest.raises(ValueError, match="pass key="):
        _linear_stage(current, source, g_cur, g_src, rule="random")


def test_a_stage_records_what_its_merge_reports():
    """`run_grasp` records the merge's own fraction, non-finite count, and the elements
    taken per leaf (read once, after the stage)."""

    def stage(current, source, batches, alignment_key, merge_key):
        taken = {"w": np.int32(2), "v": np.int32(4)}
        stats = MergeStats(None, None, taken, np.float32(0.375), np.int32(2))
        return source, stats

    steps = grasp.GraspSteps(
        finetune=lambda variables, epochs, key, label: grasp.FineTuned(variables),
        alignment_batches=lambda key: None,
        stage=stage,
    )
    start = {"params": {"w": np.zeros(3), "v": np.zeros((2, 2))}, "batch_stats": {}}
    result = grasp.run_grasp(
        start,
        [(name, lambda: start) for name in ("a", "b")],
        steps,
        config=grasp.GraspConfig(initial_epochs=0, finetune_epochs=0),
        key=jax.random.PRNGKey(7),
    )
    for stage_index in (1, 2):
        stats = result.stages[stage_index]
        assert (stats.fraction, stats.n_transferred, stats.nonfinite_leaves) == (
            0.375,
            6,
            2,
        )
        assert stats.fraction_by_layer == {"v": 1.0, "w": pytest.approx(2 / 3)}
