"""An experiment from config to results: `run_experiment(config, workdir)`.

The walk: validate the config (`settings.check`); train the missing sources
(`sources.train_sources`); write `source_matrix.{json,png}` (the shared start and every
source on every bin's test split); count the steps' FLOPs once; then for each
target (default: leave-one-out over all bins), each trial (a recorded seed, shared by
every method: paired runs) and each method: load the target's splits, run the method
(`methods.REGISTRY`), build its record and write its files (`report`) under
`results/<dataset>/<model>_<target>_<method>[suffix]_trial<k>/`. Finished runs are
reused when their settings match, so an interrupted experiment resumes. Ends with
`results/<dataset>/summary.{json,md,png}`.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import threading
import time
from pathlib import Path

import jax
from absl import logging
from jax.experimental import multihost_utils

from experiments import (
    console,
    data_checks,
    machine,
    methods,
    parallel_runs,
    reference_format,
    report,
    settings,
    source_matrix,
)
from experiments import sources as src
from experiments.context import Context, FirstStage, Method
from experiments.flops_report import StepCosts
from experiments.report import tensorboard
from grasp_jax import flops, memory, models


def run_name(config, target: str, method: str, trial: int) -> str:
    """The reference's folder name: `<model string>_<target>_<method>[_<thr>]_trial<k>`."""
    suffix = methods.REGISTRY[method].folder_suffix(config)
    model = models.reference_name(config.model)
    return f"{model}_{target}_{method}{suffix}_trial{trial}"


_STEP_COSTS: dict[str, StepCosts] = {}


def step_costs(config) -> StepCosts:
    """FLOPs of the compiled train, eval and merge programs for this config's model,
    counted once a process per model, pipeline and merge (the study calls the runner
    once per variant; counting takes ~0.25 s for small_cnn, more for the zoo)."""
    key = json.dumps(
        settings.model_dependencies(config)
        | {"granularity": config.grasp.granularity, "mode": config.grasp.mode},
        sort_keys=True,
    )
    if key not in _STEP_COSTS:
        _STEP_COSTS[key] = _counted_step_costs(config)
    return _STEP_COSTS[key]


def _counted_step_costs(config) -> StepCosts:
    model, abstract = src.model_and_abstract(config)
    step = flops.step_flops(model, abstract, settings.pipeline(config))
    return StepCosts(
        train_step=step["train_step"],
        eval_step=step["eval_step"],
        batch_size=step["batch_size"],
        params=step["params"],
        merge=flops.merge_flops(
            abstract["params"], config.grasp.granularity, config.grasp.mode
        ),
    )


def run_experiment(config, workdir: Path, *, progress: bool | None = None) -> dict:
    """The whole experiment; returns the summary dict. `progress`: bars (default: on a
    terminal only; otherwise one line per run)."""
    start = time.perf_counter()
    run_methods(config, workdir, progress=progress)
    if jax.process_count() > 1:  # process 0 wrote the runs every process now reads
        multihost_utils.sync_global_devices("grasp_jax runs written")
    # The summary of every finished run on disk this config would reuse, not only of
    # the runs this command asked for: a command that ran little never shrinks it.
    results = finished_runs(config, workdir)
    summary = report.summarize(results)
    summary["config"] = config.to_dict()
    summary["seconds"] = time.perf_counter() - start
    summary["machine"] = machine.describe()
    title = f"{config.dataset} / {config.model}"
    results_dir = workdir / "results" / config.dataset
    report.write_summary(results_dir, summary, title)
    for name in sorted({r["method_label"] for r in results}):  # the reference's texts
        method = methods.REGISTRY[name]
        file_name = reference_format.summary_file_name(
            name, method.folder_suffix(config), config.model, config.dataset
        )
        text = reference_format.summary_text(
            name,
            [r for r in results if r["method_label"] == name],
            config.dataset,
            config.model,
        )
        report.write_text_once(results_dir / file_name, text)
    return summary


def run_methods(config, workdir: Path, *, progress: bool | None = None) -> list[dict]:
    """Every run of the config (finished ones reused); returns their records."""
    return run_variants([config], workdir, progress=progress)[0]


