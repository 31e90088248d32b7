"""GRASP as a sequencer: one source at a time, merged by gradient alignment.

As the reference codes it (REFERENCE.md 4): fine-tune the first source on the target for
`initial_epochs`; then for each further source: restore it, sum both models' gradients
over `num_alignment_batches` target-train batches (the current model in train mode, so
dropout is on and its BatchNorm statistics move, as in the reference; the source in eval
mode), `merge_step`, then fine-tune for `finetune_epochs`. BatchNorm statistics never
transfer. Only the current model and the one source being merged are alive at any time.

`run_grasp` only sequences. How to fine-tune, which batches to align on and how to take
gradients are `GraspSteps`, plain functions: `default_steps` builds them on the library's
`loop.fit` (a fresh AdamW with a per-epoch cosine, best-validation restore, as the
reference), and a user's own training loop can supply its own.
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
from grasp_jax.gradients import summed_gradients
from grasp_jax.merge import merge_step, random_merge_step
from grasp_jax.transfer import MODES
from grasp_jax.tree_checks import PyTree, leaves_with_paths

Variables = dict[str, Any]
SourceLoader = Callable[[], Variables]  # restores one source's variables when called
ALIGNMENT_MODES = ("train", "eval")
# A threshold above any cosine: nothing moves (GRASP reduced to staged fine-tuning).
NOTHING_MOVES = 1.01


@dataclasses.dataclass(frozen=True)
class GraspConfig:
    """GRASP's hyperparameters; defaults are the reference's (REFERENCE.md 1.5, 4)."""

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
        if not (-1.0 <= self.threshold <= 1.0 or self.threshold == NOTHING_MOVES):
            raise ValueError(
                f"grasp.threshold={self.threshold!r}; a cosine threshold lies in [-1, 1] "
                f"(or {NOTHING_MOVES}: nothing moves)"
            )
        for name in ("initial_epochs", "finetune_epochs", "num_alignment_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"grasp.{name}={value!r}; use a whole number >= 0")
        if not self.learning_rate > 0:
            raise ValueError(
                f"grasp.learning_rate={self.learning_rate!r}; use a positive number"
            )

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


def aligned_merge(current, source, grad_current, grad_source, config, key):
    """GRASP's merge: `merge_step` with the config's threshold, granularity and mode.
    `current` is consumed (its buffers become the merged tree)."""
    del key  # deterministic
    return merge_step(
        current,
        source,
        grad_current,
        grad_source,
        threshold=config.threshold,
        granularity=config.granularity,
        mode=config.mode,
    )


def random_merge(current, source, grad_current, grad_source, config, key):
    """The `grasp_random` control: as many units as GRASP would take, chosen at random."""
    return random_merge_step(
        current,
        source,
        grad_current,
        grad_source,
        key=key,
        threshold=config.threshold,
        granularity=config.granularity,
    )


class GraspSteps(NamedTuple):
    """The training pieces `run_grasp` sequences, as plain functions.

    finetune(variables, epochs, key, label) -> FineTuned
    alignment_batches(key) -> the batches both models are scored on
    gradients(variables, batches, train_mode) -> (summed params gradients, batch_stats
        after the batches: moved in train mode, unchanged in eval mode)
    validate(variables) -> validation accuracy, recorded around each merge (optional)
    merge(current, source, grad_current, grad_source, config, key) -> (params,
        MergeStats): GRASP's `aligned_merge` unless a study swaps it
    """

    finetune: Callable[[Variables, int, jax.Array, str], FineTuned]
    alignment_batches: Callable[[jax.Array], Sequence[Any]]
    gradients: Callable[[Variables, Sequence[Any], bool], tuple[PyTree, PyTree]]
    validate: Callable[[Variables], float] | None = None
    merge: Callable[..., tuple[PyTree, Any]] = aligned_merge


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
    and `stream(key, "merge", s)`.
    """

    def finetune(variables, epochs: int, stage: int, label: str) -> FineTuned:
        if epochs == 0:
            return FineTuned(variables)
        memory.trim_host_heap()  # the last stage's freed buffers: out of RSS, peak flat
        stage_key = seeding.stream(key, "finetune", stage)
        return steps.finetune(variables, epochs, stage_key, label)

    def validate(variables):
        return None if steps.validate is None else steps.validate(variables)

    tuned = finetune(
        first_source, config.initial_epochs, 0, f"grasp stage 0 ({first_name})"
    )
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
            stats.fraction_by_layer = fraction_by_layer(
                jax.tree.map(lambda p: np.zeros((), bool), current["params"])
            )
        else:
            current = _align_and_merge(current, load, steps, config, stats, key, stage)
        stats.val_accuracy_after_merge = validate(current)
        tuned = finetune(
            current, config.finetune_epochs, stage, f"grasp stage {stage} ({name})"
        )
        current = tuned.variables
        stats.val_accuracy_after_finetune = tuned.best_val_accuracy
        stats.history = list(tuned.history)
        stages.append(stats)
    return GraspResult(variables=current, stages=stages)


