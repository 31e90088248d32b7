"""Model registry: every model is a Flax Linen module called as
`module.apply(variables, images_nhwc, train=False)` with `params` and `batch_stats`
collections, so the merge kernels only ever see parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from grasp_jax.models.efficientnet import EfficientNetB1
from grasp_jax.models.mobilevit import XS, XXS, MobileViT
from grasp_jax.models.resnet import ResNet50
from grasp_jax.models.small_cnn import SmallCNN

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "efficientnet_b1": EfficientNetB1,
    "mobilevit_xs": functools.partial(MobileViT, **XS),
    "mobilevit_xxs": functools.partial(MobileViT, **XXS),
    "resnet50": ResNet50,
    "small_cnn": SmallCNN,
}
# The same models under the official code's names: its `--model` string (in folder and
# file names) and the Hugging Face id its drivers pass.
OTHER_NAMES = {
    "efficientnet_b1": ("efficientnet-b1", "google/efficientnet-b1"),
    "mobilevit_xs": ("mobilevit-xs", "apple/mobilevit-x-small"),
    "mobilevit_xxs": ("mobilevit-xxs", "apple/mobilevit-xx-small"),
    "resnet50": ("resnet-50", "microsoft/resnet-50"),
    "small_cnn": ("small-cnn", None),
}


def names() -> list[str]:
    """The registered model names."""
    return sorted(_REGISTRY)


def zoo_name(name: str) -> str:
    """Our name of a model written any way (`resnet-50`, `microsoft/resnet-50`,
    `resnet50`); a name we do not know is returned as given."""
    for ours, others in OTHER_NAMES.items():
        if name in others:
            return ours
    return name


def reference_name(name: str) -> str:
    """The official code's `--model` string of a zoo model (`resnet50` -> `resnet-50`)."""
    return OTHER_NAMES[name][0] if name in OTHER_NAMES else name.replace("_", "-")


def create(name: str, num_classes: int, **overrides) -> nn.Module:
    """The module `name` with `num_classes` outputs; `overrides` set its other fields."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {names()}")
    if isinstance(overrides.get("dtype"), str):
        overrides["dtype"] = jnp.dtype(overrides["dtype"])
    return _REGISTRY[name](num_classes=num_classes, **overrides)


def init(
    name: str,
    num_classes: int,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    **overrides,
) -> dict:
    """Variables (`params`, `batch_stats`) of a fresh model for NHWC `input_shape`.

    Wrap in `jax.eval_shape` for shapes only (no memory spent on a throwaway init).
    """
    return _jitted_init(create(name, num_classes, **overrides), tuple(input_shape))(rng)


@functools.lru_cache(maxsize=64)
def _jitted_init(module: nn.Module, input_shape: tuple[int, ...]) -> Callable:
    """One jitted init per (module, input shape), reused by every later call.

    Jitted because op-by-op initialisation of a deep model compiles hundreds of tiny
    programs; cached because a fresh `jax.jit(lambda ...)` per call compiles again each
    time (modules are frozen dataclasses, equal fields hash equal).
    """
    return jax.jit(lambda key: module.init(key, jnp.zeros(input_shape), train=False))
