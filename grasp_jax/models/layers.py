"""Layers that behave exactly like their PyTorch counterparts.

The model zoo mirrors PyTorch networks parameter for parameter, so the few places where
Flax's defaults differ from PyTorch's are fixed here once:

- `BatchNorm` takes PyTorch's momentum (the weight of the *new* batch statistic) and,
  like PyTorch, normalises with the biased batch variance but stores the unbiased one in
  its running estimate. Statistics are kept in float32 (or wider) whatever the compute
  dtype.
- `Dense` is one 2-D matrix product over all leading axes (XLA:CPU differentiates N-D
  dot_generals ~5x slower); convolutions live in `convolutions.py`.
- `resize_bilinear` is `torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)` without antialiasing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` over the last axis; `momentum` in PyTorch's convention."""

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32)
        )
        if train:
            axes = tuple(range(x.ndim - 1))
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(wide, axes)
            var = jnp.mean(jnp.square(wide - mean), axes)
            if not self.is_initializing():
                count = x.size // channels
                unbiased = var * (count / max(count - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        if x.dtype == multiplier.dtype:  # full precision: PyTorch's order of operations
            return (x - mean) * multiplier + bias
        shift = bias - mean * multiplier
        return x * multiplier.astype(x.dtype) + shift.astype(x.dtype)


def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` over the last axis, as one 2-D product (rows = all leading axes)."""
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """`torch.nn.Linear` (kernel stored in x out, as `nn.Dense`), applied as one 2-D matrix
    product over all leading axes: XLA:CPU differentiates N-D dot_generals ~5x slower."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        out = matmul_last_axis(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            out = out + bias.astype(self.dtype)
        return out


def dense(features: int, *, dtype: jnp.dtype, name: str, bias: bool = True) -> Dense:
    """`torch.nn.Linear`."""
    return Dense(features, bias, dtype, name=name)


def layer_norm(epsilon: float, *, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    """`torch.nn.LayerNorm` over the last axis (two-pass variance, as PyTorch)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, or wider if it already is (logits, softmax inputs)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bilinear_weights(in_size: int, out_size: int, dtype: jnp.dtype) -> jax.Array:
    """(out, in) interpolation matrix of PyTorch's align_corners=False bilinear mode."""
    dtype = jnp.promote_types(dtype, jnp.float32)
    scale = in_size / out_size
    source = jnp.maximum((jnp.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5, 0.0)
    low = jnp.minimum(jnp.floor(source).astype(jnp.int32), in_size - 1)
    high = jnp.minimum(low + 1, in_size - 1)
    frac = source - low
    rows = jnp.arange(out_size)
    weights = jnp.zeros((out_size, in_size), dtype)
    weights = weights.at[rows, low].add(1.0 - frac)
    return weights.at[rows, high].add(frac)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resize NHWC `x` as `F.interpolate(mode="bilinear", align_corners=False)` does."""
    rows = _bilinear_weights(x.shape[1], height, x.dtype).astype(x.dtype)
    cols = _bilinear_weights(x.shape[2], width, x.dtype).astype(x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols)
