"""The experiment runner end to end at CI size: every method, outputs, resume, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import methods, report, runner, settings, source_matrix
from experiments.configs import override
from experiments.configs.digits import get_config
from tests import pinned_experiment
from tests.test_tensorboard import read_events

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "auroc",
    "confusion_matrix",
    "precision_macro",
    "recall_macro",
    "f1_score_macro",
    "auroc_macro",
}


def tiny_config(digits_dir):
    """One target, two trials (seeds), one epoch per phase."""
    return pinned_experiment.small_config(digits_dir, targets="d2", trials=2)


@pytest.fixture(scope="module")
def experiment(digits_dir, small_sources, tmp_path_factory):
    """The tiny experiment, from the test session's sources and source matrix (their
    settings are this config's; the runner reuses them after its checks)."""
    workdir = pinned_experiment.with_sources(small_sources, tmp_path_factory.mktemp("run"))
    config = tiny_config(digits_dir)
    summary = runner.run_experiment(config, workdir, progress=False)
    return config, workdir, summary


def test_every_method_writes_its_files(experiment):
    config, workdir, _ = experiment
    results = workdir / "results" / "digits_drift"
    events = read_events(workdir / "tensorboard")
    for method in config.methods:
        for trial in (1, 2):
            run = results / runner.run_name(config, "d2", method, trial)
            record = json.loads((run / "metrics.json").read_text())
            assert record == json.loads((run / "config.json").read_text())
            resolved = json.loads((run / "run_config.json").read_text())
            assert resolved["run"] == {
                "method": method,
                "target": "d2",
                "trial": trial,
                "seed": settings.run_seed(config, "d2", trial),
                "sources": ["d0", "d1"],
            }
            assert resolved["grasp"] == config.grasp.to_dict()
            label = method + methods.REGISTRY[method].folder_suffix(config)
            assert f"d2/{label}/trial{trial}/test_accuracy" in events
            assert record["method"] == method and record["target"] == "d2"
            assert record["diverged"] == []  # no stage stopped on a non-finite loss
            assert record["sources"] == ["d0", "d1"] and record["trial"] == trial
            assert (
                set(record["test_metrics"]) >= METRIC_KEYS
                and set(record["val_metrics"]) >= METRIC_KEYS
            )
            assert len(record["test_metrics"]["confusion_matrix"]) == 10
            assert record["flops"]["total_gflops"] > 0
            assert json.loads((run / "flops_report.json").read_text()) == record["flops"]
            profile = json.loads((run / "memory_profile.json").read_text())
            assert profile["peak"]["pytorch_peak_allocated_mb"] > 0
            assert (run / "confusion_matrices" / "test_confusion_matrix.png").stat().st_size
            if method != "ensemble":
                assert (run / "training_curves.png").exists()
    grasp_run = json.loads(
        (results / "small-cnn_d2_grasp_30_trial1" / "metrics.json").read_text()
    )
    (stage,) = grasp_run["transfer_history"]
    assert stage["source"] == "d1" and 0 <= stage["fraction"] <= 1
    assert set(grasp_run["flops"]) >= {
        "initial_training_gflops",
        "alignment_gflops_total",
        "transfer_gflops_total",
        "finetune_gflops_total",
    }


# docs/reference.md §6: what a script written for the official code reads.
REFERENCE_KEYS = {
    "dataset", "target", "sources", "trial", "model", "method", "val_metrics",
    "test_metrics", "total_time_seconds", "total_time_minutes", "flops", "gpu_memory",
    "memory_checkpoints", "hyperparameters",
}  # fmt: skip
GPU_MEMORY_KEYS = {
    f"{k}_{u}"
    for k in (
        "peak_gpu_memory",
        "peak_allocated",
        "pytorch_peak_allocated",
        "peak_reserved",
        "pytorch_peak_reserved",
        "baseline_overhead",
    )
    for u in ("mb", "gb")
} | {"device", "gpu_id", "is_cuda"}
CHECKPOINT_KEYS = {
    "pytorch_allocated_mb",
    "pytorch_reserved_mb",
    "pytorch_max_allocated_mb",
    "pytorch_max_reserved_mb",
    "actual_gpu_memory_mb",
    "baseline_overhead_mb",
}