def run_variants(
    configs: list, workdir: Path, *, progress: bool | None = None, announce=None
) -> list[list[dict]]:
    """The runs of configs that differ only in their methods and the methods' settings
    (the study's variants) as one plan, a (target, trial) at a time: GRASP's family
    shares each trial's first stage across the variants too, and at most one is kept a
    trial in progress. Returns each config's records in its own plan's order.
    `progress`: bars (default: on a terminal only). `announce(k, n, index, target,
    trial)`, if given, is called as run k of n (of `configs[index]`) starts."""
    progress = console.on_terminal() if progress is None else progress
    config = configs[0]  # the data, model, sources and seeds every variant shares
    targets = settings.check(config, methods.REGISTRY)
    for variant in configs[1:]:
        settings.check(variant, methods.REGISTRY)
    selected = {name for c in configs for name in methods.selected(c)}
    data_checks.check(config, workdir, targets, aligning=bool(methods.ALIGNING & selected))
    planned = sorted(  # (target, trial) major; each config's runs in their own order
        (
            (target, trial, index, name, finished)
            for index, variant in enumerate(configs)
            for target, trial, name, finished in plan(variant, workdir, targets)
        ),
        key=lambda run: (targets.index(run[0]), run[1]),
    )
    listed = [(t, k, n, f) for t, k, _, n, f in planned]
    named_by = [configs[index] for _, _, index, _, _ in planned]
    console.event(plan_line(config, workdir, listed, named_by))
    prepare_sources(config, workdir, progress=progress)
    results_dir = workdir / "results" / config.dataset
    costs = [step_costs(variant) for variant in configs]
    for target in targets:
        if not settings.source_bins(config, target):
            logging.warning("target %s has no sources (sources=past); skipped", target)
    runs = [(t, k, index, n) for t, k, index, n, _ in planned]  # what `run` takes
    first_stage_users = collections.Counter(
        (target, trial)
        for target, trial, _, name, finished in planned
        if not finished and methods.REGISTRY[name].shares_first_stage
    )
    at_once = settings.at_once(config, len(runs))
    splits_of = functools.cache(functools.partial(src.load_splits, config, workdir))
    one_context = threading.Lock()  # a trial's runs starting together share one

    @functools.cache
    def trial_context(target: str, trial: int) -> Context:
        splits = splits_of(target)
        # One seed per (target, trial), shared by every method: paired runs.
        seed = settings.run_seed(config, target, trial)
        bins = settings.source_bins(config, target)
        bars = progress and at_once == 1  # bars of runs side by side would garble
        shared = FirstStage(first_stage_users[(target, trial)])
        ctx = Context(config, workdir, target, bins, splits, seed, bars, first_stage=shared)
        ctx.source_layout  # noqa: B018 (traced once here, not once per run)
        return ctx

    def run(item: tuple[int, tuple[str, int, int, str]]) -> dict:
        number, (target, trial, index, name) = item
        if announce is not None:
            announce(number, len(runs), index, target, trial)
        variant, method = configs[index], methods.REGISTRY[name]
        out_dir = results_dir / run_name(variant, target, name, trial)
        if (out_dir / "metrics.json").exists():
            expected = run_dependencies(variant, method, target, trial)
            return reuse_finished(out_dir, method, expected)
        # A copy per run: the runner sets its output folder and memory marks on it.
        with one_context:
            ctx = copy.copy(trial_context(target, trial))
        ctx.config = variant
        class_names = ctx.splits["train"].dataset_info.features["label"].names
        alongside = at_once - 1
        return run_one(
            ctx, method, trial, costs[index], out_dir, class_names, alongside=alongside
        )

    records = parallel_runs.ordered_map(run, list(enumerate(runs, start=1)), at_once)
    return [
        [r for (_, _, index, _), r in zip(runs, records, strict=True) if index == i]
        for i in range(len(configs))
    ]


def prepare_sources(config, workdir: Path, *, progress: bool) -> None:
    """Trains the missing sources and writes the source matrix unless it is current."""
    src.train_sources(config, workdir)
    results_dir = workdir / "results" / config.dataset
    if not source_matrix.is_current(config, workdir, results_dir):
        matrix = source_matrix.compute(config, workdir, progress=progress)
        title = f"{config.dataset} / {config.model}"
        report.write_source_matrix(results_dir, matrix, title)


def plan(config, workdir: Path, targets: list[str]) -> list[tuple[str, int, str, bool]]:
    """(target, trial, method, finished) of every run the config asks for, in the order
    they run; targets without sources (sources=past) have none."""
    results_dir = workdir / "results" / config.dataset
    return [
        (target, trial, name, (results_dir / folder / "metrics.json").exists())
        for target in targets
        if settings.source_bins(config, target)
        for trial in range(1, config.trials + 1)
        for name in methods.selected(config)
        for folder in [run_name(config, target, name, trial)]
    ]


