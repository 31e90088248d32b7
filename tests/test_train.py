"""The training library: recipe (schedule, head LR, clipping), steps, fit (real runs,
best epoch, resume), no recompiles."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from grasp_jax import evaluation, loop, models, recipe, train
from grasp_jax import input_pipeline as ip

PIPE = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
FAST = recipe.TrainConfig(epochs=2, learning_rate=3e-3, augment=False)


def reference_factor(step: int, total: int, warmup: int) -> float:
    """The reference's LambdaLR factor, written out (docs/reference.md §3), its pi."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(3.14159265359 * progress)))


@pytest.mark.parametrize("step", [0, 1, 7, 19, 20, 21, 80, 149, 150])
def test_warmup_cosine_schedule_matches_the_reference(step):
    total, warmup = 150, int(150 * 2 / 15)  # 15 epochs of 10 steps: warmup 20
    schedule = recipe.make_schedule(dataclasses.replace(FAST, epochs=15), 10)
    assert float(schedule(step)) == pytest.approx(
        FAST.learning_rate * reference_factor(step, total, warmup),
        abs=FAST.learning_rate * 1e-6,  # float32 resolution of the factor
    )


def test_cosine_per_epoch_is_the_stage_recipe():
    config = recipe.TrainConfig(epochs=3, learning_rate=5e-5, schedule="cosine_per_epoch")
    schedule = recipe.make_schedule(config, steps_per_epoch=4)
    # CosineAnnealingLR(T_max=3) per epoch: 5e-5, 3.75e-5, 1.25e-5 (docs/reference.md §4).
    got = [float(schedule(s)) for s in (0, 3, 4, 7, 8, 11)]
    np.testing.assert_allclose(
        got, [5e-5, 5e-5, 3.75e-5, 3.75e-5, 1.25e-5, 1.25e-5], rtol=1e-6
    )


def test_head_gets_ten_times_the_learning_rate():
    params = {"conv0": {"kernel": jnp.ones(3)}, "head": {"kernel": jnp.ones(3)}}
    config = recipe.TrainConfig(
        epochs=1, weight_decay=0.0, grad_clip_norm=None, schedule="cosine_per_epoch"
    )
    tx = recipe.make_optimizer(config, steps_per_epoch=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each weight by lr * g / (|g| + eps) ~ lr.
    np.testing.assert_allclose(updates["conv0"]["kernel"], -3e-4, rtol=1e-4)
    np.testing.assert_allclose(updates["head"]["kernel"], -3e-3, rtol=1e-4)
    assert recipe.head_labels(params) == {
        "conv0": {"kernel": "backbone"},
        "head": {"kernel": "head"},
    }


def test_gradients_are_clipped_by_global_norm_before_adam():
    params = {"a": jnp.zeros(4), "head": {"b": jnp.zeros(4)}}
    tx = recipe.make_optimizer(recipe.TrainConfig(grad_clip_norm=1.0), steps_per_epoch=10)
    grads = {"a": jnp.full(4, 3.0), "head": {"b": jnp.full(4, 4.0)}}  # global norm 10
    _, state = tx.update(grads, tx.init(params), params)
    first_moments = [
        s.mu
        for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    mu = {k: v for m in first_moments for k, v in jax.tree_util.tree_leaves_with_path(m)}
    # Adam's first moment after one step is (1 - b1) * g = 0.1 * g, with g scaled to norm 1.
    got = sorted(
        float(jnp.abs(v).max()) for v in mu.values() if float(jnp.abs(v).max()) > 0
    )
    np.testing.assert_allclose(got, [0.1 * 0.3, 0.1 * 0.4], rtol=1e-5)


def small_model(dtype="float32"):
    module = models.create("small_cnn", 10, dtype=dtype)
    variables = models.init("small_cnn", 10, jax.random.PRNGKey(0), (1, 32, 32, 3))
    return module, variables


def splits(digits_dir, name="pretrain"):
    return tfds.data_source(f"digits_drift/{name}", data_dir=str(digits_dir))


def test_two_epochs_learn_well_above_chance(digits_dir):
    module, variables = small_model()
    data = splits(digits_dir)
    result = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=FAST,
        pipeline=PIPE,
        progress=False,
    )
    assert result.best_val_accuracy >= 0.3  # chance is 0.1; measured 0.41
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize(
    ("accuracies", "best"),
    [([0.5, 0.9, 0.7, 0.8], 1), ([0.3, 0.6, 0.6, 0.2], 1), ([0.1, 0.2, 0.3, 0.4], 3)],
)
def test_best_variables_are_the_best_epoch(digits_dir, monkeypatch, accuracies, best):
    """Validation accuracies scripted to be non-monotone (and tied): fit must return the
    variables it validated at the first best epoch, not the last epoch's."""
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    validated = []

    def scripted_evaluate(eval_step, variables, split, pipeline, sharding):
        validated.append(jax.tree.map(np.array, variables))
        return {"accuracy": accuracies[len(validated) - 1], "loss": 1.0}

    monkeypatch.setattr(evaluation, "evaluate", scripted_evaluate)
    config = dataclasses.replace(FAST, epochs=len(accuracies))
    result = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=config,
        pipeline=PIPE,
        progress=False,
    )
    assert result.best_epoch == best and result.stopped is None
    assert result.best_val_accuracy == accuracies[best]
    assert [h["val_accuracy"] for h in result.history] == accuracies
    jax.tree.map(np.testing.assert_array_equal, result.variables, validated[best])
    last = jax.tree.leaves(validated[-1]["params"])[0]
    if best != len(accuracies) - 1:  # the epochs really differ
        assert not np.array_equal(jax.tree.leaves(result.variables["params"])[0], last)