def _align_and_merge(current, load, steps, config, stats, key, stage) -> Variables:
    """One stage's alignment and merge; fills the merge fields of `stats`."""
    batches = steps.alignment_batches(seeding.stream(key, "alignment", stage))
    train_mode = config.alignment_current_mode == "train"
    grad_current, current_stats = steps.gradients(current, batches, train_mode)
    source = load()
    grad_source, _ = steps.gradients(source, batches, False)
    merged, merge_stats = steps.merge(
        jax.tree.map(jnp.array, current["params"]),  # a copy: the merge consumes it
        source["params"],
        grad_current,
        grad_source,
        config,
        seeding.stream(key, "merge", stage),
    )
    del source, grad_source  # the source's arrays were consumed by merge_step
    stats.fraction = float(merge_stats.fraction)
    stats.fraction_by_layer = fraction_by_layer(merge_stats.mask)
    stats.n_transferred = int(
        sum(int(np.sum(m)) for m in jax.tree.leaves(merge_stats.mask))
    )
    stats.nonfinite_leaves = int(merge_stats.nonfinite)
    return {"params": merged, "batch_stats": current_stats}


def fraction_by_layer(mask) -> dict[str, float]:
    return {path: float(np.mean(np.asarray(m))) for path, m in leaves_with_paths(mask)}


def alignment_batches(
    train_split, pipeline: ip.PipelineConfig, config: GraspConfig, key: jax.Array
) -> list[dict]:
    """The first `num_alignment_batches` of a fresh pass over the target train split,
    preprocessed once so both models see the same images (as in the reference). Each
    batch carries the dropout key (`rng`) its train-mode forward pass uses. Every
    process reads the whole split, so all of them score (and merge) alike."""
    batches = ip.dataset(
        train_split,
        pipeline,
        train=True,
        seed=seeding.int_seed(seeding.stream(key, "data")),
        shard_index=0,
        shard_count=1,
    )
    chosen = list(itertools.islice(iter(batches), config.num_alignment_batches))
    out = []
    for i, batch in enumerate(chosen):
        augment_key = seeding.stream(key, "augment", i)
        images = (
            ip.augment(augment_key, batch["image"], pipeline)
            if config.augment
            else ip.normalize(batch["image"], pipeline)
        )
        out.append(
            {
                "image": images,
                "label": jnp.asarray(batch["label"]),
                "rng": seeding.stream(key, "dropout", i),
            }
        )
    return out


def alignment_gradients(
    model: nn.Module, variables: Variables, batches: Sequence[dict], train_mode: bool
) -> tuple[PyTree, PyTree]:
    """Gradients summed over `batches` and the BatchNorm statistics after them."""
    return summed_gradients(
        objective.loss_fn(model, train=train_mode),
        variables["params"],
        batches,
        state=variables.get("batch_stats", {}),
    )


def default_steps(
    model: nn.Module,
    splits: dict,
    *,
    config: GraspConfig,
    pipeline: ip.PipelineConfig,
    progress: bool = True,
    validate_merges: bool = True,
    merge: Callable[..., tuple[PyTree, Any]] = aligned_merge,
) -> GraspSteps:
    """GRASP's steps on the library: `loop.fit` on `splits["train"]` with selection on
    `splits["validation"]`, alignment on the first batches of a fresh train pass."""

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

    return GraspSteps(
        finetune=finetune,
        alignment_batches=functools.partial(
            alignment_batches, splits["train"], pipeline, config
        ),
        gradients=functools.partial(alignment_gradients, model),
        validate=validate if validate_merges else None,
        merge=merge,
    )
