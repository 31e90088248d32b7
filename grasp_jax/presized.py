"""Small splits whose images are already at the model's size, held in memory as arrays.

For such a split the host transform is the identity, so a batch is a gather of rows:
`input_pipeline.dataset` then runs grain on row indices only (the same shuffle and the
same per-process rows, hence the same batches) and gathers images from one array. This
removes grain's per-example work (~0.3 ms an image on a 2-core CPU, a large share of a
small model's step) and stays on the host, outside any traced program.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import grain
import numpy as np

MAX_BYTES = 256 * 2**20  # larger splits stream through grain as before
_CACHE: dict[int, tuple[Sequence, dict[str, np.ndarray] | None]] = {}
_CACHE_ENTRIES = 32
_CACHE_LOCK = threading.Lock()  # runs side by side in threads share the cache


def arrays(split: Sequence, size: int) -> dict[str, np.ndarray] | None:
    """`image` (uint8 [n, size, size, 3]) and `label` (int32) of every row of `split`,
    read once per split object; None if a row is not such an image or it is too big."""
    key = id(split)
    with _CACHE_LOCK:
        if key in _CACHE and _CACHE[key][0] is split:
            return _CACHE[key][1]
    loaded = _load(split, size)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_ENTRIES:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (split, loaded)  # holding the split keeps its id from being reused
    return loaded


def _load(split: Sequence, size: int) -> dict[str, np.ndarray] | None:
    n = len(split)
    if n == 0 or n * size * size * 3 > MAX_BYTES or not _presized(split[0], size):
        return None
    rows = [split[i] for i in range(n)]
    if not all(_presized(row, size) for row in rows):
        return None
    return {
        "image": np.stack([row["image"] for row in rows]),
        "label": np.asarray([row["label"] for row in rows], np.int32),
    }


def _presized(row, size: int) -> bool:
    image = row.get("image") if isinstance(row, dict) else None
    return (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.shape == (size, size, 3)
    )


@functools.lru_cache(maxsize=64)
def shuffled_rows(n: int, seed: int) -> np.ndarray:
    """grain's shuffle of rows 0..n-1 under `seed`, computed once per (n, seed): grain
    draws every index on its own (~50 us each on a 2-core CPU, 30 ms an epoch of 600
    rows), and the methods of one run replay the same epochs' orders."""
    shuffled = grain.MapDataset.source(range(n)).shuffle(seed=seed)
    order = np.fromiter((shuffled[i] for i in range(n)), np.int64, count=n)
    order.flags.writeable = False
    return order


class Batches(Sequence):
    """Batches of `local` rows of `data`, in the row order `indices` (a sequence of row
    numbers); the last partial batch kept unless `drop_remainder`."""

    def __init__(self, data, indices: Sequence, local: int, drop_remainder: bool):
        self.data = data
        self.order = np.asarray(indices, np.int64)
        self.local = local
        full, rest = divmod(len(self.order), local)
        self.length = full + (1 if rest and not drop_remainder else 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        if not 0 <= b < self.length:
            raise IndexError(b)
        rows = self.order[b * self.local : (b + 1) * self.local]
        return {"image": self.data["image"][rows], "label": self.data["label"][rows]}
