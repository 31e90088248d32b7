"""The paper's baselines and the weight-space merges as runner methods: their kernels
against hand computations, and every method end to end at CI size."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import methods, runner
from experiments import sources as src
from experiments.context import Context, FirstStage
from experiments.methods import ensembles, fisher_estimate, fusion, pearl, weight_merges
from experiments.reference_format import MEMORY_CHECKPOINTS
from grasp_jax import (
    adapters,
    evaluation,
    logit_average,
    merging,
    models,
    seeding,
)
from grasp_jax import input_pipeline as ip
from grasp_jax.grasp import FineTuned
from tests import pinned_experiment


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_votings_against_hand_computed_values():
    # 3 sources, 2 examples, 3 classes
    logits = [
        np.array([[2.0, 1.0, 0.0], [0.0, 6.0, 0.0]]),
        np.array([[0.0, 2.5, 0.0], [0.0, 0.0, 1.0]]),
        np.array([[4.0, 0.0, 3.9], [1.0, 0.0, 0.0]]),
    ]
    sums = None
    for x in logits:
        sums = ensembles.accumulate(sums, x)
    soft, soft_pred = ensembles.combine(sums, "soft")
    np.testing.assert_allclose(soft, sum(logits) / 3)
    np.testing.assert_array_equal(soft_pred, [0, 1])  # means (2, 1.17, 1.3), (.33, 2, .33)
    probs = sum(softmax(x) for x in logits) / 3
    prob, prob_pred = ensembles.combine(sums, "prob")
    np.testing.assert_allclose(prob, np.log(probs + 1e-10))
    np.testing.assert_array_equal(prob_pred, probs.argmax(1))
    # votes: example 0 -> (0, 1, 0): class 0 wins 2-1; example 1 -> (1, 2, 0): a 1-1-1
    # tie, broken by the mean probability (.26, .47, .26): class 1, not the first class
    _, vote_pred = ensembles.combine(sums, "vote")
    assert probs[1].argmax() == 1
    np.testing.assert_array_equal(vote_pred, [0, 1])
    # a probability that underflows to 0 still has a finite score
    far = ensembles.accumulate(None, np.array([[0.0, -1000.0]]))
    np.testing.assert_allclose(
        ensembles.combine(far, "prob")[0], [np.log([1 + 1e-10, 1e-10])]
    )
    # float32 logits are summed in float64
    float32 = ensembles.accumulate(None, logits[0].astype(np.float32))
    assert {float32[key].dtype for key in ("logits", "probs")} == {np.dtype(np.float64)}


def test_vote_is_a_majority_even_against_the_mean_probability():
    logits = [np.array([[0.0, 0.1]]), np.array([[0.0, 0.1]]), np.array([[9.0, 0.0]])]
    sums = None
    for x in logits:
        sums = ensembles.accumulate(sums, x)
    assert ensembles.combine(sums, "prob")[1][0] == 0  # source 3 dominates the mean
    assert ensembles.combine(sums, "vote")[1][0] == 1  # but two sources vote class 1


@pytest.fixture(scope="module")
def cnn():
    model = models.create("small_cnn", num_classes=10)
    members = [
        models.init("small_cnn", 10, jax.random.key(k), (1, 32, 32, 3)) for k in range(3)
    ]
    images = jax.random.normal(jax.random.key(9), (4, 32, 32, 3))
    return model, members, images


@pytest.mark.accelerator  # the vmapped members on a GPU or TPU
def test_logit_average_is_the_mean_of_the_members(cnn):
    model, members, images = cnn
    stacked = logit_average.stack([lambda m=m: m for m in members])
    for got, parts in zip(
        jax.tree.leaves(stacked),
        zip(*map(jax.tree.leaves, members), strict=True),
        strict=True,
    ):
        np.testing.assert_array_equal(got, np.stack(parts))
    fused = logit_average.LogitAverage(model)
    expected = np.mean([model.apply(m, images, train=False) for m in members], axis=0)
    np.testing.assert_allclose(
        fused.apply(stacked, images, train=False), expected, atol=1e-5
    )
    key = jax.random.key(4)
    logits, updates = fused.apply(
        stacked, images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
    keys = jax.random.split(key, 3)
    outs = [
        model.apply(m, images, train=True, mutable=["batch_stats"], rngs={"dropout": k})
        for m, k in zip(members, keys, strict=True)
    ]
    np.testing.assert_allclose(logits, np.mean([o[0] for o in outs], axis=0), atol=1e-5)
    for i, (_, member_updates) in enumerate(outs):
        for got, want in zip(
            jax.tree.leaves(updates["batch_stats"]),
            jax.tree.leaves(member_updates["batch_stats"]),
            strict=True,
        ):
            np.testing.assert_allclose(got[i], want, atol=1e-5)


# small_cnn's three convolutions for three members: K plain ones each on the CPU; one each
# vmapped, the first (whose input every member shares) with K times the output channels,
# the others grouped.
UNROLLED, VMAPPED = [1] * 9, [1, 3, 3]


@pytest.mark.parametrize(
    ("platform", "groups"), [("cpu", UNROLLED), ("cuda", VMAPPED), ("tpu", VMAPPED)]
)
def test_members_are_unrolled_on_the_cpu_and_vmapped_elsewhere(cnn, platform, groups):
    """vmap makes the K members' convolutions grouped ones, which XLA:CPU runs several
    times slower than K plain ones (benchmarks/fusion_members.py)."""
    model, members, images = cnn
    stacked = logit_average.stack([lambda m=m: m for m in members])
    fused = logit_average.LogitAverage(model)

    def train_logits(variables):
        return fused.apply(
            variables,
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )[0]

    for fn in (train_logits, lambda v: fused.apply(v, images)):
        text = jax.export.export(jax.jit(fn), platforms=[platform])(stacked).mlir_module()
        found = [int(g) for g in re.findall(r"feature_group_count = (\d+)", text)]
        assert found == groups, (platform, found)


def test_logit_average_stacks_each_model_once_in_its_dtype_and_names_a_misfit(cnn):
    """Each loader is called once (one model alive beside the stack), the stack keeps
    the members' dtypes, `apply` defaults to eval mode, and a model of another
    structure is named by its index."""
    model, members, images = cnn
    calls = []

    def loader(k):
        calls.append(k)
        return members[k]

    stacked = logit_average.stack([lambda k=k: loader(k) for k in range(3)])
    assert calls == [0, 1, 2]
    assert {x.dtype for x in jax.tree.leaves(stacked)} == {jnp.dtype(jnp.float32)}
    halves = jax.tree.map(lambda x: x.astype(jnp.bfloat16), members[0])
    stacked_halves = logit_average.stack([lambda: halves])
    assert {x.dtype for x in jax.tree.leaves(stacked_halves)} == {jnp.dtype(jnp.bfloat16)}
    fused = logit_average.LogitAverage(model)
    np.testing.assert_array_equal(
        fused.apply(stacked, images), fused.apply(stacked, images, train=False)
    )
    other = models.init("small_cnn", 5, jax.random.key(0), (1, 32, 32, 3))
    with pytest.raises(
        ValueError, match=r"\(10,\) in models\[0\] but \(5,\) in models\[1\]"
    ):
        logit_average.stack([lambda: members[0], lambda: other])


class Toy(nn.Module):
    """A strided convolution, a dense layer and a head: two adapter sites."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(32, (3, 3), strides=(2, 2), name="conv")(x)
        x = nn.Dense(24, name="dense")(x.mean(axis=(1, 2)))
        return nn.Dense(5, name="head")(x)


