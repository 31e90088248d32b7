"""Model sharding: parameters split FSDP-style over a "model" mesh axis.

Data parallelism (`input_pipeline.data_parallel`) replicates the model. A model too large
for one device, or a user's FSDP layout, instead shards each parameter along one axis
over the mesh's "model" devices; the kernels, `train_step` and `loop.fit` keep whatever
layout their inputs have, so placing the variables is all it takes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grasp_jax.tree_checks import PyTree


def model_mesh(model: int) -> jax.sharding.Mesh:
    """A ("data", "model") mesh over every device, `model` devices to a model shard."""
    count = jax.device_count()
    if model < 1 or count % model:
        raise ValueError(
            f"mesh.model={model} does not divide the {count} devices; use a divisor of "
            f"{count} (1 replicates the model)."
        )
    return jax.make_mesh(
        (count // model, model),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def fsdp_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> NamedSharding:
    """Shards the largest axis that the "model" axis divides; replicates the rest (and a
    leaf no axis of which divides, e.g. a scalar)."""
    size = mesh.shape["model"]
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % size == 0 and shape[i] >= size]
    spec = [None] * len(shape)
    if axes and size > 1:
        spec[int(axes[0])] = "model"
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_model(variables: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """`variables` placed FSDP-style on `mesh` (see `fsdp_sharding`)."""
    return jax.device_put(
        variables, jax.tree.map(lambda x: fsdp_sharding(np.shape(x), mesh), variables)
    )