def test_outputs_have_every_key_of_the_reference(experiment):
    _, workdir, _ = experiment
    results = workdir / "results" / "digits_drift"
    grasp = json.loads((results / "small-cnn_d2_grasp_30_trial1/metrics.json").read_text())
    ensemble = json.loads(
        (results / "small-cnn_d2_ensemble_trial2/metrics.json").read_text()
    )
    for record in (grasp, ensemble):
        assert set(record) >= REFERENCE_KEYS and record["model"] == "small-cnn"
        assert set(record["gpu_memory"]) >= GPU_MEMORY_KEYS
        assert record["gpu_memory"]["memory_source"].startswith("host memory")  # CPU
        for sample in record["memory_checkpoints"].values():
            assert set(sample) == CHECKPOINT_KEYS
    assert list(grasp["memory_checkpoints"]) == [
        "experiment_start",
        "data_loaded",
        "initial_model_loaded",
        "initial_finetuning_complete",
        "experiment_end",
    ]
    assert set(grasp["hyperparameters"]) >= {
        "initial_epochs", "finetune_epochs", "num_alignment_batches",
        "alignment_threshold", "learning_rate", "batch_size",
    }  # fmt: skip
    assert grasp["hyperparameters"]["alignment_threshold"] == 0.3
    assert set(grasp["transfer_history"][0]) >= {"source", "n_transferred"}
    assert list(ensemble["memory_checkpoints"]) == [
        "experiment_start",
        "data_loaded",
        "source_models_loaded",
        "ensemble_created",
        "experiment_end",
    ]
    assert ensemble["voting"] and ensemble["num_source_models"] == 2
    assert set(ensemble["dataset_sizes"]) >= {"n_val_samples", "n_test_samples"}
    profile = json.loads(
        (results / "small-cnn_d2_grasp_30_trial1/memory_profile.json").read_text()
    )
    assert set(profile) >= {
        "checkpoints", "peak", "device", "gpu_id", "is_cuda", "baseline_overhead_mb"
    }  # fmt: skip
    assert set(profile["peak"]) >= {
        f"{k}_{u}"
        for k in (
            "pytorch_peak_allocated",
            "pytorch_peak_reserved",
            "actual_peak_gpu_memory",
        )
        for u in ("mb", "gb")
    }
    assert set(grasp["flops"]) >= {
        "method", "model_params_millions", "inference_gflops", "initial_training_gflops",
        "alignment_gflops_total", "transfer_gflops_total", "finetune_gflops_total",
        "total_gflops", "n_sources", "breakdown",
    }  # fmt: skip
    assert set(grasp["flops"]["breakdown"]) == {
        "initial_training_percent", "alignment_percent", "transfer_percent",
        "finetune_percent",
    }  # fmt: skip
    assert set(ensemble["flops"]) >= {
        "method", "voting", "model_params_millions", "single_model_inference_gflops",
        "val_inference_gflops", "test_inference_gflops", "combination_gflops",
        "softmax_gflops", "total_gflops", "n_sources", "n_val_samples", "n_test_samples",
        "breakdown",
    }  # fmt: skip
    assert set(ensemble["flops"]["breakdown"]) == {
        "val_inference_percent", "test_inference_percent", "combination_percent"
    }  # fmt: skip
    text = (results / "grasp_30_small-cnn_digits_drift_summary.txt").read_text()
    assert "Target: d2 (2 trials)" in text and "Test accuracy:" in text
    assert (results / "ensemble_small-cnn_digits_drift_summary.txt").exists()


def test_methods_share_a_seed_per_target_and_trial(experiment):
    """Paired runs: every method of one (target, trial) has the same recorded seed."""
    config, workdir, _ = experiment
    results = workdir / "results" / "digits_drift"
    seeds = {
        (m, t): json.loads(
            (results / runner.run_name(config, "d2", m, t) / "metrics.json").read_text()
        )["seed"]
        for m in config.methods
        for t in (1, 2)
    }
    for trial in (1, 2):
        assert len({seeds[(m, trial)] for m in config.methods}) == 1
    assert seeds[("grasp", 1)] != seeds[("grasp", 2)]