def test_adapters_add_the_low_rank_path_at_the_layer_stride():
    model = Toy()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    variables = model.init(jax.random.key(1), x)
    sites = adapters.find_sites(model, variables, x.shape)
    assert [(s.path, s.kind, s.features_in, s.features_out, s.stride) for s in sites] == [
        ("conv", "conv", 16, 32, (2, 2)),
        ("dense", "dense", 32, 24, (1, 1)),
    ]  # head excluded by name
    sets = [adapters.init_adapters(jax.random.key(k), sites, 4) for k in (2, 3)]
    assert np.all(sets[0]["conv"]["B"] == 0)
    assert np.std(sets[0]["dense"]["A"]) == pytest.approx(0.01, rel=0.3)
    plain = model.apply(variables, x)
    zero = adapters.apply_adapted(model, variables, x, sets, jnp.array([0.5, 0.5]))
    np.testing.assert_allclose(zero, plain, atol=1e-6)  # B = 0: nothing changes
    rng = np.random.default_rng(0)
    for s in sets:
        for site in s.values():
            site["B"] = jnp.asarray(rng.normal(size=site["B"].shape), jnp.float32)
    weights = np.array([0.3, 0.7])
    got = adapters.apply_adapted(model, variables, x, sets, jnp.asarray(weights))
    # by hand: conv output + x[:, ::2, ::2] A B, then the dense layer's + h A B
    p = jax.tree.map(np.asarray, variables["params"])
    conv = np.asarray(
        nn.Conv(32, (3, 3), strides=(2, 2)).apply({"params": p["conv"]}, x), np.float64
    )
    xs = np.asarray(x, np.float64)[:, ::2, ::2, :]
    conv += sum(
        w * xs @ s["conv"]["A"] @ s["conv"]["B"] for w, s in zip(weights, sets, strict=True)
    )
    h = conv.mean(axis=(1, 2))
    dense = h @ p["dense"]["kernel"] + p["dense"]["bias"]
    dense += sum(
        w * h @ s["dense"]["A"] @ s["dense"]["B"]
        for w, s in zip(weights, sets, strict=True)
    )
    expected = dense @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_blocked_adapters_get_no_gradient():
    model = Toy()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    variables = model.init(jax.random.key(1), x)
    sites = adapters.find_sites(model, variables, x.shape)
    start = adapters.init_adapters(jax.random.key(2), sites, 4)

    def loss(sets, block):
        out = adapters.apply_adapted(
            model, variables, x, sets, jnp.ones(1), block_gradient=block
        )
        return jnp.sum(out**2)

    live = jax.grad(loss)([start], False)
    blocked = jax.grad(loss)([start], True)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(live))
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(blocked))


