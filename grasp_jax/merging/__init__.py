"""Weight-space merges of the model-merging literature, as pure pytree functions.

`kernels`: all sources at once (`soup`, `task_arithmetic`, `ties`, `dare`, `magmax`,
`fisher`). `streaming`: the same with one source in memory at a time (`merge_streaming`
over a `Soup`, `TaskArithmetic`, `Ties`, `Dare`, `MagMax` or `Fisher` merger).
`fisher_diagonal` estimates the Fishers that Fisher merging weights by.
"""

from grasp_jax.merging.fisher import fisher_diagonal
from grasp_jax.merging.kernels import dare, fisher, magmax, soup, task_arithmetic, ties
from grasp_jax.merging.streaming import (
    Dare,
    Fisher,
    MagMax,
    Soup,
    TaskArithmetic,
    Ties,
    merge_streaming,
)

__all__ = [
    "Dare",
    "Fisher",
    "MagMax",
    "Soup",
    "TaskArithmetic",
    "Ties",
    "dare",
    "fisher",
    "fisher_diagonal",
    "magmax",
    "merge_streaming",
    "soup",
    "task_arithmetic",
    "ties",
]