def test_source_matrix(experiment):
    _, workdir, _ = experiment
    results = workdir / "results" / "digits_drift"
    matrix = json.loads((results / "source_matrix.json").read_text())
    assert matrix["rows"] == ["pretrained", "d0", "d1", "d2"]
    assert matrix["columns"] == ["d0", "d1", "d2"]
    values = np.asarray(matrix["accuracy"])
    assert values.shape == (4, 3) and ((values >= 0) & (values <= 1)).all()
    # Accuracies on 450 test images: multiples of 1/450.
    np.testing.assert_allclose(values * 450, np.round(values * 450), atol=1e-6)
    assert 0 <= matrix["pretrained_pool_test_accuracy"] <= 1
    assert (results / "source_matrix.png").stat().st_size > 0
    recalibrated = matrix["batchnorm_recalibrated"]
    for shares in (matrix["largest_class_share"], recalibrated["largest_class_share"]):
        shares = np.asarray(shares)  # of 450 predictions, at least a tenth in one class
        assert shares.shape == (4, 3) and ((shares >= 0.1) & (shares <= 1)).all()
        np.testing.assert_allclose(shares * 450, np.round(shares * 450), atol=1e-6)
    assert np.asarray(recalibrated["accuracy"]).shape == (4, 3)
    ensemble = np.asarray(matrix["other_sources_soft_ensemble"])
    assert ensemble.shape == (3,) and ((ensemble >= 0) & (ensemble <= 1)).all()


def test_the_other_sources_ensemble_leaves_the_bins_own_source_out():
    """By hand, one test image of class 0 per bin: the mean of the other sources'
    softmax decides, the bin's own source never counts."""

    def out(*logits):
        return {"logits": np.array([logits], float), "labels": np.array([0])}

    own_wrong = out(0.0, 20.0)  # the bin's own source: confidently wrong
    far = out(0.0, 10.0)  # p(0) = 4.5e-5
    near = out(3.0, 0.0)  # p(0) = 0.953
    # bin 0: sources 1-3 vote: mean softmax p(0) = 0.635 (right), where the mean of
    # their logits, (2, 3.3), would be wrong and counting source 0 would tip it too
    outputs = [[own_wrong, near], [far, own_wrong], [near, near], [near, far]]
    outputs = [[*row, near, near] for row in outputs]  # bins 2, 3: every source right
    outputs[2][2] = own_wrong
    outputs[3][3] = own_wrong
    # bin 1: sources 0, 2, 3 -> near, near, far: right
    assert source_matrix.other_sources_soft_ensemble(outputs) == [1.0, 1.0, 1.0, 1.0]
    outputs[2][0] = far  # bin 0 now: far, far, near -> p(0) = 0.318: wrong
    assert source_matrix.other_sources_soft_ensemble(outputs)[0] == 0.0


def record(method, target, trial, accuracy):
    return {
        "method_label": method,
        "target": target,
        "trial": trial,
        "test_metrics": {"accuracy": accuracy},
    }