def test_composition_weights_stay_on_the_simplex():
    np.testing.assert_allclose(
        pearl.onto_simplex(jnp.array([0.5, -0.2, 0.7])), [0.5 / 1.2, 0.0, 0.7 / 1.2]
    )
    np.testing.assert_allclose(pearl.onto_simplex(jnp.array([-1.0, -2.0])), [0.5, 0.5])
    np.testing.assert_allclose(pearl.onto_simplex(jnp.array([0.2, 0.3])), [0.4, 0.6])
    tx = pearl.composition_optimizer(0.5)
    weights = jnp.array([0.25, 0.25, 0.5])
    state = tx.init(weights)
    updates, state = tx.update(jnp.array([1.0, -1.0, 0.0]), state, weights)
    moved = optax.apply_updates(weights, updates)
    # Adam's first step moves each weight by -lr * sign(grad): (-0.25, 0.75, 0.5)
    np.testing.assert_allclose(moved, np.array([0.0, 0.75, 0.5]) / 1.25, atol=1e-5)


@pytest.fixture(scope="module")
def prepared(digits_dir, small_sources, tmp_path_factory):
    """The config of every method on one target, one trial, one epoch per phase, and a
    work folder holding its trained sources: the tests that call one method's run
    function start here (seconds), not from the every-method run (minutes)."""
    workdir = pinned_experiment.with_sources(small_sources, tmp_path_factory.mktemp("all"))
    (workdir / "tfds").symlink_to(digits_dir)  # where a config without data_dir looks
    config = pinned_experiment.small_config(digits_dir, targets="d2", trials=1)
    config.methods = ("all",)
    config.merging.fisher.examples = 20
    return config, workdir


@pytest.fixture(scope="module")
def experiment(prepared):
    """Every method run by the runner in the `prepared` work folder, and the
    descriptions of the `loop.fit` calls it made."""
    config, workdir = prepared
    with pinned_experiment.recorded_fits() as fits:
        summary = runner.run_experiment(config, workdir, progress=False)
    return config, workdir, summary, fits


def load(workdir, config, method):
    run = workdir / "results/digits_drift" / runner.run_name(config, "d2", method, 1)
    return json.loads((run / "metrics.json").read_text())


def test_every_method_runs_and_the_summary_ranks_them(experiment):
    config, workdir, summary, _ = experiment
    ranked = list(summary["methods"])
    assert set(ranked) == set(methods.REGISTRY) - {"ensemble"}
    means = [summary["methods"][m]["test_accuracy_mean"] for m in ranked]
    assert means == sorted(means, reverse=True)
    assert [summary["methods"][m]["rank"] for m in ranked] == list(range(1, 17))
    table = (workdir / "results/digits_drift/summary.md").read_text()
    assert all(f"| {i + 1} | {m} |" in table for i, m in enumerate(ranked))
    for method in ranked:
        assert load(workdir, config, method)["method"] == method


