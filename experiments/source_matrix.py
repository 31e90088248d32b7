"""The source matrix: how far each source transfers, written before any method runs.

Rows are the shared start and every source, columns every bin's test split. Per cell:
the test accuracy, the largest share of the predictions one class takes (1.0: the model
predicts one class for everything), and the same two after the model's BatchNorm
statistics were re-estimated on the column's train split (`grasp_jax.recalibration`):
a cell that recovers there failed through its input statistics, not its features. With
`init="pretrain"` also the start's accuracy on its pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from experiments import parallel_runs, settings, sources
from grasp_jax import checkpoints, evaluation, recalibration


def compute(config, workdir: Path, *, progress: bool = True) -> dict:
    """Test accuracy of the shared start and of every source on every bin's test split.

    With `init="pretrain"` also the start's accuracy on the pool's own test split. Shows
    how far each source transfers: well on its own bin, less on distant ones.
    """
    model, abstract = sources.model_and_abstract(config)
    pipeline = settings.pipeline(config)
    splits = [sources.load_splits(config, workdir, b) for b in config.bins]

    def cell(variables, split, keep: list | None = None) -> tuple[float, float]:
        out = evaluation.predict(model, variables, split["test"], pipeline)
        if keep is not None:
            keep.append(out)
        return out["accuracy"], largest_class_share(out["logits"])

    def row(variables, keep: list | None = None) -> list[tuple[float, float]]:
        return [cell(variables, split, keep) for split in splits]

    def recalibrated_row(variables) -> list[tuple[float, float]]:
        return [
            cell(recalibration.recalibrate(model, variables, s["train"], pipeline), s)
            for s in splits
        ]

    start = sources.initial_variables(config, workdir, writer=None)

    def model_rows(bin_name: str | None):
        """The start's (None) or a source's plain and recalibrated rows, and a
        source's outputs per bin."""
        keep: list | None = None if bin_name is None else []
        variables = (
            start
            if bin_name is None
            else sources.restore_source(config, workdir, bin_name, abstract)
        )
        rows = row(variables, keep), recalibrated_row(variables), keep
        bar.update()
        return rows

    # `concurrent_runs` rows at once (threads: the same numbers as one at a time).
    models = [None, *config.bins]
    with tqdm(total=len(models), desc="source matrix", disable=not progress) as bar:
        at_once = settings.at_once(config, len(models))
        done = parallel_runs.ordered_map(model_rows, models, at_once)
    plain = [p for p, _, _ in done]
    recalibrated = [r for _, r, _ in done]
    outputs: list[list[dict]] = [o for _, _, o in done[1:]]  # per source, per bin
    matrix = {
        "rows": ["pretrained", *config.bins],
        "columns": list(config.bins),
        "accuracy": [[a for a, _ in r] for r in plain],
        "largest_class_share": [[s for _, s in r] for r in plain],
        "batchnorm_recalibrated": {
            "accuracy": [[a for a, _ in r] for r in recalibrated],
            "largest_class_share": [[s for _, s in r] for r in recalibrated],
            "how": "BatchNorm statistics re-estimated on the column's train split",
        },
        "other_sources_soft_ensemble": other_sources_soft_ensemble(outputs),
        "inputs": inputs(config, workdir),
    }
    if config.init == "pretrain":
        pool = sources.load_splits(config, workdir, config.pretrain.data_config)["test"]
        matrix["pretrained_pool_test_accuracy"] = evaluation.predict(
            model, start, pool, pipeline
        )["accuracy"]
    return matrix


def inputs(config, workdir: Path) -> dict:
    """What the matrix was computed from: the bins and every model's checksums (the
    start's where it is a cached pretraining). A matrix whose inputs differ is stale."""
    names = (["_pretrained"] if config.init == "pretrain" else []) + list(config.bins)
    checksums = {}
    for name in names:
        path = sources.source_dir(config, workdir, name) / checkpoints.CHECKSUMS
        checksums[name] = json.loads(path.read_text()) if path.exists() else None
    return {"bins": list(config.bins), "init": config.init, "checksums": checksums}


def is_current(config, workdir: Path, results_dir: Path) -> bool:
    """True if `source_matrix.json` exists and was computed from today's sources."""
    path = results_dir / "source_matrix.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return "other_sources_soft_ensemble" in saved and saved.get("inputs") == inputs(
        config, workdir
    )


def other_sources_soft_ensemble(outputs: list[list[dict]]) -> list[float]:
    """Per bin: the accuracy of the mean softmax of every source but the bin's own (the
    K-1 models a target has to transfer from), on the bin's test split."""
    accuracies = []
    for j in range(len(outputs)):
        others = [outputs[i][j]["logits"] for i in range(len(outputs)) if i != j]
        if not others:
            accuracies.append(float("nan"))
            continue
        probabilities = np.mean([_softmax(np.asarray(x, np.float64)) for x in others], 0)
        labels = np.asarray(outputs[j][j]["labels"])
        accuracies.append(float(np.mean(probabilities.argmax(axis=1) == labels)))
    return accuracies


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def largest_class_share(logits) -> float:
    """The share of the predictions that go to the most predicted class."""
    predictions = np.asarray(logits).argmax(axis=1)
    return float(np.bincount(predictions).max() / len(predictions))
