"""GRASP as a sequencer: one source at a time, merged by gradient alignment.

As the reference codes it (docs/reference.md §4): fine-tune the first source on the target
for `initial_epochs`; then for each further source: restore it, sum both models' gradients
over `num_alignment_batches` target-train batches (the current model in train mode, so
dropout is on and its BatchNorm statistics move, as in the reference; the source in eval
mode), `merge_step`, then fine-tune for `finetune_epochs`. BatchNorm statistics never
transfer. Only the current model and the one source being merged are alive at any time.

`run_grasp` only sequences. How to fine-tune, which batches to align on and how to run a
stage are `GraspSteps`, plain functions: `default_steps` builds them on the library's
`loop.fit` (a fresh AdamW with a per-epoch cosine, best-validation restore, as the
reference) and runs each stage's alignment and merge as one XLA program
(`library_stage`); a user's own training loop can supply its own.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grasp_jax import evaluation, loop, memory, objective, recipe, seeding
from grasp_jax import input_pipeline as ip
from grasp_jax.alignment import GRANULARITIES
from grasp_jax.arguments import NOTHING_MOVES, threshold_in_range
from grasp_jax.stage import RULES, grasp_stage
from grasp_jax.transfer import MODES
from grasp_jax.tree_checks import PyTree, leaves_with_paths

Variables = dict[str, Any]
SourceLoader = Callable[[], Variables]  # restores one source's variables when called
ALIGNMENT_MODES = ("train", "eval")
# NOTHING_MOVES (1.01, from grasp_jax.arguments): GRASP reduced to staged fine-tuning.


@dataclasses.dataclass(frozen=True)
class GraspConfig:
    """GRASP's hyperparameters; defaults are the reference's (docs/reference.md §1, §4)."""

    initial_epochs: int = 3
    finetune_epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    num_alignment_batches: int = 1
    threshold: float = 0.3
    granularity: str = "tensor"
    mode: str = "hard"
    alignment_current_mode: str = "train"  # the reference's; "eval" is the cleaner one
    augment: bool = True

    def __post_init__(self):
        for name, valid in (
            ("granularity", GRANULARITIES),
            ("mode", MODES),
            ("alignment_current_mode", ALIGNMENT_MODES),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"grasp.{name}={getattr(self, name)!r}; use one of {list(valid)}"
                )
        if not threshold_in_range(self.threshold):
            raise ValueError(
                f"grasp.threshold={self.threshold!r}; a cosine threshold lies in "
                f"[-1, {NOTHING_MOVES}] ({NOTHING_MOVES}: nothing moves)"
            )
        for name in ("initial_epochs", "finetune_epochs", "num_alignment_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"grasp.{name}={value!r}; use a whole number >= 0")
        if not self.learning_rate > 0:
            raise ValueError(
                f"grasp.learning_rate={self.learning_rate!r}; use a positive number"
            )

    def total_epochs(self, sources: int) -> int:
        """Training epochs of a GRASP run over `sources` sources: the budget the
        fine-tuning baselines get, so that they train exactly as long."""
        return self.initial_epochs + self.finetune_epochs * (sources - 1)

    def stage_config(self, epochs: int) -> recipe.TrainConfig:
        """The reference's `fine_tune_model`: plain AdamW, cosine per epoch, no clipping."""
        return recipe.fine_tuning(
            epochs, self.learning_rate, self.weight_decay, self.augment
        )


class FineTuned(NamedTuple):
    """What a fine-tuning step returns: the variables to go on with, and its record."""

    variables: Variables
    best_val_accuracy: float | None = None
    history: Sequence[dict] = ()


class GraspSteps(NamedTuple):
    """The training pieces `run_grasp` sequences, as plain functions.

    finetune(variables, epochs, key, label) -> FineTuned
    alignment_batches(key) -> the batches both models are scored on
    stage(current, source, batches, alignment_key, merge_key) -> (variables,
        MergeStats): both models' gradients on the batches and the merge, e.g. one
        `stage.grasp_stage` program; `current` may be consumed (donated)
    validate(variables) -> validation accuracy, recorded around each merge (optional)
    """

    finetune: Callable[[Variables, int, jax.Array, str], FineTuned]
    alignment_batches: Callable[[jax.Array], Any]
    stage: Callable[
        [Variables, Variables, Any, jax.Array, jax.Array], tuple[Variables, Any]
    ]
    validate: Callable[[Variables], float] | None = None


@dataclasses.dataclass
class StageStats:
    """What one stage did; `fraction_by_layer` maps parameter paths to the share taken."""

    source: str
    fraction: float = 0.0
    fraction_by_layer: dict[str, float] = dataclasses.field(default_factory=dict)
    n_transferred: int = 0
    nonfinite_leaves: int = 0
    val_accuracy_before_merge: float | None = None
    val_accuracy_after_merge: float | None = None
    val_accuracy_after_finetune: float | None = None
    history: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GraspResult:
    variables: Variables
    stages: list[StageStats]


