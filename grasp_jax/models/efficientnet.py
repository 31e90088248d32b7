"""EfficientNet-B1 as HF transformers builds `google/efficientnet-b1`.

Module names follow the transformers state dict (`efficientnet/encoder/blocks_3/...` is
`efficientnet.encoder.blocks.3...`). HF's quirks are kept on purpose, because pretrained
weights were trained (or converted) with them:

- BatchNorm momentum is the config's 0.99 in PyTorch's convention (the running statistics
  follow the latest batch almost entirely), except in the expansion layers, which use
  PyTorch's default 0.1.
- Strided depthwise convolutions pad by hand: `(k//2 - 1, k//2)` (Keras' padding for
  even inputs), or `(k//2, k//2)` for the blocks listed in `depthwise_padding`. HF fixes
  that list from the configured image size (B1's 240: block 16 sees an odd 15x15 map) and
  keeps it for every input size; so do we. Set `depthwise_padding` to match a checkpoint
  converted for another size (its config.json says which).
- The "drop connect" rate is a plain dropout on the residual branch, applied (with the
  residual) only to stride-1 blocks after the first of each stage.
- The stem pads (0, 1) then runs a valid 3x3 stride-2 convolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models import convolutions
from grasp_jax.models.convolutions import conv
from grasp_jax.models.layers import BatchNorm, at_least_float32, dense

EPSILON = 1e-3
MOMENTUM = 0.99  # HF's config value, PyTorch convention


def round_filters(channels: int, width_coefficient: float, divisor: int = 8) -> int:
    """HF's `round_filters`: scale a channel count and round to a multiple of `divisor`."""
    channels *= width_coefficient
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return int(rounded)


# HF's EfficientNet BatchNorms: epsilon 1e-3 and, except in the expansion, momentum 0.99.
ConvBN = functools.partial(convolutions.ConvBN, momentum=MOMENTUM, epsilon=EPSILON)


class SqueezeExcite(nn.Module):
    """Channel gates from the globally pooled features."""

    dim: int
    reduced: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gates = jnp.mean(x, axis=(1, 2), keepdims=True)
        gates = conv(self.reduced, 1, bias=True, dtype=self.dtype, name="reduce")(gates)
        gates = conv(self.dim, 1, bias=True, dtype=self.dtype, name="expand")(
            nn.silu(gates)
        )
        return x * nn.sigmoid(gates)


class BlockSpec(NamedTuple):
    """One MBConv block's shape, as HF's encoder derives it from the config."""

    in_dim: int
    out_dim: int
    stride: int
    expand_ratio: int
    kernel: int
    drop_rate: float
    first_in_stage: bool
    symmetric_padding: bool


class Block(nn.Module):
    """Expand (1x1), depthwise conv, squeeze-excite, project (1x1), maybe add the input."""

    spec: BlockSpec
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        inputs = x
        dim = spec.in_dim * spec.expand_ratio
        if spec.expand_ratio != 1:
            x = ConvBN(
                dim,
                1,
                momentum=0.1,
                conv_name="expand_conv",
                norm_name="expand_bn",
                activation=nn.silu,
                dtype=self.dtype,
                name="expansion",
            )(x, train)
        half = spec.kernel // 2
        if spec.stride == 2:
            low = half if spec.symmetric_padding else half - 1
            padding = [(low, half), (low, half)]
        else:
            padding = half
        x = ConvBN(
            dim,
            spec.kernel,
            stride=spec.stride,
            padding=padding,
            groups=dim,
            activation=nn.silu,
            conv_name="depthwise_conv",
            norm_name="depthwise_norm",
            dtype=self.dtype,
            name="depthwise_conv",
        )(x, train)
        reduced = max(1, int(spec.in_dim * 0.25))
        x = SqueezeExcite(dim, reduced, self.dtype, name="squeeze_excite")(x)
        x = ConvBN(
            spec.out_dim,
            1,
            conv_name="project_conv",
            norm_name="project_bn",
            dtype=self.dtype,
            name="projection",
        )(x, train)
        if spec.stride == 1 and not spec.first_in_stage:
            x = nn.Dropout(spec.drop_rate, deterministic=not train)(x)
            x = x + inputs
        return x


class Encoder(nn.Module):
    """The MBConv blocks and the 1x1 top convolution."""

    blocks: tuple[BlockSpec, ...]
    top_dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for index, spec in enumerate(self.blocks):
            x = Block(spec, self.dtype, name=f"blocks_{index}")(x, train)
        x = conv(self.top_dim, 1, dtype=self.dtype, name="top_conv")(x)
        x = BatchNorm(MOMENTUM, EPSILON, self.dtype, name="top_bn")(x, train)
        return nn.silu(x)


class Backbone(nn.Module):
    """HF's `EfficientNetModel`: stem (`embeddings`), encoder, global mean pooling."""

    stem_dim: int
    blocks: tuple[BlockSpec, ...]
    top_dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(
            self.stem_dim,
            3,
            stride=2,
            padding=[(0, 1), (0, 1)],
            activation=nn.silu,
            norm_name="batchnorm",
            dtype=self.dtype,
            name="embeddings",
        )(x, train)
        x = Encoder(self.blocks, self.top_dim, self.dtype, name="encoder")(x, train)
        return jnp.mean(x, axis=(1, 2))


class EfficientNetB1(nn.Module):
    """EfficientNet-B1 (7.8M parameters with 1000 classes) in HF's layout."""

    num_classes: int
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.1
    kernel_sizes: Sequence[int] = (3, 3, 5, 3, 5, 5, 3)
    in_channels: Sequence[int] = (32, 16, 24, 40, 80, 112, 192)
    out_channels: Sequence[int] = (16, 24, 40, 80, 112, 192, 320)
    strides: Sequence[int] = (1, 2, 2, 2, 1, 2, 1)
    num_block_repeats: Sequence[int] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: Sequence[int] = (1, 6, 6, 6, 6, 6, 6)
    depthwise_padding: Sequence[int] = (16,)
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    def block_specs(self) -> tuple[BlockSpec, ...]:
        """Every block's shape, in HF's order (depth scaled by `depth_coefficient`)."""
        width = self.width_coefficient
        repeats = [math.ceil(self.depth_coefficient * n) for n in self.num_block_repeats]
        specs = []
        for stage, repeat in enumerate(repeats):
            out_dim = round_filters(self.out_channels[stage], width)
            for j in range(repeat):
                index = len(specs)
                specs.append(
                    BlockSpec(
                        in_dim=round_filters(self.in_channels[stage], width)
                        if j == 0
                        else out_dim,
                        out_dim=out_dim,
                        stride=self.strides[stage] if j == 0 else 1,
                        expand_ratio=self.expand_ratios[stage],
                        kernel=self.kernel_sizes[stage],
                        drop_rate=self.drop_connect_rate * index / sum(repeats),
                        first_in_stage=j == 0,
                        symmetric_padding=index in self.depthwise_padding,
                    )
                )
        return tuple(specs)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        width = self.width_coefficient
        x = Backbone(
            round_filters(32, width),
            self.block_specs(),
            round_filters(1280, width),
            self.dtype,
            name="efficientnet",
        )(images.astype(self.dtype), train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return at_least_float32(logits)
