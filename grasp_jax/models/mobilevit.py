"""MobileViT-XXS / -XS as HF transformers builds `apple/mobilevit-xx-small` / `-x-small`.

Module names follow the transformers state dict (`mobilevit/encoder/layer_2/...` is
`mobilevit.encoder.layer.2...`). As in HF, a feature map whose side is not a multiple of
the patch size is resized bilinearly to the next multiple before unfolding and back after
folding (at 224 pixels the last stage's 7x7 map goes through 8x8).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models.convolutions import ConvBN
from grasp_jax.models.layers import (
    at_least_float32,
    dense,
    layer_norm,
    resize_bilinear,
)

LAYER_NORM_EPSILON = 1e-5


def make_divisible(value: float, divisor: int = 8) -> int:
    """HF's `make_divisible`: round to a multiple of `divisor`, losing at most 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


class Settings(NamedTuple):
    """What every MobileViT block needs from the model's configuration."""

    expand_ratio: float
    kernel: int
    patch_size: int
    num_heads: int
    mlp_ratio: float
    attention_dropout: float
    hidden_dropout: float
    dtype: jnp.dtype


# HF's `MobileViTConvLayer`: bias-free conv, BatchNorm (PyTorch's defaults), SiLU.
ConvLayer = functools.partial(ConvBN, activation=nn.silu)


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, reduce 1x1; residual if shapes match."""

    out_channels: int
    stride: int
    expand_ratio: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        expanded = make_divisible(round(in_channels * self.expand_ratio))
        y = ConvLayer(expanded, 1, dtype=self.dtype, name="expand_1x1")(x, train)
        y = ConvLayer(
            expanded, 3, self.stride, groups=expanded, dtype=self.dtype, name="conv_3x3"
        )(y, train)
        y = ConvLayer(
            self.out_channels, 1, activation=None, dtype=self.dtype, name="reduce_1x1"
        )(y, train)
        if self.stride == 1 and in_channels == self.out_channels:
            return x + y
        return y


class MobileNetLayer(nn.Module):
    """A stack of inverted residuals (`layer_0`, `layer_1`, ...); the first may stride."""

    out_channels: int
    stride: int
    num_blocks: int
    expand_ratio: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            x = InvertedResidual(
                self.out_channels, stride, self.expand_ratio, self.dtype, name=f"layer_{i}"
            )(x, train)
        return x


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (`query`, `key`, `value`)."""

    num_heads: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        batch, tokens, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(name):  # (batch, heads, tokens, head_dim): XLA:CPU's fast layout
            y = dense(hidden, dtype=self.dtype, name=name)(x)
            return y.reshape(batch, tokens, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(head_dim)
        probs = jax.nn.softmax(at_least_float32(scores), axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return context.transpose(0, 2, 1, 3).reshape(batch, tokens, hidden)


class Linear(nn.Module):
    """HF's wrappers around one `dense` layer, with optional SiLU and dropout."""

    features: int
    activate: bool = False
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = dense(self.features, dtype=self.dtype, name="dense")(x)
        if self.activate:
            x = nn.silu(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Attention(nn.Module):
    """HF's `MobileViTAttention`: self-attention, then the output projection."""

    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        y = SelfAttention(
            cfg.num_heads, cfg.attention_dropout, cfg.dtype, name="attention"
        )(x, train)
        return Linear(
            x.shape[-1], dropout=cfg.hidden_dropout, dtype=cfg.dtype, name="output"
        )(y, train)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: attention and a SiLU MLP, each with a residual."""

    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg, hidden = self.config, x.shape[-1]
        y = layer_norm(LAYER_NORM_EPSILON, dtype=cfg.dtype, name="layernorm_before")(x)
        x = x + Attention(cfg, name="attention")(y, train)
        y = layer_norm(LAYER_NORM_EPSILON, dtype=cfg.dtype, name="layernorm_after")(x)
        mlp = int(hidden * cfg.mlp_ratio)
        y = Linear(mlp, activate=True, dtype=cfg.dtype, name="intermediate")(y, train)
        y = Linear(hidden, dropout=cfg.hidden_dropout, dtype=cfg.dtype, name="output")(
            y, train
        )
        return x + y


class Transformer(nn.Module):
    """`num_layers` transformer layers (`layer_0`, ...)."""

    num_layers: int
    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_layers):
            x = TransformerLayer(self.config, name=f"layer_{i}")(x, train)
        return x


def unfold(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B * patch**2, patches, C): tokens at one in-patch offset attend."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b * patch * patch, (h // patch) * (w // patch), c)


def fold(tokens: jax.Array, batch: int, height: int, width: int, patch: int) -> jax.Array:
    """The inverse of `unfold`."""
    c = tokens.shape[-1]
    x = tokens.reshape(batch, patch, patch, height // patch, width // patch, c)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(batch, height, width, c)


class MobileViTBlock(nn.Module):
    """HF's `MobileViTLayer`: optional strided inverted residual, local conv, a
    transformer over unfolded patches, projection and fusion with the local features."""

    out_channels: int
    hidden_size: int
    num_layers: int
    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        x = InvertedResidual(
            self.out_channels, 2, cfg.expand_ratio, cfg.dtype, name="downsampling_layer"
        )(x, train)
        channels = x.shape[-1]
        residual = x
        x = ConvLayer(channels, cfg.kernel, dtype=cfg.dtype, name="conv_kxk")(x, train)
        x = ConvLayer(
            self.hidden_size,
            1,
            normalize=False,
            activation=None,
            dtype=cfg.dtype,
            name="conv_1x1",
        )(x, train)

        batch, height, width, _ = x.shape
        p = cfg.patch_size
        new_height, new_width = math.ceil(height / p) * p, math.ceil(width / p) * p
        resized = (new_height, new_width) != (height, width)
        if resized:
            x = resize_bilinear(x, new_height, new_width)
        tokens = Transformer(self.num_layers, cfg, name="transformer")(unfold(x, p), train)
        tokens = layer_norm(LAYER_NORM_EPSILON, dtype=cfg.dtype, name="layernorm")(tokens)
        x = fold(tokens, batch, new_height, new_width, p)
        if resized:
            x = resize_bilinear(x, height, width)

        x = ConvLayer(channels, 1, dtype=cfg.dtype, name="conv_projection")(x, train)
        x = jnp.concatenate([residual, x], axis=-1)
        return ConvLayer(channels, cfg.kernel, dtype=cfg.dtype, name="fusion")(x, train)


class Encoder(nn.Module):
    """Two MobileNet stages, then three MobileViT stages (`layer_0` .. `layer_4`)."""

    neck_sizes: Sequence[int]
    hidden_sizes: Sequence[int]
    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg, neck = self.config, self.neck_sizes
        x = MobileNetLayer(neck[1], 1, 1, cfg.expand_ratio, cfg.dtype, name="layer_0")(
            x, train
        )
        x = MobileNetLayer(neck[2], 2, 3, cfg.expand_ratio, cfg.dtype, name="layer_1")(
            x, train
        )
        for i, layers in enumerate((2, 4, 3)):
            x = MobileViTBlock(
                neck[3 + i], self.hidden_sizes[i], layers, cfg, name=f"layer_{2 + i}"
            )(x, train)
        return x


class Backbone(nn.Module):
    """HF's `MobileViTModel`: stem, encoder, 1x1 expansion, global mean pooling."""

    neck_sizes: Sequence[int]
    hidden_sizes: Sequence[int]
    config: Settings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        neck, dtype = self.neck_sizes, self.config.dtype
        x = ConvLayer(neck[0], 3, 2, dtype=dtype, name="conv_stem")(x, train)
        x = Encoder(neck, self.hidden_sizes, self.config, name="encoder")(x, train)
        x = ConvLayer(neck[6], 1, dtype=dtype, name="conv_1x1_exp")(x, train)
        return jnp.mean(x, axis=(1, 2))


class MobileViT(nn.Module):
    """MobileViT image classifier; `mobilevit_xxs` and `mobilevit_xs` set the sizes."""

    num_classes: int
    neck_hidden_sizes: Sequence[int] = (16, 16, 24, 48, 64, 80, 320)
    hidden_sizes: Sequence[int] = (64, 80, 96)
    expand_ratio: float = 2.0
    num_attention_heads: int = 4
    mlp_ratio: float = 2.0
    conv_kernel_size: int = 3
    patch_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        settings = Settings(
            self.expand_ratio,
            self.conv_kernel_size,
            self.patch_size,
            self.num_attention_heads,
            self.mlp_ratio,
            self.attention_probs_dropout_prob,
            self.hidden_dropout_prob,
            self.dtype,
        )
        x = Backbone(
            tuple(self.neck_hidden_sizes),
            tuple(self.hidden_sizes),
            settings,
            name="mobilevit",
        )(images.astype(self.dtype), train)
        x = nn.Dropout(self.classifier_dropout_prob, deterministic=not train)(x)
        logits = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return at_least_float32(logits)


XXS = {
    "neck_hidden_sizes": (16, 16, 24, 48, 64, 80, 320),
    "hidden_sizes": (64, 80, 96),
    "expand_ratio": 2.0,
}
XS = {
    "neck_hidden_sizes": (16, 32, 48, 64, 80, 96, 384),
    "hidden_sizes": (96, 120, 144),
    "expand_ratio": 4.0,
}