def run_grasp(
    first_source: Variables,
    later_sources: Iterable[tuple[str, SourceLoader]],
    steps: GraspSteps,
    *,
    config: GraspConfig,
    key: jax.Array,
    first_name: str = "source_0",
) -> GraspResult:
    """Runs GRASP from `first_source` through `later_sources`.

    `later_sources` yields `(name, loader)` pairs in merge order; each loader restores one
    source's variables when called (e.g. from Orbax), so only one source is in memory.
    A stage of 0 epochs skips its fine-tuning (to study the merges alone). Each
    fine-tune starts by giving the C heap's free pages back (`memory.trim_host_heap`),
    so the last stage's freed buffers do not raise this one's peak. Stage `s`
    hands `steps` the keys `stream(key, "finetune", s)`, `stream(key, "alignment", s)`
    and `stream(key, "merge", s)`. `first_source` is never consumed; every later
    model is the run's own and is donated to the next stage.
    """

    def finetune(variables, epochs: int, stage: int, label: str) -> FineTuned:
        if epochs == 0:
            return FineTuned(variables)
        memory.trim_host_heap()  # the last stage's freed buffers: out of RSS, peak flat
        stage_key = seeding.stream(key, "finetune", stage)
        return steps.finetune(variables, epochs, stage_key, label)

    def validate(variables):
        return None if steps.validate is None else steps.validate(variables)

    # The first stage's model is donated to the first merge: never the caller's arrays.
    start = first_source if config.initial_epochs else loop.device_copy(first_source)
    tuned = finetune(start, config.initial_epochs, 0, f"grasp stage 0 ({first_name})")
    current = tuned.variables
    stages = [
        StageStats(
            source=first_name,
            val_accuracy_after_finetune=tuned.best_val_accuracy,
            history=list(tuned.history),
        )
    ]
    for stage, (name, load) in enumerate(later_sources, start=1):
        stats = StageStats(source=name)
        stats.val_accuracy_before_merge = validate(current)
        if config.num_alignment_batches == 0:
            # As the reference: no gradients, no scores, nothing moves (and the source
            # is never read).
            stats.fraction_by_layer = {
                path: 0.0 for path, _ in leaves_with_paths(current["params"])
            }
        else:
            current = _align_and_merge(current, load, steps, stats, key, stage)
        stats.val_accuracy_after_merge = validate(current)
        tuned = finetune(
            current, config.finetune_epochs, stage, f"grasp stage {stage} ({name})"
        )
        current = tuned.variables
        stats.val_accuracy_after_finetune = tuned.best_val_accuracy
        stats.history = list(tuned.history)
        stages.append(stats)
    return GraspResult(variables=current, stages=stages)


def _align_and_merge(current, load, steps, stats, key, stage) -> Variables:
    """One stage's alignment and merge (`current` is consumed); fills the merge fields
    of `stats` from one read of the merge's small statistics."""
    alignment_key = seeding.stream(key, "alignment", stage)
    batches = steps.alignment_batches(alignment_key)
    source = load()
    merged, merge_stats = steps.stage(
        current, source, batches, alignment_key, seeding.stream(key, "merge", stage)
    )
    del source  # nothing of the source outlives its stage
    fraction, nonfinite, taken = jax.device_get(
        (merge_stats.fraction, merge_stats.nonfinite, merge_stats.taken)
    )
    stats.fraction = float(fraction)
    stats.fraction_by_layer = fraction_by_layer(taken, merged["params"])
    stats.n_transferred = int(sum(int(t) for t in jax.tree.leaves(taken)))
    stats.nonfinite_leaves = int(nonfinite)
    return merged


def fraction_by_layer(taken: PyTree, params: PyTree) -> dict[str, float]:
    """Share of each parameter leaf taken from the source, by path, from the merge's
    per-leaf element counts (`MergeStats.taken`, read to the host)."""
    return {
        path: int(count) / max(int(np.size(param)), 1)
        for (path, count), (_, param) in zip(
            leaves_with_paths(taken), leaves_with_paths(params), strict=True
        )
    }


