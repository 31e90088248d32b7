"""PyTorch-style 2-D convolutions, each built the way XLA compiles fast on CPU.

All keep `nn.Conv`'s parameters (`kernel` kh x kw x in/groups x out, lecun-normal; `bias`
zeros), so weights map one to one to PyTorch's, and all pad explicitly (PyTorch's
`padding=k // 2`, or asymmetric pads) rather than with XLA's "SAME", whose split of an
odd total pad differs for strided convolutions. Each form is pure JAX (it traces,
shards and differentiates like `nn.Conv`):

- depthwise (groups = channels): shifted-slice sums with a hand-written gradient, since
  XLA:CPU's grouped convolution is far slower than elementwise multiply-adds;
- 1x1: one 2-D matrix product, which every backend runs at its matmul speed;
- k x k (groups = 1): XLA's own convolution.

`benchmarks/conv_backends.py` times each against XLA's convolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models.layers import BatchNorm, matmul_last_axis


def _kernel_and_bias(module: nn.Module, shape: tuple[int, ...], use_bias: bool):
    """`nn.Conv`'s parameters: a lecun-normal kernel and, if asked, a zero bias."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
    bias = None
    if use_bias:
        bias = module.param("bias", nn.initializers.zeros, (shape[-1],), jnp.float32)
    return kernel, bias


def _add_bias(out: jax.Array, bias: jax.Array | None) -> jax.Array:
    return out if bias is None else out + bias.astype(out.dtype)


def _depthwise_forward(padded: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Sum over taps of the strided window times that tap's per-channel weight."""
    k = kernel.shape[0]
    height = (padded.shape[1] - k) // stride + 1
    width = (padded.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            window = padded[
                :,
                i : i + stride * (height - 1) + 1 : stride,
                j : j + stride * (width - 1) + 1 : stride,
            ]
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(padded: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise convolution of an already padded NHWC input with a (k, k, 1, C) kernel."""
    return _depthwise_forward(padded, kernel, stride)


def _depthwise_vjp_forward(padded, kernel, stride):
    return _depthwise_forward(padded, kernel, stride), (padded, kernel)


def _depthwise_vjp_backward(stride, residuals, grad):
    """Both gradients, written so that XLA:CPU fuses them well (autodiff's strided-slice
    transposes reduce ~6x slower): the input gradient sums unit-stride slices of the
    output gradient dilated and padded once; the kernel gradient reduces the input times
    the output gradient placed (one `pad`) at each tap's offset."""
    padded, kernel = residuals
    k = kernel.shape[0]
    height, width = padded.shape[1], padded.shape[2]
    reach_h = stride * (grad.shape[1] - 1) + 1  # input rows the first tap's windows span
    reach_w = stride * (grad.shape[2] - 1) + 1
    zero = jnp.zeros((), grad.dtype)

    def placed(low_h, high_h, low_w, high_w):
        config = [(0, 0, 0), (low_h, high_h, stride - 1), (low_w, high_w, stride - 1)]
        return jax.lax.pad(grad, zero, [*config, (0, 0, 0)])

    spread = placed(
        k - 1, k - 1 + height - k + 1 - reach_h, k - 1, k - 1 + width - k + 1 - reach_w
    )
    d_input = None
    d_kernel = []
    for i in range(k):
        for j in range(k):
            window = spread[
                :, k - 1 - i : k - 1 - i + height, k - 1 - j : k - 1 - j + width
            ]
            term = window * kernel[i, j, 0]
            d_input = term if d_input is None else d_input + term
            at_tap = placed(i, height - i - reach_h, j, width - j - reach_w)
            d_kernel.append(jnp.sum(padded * at_tap, axis=(0, 1, 2)))
    d_kernel = jnp.stack(d_kernel).reshape(k, k, 1, -1).astype(kernel.dtype)
    return d_input, d_kernel


depthwise_conv.defvjp(_depthwise_vjp_forward, _depthwise_vjp_backward)


class DepthwiseConv(nn.Module):
    """A depthwise `Conv2d` (groups = channels) as a sum of shifted, scaled slices."""

    features: int
    kernel_size: int
    stride: int
    padding: Sequence[tuple[int, int]]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.features:
            raise ValueError(
                f"depthwise conv {self.name}: {x.shape[-1]} input channels, "
                f"expected {self.features}"
            )
        k = self.kernel_size
        kernel, bias = _kernel_and_bias(self, (k, k, 1, self.features), self.use_bias)
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), *self.padding, (0, 0)))
        return _add_bias(
            depthwise_conv(padded, kernel.astype(self.dtype), self.stride), bias
        )


class PointwiseConv(nn.Module):
    """An unpadded 1x1 `Conv2d` as one 2-D matrix product over all (strided) pixels."""

    features: int
    stride: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (1, 1, x.shape[-1], self.features)
        kernel, bias = _kernel_and_bias(self, shape, self.use_bias)
        x = x[:, :: self.stride, :: self.stride].astype(self.dtype)
        return _add_bias(matmul_last_axis(x, kernel[0, 0].astype(self.dtype)), bias)


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] | None = None,
    groups: int = 1,
    bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
    name: str,
) -> nn.Module:
    """A PyTorch-style `Conv2d` (symmetric `kernel // 2` padding unless told otherwise),
    in the fastest of the forms above for its shape and backend."""
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = [(padding, padding), (padding, padding)]
    padding = tuple(tuple(pair) for pair in padding)
    if groups > 1 and groups == features:
        return DepthwiseConv(features, kernel, stride, padding, bias, dtype, name=name)
    if kernel == 1 and groups == 1 and padding == ((0, 0), (0, 0)):
        return PointwiseConv(features, stride, bias, dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ConvBN(nn.Module):
    """A bias-free `conv`, then (unless `normalize=False`) its BatchNorm and an optional
    activation: the unit HF's MobileViT and EfficientNet are built of, with the pair's
    names as each model's state dict spells them."""

    features: int
    kernel: int
    stride: int = 1
    padding: int | Sequence[tuple[int, int]] | None = None
    groups: int = 1
    normalize: bool = True
    activation: Callable[[jax.Array], jax.Array] | None = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    conv_name: str = "convolution"
    norm_name: str = "normalization"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(
            self.features,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            dtype=self.dtype,
            name=self.conv_name,
        )(x)
        if self.normalize:
            x = BatchNorm(self.momentum, self.epsilon, self.dtype, name=self.norm_name)(
                x, train
            )
        return x if self.activation is None else self.activation(x)