def test_baselines_keep_the_reference_keys(experiment):
    config, workdir, *_ = experiment
    fusion = load(workdir, config, "fusion")
    assert fusion["num_source_models"] == 2
    assert set(fusion["hyperparameters"]) >= {
        "finetune_epochs", "learning_rate", "weight_decay", "batch_size"
    }  # fmt: skip
    assert set(fusion["flops"]) >= {
        "method", "model_params_millions", "single_model_inference_gflops",
        "fusion_gflops", "finetune_gflops", "val_inference_gflops",
        "test_inference_gflops", "total_gflops", "n_sources", "finetune_epochs",
        "n_train_samples", "n_val_samples", "n_test_samples", "breakdown",
    }  # fmt: skip
    assert sum(fusion["flops"]["breakdown"].values()) == pytest.approx(100)
    assert tuple(fusion["memory_checkpoints"]) == MEMORY_CHECKPOINTS["fusion"] == (
        "experiment_start", "data_loaded", "source_models_loaded",
        "fusion_model_created", "finetuning_complete", "experiment_end",
    )  # fmt: skip
    record = load(workdir, config, "pearl")
    weights = record["composition_weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1) and min(weights) >= 0
    # small_cnn: conv1 (16 -> 32) and conv2 (32 -> 64), rank 16 (conv0 has 3 inputs)
    assert record["adapter_params_per_source"] == 16 * (16 + 32) + 16 * (32 + 64)
    assert set(record["hyperparameters"]) >= {
        "finetune_epochs", "composition_epochs", "adapter_dim", "learning_rate",
        "batch_size",
    }  # fmt: skip
    assert set(record["flops"]) >= {
        "adapter_params_millions", "adapter_params_per_source", "inference_gflops",
        "adapter_training_gflops", "adapter_training_gflops_total",
        "composition_learning_gflops", "total_gflops", "n_sources", "lora_rank",
        "n_adapted_layers", "breakdown",
    }  # fmt: skip
    assert tuple(record["memory_checkpoints"]) == MEMORY_CHECKPOINTS["pearl"] == (
        "experiment_start", "data_loaded", "base_model_created", "adapters_trained",
        "composition_learned", "experiment_end",
    )  # fmt: skip
    for voting in ("soft", "prob", "vote"):
        ensemble = load(workdir, config, f"ensemble_{voting}")
        assert ensemble["voting"].startswith(voting)
        assert ensemble["flops"]["voting"] == ensemble["voting"]
    assert load(workdir, config, "ensemble_prob")["flops"]["softmax_gflops"] > 0


def context(config, workdir, **changes):
    changed = config.copy_and_resolve_references()
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = changed
        for section in sections:
            node = node[section]
        node[leaf] = value
    splits = src.load_splits(changed, workdir, "d2")
    return Context(changed, workdir, "d2", ["d0", "d1"], splits, 7, False)


def test_staged_finetune_is_grasp_with_nothing_moved(experiment):
    """The exact control: GRASP at threshold 1.01 (no cosine passes), same stages, same
    seed, so the same numbers; and its record shows nothing moved."""
    config, workdir, *_ = experiment
    staged = load(workdir, config, "staged_finetune")
    assert [s["fraction"] for s in staged["transfer_history"]] == [0.0]
    assert staged["hyperparameters"]["threshold"] == 1.01
    ctx = context(config, workdir, **{"grasp.threshold": 1.01})
    grasp_run = methods.REGISTRY["grasp"].run(ctx)
    control = methods.REGISTRY["staged_finetune"].run(context(config, workdir))
    np.testing.assert_array_equal(control.test["logits"], grasp_run.test["logits"])
    moved = methods.REGISTRY["grasp"].run(
        context(config, workdir, **{"grasp.threshold": -1.0})
    )
    assert not np.array_equal(control.test["logits"], moved.test["logits"])


def test_grasps_family_trains_the_first_stage_once_a_trial(experiment):
    """grasp, staged_finetune and grasp_random share their trial's first stage (the
    first source fine-tuned on the target, `context.FirstStage`): one fine-tune and the
    same record in all three. That the shared runs keep the numbers of runs that each
    train their own, test_pinned_experiment checks (numbers pinned before sharing)."""
    config, workdir, _, fits = experiment
    assert [f for f in fits if f.startswith("grasp stage 0")] == ["grasp stage 0 (d0)"]

    def first_stage(method):
        history = load(workdir, config, method)["history"]
        return [
            {k: v for k, v in h.items() if k != "images_per_second"}
            for h in history
            if h["stage"] == 0
        ]

    assert first_stage("grasp") == first_stage("staged_finetune") != []
    assert first_stage("grasp_random") == first_stage("grasp")


def test_a_first_stage_is_kept_for_its_last_user_and_copied_before():
    trained = []

    def train():
        trained.append(1)
        return FineTuned({"w": jnp.arange(3.0)}, 0.5, [{"epoch": 0}])

    shared = FirstStage(users=3)
    got = [shared.get("key", train) for _ in range(3)]
    assert len(trained) == 1
    kept = got[2].variables["w"]  # the last user's; the others may donate theirs
    assert got[0].variables["w"] is not kept and got[1].variables["w"] is not kept
    for tuned in got:
        np.testing.assert_array_equal(tuned.variables["w"], [0.0, 1.0, 2.0])
        assert (tuned.best_val_accuracy, tuned.history) == (0.5, [{"epoch": 0}])
    shared.get("key", train)  # dropped after its last user: trained again
    assert len(trained) == 2
    alone = FirstStage()  # no users counted (a run function called directly)
    alone.get("key", train)
    alone.get("key", train)
    assert len(trained) == 4


def recorded_fits(ctx) -> list[dict]:
    """Makes `ctx.fit` record each call (its arguments and what it returned)."""
    calls, real = [], ctx.fit

    def fit(variables, recipe, description, **kwargs):
        result = real(variables, recipe, description, **kwargs)
        calls.append(
            dict(kwargs, variables=variables, recipe=recipe, description=description)
            | {"result": result}
        )
        return result

    ctx.fit = fit
    return calls


def assert_trees_equal(got, want, **tolerance):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if tolerance:
            np.testing.assert_allclose(a, b, **tolerance)
        else:
            np.testing.assert_array_equal(a, b)


def test_fusion_records_the_models_it_fused(prepared, monkeypatch):
    """`num_source_models` came from the config, so a FUSION that fused fewer sources
    than it was given still recorded all of them. Here the stack drops one."""
    config, workdir = prepared
    real_stack = fusion.logit_average.stack
    monkeypatch.setattr(
        fusion.logit_average, "stack", lambda loaders: real_stack(loaders[:1])
    )
    result = fusion.run_fusion(context(config, workdir, **{"fusion.epochs": 1}))
    assert result.extra["num_source_models"] == 1


def test_fusion_fine_tunes_the_stacked_sources_by_its_own_recipe(prepared):
    """One fit of every source stacked in bin order, through the mean of their logits,
    with `config.fusion`'s recipe; the predictions are the fitted stack's."""
    config, workdir = prepared
    ctx = context(config, workdir, **{"fusion.epochs": 2, "fusion.learning_rate": 3e-4})
    marks = []
    ctx.mark = marks.append
    calls = recorded_fits(ctx)
    result = fusion.run_fusion(ctx)
    [call] = calls
    assert call["description"] == "fusion"
    sources = [ctx.restore(b) for b in ("d0", "d1")]
    for got, *members in zip(
        jax.tree.leaves(call["variables"]), *map(jax.tree.leaves, sources), strict=True
    ):
        np.testing.assert_array_equal(got, np.stack(members))
    fit = call["recipe"]
    assert (fit.epochs, fit.learning_rate, fit.weight_decay) == (2, 3e-4, 0.01)
    assert (fit.schedule, fit.grad_clip_norm, fit.head_lr_multiplier) == (
        "cosine_per_epoch", None, 1.0
    )  # fmt: skip
    assert fit.augment is False  # digits turns augmentation off
    assert isinstance(call["model"], logit_average.LogitAverage)
    fused = logit_average.LogitAverage(ctx.model)
    fitted = call["result"].variables
    for split, out in (("validation", result.val), ("test", result.test)):
        want = evaluation.predict(fused, fitted, ctx.splits[split], ctx.pipeline)
        np.testing.assert_allclose(out["logits"], want["logits"], atol=1e-6)
    assert result.train_epochs == 2 and len(result.history) == 2
    assert result.extra == {"num_source_models": 2}
    assert marks == ["source_models_loaded", "fusion_model_created", "finetuning_complete"]


def test_faithful_pearl_is_the_first_source_zero_shot(prepared):
    config, workdir = prepared
    ctx = context(config, workdir, **{"pearl.faithful": True})
    result = pearl.run_pearl(ctx)
    first = evaluation.predict(
        ctx.model, ctx.restore("d0"), ctx.splits["test"], ctx.pipeline
    )
    np.testing.assert_allclose(result.test["logits"], first["logits"], atol=1e-5)
    assert result.extra["composition_weights"] == [0.5, 0.5]


def test_pearl_trains_one_adapter_set_per_source_then_their_weights(prepared):
    """On the first source's frozen model: a fresh set per source (each its own random
    start, B = 0) trained with `config.pearl`'s recipe, then uniform weights over the
    trained sets with the composition recipe; what it reports is that last fit's."""
    config, workdir = prepared
    ctx = context(
        config,
        workdir,
        **{"pearl.adapter_epochs": 2, "pearl.composition_epochs": 1, "pearl.rank": 4},
    )
    marks = []
    ctx.mark = marks.append
    calls = recorded_fits(ctx)
    result = pearl.run_pearl(ctx)
    assert [c["description"] for c in calls] == [
        "pearl adapters d0", "pearl adapters d1", "pearl composition"
    ]  # fmt: skip
    base = ctx.restore("d0")
    starts = []
    for call in calls[:2]:
        assert_trees_equal(call["variables"]["batch_stats"]["base"], base)
        [start] = call["variables"]["params"]["adapters"]
        assert all(np.all(site["B"] == 0) for site in start.values())
        assert [s["A"].shape for s in start.values()] == [(16, 4), (32, 4)]
        starts.append(start)
        fit = call["recipe"]
        assert (fit.epochs, fit.learning_rate, fit.weight_decay) == (2, 5e-4, 0.01)
        assert fit.schedule == "cosine_per_epoch" and fit.augment is False
        assert call["model"].block_gradient is False
    assert not np.array_equal(starts[0]["conv1"]["A"], starts[1]["conv1"]["A"])
    composition = calls[2]
    np.testing.assert_array_equal(composition["variables"]["params"]["weights"], [0.5, 0.5])
    trained = [c["result"].variables["params"]["adapters"][0] for c in calls[:2]]
    assert_trees_equal(composition["variables"]["batch_stats"]["adapters"], trained)
    assert_trees_equal(composition["variables"]["batch_stats"]["base"], base)
    fit = composition["recipe"]
    assert (fit.epochs, fit.learning_rate, fit.schedule) == (1, 0.01, "constant")
    assert fit.weight_decay == 0.0 and fit.augment is False
    assert composition["optimizer"] is pearl.composition_optimizer(0.01)
    weights = composition["result"].variables["params"]["weights"]
    assert result.extra == {
        "composition_weights": [float(w) for w in weights],
        "adapter_params_per_source": 4 * (16 + 32) + 4 * (32 + 64),
        "n_adapted_layers": 2,
        "faithful": False,
    }
    for split, out in (("validation", result.val), ("test", result.test)):
        want = evaluation.predict(
            adapters.Adapted(ctx.model),
            composition["result"].variables,
            ctx.splits[split],
            ctx.pipeline,
        )
        np.testing.assert_allclose(out["logits"], want["logits"], atol=1e-6)
    assert result.train_epochs == 2 * 2 + 1
    assert result.history == [
        dict(h, stage=stage)
        for stage, call in enumerate(calls)
        for h in call["result"].history
    ]
    assert [h["stage"] for h in result.history] == [0, 0, 1, 1, 2]
    assert marks == ["base_model_created", "adapters_trained", "composition_learned"]


def test_pearl_on_a_model_without_an_adapter_site_is_refused_by_name(prepared, monkeypatch):
    config, workdir = prepared
    monkeypatch.setattr(pearl.adapters, "find_sites", lambda *args: [])
    with pytest.raises(
        ValueError,
        match=r"^pearl: small_cnn has no layer an adapter fits \(>= 16 channels in and "
        r"out, not a head\)$",
    ):
        pearl.run_pearl(context(config, workdir))


@pytest.mark.parametrize("voting", ["soft", "prob", "vote"])
def test_ensemble_runs_combine_each_sources_predictions(prepared, voting):
    """Each source's predictions on the target, combined by hand: the mean logit, the
    log of the mean probability, or the majority with ties to the higher mean
    probability."""
    config, workdir = prepared
    ctx = context(config, workdir)
    marks = []
    ctx.mark = marks.append
    result = ensembles.run_ensemble(ctx, voting)
    per_source = [ctx.predict(ctx.restore(b)) for b in ("d0", "d1")]
    for index, out in enumerate((result.val, result.test)):
        logits = [np.asarray(p[index]["logits"], np.float64) for p in per_source]
        labels = per_source[0][index]["labels"]
        probs = np.mean([softmax(x) for x in logits], axis=0)
        if voting == "soft":
            scores = np.mean(logits, axis=0)
            predictions = scores.argmax(axis=1)
        else:
            scores = np.log(probs + 1e-10)
            predictions = probs.argmax(axis=1)
        if voting == "vote":
            classes = np.array([x.argmax(axis=1) for x in logits]).T
            predictions = []
            for row, votes in enumerate(classes):
                counts = np.bincount(votes, minlength=probs.shape[1])
                tied = np.flatnonzero(counts == counts.max())
                predictions.append(tied[np.argmax(probs[row, tied])])
        np.testing.assert_allclose(out["logits"], scores, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out["predictions"], predictions)
        np.testing.assert_array_equal(out["labels"], labels)
        assert out["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert result.extra == {
        "voting": ensembles.VOTING[voting],
        "num_source_models": 2,
    }
    assert result.extra["voting"].startswith(voting)
    assert (result.history, result.train_epochs) == ([], 0)
    assert marks == ["source_models_loaded", "ensemble_created"]


def squared_gradient(loss, params, *data):
    """The elementwise square of `loss`'s gradient in `params` (jitted: one program a
    shape instead of a small one per operation)."""
    return jax.tree.map(jnp.square, jax.jit(jax.grad(loss))(params, *data))


def own_data_fisher(ctx, workdir, bin_name, variables, examples):
    """FusionBench's Fisher written out here: per batch of the source's own train split,
    (grad of sum sqrt(p) log p under its own softmax)^2, summed, over the examples."""

    def loss(params, images):
        logits = ctx.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=False,
        )
        log_p = jax.nn.log_softmax(logits)
        return jnp.sum(jax.lax.stop_gradient(jnp.sqrt(jnp.exp(log_p))) * log_p)

    split = src.load_splits(ctx.config, workdir, bin_name)["train"]
    total, seen = None, 0
    for batch in ip.dataset(split, ctx.pipeline, train=False, shard_index=0, shard_count=1):
        if seen >= examples:
            break
        images = ip.normalize(batch["image"][: examples - seen], ctx.pipeline)
        seen += len(images)
        squared = squared_gradient(loss, variables["params"], images)
        total = squared if total is None else jax.tree.map(jnp.add, total, squared)
    return jax.tree.map(lambda t: t / seen, total)


