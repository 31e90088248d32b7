"""What every method of one (target, trial) is handed, and what it hands back.

`Context` gives a method the target's splits, the sources (restored one at a time), the
shared pretrained start, and `fit`/`predict` on the target; `MethodResult` is what the
runner reports. `training_flops` turns XLA's per-step FLOPs into a run's totals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

from experiments import settings
from experiments import sources as src
from grasp_jax import evaluation, loop, sharding
from grasp_jax import input_pipeline as ip


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
    # Set by the runner for each run: where its files go, and a memory sample by name.
    out_dir: Path | None = None
    mark: Callable[[str], None] = lambda name: None

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
        """The abstract variables sources restore into: split over `config.mesh.model`
        devices when that is above 1, so Orbax reads each shard onto its own device
        and no device ever holds the whole model."""
        abstract = self.model_and_abstract[1]
        if self.config.mesh.model == 1:
            return abstract
        mesh = sharding.model_mesh(self.config.mesh.model)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=sharding.fsdp_sharding(x.shape, mesh)
            ),
            abstract,
        )

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


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """XLA's FLOPs of the compiled steps, measured once per experiment."""

    train_step: float
    eval_step: float
    batch_size: int
    params: int
    merge: float


def training_flops(
    ctx: Context,
    result: MethodResult,
    costs: StepCosts,
    *,
    label: str,
    models_evaluated: int = 1,
    phases: Callable[[float], tuple[float, dict]] | None = None,
) -> dict:
    """Totals from XLA's per-step FLOPs and the steps each phase ran. `phases(training)`
    returns FLOPs spent beside the training epochs and the method's own report keys."""
    batch_size = ctx.pipeline.batch_size
    steps = ip.steps_per_epoch(ctx.splits["train"], batch_size)
    eval_batches = -(-len(ctx.splits["validation"]) // batch_size)
    test_batches = -(-len(ctx.splits["test"]) // batch_size)
    training = result.train_epochs * steps * costs.train_step
    evaluation_flops = (
        result.train_epochs * eval_batches
        + models_evaluated * (eval_batches + test_batches)
    ) * costs.eval_step
    out = {
        "method": label,
        "source": "XLA cost analysis of the compiled steps",
        "model_params_millions": costs.params / 1e6,
        "inference_gflops": costs.eval_step / costs.batch_size / 1e9,
        "train_step_gflops": costs.train_step / 1e9,
        "training_gflops": training / 1e9,
        "evaluation_gflops": evaluation_flops / 1e9,
        "n_sources": len(ctx.source_bins),
    }
    if phases is not None:
        extra, keys = phases(training)
        out |= keys
        training += extra
    out["total_gflops"] = (training + evaluation_flops) / 1e9
    return out