def alignment_batches(
    train_split, pipeline: ip.PipelineConfig, config: GraspConfig, key: jax.Array
) -> dict[str, np.ndarray]:
    """The first `num_alignment_batches` of a fresh pass over the target train split,
    stacked on a leading axis as host arrays (uint8 `image`, `label`): the stage
    program preprocesses each once, with keys it derives from the stage's, so both
    models see the same images (as in the reference). Every process reads the whole
    split, so all of them score (and merge) alike."""
    batches = ip.dataset(
        train_split,
        pipeline,
        train=True,
        seed=seeding.int_seed(seeding.stream(key, "data")),
        shard_index=0,
        shard_count=1,
    )
    chosen = list(itertools.islice(iter(batches), config.num_alignment_batches))
    if not chosen:
        raise ValueError(
            f"{len(train_split)} training examples make no alignment batch of "
            f"{pipeline.batch_size}; lower the batch size."
        )
    return {
        "image": np.stack([np.asarray(b["image"]) for b in chosen]),
        "label": np.stack([np.asarray(b["label"]) for b in chosen]),
    }


@functools.cache
def prepared_loss(
    model: nn.Module, pipeline: ip.PipelineConfig, augment: bool, train: bool
) -> Callable:
    """`objective.loss_fn` on a raw alignment batch: augmentation (or normalisation)
    from the batch's `augment_key` and dropout from its `rng`, inside the traced loss.
    Cached: one function object per setting, so the stage compiles once."""
    loss = objective.loss_fn(model, train=train)

    def prepared(params, batch_stats, batch):
        if augment:
            images = ip.augment(batch["augment_key"], batch["image"], pipeline)
        else:
            images = ip.normalize(batch["image"], pipeline)
        inputs = {"image": images, "label": batch["label"], "rng": batch["rng"]}
        return loss(params, batch_stats, inputs)

    return prepared


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "pipeline",
        "augment",
        "train_mode",
        "granularity",
        "mode",
        "rule",
    ),
    donate_argnames=("current",),
)
def library_stage(
    current: Variables,
    source: Variables,
    batches: dict,
    alignment_key: jax.Array,
    merge_key: jax.Array,
    threshold: jax.Array,
    *,
    model: nn.Module,
    pipeline: ip.PipelineConfig,
    augment: bool,
    train_mode: bool,
    granularity: str,
    mode: str,
    rule: str,
):
    """The library's GRASP stage, one program: batch `i`'s augmentation and dropout keys
    are `stream(alignment_key, "augment" | "dropout", i)`, derived here on device, then
    `stage.grasp_stage` (current model in train or eval mode, source in eval mode)."""
    index = jnp.arange(batches["label"].shape[0])
    keyed = {
        **batches,
        "augment_key": jax.vmap(lambda i: seeding.stream(alignment_key, "augment", i))(
            index
        ),
        "rng": jax.vmap(lambda i: seeding.stream(alignment_key, "dropout", i))(index),
    }
    return grasp_stage(
        current,
        source,
        keyed,
        current_loss=prepared_loss(model, pipeline, augment, train_mode),
        source_loss=prepared_loss(model, pipeline, augment, False),
        threshold=threshold,
        granularity=granularity,
        mode=mode,
        rule=rule,
        key=merge_key,
    )


def default_steps(
    model: nn.Module,
    splits: dict,
    *,
    config: GraspConfig,
    pipeline: ip.PipelineConfig,
    progress: bool = True,
    validate_merges: bool = True,
    rule: str = "aligned",
) -> GraspSteps:
    """GRASP's steps on the library: `loop.fit` on `splits["train"]` with selection on
    `splits["validation"]`, alignment on the first batches of a fresh train pass, each
    stage one `library_stage` program (`rule` "random": the `grasp_random` control)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; use one of {RULES}")

    def finetune(variables, epochs, key, label) -> FineTuned:
        result = loop.fit(
            model,
            variables,
            splits["train"],
            splits["validation"],
            config=config.stage_config(epochs),
            pipeline=pipeline,
            seed=seeding.int_seed(key),
            progress=progress,
            description=label,
        )
        return FineTuned(result.variables, result.best_val_accuracy, result.history)

    def validate(variables) -> float:
        return evaluation.predict(model, variables, splits["validation"], pipeline)[
            "accuracy"
        ]

    def stage(current, source, batches, alignment_key, merge_key):
        # The source is restored where it lands; lay it out as the current model is
        # (a sharded model's source is sharded alike) before the two meet in one jit.
        source = place_like(source, current)
        return library_stage(
            current,
            source,
            batches,
            alignment_key,
            merge_key,
            config.threshold,
            model=model,
            pipeline=pipeline,
            augment=config.augment,
            train_mode=config.alignment_current_mode == "train",
            granularity=config.granularity,
            mode=config.mode,
            rule=rule,
        )

    return GraspSteps(
        finetune=finetune,
        alignment_batches=functools.partial(
            alignment_batches, splits["train"], pipeline, config
        ),
        stage=stage,
        validate=validate if validate_merges else None,
    )


def place_like(tree: PyTree, like: PyTree) -> PyTree:
    """`tree` laid out as `like` (same structure) is, where `like` is on devices."""
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(like)):
        return tree
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))