def empirical_target_fisher(ctx, variables, examples):
    """The empirical Fisher written out here: the mean over the target's first train
    examples (in order) of the squared gradient of the cross-entropy with the true
    label, one example at a time."""

    def loss(params, image, label):
        logits = ctx.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            image[None],
            train=False,
        )
        return -jax.nn.log_softmax(logits)[0, label]

    images, labels = [], []
    for batch in ip.dataset(
        ctx.splits["train"], ctx.pipeline, train=False, shard_index=0, shard_count=1
    ):
        images += list(ip.normalize(batch["image"], ctx.pipeline))
        labels += list(batch["label"])
        if len(labels) >= examples:
            break
    total = None
    for image, label in zip(images[:examples], labels[:examples], strict=True):
        squared = squared_gradient(loss, variables["params"], image, label)
        total = squared if total is None else jax.tree.map(jnp.add, total, squared)
    return jax.tree.map(lambda t: t / examples, total)


def test_the_fisher_examples_are_the_splits_first_on_every_host(monkeypatch):
    """The Fisher is estimated on the same first examples on every host (the second of
    two here), across batches, each preprocessed by the pipeline."""
    rng = np.random.default_rng(0)
    split = [
        {"image": rng.integers(0, 256, (8, 8, 3), np.uint8), "label": i} for i in range(10)
    ]
    pipeline = ip.PipelineConfig(resize_size=8, crop_size=8, batch_size=4)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    chosen = fisher_estimate._first_examples(split, pipeline, 6)
    assert [len(batch["label"]) for batch in chosen] == [4, 2]
    np.testing.assert_array_equal(
        np.concatenate([batch["label"] for batch in chosen]), range(6)
    )
    images = np.stack([example["image"] for example in split[:6]]) / 255.0
    expected = (images - np.array(pipeline.mean)) / np.array(pipeline.std)
    np.testing.assert_allclose(
        np.concatenate([batch["image"] for batch in chosen]), expected, atol=1e-6
    )


