"""A small CNN for the embedded data set and fast tests.

Conv-BatchNorm-ReLU blocks with max pooling, global average pooling, dropout and a dense
classifier named `head` (the training recipe gives the head 10x the learning rate, as the
reference does for `classifier`/`head`/`fc` parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults: momentum 0.1 (Flax counts the complement), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class SmallCNN(nn.Module):
    """`widths` conv blocks (all but the last halve the resolution), then a linear head."""

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)
    dropout_rate: float = 0.2
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = images.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                dtype=self.dtype,
                name=f"bn{i}",
            )(x)
            x = nn.relu(x)
            if i < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
