"""`experiments.study` at CI size: a reduced grid, every output, and its invariants."""

from __future__ import annotations

import json

import pytest

from experiments import runner, settings, study
from grasp_jax.grasp import NOTHING_MOVES
from tests import pinned_experiment
from tests.test_main import tiny_config


@pytest.fixture(scope="module")
def small_study(digits_dir, small_sources, tmp_path_factory):
    workdir = pinned_experiment.with_sources(
        small_sources, tmp_path_factory.mktemp("study")
    )
    config = tiny_config(digits_dir)
    config.trials = 1  # one run a variant: every code path, half the time of two
    config.study.update(thresholds=(-1.0, 0.3, 1.01), granularities=("tensor", "channel"))
    with pinned_experiment.recorded_fits() as fits:
        result = study.run_study(config, workdir, progress=False)
    return config, workdir, result, fits


def test_the_grid_comes_from_the_config_and_always_holds_the_baseline(digits_dir):
    assert study.STAGED[1] == NOTHING_MOVES  # kept apart so that --help imports no JAX
    config = tiny_config(digits_dir)
    config.study.update(thresholds=(0.3,), granularities=("element",), modes=("soft",))
    config.study.controls = False
    assert study.variants(config.study) == [
        ("grasp", 1.01, "tensor", "hard"),
        ("grasp", 0.3, "element", "soft"),
    ]
    config.study.controls = True
    assert study.variants(config.study)[-1] == ("grasp_random", 0.3, "element", "hard")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("granularities", ("tensr",), "study.granularities=tensr: choose from"),
        ("modes", (), "study.modes=: choose from"),
        ("thresholds", (0.3, 2.0), "study.thresholds: [2.0]; cosine thresholds lie in"),
    ],
)
def test_a_study_key_that_cannot_work_is_refused_by_name(digits_dir, key, value, message):
    config = tiny_config(digits_dir)
    config.study[key] = value
    with pytest.raises(settings.ConfigError, match=message.replace("[", r"\[")):
        study.check(config)


def test_every_variant_has_a_row_and_the_files_exist(small_study):
    _, workdir, result, _ = small_study
    # grasp: 2 granularities x 2 modes x 3 thresholds; grasp_random: 2 x threshold 0.3
    assert len(result["rows"]) == 12 + 2
    assert {r["n_runs"] for r in result["rows"]} == {1}  # one target x one trial
    out = workdir / "results" / "digits_drift"
    assert json.loads((out / "study.json").read_text())["rows"] == result["rows"]
    heading = (out / "study.md").read_text().splitlines()[0]
    assert heading == "# digits_drift / small_cnn: what alignment adds"  # once
    assert (out / "study.png").stat().st_size > 0


def test_the_variants_share_the_trials_first_stage(small_study):
    """The 14 variants' runs of the (target, trial) start from one first-stage
    fine-tune (`runner.run_variants`), and every run records the same stage 0."""
    _, workdir, _, fits = small_study
    assert [f for f in fits if f.startswith("grasp stage 0")] == ["grasp stage 0 (d0)"]
    assert len([f for f in fits if f.startswith("grasp stage 1")]) == 14
    records = [
        json.loads(path.read_text())["history"]
        for path in (workdir / "results" / "digits_drift").glob("*/metrics.json")
    ]
    stage_0 = [[h for h in history if h["stage"] == 0] for history in records]
    assert len(stage_0) == 14 and all(s == stage_0[0] != [] for s in stage_0)


def test_a_longer_study_is_costed_from_every_variants_own_folder(small_study):
    """The plan line of the study with a second trial: each method's finished runs,
    read from their variants' folders (named by threshold, granularity and mode), give
    its mean time; the 14 new runs mirror the 14 finished ones, so together they take
    what those took."""
    config, workdir, _, _ = small_study
    longer = config.copy_and_resolve_references()
    longer.trials = 2
    runs, named_by, finished_seconds = [], [], 0.0
    for variant in study.variant_configs(longer):
        for target, trial, name, finished in runner.plan(variant, workdir, ["d2"]):
            runs.append((target, trial, name, finished))
            named_by.append(variant)
            if finished:
                folder = runner.run_name(variant, target, name, trial)
                path = workdir / "results/digits_drift" / folder / "metrics.json"
                finished_seconds += json.loads(path.read_text())["total_time_seconds"]
    assert runner.plan_line(longer, workdir, runs, named_by) == (
        "plan: 28 runs, 14 finished earlier (reused); the other 14 take about "
        f"{runner._duration(finished_seconds)} (at past run times)"
    )


def row(result, method, threshold, granularity, mode="hard"):
    (found,) = [
        r
        for r in result["rows"]
        if (r["method"], r["threshold"], r["granularity"], r["mode"])
        == (method, threshold, granularity, mode)
    ]
    return found


def test_threshold_extremes_move_everything_or_nothing(small_study):
    _, _, result, _ = small_study
    staged = row(result, "grasp", 1.01, "tensor")
    assert staged["fraction_moved_mean"] == 0.0
    assert staged["paired_difference_to_staged_finetuning"]["mean"] == 0.0
    # -1 moves every tensor whose gradients are not exactly opposite: all of them here
    assert row(result, "grasp", -1.0, "tensor")["fraction_moved_mean"] == 1.0
    # nothing moves at 1.01 whatever the granularity: identical to staged fine-tuning
    for granularity in ("tensor", "channel"):
        same = row(result, "grasp", 1.01, granularity, "soft")
        assert same["test_accuracy"]["mean"] == staged["test_accuracy"]["mean"]


def test_the_random_control_moves_units_not_aligned_ones(small_study):
    _, workdir, result, _ = small_study
    random = row(result, "grasp_random", 0.3, "channel")
    assert 0.0 < random["fraction_moved_mean"] < 1.0
    runs = workdir / "results" / "digits_drift"
    folders = sorted(p.name for p in runs.glob("*grasp_random*"))
    assert folders == [
        "small-cnn_d2_grasp_random_30_channel_hard_trial1",
        "small-cnn_d2_grasp_random_30_trial1",
    ]


def test_a_study_redirected_to_a_file_draws_no_progress_bars(
    digits_dir, tmp_path, monkeypatch
):
    """The study passes no `progress=True` of its own: bars only on a terminal (#27)."""
    from experiments import runner

    asked = []

    def stop_at_once(configs, workdir, *, progress=None, announce=None):
        asked.append(progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_variants", stop_at_once)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(tiny_config(digits_dir), tmp_path)
    assert asked and asked[0] is not True