class _FailingWriter:
    """Raises at one epoch, after that epoch's metrics but before its checkpoint."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at

    def add_scalar(self, tag, value, epoch):
        if epoch == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")

    def flush(self):
        pass


def test_resume_after_interruption_matches_an_uninterrupted_run(
    digits_dir, tmp_path, capsys
):
    module, variables = small_model()
    data = splits(digits_dir, "d0")
    config = dataclasses.replace(FAST, epochs=3)
    kwargs = {"config": config, "pipeline": PIPE, "progress": False, "seed": 5}
    whole = loop.fit(module, variables, data["train"], data["validation"], **kwargs)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(
            module,
            variables,
            data["train"],
            data["validation"],
            workdir=tmp_path,
            writer=_FailingWriter(fail_at=2),
            **kwargs,
        )
    steps_run = []
    real_step = train.train_step

    def counting_step(*args, **step_kwargs):
        steps_run.append(1)
        return real_step(*args, **step_kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_step", counting_step)
        capsys.readouterr()
        resumed = loop.fit(
            module,
            variables,
            data["train"],
            data["validation"],
            workdir=tmp_path,
            **{**kwargs, "progress": True},
        )
    # epochs 0 and 1 were checkpointed: the rerun trains epoch 2 only
    steps = ip.steps_per_epoch(data["train"], PIPE.batch_size)
    assert len(steps_run) == steps
    assert f"{2 * steps}/{3 * steps}" in capsys.readouterr().err  # the bar resumes too
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert [h["val_accuracy"] for h in resumed.history] == [
        h["val_accuracy"] for h in whole.history
    ]
    jax.tree.map(np.testing.assert_array_equal, resumed.variables, whole.variables)


def test_a_step_does_not_recompile(compile_count):
    module, variables = small_model()
    tx = recipe.make_optimizer(FAST, 10)
    train_step = functools.partial(
        train.train_step, model=module, pipeline=PIPE, augment=FAST.augment
    )
    state = train.create_train_state(variables, tx, 0)
    rng = np.random.default_rng(0)

    def batch():
        return {
            "image": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, 32).astype(np.int32),
        }

    state, _ = train_step(state, batch())
    before = compile_count()
    for _ in range(3):
        state, metrics = train_step(state, batch())
    jax.block_until_ready(metrics)
    assert compile_count() == before
    assert int(state.step) == 4


@pytest.mark.parametrize(
    "config",
    [
        FAST,  # warmup and cosine per step, clipping, the head at 10x
        recipe.fine_tuning(3, 5e-5, 0.01, augment=False),  # GRASP's stage: cosine per epoch
    ],
    ids=["source_training", "stage"],
)
def test_fed_rates_train_as_the_in_step_schedule_to_the_bit(config):
    """`loop.fit`'s optimiser takes the rates from a program of its own; the parameters
    after steps across the warmup, an epoch boundary and the cosine equal those of
    optax's schedule computed inside the step (`make_optimizer`), bit for bit."""
    module, variables = small_model()
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, 32).astype(np.int32),
        }
        for _ in range(9)
    ]
    step = functools.partial(train.train_step, model=module, pipeline=PIPE, augment=False)
    inside, fed = (  # copies: each state is donated step after step
        train.create_train_state(loop.device_copy(variables), tx, 0)
        for tx in (recipe.make_optimizer(config, 3), recipe.optimizer_for(config))
    )
    rates = recipe.learning_rates(config, 3)
    for batch in batches:
        inside, _ = step(inside, batch)
        fed, _ = step(fed.replace(learning_rates=rates(fed.step)), batch)
    jax.tree.map(np.testing.assert_array_equal, fed.variables, inside.variables)