def test_summary_statistics_on_synthetic_records():
    grasp = [0.80, 0.70, 0.90, 0.60, 0.75]
    other = [0.85, 0.70, 0.95, 0.70, 0.70]  # differences: +5, 0, +5, +10, -5 points
    keys = [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1)]
    results = [record("grasp", t, k, a) for (t, k), a in zip(keys, grasp, strict=True)]
    results += [record("other", t, k, a) for (t, k), a in zip(keys, other, strict=True)]
    results.append(record("other", "d", 1, 0.5))  # no GRASP run to pair with
    summary = report.summarize(results)
    entry = summary["methods"]["grasp"]
    assert entry["test_accuracy_mean"] == pytest.approx(0.75)
    # population std (ddof 0), as the reference: sqrt(mean of squared deviations)
    assert entry["test_accuracy_std"] == pytest.approx((0.05 / 5) ** 0.5)
    assert entry["per_target"]["a"] == {
        "test_accuracy_mean": pytest.approx(0.75),
        "test_accuracy_std": pytest.approx(0.05),
        "n_runs": 2,
    }
    assert "paired_difference_to_grasp" not in entry
    paired = summary["methods"]["other"]["paired_difference_to_grasp"]
    assert paired["n_pairs"] == 5 and paired["mean"] == pytest.approx(3.0)
    # deviations from 3: (2, -3, 2, 7, -8), squares sum to 130: sample variance 32.5;
    # t(0.975, 4) = 2.776445 (tables)
    half = 2.776445 * 32.5**0.5 / 5**0.5
    assert paired["ci95"] == pytest.approx([3.0 - half, 3.0 + half], abs=1e-4)
    single = report.summarize(results[:1] + results[5:6])
    assert single["methods"]["other"]["paired_difference_to_grasp"]["ci95"] is None
    # other: mean of (85, 70, 95, 70, 70, 50) = 73.3, population std 14.0
    assert report.summary_markdown(summary, "t") == (
        "# t\n\nTest accuracy in %, mean ± population std over trials (n runs); Δ grasp: "
        "the paired difference to GRASP in points over (target, trial) pairs with the "
        "same seed, mean [95 % Student t interval].\n\n"
        "| rank | method | all targets | Δ grasp | a | b | c | d |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 1 | grasp | 75.0 ± 10.0 (5) | - | 75.0 ± 5.0 | 75.0 ± 15.0 | 75.0 ± 0.0 | - |\n"
        "| 2 | other | 73.3 ± 14.0 (6) | +3.0 [-4.1, +10.1] | 77.5 ± 7.5 | 82.5 ± 12.5 | "
        "70.0 ± 0.0 | 50.0 ± 0.0 |\n"
    )
    # ranked by mean accuracy: other (85) above grasp (80)
    assert "| 1 | other | 85.0 ± 0.0 (1) | +5.0 | 85.0 ± 0.0 |" in report.summary_markdown(
        single, "t"
    )
    assert [m["rank"] for m in single["methods"].values()] == [1, 2]
    assert list(single["methods"]) == ["other", "grasp"]


def test_paired_interval_needs_two_pairs():
    assert report.mean_with_interval([]) == {
        "mean": None,
        "ci95": None,
        "n_pairs": 0,
        "interval": "student t",
    }
    two = report.mean_with_interval([1.0, 3.0])  # t(0.975, 1) = 12.7062 (tables)
    assert two["mean"] == 2.0
    assert two["ci95"] == pytest.approx([2.0 - 12.7062, 2.0 + 12.7062], abs=1e-4)


def test_summary_has_each_method(experiment):
    config, workdir, summary = experiment
    on_disk = json.loads((workdir / "results/digits_drift/summary.json").read_text())
    for method in config.methods:
        entry = on_disk["methods"][method]
        assert entry["n_runs"] == 2
        assert set(entry) >= {"test_accuracy_mean", "test_accuracy_std", "per_target"}
        assert entry["per_target"]["d2"]["n_runs"] == 2
    assert (workdir / "results/digits_drift/summary.md").read_text().startswith("# digits")
    assert (workdir / "results/digits_drift/summary.png").exists()
    assert on_disk["methods"] == summary["methods"]
    machine = on_disk["machine"]  # where the numbers come from
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert (
        machine["cpu"] in cpuinfo and machine["device_kind"] == jax.devices()[0].device_kind
    )
    assert machine["libraries"]["jax"] == jax.__version__
    assert set(machine["cpu_flags_xla_uses"]) <= set(cpuinfo.split())


def test_a_stale_source_matrix_is_recomputed(experiment):
    """Once written, the matrix was never recomputed: after retraining the sources or
    changing the bins it kept the old numbers. It now records its inputs (the bins and
    every model's checksums) and is recomputed when they change."""
    config, workdir, _ = experiment
    path = workdir / "results/digits_drift/source_matrix.json"
    matrix = json.loads(path.read_text())
    assert matrix["inputs"] == source_matrix.inputs(config, workdir)
    assert set(matrix["inputs"]["checksums"]) == {"_pretrained", "d0", "d1", "d2"}
    stale = dict(matrix, accuracy=[[0.0]], inputs=dict(matrix["inputs"], bins=["d9"]))
    path.write_text(json.dumps(stale))
    runner.run_methods(config, workdir, progress=False)
    assert json.loads(path.read_text()) == matrix