MERGES = ["soup", "task_arithmetic", "ties", "dare", "magmax", "fisher", "fisher_target"]


@pytest.mark.parametrize("name", MERGES)
def test_runner_merges_equal_the_all_at_once_kernels(prepared, name, monkeypatch):
    """Each merge method's sources streamed as the runner does, against the merge of
    all of them at once with the literature's defaults; BatchNorm statistics by their
    plain mean. The runner starts the merge laid out as its sources: one compiled
    update a pass (TIES: its election apart)."""
    config, workdir = prepared
    traces, stream = [], merging.merge_streaming

    def counted(merger, start, loaders):
        def update(*args):
            traces.append(args[3])
            return merger.update(*args)

        return stream(merger._replace(update=update), start, loaders)

    monkeypatch.setattr(merging, "merge_streaming", counted)
    changes = {
        # more than a batch of 32; the data in the work folder
        "fisher": {"merging.fisher.examples": 40, "data_dir": ""},
        "fisher_target": {
            "merging.fisher.estimate": "empirical_target",
            "merging.fisher.examples": 6,
        },
    }
    ctx = context(config, workdir, **changes.get(name, {}))
    merged = weight_merges.merge_sources(ctx, name.removesuffix("_target"))
    restored = [ctx.restore(b) for b in ("d0", "d1")]
    params = [r["params"] for r in restored]
    base = ctx.base()["params"]
    if name == "soup":
        expected = merging.soup(params)
    elif name == "task_arithmetic":
        expected = merging.task_arithmetic(base, params, scale=0.3)
    elif name == "ties":
        expected = merging.ties(base, params, keep=0.2, scale=0.3, aggregate="sum")
    elif name == "dare":
        key = seeding.stream(seeding.root_key(7), "merge_dare")  # the run's stream
        expected = merging.dare(base, params, key=key, rate=0.5, scale=0.3)
    elif name == "magmax":
        expected = merging.magmax(base, params, scale=0.5)
    elif name == "fisher":
        fishers = [
            own_data_fisher(ctx, workdir, b, r, 40)
            for b, r in zip(("d0", "d1"), restored, strict=True)
        ]
        expected = merging.fisher(params, fishers, floor=1e-6, normalize=True)
    else:
        fishers = [empirical_target_fisher(ctx, r, 6) for r in restored]
        expected = merging.fisher(params, fishers, floor=1e-6, normalize=True)
    assert_trees_equal(merged["params"], expected, rtol=1e-5, atol=1e-6)
    assert len(traces) == (3 if name == "ties" else 1), traces
    for got, *stats in zip(
        jax.tree.leaves(merged["batch_stats"]),
        *(jax.tree.leaves(r["batch_stats"]) for r in restored),
        strict=True,
    ):
        np.testing.assert_allclose(got, np.mean(stats, axis=0), rtol=1e-6)


