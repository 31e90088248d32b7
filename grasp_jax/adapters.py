"""Low-rank adapters on any Flax model, without touching its code: PEARL's building block.

An adapter on a layer adds `(x @ A) @ B` to the layer's output, `x` being the layer's
input (for a convolution, taken at the layer's stride: a 1x1 convolution A, then a 1x1
convolution B). Which layers get one follows the reference (docs/reference.md §5): every
layer with a `kernel` parameter whose input and output have at least 16 channels, except
those whose path names a `head` or `classifier`, and only where the adapter's output
shape equals the layer's. A is N(0, 0.01^2) for dense layers and Kaiming-normal for
convolutions, B is zero, so a new adapter changes nothing. The adapters are added by
`flax.linen.intercept_methods` around the base model's own `apply`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.tree_checks import PyTree

EXCLUDED_NAMES = ("head", "classifier")
MIN_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class Site:
    """A layer that takes an adapter."""

    path: str  # the module path, e.g. "stage2/block0/conv1"
    kind: str  # "conv" (has a stride) or "dense"
    features_in: int
    features_out: int
    stride: tuple[int, int]


def _stride(module: nn.Module) -> tuple[int, int]:
    stride = getattr(module, "strides", None) or getattr(module, "stride", None) or 1
    return (stride, stride) if isinstance(stride, int) else tuple(stride)


def _taken(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """The layer input at the layer's stride (a 1x1 convolution's view of it)."""
    return x[:, :: stride[0], :: stride[1], :] if x.ndim == 4 else x


def find_sites(model: nn.Module, variables: PyTree, image_shape: Sequence[int]) -> list:
    """The layers of `model` that take adapters, found by tracing one eval-mode pass."""
    sites: list[Site] = []

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not args:
            return y
        x = args[0]
        has_kernel = "kernel" in module.variables.get("params", {})
        path = "/".join(module.path)
        if (
            has_kernel
            and isinstance(x, jax.Array | jax.ShapeDtypeStruct)
            and x.shape[-1] >= MIN_CHANNELS
            and y.shape[-1] >= MIN_CHANNELS
            and not any(name in path for name in EXCLUDED_NAMES)
            and _taken(x, _stride(module)).shape[:-1] == y.shape[:-1]
        ):
            kind = (
                "conv"
                if hasattr(module, "strides") or hasattr(module, "stride")
                else "dense"
            )
            sites.append(Site(path, kind, x.shape[-1], y.shape[-1], _stride(module)))
        return y

    images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return sites


def init_adapters(key: jax.Array, sites: Sequence[Site], rank: int) -> dict:
    """One adapter per site: {path: {"A": (in, rank), "B": (rank, out)}}, B zero."""
    adapters = {}
    for index, site in enumerate(sites):
        std = 0.01 if site.kind == "dense" else math.sqrt(2.0 / site.features_in)
        a = std * jax.random.normal(
            jax.random.fold_in(key, index), (site.features_in, rank)
        )
        adapters[site.path] = {"A": a, "B": jnp.zeros((rank, site.features_out))}
    return adapters


def adapter_count(adapters: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))


def apply_adapted(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    adapter_sets: Sequence[dict],
    weights: jax.Array,
    *,
    block_gradient: bool = False,
) -> jax.Array:
    """Eval-mode logits of `model` with, at every adapted layer, the weighted sum over
    the sets of their adapters' outputs added. `block_gradient` cuts the adapters out
    of the gradient (the reference's `.data` assignment: nothing trains)."""

    def add_adapters(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name != "__call__" or path not in adapter_sets[0]:
            return y
        x = _taken(args[0], _stride(context.module)).astype(jnp.float32)
        delta = sum(
            w * ((x @ s[path]["A"]) @ s[path]["B"])
            for w, s in zip(weights, adapter_sets, strict=True)
        )
        if block_gradient:
            delta = jax.lax.stop_gradient(delta)
        return y + delta.astype(y.dtype)

    with nn.intercept_methods(add_adapters):
        return model.apply(variables, images, train=False)


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A model for `loop.fit`/`evaluation.predict`: the frozen base (eval mode) plus
    adapter sets. Its `params` are what trains, `{"adapters": [set, ...]}` or
    `{"weights": w}` (one composition weight per set); its `batch_stats` hold what stays
    fixed: `{"base": base variables}` and, when the weights train, `"adapters"`."""

    base: nn.Module
    block_gradient: bool = False

    def apply(self, variables, images, *, train=False, mutable=False, rngs=None):
        trained, fixed = variables["params"], variables["batch_stats"]
        sets = trained.get("adapters", fixed.get("adapters"))
        weights = trained.get("weights", jnp.ones(len(sets)))
        logits = apply_adapted(
            self.base,
            fixed["base"],
            images,
            sets,
            weights,
            block_gradient=self.block_gradient,
        )
        return (logits, {"batch_stats": fixed}) if train else logits