def test_a_command_that_runs_little_keeps_the_whole_summary(experiment):
    """The summary is that of every finished run on disk under these settings: a later
    command for one method, or for a target without sources, once replaced it with its
    own (one method, or none)."""
    config, workdir, _ = experiment
    path = workdir / "results/digits_drift/summary.json"
    before = json.loads(path.read_text())["methods"]
    one = config.copy_and_resolve_references()
    one.methods = ("finetune",)
    assert runner.run_experiment(one, workdir, progress=False)["methods"] == before
    nothing = config.copy_and_resolve_references()
    nothing.update(targets=("d0",), sources="past")
    runner.run_experiment(nothing, workdir, progress=False)
    assert json.loads(path.read_text())["methods"] == before
    assert set(before) == set(config.methods)


def test_rerun_resumes_only_unfinished_runs(experiment):
    config, workdir, _ = experiment
    results = workdir / "results" / "digits_drift"
    crashed = results / runner.run_name(config, "d2", "finetune", 2) / "metrics.json"
    kept = results / runner.run_name(config, "d2", "grasp", 1) / "metrics.json"
    stamp = kept.stat().st_mtime_ns
    crashed.unlink()  # as if the process died before finishing this run
    runner.run_experiment(config, workdir, progress=False)
    assert crashed.exists() and kept.stat().st_mtime_ns == stamp


def test_finished_runs_with_other_settings_are_not_reused(experiment):
    config, workdir, _ = experiment
    changed = config.copy_and_resolve_references()
    changed.grasp.granularity = "channel"
    with pytest.raises(
        settings.ConfigError, match=r"other settings \(\['hyperparameters.granularity'\]\)"
    ):
        runner.run_experiment(changed, workdir, progress=False)


@pytest.mark.parametrize(
    ("key", "value", "differ"),
    [
        ("seed", 1, "['seed']"),
        ("pipeline.batch_size", 16, "['pipeline.batch_size']"),
        ("source_training.learning_rate", 0.5, "['recipe.learning_rate']"),
    ],
)
def test_runs_are_not_reused_when_seed_pipeline_or_sources_changed(
    experiment, key, value, differ
):
    config, workdir, _ = experiment
    changed = config.copy_and_resolve_references()
    *sections, leaf = key.split(".")
    node = changed
    for section in sections:
        node = node[section]
    node[leaf] = value
    # the sources exist: their reuse check (or the runs') must refuse, naming the key
    with pytest.raises(settings.ConfigError, match=re.escape(f"other settings ({differ})")):
        runner.run_methods(changed, workdir, progress=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("methods", ("grasp", "fuse"), r"unknown method\(s\) \['fuse'\]; choose from"),
        (
            "methods",
            ("grasp,ties+nope",),
            r"unknown method\(s\) \['nope'\];.*'magmax'.* or all",
        ),
        ("targets", ("d9",), r"unknown target\(s\) \['d9'\]; the bins are"),
        ("sources", "future", r"use one of \['all', 'past'\]"),
        ("model", "vit", r"config.model='vit'; choose one of \["),
    ],
)
def test_bad_experiment_keys_list_the_valid_ones(key, value, message):
    config = get_config()
    setattr(config, key, value)
    with pytest.raises(settings.ConfigError, match=message):
        settings.check(config, methods.REGISTRY)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("merging.dare.rate", 1.0, r"merging.dare.rate=1.0; use a value in \[0.0, 0.999\]"),
        ("merging.ties.keep", 1.5, r"merging.ties.keep=1.5"),
        ("merging.finetune_epochs", -2, r"use -1 \(GRASP's budget\)"),
        ("merging.fisher.examples", 0, r"merging.fisher.examples=0"),
        (
            "merging.fisher.estimate",
            "empirical",
            r"merging.fisher.estimate='empirical'; use one of \['expected_own_data', "
            r"'empirical_target'\]",
        ),
        ("merging.ties.aggregate", "median", r"merging.ties.aggregate='median'; use one"),
        ("fusion.epochs", 0, r"fusion.epochs=0; train at least one epoch"),
        ("fusion.learning_rate", 0.0, r"fusion.learning_rate=0.0; must be > 0"),
        ("pearl.adapter_epochs", 0, r"pearl.adapter_epochs=0; use at least 1"),
        ("pearl.rank", 0, r"pearl.rank=0"),
        ("pearl.composition_learning_rate", 0.0, r"pearl.composition_learning_rate=0.0"),
    ],
)
def test_bad_baseline_settings_name_the_key(key, value, message):
    config = get_config()
    section, *inner, leaf = key.split(".")
    node = config[section]
    for name in inner:
        node = node[name]
    node[leaf] = value
    with pytest.raises(settings.ConfigError, match=message):
        settings.check(config, methods.REGISTRY)


