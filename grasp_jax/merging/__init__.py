"""Weight-space merges of the model-merging literature, as pure pytree functions.

`kernels`: all sources at once (`soup`, `task_arithmetic`, `ties`, `dare`, `magmax`,
`fisher`). `streaming`: the same with one source in memory at a time, each merge a
`StreamingMerger` of pure `init`/`update`/`finish` functions (`streaming.ties()`, ...)
driven by `merge_streaming`. `fisher_diagonal` estimates the Fishers that Fisher merging
weights by.
"""

from grasp_jax.merging import streaming
from grasp_jax.merging.fisher import fisher_diagonal
from grasp_jax.merging.kernels import dare, fisher, magmax, soup, task_arithmetic, ties
from grasp_jax.merging.streaming import StreamingMerger, merge_streaming

__all__ = [
    "StreamingMerger",
    "dare",
    "fisher",
    "fisher_diagonal",
    "magmax",
    "merge_streaming",
    "soup",
    "streaming",
    "task_arithmetic",
    "ties",
]