@pytest.mark.parametrize("finetune_epochs", [0, 1, -1])
def test_a_weight_merge_is_evaluated_merged_then_fine_tuned(prepared, finetune_epochs):
    """The validation accuracy right after merging, then GRASP's stage recipe for
    GRASP's budget (-1: 1 + 1 x (2 - 1) = 2 epochs here), the epochs set, or none (0:
    the merged model's own predictions)."""
    config, workdir = prepared
    ctx = context(config, workdir, **{"merging.finetune_epochs": finetune_epochs})
    marks = []
    ctx.mark = marks.append
    calls = recorded_fits(ctx)
    result = weight_merges.run_weight_merge(ctx, "task_arithmetic")
    merged = weight_merges.merge_sources(ctx, "task_arithmetic")
    merged_val, merged_test = ctx.predict(merged)
    epochs = 2 if finetune_epochs == -1 else finetune_epochs
    assert result.extra == {
        "num_source_models": 2,
        "val_accuracy_after_merge": merged_val["accuracy"],
        "finetune_epochs": epochs,
    }
    assert result.train_epochs == epochs and len(result.history) == epochs
    assert marks == ["models_merged", "finetuning_complete"]
    if epochs == 0:
        assert calls == []
        np.testing.assert_array_equal(result.test["logits"], merged_test["logits"])
        return
    [call] = calls
    assert_trees_equal(call["variables"], merged)
    assert call["description"] == "task_arithmetic fine-tune"
    fit = call["recipe"]
    grasp = config.grasp
    assert (fit.epochs, fit.learning_rate, fit.weight_decay, fit.augment) == (
        epochs, grasp.learning_rate, grasp.weight_decay, grasp.augment
    )  # fmt: skip
    assert fit.schedule == "cosine_per_epoch" and fit.grad_clip_norm is None
    tuned_val, tuned_test = ctx.predict(call["result"].variables)
    np.testing.assert_array_equal(result.test["logits"], tuned_test["logits"])
    np.testing.assert_array_equal(result.val["logits"], tuned_val["logits"])


def test_a_weight_merges_settings_are_its_merger_budget_and_stage_recipe(prepared):
    config, _ = prepared
    grasp = config.grasp
    stage = {
        "initial_epochs": 1,
        "finetune_epochs": 1,
        "learning_rate": grasp.learning_rate,
        "weight_decay": grasp.weight_decay,
        "augment": grasp.augment,
    }
    assert weight_merges.hyperparameters(config, "ties") == {
        "ties": {"keep": 0.2, "scale": 0.3, "aggregate": "sum"},
        "finetune_epochs_setting": -1,
        "stage_recipe": stage,
    }
    assert weight_merges.hyperparameters(config, "soup") == {
        "soup": {},
        "finetune_epochs_setting": -1,
        "stage_recipe": stage,
    }
    assert weight_merges.hyperparameters(config, "fisher")["fisher"] == {
        "floor": 1e-6, "normalize": True, "estimate": "expected_own_data", "examples": 20
    }  # fmt: skip
