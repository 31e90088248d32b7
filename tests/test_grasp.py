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


@pytest.mark.parametrize("augment", [False, True])
def test_alignment_batches_are_the_first_of_a_fresh_pass(splits, augment):
    """The first batches of a shuffled training pass seeded by the stage key's "data"
    stream, preprocessed once (augmented with its "augment" stream, batch by batch), each
    with its own dropout key, the "dropout" stream."""
    key = jax.random.PRNGKey(3)
    batches = grasp.alignment_batches(
        splits["train"],
        PIPE,
        grasp.GraspConfig(num_alignment_batches=2, augment=augment),
        key,
    )
    seed = seeding.int_seed(seeding.stream(key, "data"))
    raw = list(
        itertools.islice(iter(ip.dataset(splits["train"], PIPE, train=True, seed=seed)), 3)
    )
    in_order = next(iter(ip.dataset(splits["train"], PIPE, train=False)))
    assert not np.array_equal(raw[0]["label"], in_order["label"][: PIPE.batch_size])
    assert len(batches) == 2
    for i, (got, want) in enumerate(zip(batches, raw[:2], strict=True)):
        assert set(got) == {"image", "label", "rng"}
        if augment:
            expected = ip.augment(seeding.stream(key, "augment", i), want["image"], PIPE)
        else:
            expected = ip.normalize(want["image"], PIPE)
        np.testing.assert_allclose(got["image"], expected, rtol=1e-6)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["rng"], seeding.stream(key, "dropout", i))
    assert not np.array_equal(batches[0]["rng"], batches[1]["rng"])
    if augment:  # augmentation really happened, with a key of its own per batch
        assert not np.allclose(batches[0]["image"], ip.normalize(raw[0]["image"], PIPE))


def test_stages_run_in_the_reference_order_from_the_right_state(monkeypatch):
    """Spies on every step: fine-tune, then per source: align (current, train mode;
    source, eval mode), merge, fine-tune the merged model; each from the last result.
    Each fine-tune starts by trimming the C heap (the peak stays flat in K)."""
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
        ("trim",),
        ("finetune", 0.0, 2, "grasp stage 0 (first)"),
        ("gradients", 1.0, True, batch[1]),  # the fine-tuned model, train mode
        ("load", "a"),  # the source is restored only after the current model's pass
        ("gradients", 10.0, False, batch[1]),
        ("trim",),
        ("finetune", 10.0, 1, "grasp stage 1 (a)"),  # the merged model: all of source a
        ("gradients", 11.0, True, batch[2]),
        ("load", "b"),
        ("gradients", 20.0, False, batch[2]),
        ("trim",),
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
    assert steps.merge is grasp.aligned_merge
    other = grasp.default_steps(
        model,
        splits,
        config=config,
        pipeline=PIPE,
        validate_merges=False,
        merge=grasp.random_merge,
    )
    assert other.validate is None and other.merge is grasp.random_merge


def test_default_steps_align_on_the_train_split_with_the_model():
    model = models.create("small_cnn", 10)
    rows = [
        {"image": np.full((32, 32, 3), 40 * (i % 5), np.uint8), "label": i % 10}
        for i in range(64)
    ]
    splits = {"train": rows, "validation": rows[:8]}
    config = grasp.GraspConfig(num_alignment_batches=1, augment=False)
    steps = grasp.default_steps(model, splits, config=config, pipeline=PIPE, progress=False)
    key = jax.random.PRNGKey(4)
    (batch,) = steps.alignment_batches(key)
    (want,) = grasp.alignment_batches(rows, PIPE, config, key)
    np.testing.assert_array_equal(batch["image"], want["image"])
    current = variables(0)
    grads, stats = steps.gradients(current, [batch], False)
    expected = jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(
                {"params": p, "batch_stats": current["batch_stats"]}, batch["image"]
            ),
            batch["label"],
        ).mean()
    )(current["params"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        grads,
        expected,
    )
    jax.tree.map(np.testing.assert_array_equal, stats, current["batch_stats"])


def test_every_process_aligns_on_the_whole_global_batches(splits, monkeypatch):
    """In a multi-process run each process scores the full batches (then all merge
    alike), not its shard of them: as process 1 of 2 it gets what one process gets."""
    config = grasp.GraspConfig(num_alignment_batches=2, augment=False)
    key = jax.random.PRNGKey(6)
    alone = grasp.alignment_batches(splits["train"], PIPE, config, key)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    second = grasp.alignment_batches(splits["train"], PIPE, config, key)
    assert len(second) == 2
    for got, want in zip(second, alone, strict=True):
        assert got["image"].shape[0] == PIPE.batch_size
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_alignment_gradients_of_a_model_without_batch_norm():
    """A model with no BatchNorm keeps an empty (not missing) statistics collection."""
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(3)(x)

    model = Linear()
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))["params"]
    batch = {
        "image": np.arange(8, dtype=np.float32).reshape(2, 4) / 8,
        "label": np.array([0, 2]),
        "rng": jax.random.PRNGKey(1),
    }
    for train_mode in (False, True):
        grads, stats = grasp.alignment_gradients(
            model, {"params": params}, [batch], train_mode
        )
        assert stats == {}
        expected = jax.grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, batch["image"]), batch["label"]
            ).mean()
        )(params)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), grads, expected
        )


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