def plan_line(
    config, workdir: Path, runs: list[tuple[str, int, str, bool]], named_by=None
) -> str:
    """`plan: N runs, F finished earlier (reused)`, and how long the others take at the
    mean time of this work folder's finished runs of each method, when every method left
    has some (more trials, say: a large plan says what it costs before it starts).
    `named_by`: each run's config, where the runs are several configs' (their folders'
    names differ); default `config`."""
    done = sum(finished for *_, finished in runs)
    line = f"plan: {len(runs)} runs, {done} finished earlier (reused)"
    left = [name for _, _, name, finished in runs if not finished]
    results_dir = workdir / "results" / config.dataset
    seconds: dict[str, list[float]] = {}
    for (target, trial, name, finished), named in zip(
        runs, named_by or [config] * len(runs), strict=True
    ):
        if finished and name in left:
            path = results_dir / run_name(named, target, name, trial) / "metrics.json"
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):  # the run loop says what is wrong with it
                return line
            seconds.setdefault(name, []).append(record.get("total_time_seconds", 0.0))
    if not left or set(left) - set(seconds):
        return line
    total = sum(sum(seconds[name]) / len(seconds[name]) for name in left)
    return (
        f"{line}; the other {len(left)} take about {_duration(total)} (at past run times)"
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_dependencies(config, method: Method, target: str, trial: int) -> dict:
    """Everything a run's numbers depend on, recorded with it and compared on reuse."""
    return (
        settings.model_dependencies(config)
        | settings.start_dependencies(config)
        | {
            "hyperparameters": method.hyperparameters(config),
            "seed": settings.run_seed(config, target, trial),
            "sources": settings.source_bins(config, target),
            "source_training": config.source_training.to_dict(),
        }
    )


def finished_runs(config, workdir: Path) -> list[dict]:
    """The records of every finished run on disk that `config` would reuse: any method
    of the registry (an alias under its own folder name), any bin as the target, any
    trial, under the same settings."""
    results_dir = workdir / "results" / config.dataset
    records = []
    for name, method in methods.REGISTRY.items():
        for target in config.bins:
            if not settings.source_bins(config, target):
                continue
            prefix = run_name(config, target, name, 0).removesuffix("0")
            for path in sorted(results_dir.glob(f"{prefix}*/metrics.json")):
                trial = path.parent.name.removeprefix(prefix)
                if not trial.isdigit():
                    continue
                record = json.loads(path.read_text())
                expected = run_dependencies(config, method, target, int(trial))
                if record.get("settings") == expected:
                    records.append(record | {"method_label": name})
    return records


def reuse_finished(out_dir: Path, method: Method, expected: dict) -> dict:
    """A finished run, reused only if every setting its numbers depend on is the same:
    result folders are named as the reference's (threshold only), so runs with other
    settings, seeds or data would otherwise be mixed into the summary."""
    record = json.loads((out_dir / "metrics.json").read_text())
    settings.require_same(
        record.get("settings", {}),
        expected,
        f"{out_dir} holds a finished run",
        "use another --workdir for this configuration, or delete that folder",
    )
    record["method_label"] = method.name
    return record


def memory_checkpoint(log: dict, marks: tuple[str, ...], name: str) -> None:
    """Samples memory under `name`, one of the method's declared `marks`."""
    if name not in marks:
        raise ValueError(f"memory mark {name!r} is not among the method's {marks}")
    log[name] = {
        "host_rss_mb": _mb(memory.current_host_memory_bytes()),
        "host_peak_mb": _mb(memory.peak_host_memory_bytes()),
        "device_peak_mb": _mb(memory.peak_device_memory_bytes()),
    }


def _mb(value):
    return value / 2**20 if value is not None else None


def run_one(
    ctx: Context,
    method: Method,
    trial: int,
    costs: StepCosts,
    out_dir: Path,
    class_names: list[str],
    *,
    alongside: int = 0,
) -> dict:
    """One (target, method, trial): run, evaluate, write every result file. `alongside`:
    how many other runs share the process meanwhile (their memory counts in its peak)."""
    memory_log: dict = {}
    # This run's peak, not the process's, unless other runs share the process.
    per_run = not alongside and memory.reset_peak_host_memory()
    ctx.mark = functools.partial(memory_checkpoint, memory_log, method.memory_marks)
    ctx.out_dir = out_dir
    ctx.mark("experiment_start")
    ctx.mark("data_loaded")  # the runner loaded the target's splits before the run
    start = time.perf_counter()
    result = method.run(ctx)
    seconds = time.perf_counter() - start
    ctx.mark("experiment_end")
    record, profile = report.run_record(
        ctx, method, trial, result, seconds, costs, memory_log
    )
    record["memory"]["host_peak_scope"] = (
        "this run"
        if per_run
        else f"this process, up to {alongside + 1} runs at once"
        if alongside
        else "this process so far"
    )
    record["settings"] = run_dependencies(ctx.config, method, ctx.target, trial)
    title = f"{method.name} on {ctx.target}, trial {trial}"
    run = {"method": method.name, "target": ctx.target, "trial": trial, "seed": ctx.seed}
    resolved = ctx.config.to_dict() | {"run": run | {"sources": list(ctx.source_bins)}}
    report.write_run(out_dir, record, profile, class_names, title, resolved)
    if jax.process_index() == 0:
        label = method.name + method.folder_suffix(ctx.config)
        tensorboard.log_run(ctx.workdir / "tensorboard", record, label)
    record["method_label"] = method.name
    accuracy = record["test_metrics"]["accuracy"]
    console.event(f"{out_dir.name}: test accuracy {100 * accuracy:.1f} % ({seconds:.0f} s)")
    return record