def test_baseline_settings_at_the_edges_of_their_ranges_are_accepted():
    config = get_config()
    config.merging.dare.rate = 0.0
    config.merging.ties.keep = 1.0
    config.merging.ties.scale = 10.0
    config.merging.finetune_epochs = -1
    config.merging.fisher.examples = 1
    config.merging.fisher.floor = 0.0
    config.pearl.update(rank=1, adapter_epochs=1, composition_epochs=1)
    config.fusion.epochs = 1
    settings.check(config, methods.REGISTRY)  # no error


def test_methods_all_is_every_method_but_the_alias():
    config = get_config("methods=all")
    settings.check(config, methods.REGISTRY)  # "all" is not an unknown method
    names = methods.selected(config)
    assert set(names) == set(methods.REGISTRY) - {"ensemble"}
    assert methods.selected(get_config("methods=grasp+fusion")) == ["grasp", "fusion"]
    config.methods = ("grasp,ties+fusion",)
    assert settings.requested_methods(config) == ["grasp", "ties", "fusion"]
    one_string = types.SimpleNamespace(methods="grasp,ties+fusion")
    assert settings.requested_methods(one_string) == ["grasp", "ties", "fusion"]


def test_unknown_config_key_is_rejected_on_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config=digits", "--config.nope=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "nope" in result.stderr


def test_past_sources_only_use_earlier_bins():
    config = get_config()
    config.sources = "past"
    assert settings.source_bins(config, "d2") == ["d0", "d1"]
    assert settings.source_bins(config, "d0") == []


def test_step_costs_are_counted_once_per_model_pipeline_and_merge(monkeypatch):
    """The study calls the runner once per variant: the steps' FLOPs are counted once,
    and a setting that changes a program is counted afresh, to its own value."""
    monkeypatch.setattr(runner, "_STEP_COSTS", {})
    counted = []
    count = runner._counted_step_costs
    monkeypatch.setattr(
        runner, "_counted_step_costs", lambda c: counted.append(1) or count(c)
    )
    config = get_config()
    first = runner.step_costs(config)
    assert runner.step_costs(config.copy_and_resolve_references()) is first
    assert len(counted) == 1
    for key, value in [
        ("grasp.granularity", "element"),
        ("grasp.mode", "soft"),
        ("pipeline.batch_size", "16"),
        ("num_classes", "7"),
    ]:
        changed = override(config.copy_and_resolve_references(), {key: value})
        assert runner.step_costs(changed) == count(changed) != first, key
    assert len(counted) == 5