@pytest.mark.parametrize(
    ("granularity", "mode"), [("channel", "soft"), ("element", "hard"), ("tensor", "soft")]
)
def test_aligned_merge_follows_the_configs_threshold_granularity_and_mode(
    granularity, mode
):
    current, source, g_cur, g_src = _leaf_trees(1)
    config = grasp.GraspConfig(threshold=0.1, granularity=granularity, mode=mode)
    merged, _ = grasp.aligned_merge(
        _on_device(current), _on_device(source), g_cur, g_src, config, None
    )
    for name in current:
        score = ref.cosine(g_cur[name], g_src[name], granularity)
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
def test_random_merge_moves_as_many_units_as_grasp_would_chosen_by_the_key(granularity):
    current, source, g_cur, g_src = _leaf_trees(2)
    config = grasp.GraspConfig(threshold=0.0, granularity=granularity)
    aligned = sum(
        int(np.sum(ref.cosine(g_cur[n], g_src[n], granularity) > 0.0)) for n in current
    )
    units = sum(
        1 if granularity == "tensor" else (t.shape[-1] if t.ndim >= 2 else t.size)
        for t in current.values()
    )
    assert 0 < aligned < units  # some units move, not all: a choice to make
    chosen = []
    for seed in (0, 1, 2, 0):
        merged, _ = grasp.random_merge(
            _on_device(current),
            _on_device(source),
            g_cur,
            g_src,
            config,
            jax.random.PRNGKey(seed),
        )
        assert _moved_units(merged, current, source, granularity) == aligned
        chosen.append(jax.tree.map(np.asarray, merged))
    jax.tree.map(np.testing.assert_array_equal, chosen[0], chosen[3])  # same key
    assert any(
        not np.array_equal(chosen[0][n], chosen[i][n]) for i in (1, 2) for n in current
    )


def test_a_stage_records_what_its_merge_reports_and_passes_the_merge_key():
    """`run_grasp` hands the merge the stage's "merge" stream and records the merge's
    own fraction, the elements its mask takes and its non-finite count."""
    seen_keys = []

    def merge(current, source, grad_current, grad_source, config, key):
        seen_keys.append(np.asarray(key))
        mask = {"w": np.array([True, False, True]), "v": np.ones((2, 2), bool)}
        return source, MergeStats(scores=None, mask=mask, fraction=0.375, nonfinite=2)

    steps = grasp.GraspSteps(
        finetune=lambda variables, epochs, key, label: grasp.FineTuned(variables),
        alignment_batches=lambda key: [None],
        gradients=lambda v, b, train_mode: (
            jax.tree.map(np.ones_like, v["params"]),
            v["batch_stats"],
        ),
        merge=merge,
    )
    start = {"params": {"w": np.zeros(3), "v": np.zeros((2, 2))}, "batch_stats": {}}
    result = grasp.run_grasp(
        start,
        [(name, lambda: start) for name in ("a", "b")],
        steps,
        config=grasp.GraspConfig(initial_epochs=0, finetune_epochs=0),
        key=jax.random.PRNGKey(7),
    )
    for stage in (1, 2):
        stats = result.stages[stage]
        assert (stats.fraction, stats.n_transferred, stats.nonfinite_leaves) == (
            0.375,
            6,
            2,
        )
        assert stats.fraction_by_layer == {"v": 1.0, "w": pytest.approx(2 / 3)}
        np.testing.assert_array_equal(
            seen_keys[stage - 1], seeding.stream(jax.random.PRNGKey(7), "merge", stage)
        )
