"""Runs a whole experiment from a config: `python -m experiments.main --config=digits`.

Trains missing sources, then for each target (default: leave-one-out over all bins), each
method and each trial (a distinct, recorded seed): runs it, evaluates on the target's test
split and writes `results/<dataset>/<model>_<target>_<method>[_<thr>]_trial<k>/`. Finished
runs are skipped, so an interrupted experiment resumes; files are written atomically.
Ends with `results/<dataset>/summary.{json,md,png}` and prints the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import methods, report
from experiments import sources as src
from experiments.configs import CONFIG_DIR, expand_config_argument
from experiments.sources import train_sources
from grasp_jax import flops, memory, metrics

_CONFIG = config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "digits.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config>).")


class ConfigError(ValueError):
    """An unknown method, target or sources choice; the message lists the valid ones."""


def check_config(config) -> list[str]:
    """Validates the experiment keys; returns the targets."""
    unknown = sorted(set(config.methods) - set(methods.METHODS))
    if unknown:
        raise ConfigError(
            f"unknown method(s) {unknown}; choose from {list(methods.METHODS)}"
        )
    if config.sources not in ("all", "past"):
        raise ConfigError(f"config.sources={config.sources!r}; use 'all' or 'past'")
    targets = list(config.bins) if "all" in config.targets else list(config.targets)
    bad = sorted(set(targets) - set(config.bins))
    if bad:
        raise ConfigError(f"unknown target(s) {bad}; the bins are {list(config.bins)}")
    if config.trials < 1:
        raise ConfigError(f"config.trials={config.trials}; run at least one trial")
    return targets


def source_bins(config, target: str) -> list[str]:
    bins = list(config.bins)
    if config.sources == "past":
        return bins[: bins.index(target)]
    return [b for b in bins if b != target]


def run_name(config, target: str, method: str, trial: int) -> str:
    threshold = f"_{round(config.grasp.threshold * 100)}" if method == "grasp" else ""
    return f"{config.model}_{target}_{method}{threshold}_trial{trial}"


def memory_checkpoint(log: dict, name: str) -> None:
    log[name] = {
        "host_rss_mb": _mb(memory.current_host_memory_bytes()),
        "host_peak_mb": _mb(memory.peak_host_memory_bytes()),
        "device_peak_mb": _mb(memory.peak_device_memory_bytes()),
    }


def _mb(value):
    return value / 2**20 if value is not None else None


def flops_report(method: str, result: methods.MethodResult, step: dict, ctx, merge: float):
    """Totals from XLA's per-step FLOPs and the steps each phase ran."""
    pipeline = ctx.pipeline
    steps_per_epoch = len(ctx.splits["train"]) // pipeline.batch_size
    eval_batches = -(-len(ctx.splits["validation"]) // pipeline.batch_size)
    test_batches = -(-len(ctx.splits["test"]) // pipeline.batch_size)
    n_models = len(ctx.source_bins) if method == "ensemble" else 1
    training = result.train_epochs * steps_per_epoch * step["train_step"]
    evaluation = (
        result.train_epochs * eval_batches + n_models * (eval_batches + test_batches)
    ) * step["eval_step"]
    out = {
        "method": method.upper() if method == "grasp" else method,
        "source": "XLA cost analysis of the compiled steps",
        "model_params_millions": step["params"] / 1e6,
        "inference_gflops": step["eval_step"] / step["batch_size"] / 1e9,
        "train_step_gflops": step["train_step"] / 1e9,
        "training_gflops": training / 1e9,
        "evaluation_gflops": evaluation / 1e9,
        "n_sources": len(ctx.source_bins),
    }
    if method == "grasp":
        cfg = ctx.grasp_config()
        stages = len(ctx.source_bins) - 1
        # one alignment batch costs about a training step's forward+backward, per model
        alignment = 2 * stages * cfg.num_alignment_batches * step["train_step"]
        initial = cfg.initial_epochs * steps_per_epoch * step["train_step"]
        out |= {
            "initial_training_gflops": initial / 1e9,
            "alignment_gflops_total": alignment / 1e9,
            "transfer_gflops_total": stages * merge / 1e9,
            "finetune_gflops_total": (training - initial) / 1e9,
        }
        training += alignment + stages * merge
    out["total_gflops"] = (training + evaluation) / 1e9
    return out


def run_experiment(config, workdir: Path, *, progress: bool = True) -> dict:
    """The whole experiment; returns the summary dict."""
    targets = check_config(config)
    start = time.perf_counter()
    train_sources(config, workdir)
    model, abstract = src.model_and_abstract(config)
    step = flops.step_flops(model, abstract, src.pipeline_config(config))
    merge = flops.merge_flops(abstract["params"])
    results_dir = workdir / "results" / config.dataset
    results = []
    for t_index, target in enumerate(targets):
        bins = source_bins(config, target)
        if not bins:
            logging.warning("target %s has no sources (sources=past); skipped", target)
            continue
        splits = src.load_splits(config, workdir, target)
        builder = tfds.builder(
            f"{config.dataset}/{target}", data_dir=src.data_dir(config, workdir)
        )
        class_names = builder.info.features["label"].names
        for m_index, method in enumerate(config.methods):
            for trial in range(1, config.trials + 1):
                out_dir = results_dir / run_name(config, target, method, trial)
                if (out_dir / "metrics.json").exists():
                    results.append(_load_finished(out_dir, method, config))
                    continue
                seed = src.config_seed(config, "run", t_index, m_index, trial)
                ctx = methods.Context(config, workdir, target, bins, splits, seed, progress)
                record = run_one(ctx, out_dir, method, trial, class_names, step, merge)
                results.append(record)
    summary = report.summarize(results)
    summary["config"] = config.to_dict()
    summary["seconds"] = time.perf_counter() - start
    title = f"{config.dataset} / {config.model}"
    report.write_json(results_dir / "summary.json", summary)
    (results_dir / "summary.md").write_text(report.summary_markdown(summary, title))
    report.summary_bar_chart(summary, results_dir / "summary.png", title)
    return summary


def method_hyperparameters(config, method: str) -> dict:
    """The settings a method's result depends on, recorded with every run."""
    if method in ("grasp", "finetune"):
        return config.grasp.to_dict()
    if method == "target_only":
        return config.source_training.to_dict()
    return {}


def _load_finished(out_dir: Path, method: str, config) -> dict:
    """A finished run, reused only if it ran with the current settings: result folders
    are named as the reference's (threshold only), so other settings would collide."""
    record = json.loads((out_dir / "metrics.json").read_text())
    expected = method_hyperparameters(config, method)
    if record.get("hyperparameters") != expected:
        stored = record.get("hyperparameters", {})
        differ = sorted(
            k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k)
        )
        raise ConfigError(
            f"{out_dir} holds a finished run with other settings ({differ}); "
            "use another --workdir for this configuration, or delete that folder."
        )
    record["method_label"] = method
    return record


def run_one(
    ctx: methods.Context,
    out_dir: Path,
    method: str,
    trial: int,
    class_names: list[str],
    step: dict,
    merge: float,
) -> dict:
    """One (target, method, trial): run, evaluate, write every result file."""
    config, target, bins, splits = ctx.config, ctx.target, ctx.source_bins, ctx.splits
    checkpoints: dict = {}
    memory_checkpoint(checkpoints, "experiment_start")
    start = time.perf_counter()
    result = methods.RUNNERS[method](ctx)
    seconds = time.perf_counter() - start
    memory_checkpoint(checkpoints, "experiment_end")
    record = {
        "dataset": config.dataset,
        "target": target,
        "sources": bins,
        "trial": trial,
        "model": config.model,
        "method": method,
        "seed": ctx.seed,
        "val_metrics": metrics.classification_metrics(
            result.val["logits"], result.val["labels"]
        ),
        "test_metrics": metrics.classification_metrics(
            result.test["logits"], result.test["labels"]
        ),
        "total_time_seconds": seconds,
        "total_time_minutes": seconds / 60,
        "hyperparameters": method_hyperparameters(config, method),
        "dataset_sizes": {
            f"n_{k}_samples": len(v)
            for k, v in (
                ("train", splits["train"]),
                ("val", splits["validation"]),
                ("test", splits["test"]),
            )
        },
        "history": result.history,
        **result.extra,
    }
    record["flops"] = flops_report(method, result, step, ctx, merge)
    peak = max((c["host_peak_mb"] or 0) for c in checkpoints.values())
    profile = {
        "checkpoints": checkpoints,
        "peak": {
            "host_peak_mb": peak,
            "host_peak_gb": peak / 1024,
            "device_peak_mb": checkpoints["experiment_end"]["device_peak_mb"],
        },
        "device": jax.devices()[0].platform,
        "note": "host peak is this process's VmHWM so far (all earlier runs)",
    }
    record["memory"] = profile["peak"]
    report.write_json(out_dir / "memory_profile.json", profile)
    report.write_json(out_dir / "flops_report.json", record["flops"])
    report.confusion_matrix_png(
        record["test_metrics"]["confusion_matrix"],
        class_names,
        out_dir / "confusion_matrices" / "test_confusion_matrix.png",
        f"{method} on {target} (test)",
    )
    report.confusion_matrix_png(
        record["val_metrics"]["confusion_matrix"],
        class_names,
        out_dir / "confusion_matrices" / "val_confusion_matrix.png",
        f"{method} on {target} (val)",
    )
    if result.history:
        report.training_curves_png(
            result.history, out_dir / "training_curves.png", f"{method} on {target}"
        )
    report.write_json(out_dir / "config.json", record)
    report.write_json(out_dir / "metrics.json", record)  # last: marks the run finished
    record["method_label"] = method
    return record


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = Path(_WORKDIR.value or f"runs/{config.name}")
    try:
        summary = run_experiment(config, workdir)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    title = f"{config.dataset} / {config.model}"
    print()
    print(report.summary_markdown(summary, title))
    print(f"results in {workdir / 'results' / config.dataset}; {summary['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main, argv=expand_config_argument(sys.argv))
