"""Random streams derived from one key by name, so no two purposes share randomness.

`stream(key, "alignment_dropout", stage)` folds a stable hash of the name, then each
index, into `key`: adding a stream never shifts another, and a run is replayed from its
one recorded seed. `int_seed` turns a key into the integer seed that grain and NumPy take.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp


def stream(key: jax.Array, name: str, *indices: int) -> jax.Array:
    """The key of stream `name` (then `indices`, e.g. a stage and a batch) under `key`."""
    key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    for index in indices:
        key = jax.random.fold_in(key, index)
    return key


def int_seed(key: jax.Array) -> int:
    """A 31-bit integer drawn from `key`, for APIs that take integer seeds."""
    return int(jax.random.bits(key, (), jnp.uint32) & 0x7FFFFFFF)


def root_key(seed: int) -> jax.Array:
    """The key every stream of a run derives from (a raw uint32 key, as Orbax stores)."""
    return jax.random.PRNGKey(seed)