def test_two_processes_compute_the_same_results(experiment, digits_dir, tmp_path):
    """`python -m experiments.main` as a two-process job (gloo): both processes print
    the same summary, and the files on disk hold it. The sources and their matrix come
    from `experiment` (same settings: reused after their checks); test_data_parallel
    trains in two processes."""
    from tests.test_data_parallel import free_port

    shutil.copytree(experiment[1] / "sources", tmp_path / "sources")
    results = tmp_path / "results/digits_drift"
    results.mkdir(parents=True)
    shutil.copy(experiment[1] / "results/digits_drift/source_matrix.json", results)

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=digits:bins=d0+d1+d2,targets=d2,trials=1,methods=grasp+ensemble,"
        "pretrain.epochs=1,source_training.epochs=1,"
        "grasp.initial_epochs=1,grasp.finetune_epochs=1",
        f"--config.data_dir={digits_dir}",
        f"--workdir={tmp_path}",
        f"--coordinator=localhost:{port}",
        "--num_processes=2",
        "--cpu_collectives=gloo",
    ]
    workers = [
        subprocess.Popen(
            [*command, f"--process_id={i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs, events = [], []
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-3000:]
        # Redirected, a log has no progress-bar frames or cursor codes, and one
        # timestamped line per run (from process 0); the copied sources are reused.
        assert "\r" not in out + err and "\x1b[" not in out + err
        assert ": trained, best validation accuracy" not in out
        events.append([line for line in out.splitlines() if ": test accuracy " in line])
        outputs.append(out[out.index("# digits_drift") :].split("\nresults in")[0])
    assert [len(e) for e in events] == [2, 0]  # grasp and ensemble on d2, one trial
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d small-cnn_d2_", events[0][0])
    assert outputs[0] == outputs[1]
    on_disk = (tmp_path / "results/digits_drift/summary.md").read_text()
    assert outputs[0].strip() == on_disk.strip()
    assert "| grasp |" in on_disk and "| ensemble |" in on_disk


def test_only_process_zero_writes(experiment, tmp_path, monkeypatch):
    config, workdir, summary = experiment
    run = workdir / "results/digits_drift" / runner.run_name(config, "d2", "grasp", 1)
    record = json.loads((run / "metrics.json").read_text())
    profile = json.loads((run / "memory_profile.json").read_text())
    monkeypatch.setattr(report.writers.jax, "process_index", lambda: 1)
    report.write_run(
        tmp_path / "run", record, profile, [str(i) for i in range(10)], "t", {}
    )
    report.write_summary(tmp_path / "summary", summary, "t")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(report.writers.jax, "process_index", lambda: 0)
    report.write_run(
        tmp_path / "run", record, profile, [str(i) for i in range(10)], "t", {}
    )
    assert json.loads((tmp_path / "run/metrics.json").read_text()) == record


def test_list_names_every_method_with_its_hyperparameters():
    from experiments import main

    text = main.listing(get_config())
    for name, method in methods.REGISTRY.items():
        assert f"\n  {name}: {method.description}" in text
    assert "      threshold = 0.3" in text and "      voting = soft" in text
    assert text.startswith("configs: clear10, clear100, digits, yearbook")


def test_a_dry_run_lists_the_runs_marks_finished_ones_and_writes_nothing(
    experiment, tmp_path
):
    from experiments import main

    config, workdir, _ = experiment
    before = sorted(p for p in workdir.rglob("*"))
    text = main.dry_run(config, workdir)
    assert sorted(p for p in workdir.rglob("*")) == before
    lines = text.splitlines()
    assert "d2 trial 2: grasp (finished earlier)" in lines
    assert (
        lines[-1]
        == f"plan: 10 runs, 10 finished earlier (reused) in {workdir}; nothing was run"
    )
    fresh = main.dry_run(config, tmp_path / "new")
    assert fresh.splitlines()[-1].startswith(
        "plan: 10 runs, 0 finished earlier (reused) in"
    )
    # More trials: the ten new runs cost what this folder's runs of each method took.
    more = config.copy_and_resolve_references()
    more.trials = 4
    results = workdir / "results" / "digits_drift"  # other tests add runs beside these
    seconds = [
        json.loads((results / name / "metrics.json").read_text())["total_time_seconds"]
        for method in config.methods
        for name in (runner.run_name(config, "d2", method, t) for t in (1, 2))
    ]
    expected = sum(seconds)  # per method: two new trials at the mean of its two
    text = f"{expected / 60:.0f} min" if expected >= 60 else f"{expected:.0f} s"
    assert main.dry_run(more, workdir).splitlines()[-1] == (
        f"plan: 20 runs, 10 finished earlier (reused); the other 10 take about {text} "
        f"(at past run times) in {workdir}; nothing was run"
    )
    assert "d2 trial 1: target_only" in fresh.splitlines()
    assert not (tmp_path / "new").exists()
    twice = config.copy_and_resolve_references()
    twice.methods = ("grasp", "grasp")
    with pytest.raises(settings.ConfigError, match="grasp"):  # checked as a real run
        main.dry_run(twice, tmp_path / "new")


def test_info_logs_only_when_verbosity_asks(tmp_path):
    """absl/JAX/TFDS INFO lines are off by default and back with --verbosity=0."""

    def stderr(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.main",
                "--dry_run",
                *extra,
                f"--workdir={tmp_path}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        ).stderr

    info = re.compile(r"^I\d{4} ", re.MULTILINE)
    assert not info.search(stderr())
    assert info.search(stderr("--verbosity=0"))