def test_recipes_that_differ_in_their_schedule_share_one_compiled_step(digits_dir):
    """A stage's epochs, a learning rate or the split's size change only the rates fed
    in: the second `fit` reuses the first's compiled training step."""
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    fits = [
        (recipe.fine_tuning(1, 5e-5, 0.01, augment=False), data["train"]),
        (recipe.fine_tuning(2, 1e-4, 0.01, augment=False), list(data["train"])[:96]),
    ]
    sizes = []
    for config, train_split in fits:
        loop.fit(
            module,
            variables,
            train_split,
            data["validation"],
            config=config,
            pipeline=PIPE,
            progress=False,
        )
        sizes.append(train.train_step._cache_size())
    assert sizes[1] == sizes[0]


def test_bfloat16_compute_keeps_float32_parameters():
    module, variables = small_model(dtype="bfloat16")
    tx = recipe.make_optimizer(FAST, 10)
    state = train.create_train_state(variables, tx, 0)
    batch = {"image": np.zeros((32, 32, 32, 3), np.uint8), "label": np.zeros(32, np.int32)}
    state, metrics = train.train_step(
        state, batch, model=module, pipeline=PIPE, augment=False
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"]))


def test_one_full_batch_trains_and_less_is_an_error(digits_dir):
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    examples = [data["train"][i] for i in range(40)]  # one batch of 32, 8 dropped
    config = dataclasses.replace(FAST, epochs=1)
    kwargs = {"config": config, "pipeline": PIPE, "progress": False}
    result = loop.fit(module, variables, examples, data["validation"], **kwargs)
    assert len(result.history) == 1
    with pytest.raises(ValueError, match=r"train: 20 training examples make no full batch"):
        loop.fit(module, variables, examples[:20], data["validation"], **kwargs)


def test_the_callers_variables_survive_and_augment_is_passed(digits_dir, monkeypatch):
    """fit donates its state step after step: it must train a copy. And the recipe's
    `augment` reaches the step."""
    module, variables = small_model()
    on_device = jax.tree.map(jnp.asarray, variables)
    data = splits(digits_dir, "d1")
    seen = []
    real_step = train.train_step

    def spy(state, batch, **kwargs):
        seen.append(kwargs["augment"])
        return real_step(state, batch, **kwargs)

    monkeypatch.setattr(train, "train_step", spy)
    config = dataclasses.replace(FAST, epochs=1, augment=True)
    loop.fit(
        module,
        on_device,
        data["train"],
        data["validation"],
        config=config,
        pipeline=PIPE,
        progress=False,
    )
    assert seen and set(seen) == {True}
    jax.tree.map(np.testing.assert_array_equal, on_device, variables)  # not deleted


class _RecordingWriter:
    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, tag, value, epoch):
        self.scalars.append((tag, value, epoch))

    def flush(self):
        self.flushes += 1


