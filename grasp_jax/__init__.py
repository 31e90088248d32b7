"""grasp_jax: GRASP (Gradient-Aligned Sequential Parameter Transfer) in JAX.

The kernels are pure functions over pytrees (e.g. Flax `params`), jitted by XLA:
`alignment_scores` scores how two models' gradients agree, `transfer` takes the agreeing
units of a source model, `merge_step` does both (traceable inside a caller's `jit`,
`scan` or `vmap`; donating at top level), `grasp_stage` runs a whole stage (both models'
alignment gradients by `lax.scan`, then the merge) as one program, and
`summed_gradients` sums gradients over an iterable of batches. `run_grasp` sequences
whole GRASP runs from `GraspSteps` (`default_steps` builds them on the library's `fit`).
`merging` holds the literature's weight-space merges (all at once and streaming).
"""

from grasp_jax import merging
from grasp_jax.alignment import GRANULARITIES, alignment_scores
from grasp_jax.gradients import summed_gradients
from grasp_jax.grasp import FineTuned, GraspConfig, GraspSteps, default_steps, run_grasp
from grasp_jax.merge import MergeStats, merge_step, random_merge_step
from grasp_jax.stage import grasp_stage
from grasp_jax.transfer import MODES, transfer

__version__ = "0.1.0"

__all__ = [
    "GRANULARITIES",
    "MODES",
    "FineTuned",
    "GraspConfig",
    "GraspSteps",
    "MergeStats",
    "alignment_scores",
    "default_steps",
    "grasp_stage",
    "merge_step",
    "merging",
    "random_merge_step",
    "run_grasp",
    "summed_gradients",
    "transfer",
]
