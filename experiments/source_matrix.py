"""The source matrix: how far each source transfers, written before any method runs.

Rows are the shared start and every source, columns every bin's test split; the cells are
test accuracies (with `init="pretrain"` also the start's accuracy on its pool).
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from experiments import settings, sources
from grasp_jax import evaluation


def compute(config, workdir: Path, *, progress: bool = True) -> dict:
    """Test accuracy of the shared start and of every source on every bin's test split.

    With `init="pretrain"` also the start's accuracy on the pool's own test split. Shows
    how far each source transfers: well on its own bin, less on distant ones.
    """
    model, abstract = sources.model_and_abstract(config)
    pipeline = settings.pipeline(config)
    tests = [sources.load_splits(config, workdir, b)["test"] for b in config.bins]

    def accuracies(variables) -> list[float]:
        return [
            evaluation.predict(model, variables, test, pipeline)["accuracy"]
            for test in tests
        ]

    start = sources.initial_variables(config, workdir, writer=None)
    accuracy = [accuracies(start)]
    for bin_name in tqdm(config.bins, desc="source matrix", disable=not progress):
        accuracy.append(
            accuracies(sources.restore_source(config, workdir, bin_name, abstract))
        )
    matrix = {
        "rows": ["pretrained", *config.bins],
        "columns": list(config.bins),
        "accuracy": accuracy,
    }
    if config.init == "pretrain":
        pool = sources.load_splits(config, workdir, config.pretrain.data_config)["test"]
        matrix["pretrained_pool_test_accuracy"] = evaluation.predict(
            model, start, pool, pipeline
        )["accuracy"]
    return matrix