def test_history_and_writer_record_what_each_epoch_did(digits_dir, monkeypatch):
    """Per epoch: the mean of the steps' own loss and accuracy, the validation pass's
    numbers, the learning rate the epoch started with (CosineAnnealingLR(T_max=3):
    lr, 0.75 lr, 0.25 lr), a throughput consistent with the run's time; the writer gets
    each under "<description>/<key>" at step `epoch`, flushed once per epoch."""
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    per_step, labels = [], []
    real_step = train.train_step

    def spy(state, batch, **kwargs):
        labels.append(np.asarray(batch["label"]))
        state, metrics = real_step(state, batch, **kwargs)
        per_step.append(jax.device_get(metrics))
        return state, metrics

    validations = iter([(0.25, 2.5), (0.5, 1.5), (0.75, 0.5)])

    def scripted_evaluate(eval_step, variables, split, pipeline, sharding):
        accuracy, loss = next(validations)
        return {"accuracy": accuracy, "loss": loss}

    monkeypatch.setattr(train, "train_step", spy)
    monkeypatch.setattr(evaluation, "evaluate", scripted_evaluate)
    config = recipe.TrainConfig(epochs=3, learning_rate=3e-3, schedule="cosine_per_epoch")
    writer = _RecordingWriter()
    result = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=config,
        pipeline=PIPE,
        progress=False,
        writer=writer,
        description="stage",
        seed=5,
    )
    steps = ip.steps_per_epoch(data["train"], PIPE.batch_size)
    assert len(per_step) == 3 * steps
    # each epoch: the shuffled training pass of (seed, epoch), full batches only
    for epoch in range(3):
        passes = ip.dataset(data["train"], PIPE, train=True, seed=5, epoch=epoch)
        want = [b["label"] for b in itertools.islice(passes, steps)]
        np.testing.assert_array_equal(labels[epoch * steps : (epoch + 1) * steps], want)
    assert not np.array_equal(labels[0], labels[steps])  # epochs are shuffled anew
    keys = [
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "images_per_second",
    ]
    for epoch, record in enumerate(result.history):
        assert sorted(record) == sorted(["epoch", *keys])
        assert record["epoch"] == epoch
        mine = per_step[epoch * steps : (epoch + 1) * steps]
        assert record["train_loss"] == pytest.approx(np.mean([m["loss"] for m in mine]))
        assert record["train_accuracy"] == pytest.approx(
            np.mean([m["accuracy"] for m in mine])
        )
        assert (record["val_accuracy"], record["val_loss"]) == [
            (0.25, 2.5),
            (0.5, 1.5),
            (0.75, 0.5),
        ][epoch]
        assert record["learning_rate"] == pytest.approx(
            3e-3 * [1.0, 0.75, 0.25][epoch], rel=1e-6
        )
    epoch_seconds = [
        steps * PIPE.batch_size / r["images_per_second"] for r in result.history
    ]
    assert 0.5 * result.seconds < sum(epoch_seconds) <= result.seconds
    assert result.best_epoch == 2 and result.best_val_accuracy == 0.75
    assert writer.scalars == [
        (f"stage/{key}", record[key], record["epoch"])
        for record in result.history
        for key in keys
    ]
    assert writer.flushes == 3


def test_a_given_optimizer_replaces_the_recipes(digits_dir):
    """`optimizer=` trains with that transformation: one that zeroes every update leaves
    the parameters where they started (the recipe's AdamW would move them)."""
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    config = dataclasses.replace(FAST, epochs=1)
    kwargs = {"config": config, "pipeline": PIPE, "progress": False}
    frozen = loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        optimizer=optax.set_to_zero(),
        **kwargs,
    )
    jax.tree.map(
        np.testing.assert_array_equal, frozen.variables["params"], variables["params"]
    )
    trained = loop.fit(module, variables, data["train"], data["validation"], **kwargs)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b),
        trained.variables["params"],
        variables["params"],
    )
    assert all(jax.tree.leaves(moved))


def test_the_progress_bar_counts_every_step_under_the_description(digits_dir, capsys):
    module, variables = small_model()
    data = splits(digits_dir, "d1")
    config = dataclasses.replace(FAST, epochs=2)
    loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=config,
        pipeline=PIPE,
        progress=True,
        description="stage 7",
    )
    steps = ip.steps_per_epoch(data["train"], PIPE.batch_size)
    shown = capsys.readouterr().err
    assert "stage 7:" in shown and f"{2 * steps}/{2 * steps}" in shown
    assert f"0/{2 * steps}" in shown
    loop.fit(
        module,
        variables,
        data["train"],
        data["validation"],
        config=dataclasses.replace(FAST, epochs=1),
        pipeline=PIPE,
        progress=False,
        description="quiet",
    )
    assert "quiet" not in capsys.readouterr().err
