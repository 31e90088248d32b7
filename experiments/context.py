"""What the runner and the methods agree on: what a method is handed, what it hands
back, and what a method entry declares.

`Context` gives a method the target's splits, the sources (restored one at a time), the
shared pretrained start, and `fit`/`predict` on the target; `MethodResult` is what the
runner reports; `Method` is a registry entry (`experiments.methods`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

from experiments import reference_format, settings
from experiments import sources as src
from experiments.flops_report import StepCosts, training_flops
from grasp_jax import checkpoints, evaluation, loop, sharding
from grasp_jax import input_pipeline as ip


class FirstStage:
    """GRASP's first stage of one (target, trial), the first source fine-tuned on the
    target: the same in every run of GRASP's family (one seed, source and recipe a
    trial), so the first run to reach it trains it and the others take a copy. Kept
    until the last of `users` runs (the runner counts them) has taken it: at most one
    model a trial in progress. With no users counted, every run trains its own."""

    def __init__(self, users: int = 0):
        self.users = users
        self._lock = threading.Lock()
        self._kept: dict = {}

    def get(self, key, train: Callable[[], Any]):
        """The `grasp.FineTuned` kept under `key`, else `train()`'s. The caller owns
        (may donate) the variables it gets: a copy while others will take them."""
        with self._lock:  # a run arriving while another trains it waits for that one
            tuned = self._kept.pop(key) if key in self._kept else train()
            self.users -= 1
            if self.users <= 0:
                return tuned
            self._kept[key] = tuned
            return tuned._replace(variables=loop.device_copy(tuned.variables))


@dataclasses.dataclass
class Context:
    """What every method of one (target, trial) needs."""

    config: Any
    workdir: Path
    target: str
    source_bins: list[str]
    splits: dict
    seed: int
    progress: bool = True
    # Set by the runner for each run: where its files go, and a memory sample by name
    # (one of the method's `memory_marks`).
    out_dir: Path | None = None
    mark: Callable[[str], None] = lambda name: None
    # Shared by the copies the runner makes of one trial's context.
    first_stage: FirstStage = dataclasses.field(default_factory=FirstStage)

    @functools.cached_property
    def model_and_abstract(self):
        return src.model_and_abstract(self.config)

    @property
    def model(self):
        return self.model_and_abstract[0]

    @property
    def pipeline(self) -> ip.PipelineConfig:
        return settings.pipeline(self.config)

    @functools.cached_property
    def source_layout(self) -> dict:
        """The abstract variables sources restore into, each leaf naming its sharding:
        split over `config.mesh.model` devices when that is above 1, so Orbax reads
        each shard onto its own device and no device ever holds the whole model; else
        replicated over every device."""
        abstract = self.model_and_abstract[1]
        if self.config.mesh.model > 1:
            mesh = sharding.model_mesh(self.config.mesh.model)
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    x.shape, x.dtype, sharding=sharding.fsdp_sharding(x.shape, mesh)
                ),
                abstract,
            )
        return checkpoints.restore_layout(abstract)

    def restore(self, bin_name: str) -> dict:
        """The trained source model of `bin_name`, laid out as `source_layout`
        (training and merging keep the layout)."""
        return src.restore_source(self.config, self.workdir, bin_name, self.source_layout)

    def base(self) -> dict:
        """The shared start every source was trained from (pretraining or imported
        weights): the `base` of task vectors."""
        return src.initial_variables(self.config, self.workdir, writer=None)

    def predict(self, variables, model=None) -> tuple[dict, dict]:
        """Predictions of `variables` on the target's validation and test splits (with
        `model`, e.g. a wrapper over several models, instead of the zoo model)."""
        return tuple(
            evaluation.predict(
                model if model is not None else self.model,
                variables,
                self.splits[s],
                self.pipeline,
            )
            for s in ("validation", "test")
        )

    def predict_final(self, variables) -> tuple[dict, dict]:
        """`predict` for the run's one final model (of the zoo model), which
        `config.save_models` keeps in the run folder."""
        if self.config.save_models:
            from experiments import final_model

            final_model.save_run_model(self.config, self.out_dir, variables)
        return self.predict(variables)

    def fit(
        self,
        variables,
        recipe,
        description: str,
        *,
        model=None,
        optimizer: optax.GradientTransformation | None = None,
    ) -> loop.FitResult:
        """`loop.fit` on the target's train split, selecting on its validation split."""
        return loop.fit(
            model if model is not None else self.model,
            variables,
            self.splits["train"],
            self.splits["validation"],
            config=recipe,
            pipeline=self.pipeline,
            seed=self.seed,
            progress=self.progress,
            description=description,
            optimizer=optimizer,
        )


@dataclasses.dataclass
class MethodResult:
    val: dict  # predictions on validation: accuracy, logits, labels
    test: dict
    history: list[dict]
    train_epochs: int
    extra: dict = dataclasses.field(default_factory=dict)


# The memory samples every run takes (the runner's); a method adds its own between.
RUNNER_MARKS = ("experiment_start", "data_loaded", "experiment_end")


def _no_settings(config) -> dict:
    return {}


def _no_check(config) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One comparable method: its run function, the hyperparameters its result depends
    on (recorded with every run and compared before a finished run is reused), its
    run-folder suffix, FLOPs, the memory samples it takes (the reference's names) and a
    check of its config section that runs before any work."""

    name: str
    run: Callable[[Context], MethodResult]
    hyperparameters: Callable[[Any], dict]
    folder_suffix: Callable[[Any], str] = lambda config: ""
    flops: Callable[[Context, MethodResult, StepCosts], dict] | None = None
    # Keys the reference's metrics.json has beside ours (e.g. `alignment_threshold`).
    reference_hyperparameters: Callable[[Any], dict] = _no_settings
    memory_marks: tuple[str, ...] = RUNNER_MARKS
    check: Callable[[Any], None] = _no_check
    description: str = ""
    alias_of: str | None = None  # runs that method under the name earlier results used
    shares_first_stage: bool = False  # takes its trial's `FirstStage` (GRASP's family)

    def report_flops(self, ctx: Context, result: MethodResult, costs: StepCosts) -> dict:
        if self.flops is not None:
            return self.flops(ctx, result, costs)
        return training_flops(ctx, result, costs, label=self.name)


def section_method(
    name: str,
    run: Callable[[Context], MethodResult],
    *,
    flops: Callable[[Context, MethodResult, StepCosts], dict],
    recipe: Callable[[Any], Any],
    reference_names: dict[str, str],
    description: str,
) -> Method:
    """A baseline configured by its own section `config.<name>` (FUSION, PEARL): the
    section is its hyperparameters, `recipe(config)` reads and checks it, and
    `reference_names` maps the reference's `hyperparameters` keys to the section's."""
    return Method(
        name,
        run,
        lambda config: config[name].to_dict(),
        flops=flops,
        reference_hyperparameters=lambda config: {
            theirs: config[name][ours] for theirs, ours in reference_names.items()
        },
        memory_marks=reference_format.MEMORY_CHECKPOINTS[name],
        check=recipe,
        description=description,
    )
