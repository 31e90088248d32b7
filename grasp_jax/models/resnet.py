"""ResNet-50 with torchvision's layout (v1.5: stride in the 3x3 convolution).

Module names follow torchvision's state dict (`layer1_0/conv1` is `layer1.0.conv1`), so
`grasp_jax.interop` maps weights by name. The head is the reference's: dropout, then the
linear layer `fc` (the reference stores it as `fc.1`, HF transformers as `classifier.1`;
interop reads all three).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models.convolutions import conv
from grasp_jax.models.layers import BatchNorm, at_least_float32, dense


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, plus a projected shortcut when needed."""

    width: int
    stride: int
    project: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def conv_bn(y, features, kernel, stride, index):
            y = conv(
                features, kernel, stride=stride, dtype=self.dtype, name=f"conv{index}"
            )(y)
            return BatchNorm(dtype=self.dtype, name=f"bn{index}")(y, train)

        y = nn.relu(conv_bn(x, self.width, 1, 1, 1))
        y = nn.relu(conv_bn(y, self.width, 3, self.stride, 2))
        y = conv_bn(y, self.width * 4, 1, 1, 3)
        if self.project:
            x = conv(
                self.width * 4, 1, stride=self.stride, dtype=self.dtype, name="downsample_0"
            )(x)
            x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, train)
        return nn.relu(y + x)


class ResNet50(nn.Module):
    """torchvision `resnet50` with the reference's `Dropout -> Linear` head."""

    num_classes: int
    depths: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    dropout_rate: float = 0.2
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = conv(64, 7, stride=2, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True)):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(
                    width, stride, block == 0, self.dtype, name=f"layer{stage + 1}_{block}"
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return at_least_float32(dense(self.num_classes, dtype=self.dtype, name="fc")(x))
