"""Weights between PyTorch and the Flax model zoo, in both directions, strictly.

`import_torch` reads a state dict (or a file or HF model directory holding one), detects
its layout from the keys, and returns Flax variables; `export_torch` and
`save_safetensors` go back. Layouts read:

- HF transformers (`ResNetForImageClassification`, `EfficientNetForImageClassification`,
  `MobileViTForImageClassification`), as a directory, file or state dict;
- torchvision ResNet-50 with its `fc.*` head or the reference's `fc.1.*`
  (`Sequential(Dropout, Linear)`);
- the reference's PyTorch Lightning `.ckpt` files (`state_dict` under a `model.` prefix).

Unlike the reference (`strict=False`), every missing, unexpected or wrongly shaped key is
an error that lists them; a head of another class count is replaced only when asked
(`drop_head=True`). Files are read with safetensors or `torch.load(weights_only=True)`:
nothing arbitrary is ever unpickled.

The Flax modules are named after a canonical PyTorch layout (HF's for EfficientNet and
MobileViT, torchvision's for ResNet-50): module `layer1_0` is `layer1.0`, kernels are
transposed, BatchNorm `scale`/`mean`/`var` are `weight`/`running_mean`/`running_var`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from grasp_jax import files, models

# Each model with a PyTorch layout: its layouts (the first is the default for export)
# and the canonical head's key prefix.
_PYTORCH = {
    "resnet50": (("torchvision", "reference", "hf"), "fc."),
    "efficientnet_b1": (("hf",), "classifier."),
    "mobilevit_xxs": (("hf",), "classifier."),
    "mobilevit_xs": (("hf",), "classifier."),
}
LAYOUTS = {name: layouts for name, (layouts, _) in _PYTORCH.items()}
HEAD_PREFIX = {name: head for name, (_, head) in _PYTORCH.items()}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_WRAPPER_PREFIXES = ("model.", "module.")  # Lightning's attribute, DDP's wrapper
_INIT_SHAPE = (1, 64, 64, 3)  # parameter shapes do not depend on the input size


class InteropError(ValueError):
    """A checkpoint that cannot become (or come from) the named model's variables."""


# --------------------------------------------------------------------------- key names


def _torch_key(path: tuple[str, ...]) -> str:
    """Canonical PyTorch key of a Flax variable path ('params', module..., leaf)."""
    collection, *modules, leaf = path
    if (collection, leaf) not in _LEAF_NAMES:
        raise InteropError(f"no PyTorch name for Flax variable {'/'.join(path)}")
    modules = [re.sub(r"_(\d+)$", r".\1", name) for name in modules]
    return ".".join([*modules, _LEAF_NAMES[collection, leaf]])


def _resnet_to_hf(key: str) -> str:
    """torchvision ResNet key -> HF `ResNetForImageClassification` key."""
    if key.startswith("fc."):
        return "classifier.1." + key[3:]
    stem = re.fullmatch(r"(conv|bn)1\.(.+)", key)
    if stem:
        part = "convolution" if stem[1] == "conv" else "normalization"
        return f"resnet.embedder.embedder.{part}.{stem[2]}"
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(.+)", key)
    if not block:
        return key
    stage, index, kind, number, leaf = block.groups()
    prefix = f"resnet.encoder.stages.{int(stage) - 1}.layers.{index}"
    if kind == "downsample.":
        part = "convolution" if number == "0" else "normalization"
        return f"{prefix}.shortcut.{part}.{leaf}"
    part = "convolution" if kind == "conv" else "normalization"
    return f"{prefix}.layer.{int(number) - 1}.{part}.{leaf}"


def _to_layout(name: str, key: str, layout: str) -> str:
    """Canonical key -> `layout`'s key."""
    if layout == "hf" and name == "resnet50":
        return _resnet_to_hf(key)
    if layout == "reference" and key.startswith("fc."):
        return "fc.1." + key[3:]
    return key


def detect_layout(keys) -> tuple[str, str]:
    """(model family, layout) of a state dict, from its key names."""
    keys = set(keys)
    if any(k.startswith("mobilevit.") for k in keys):
        return "mobilevit", "hf"
    if any(k.startswith("efficientnet.") for k in keys):
        return "efficientnet", "hf"
    if any(k.startswith("resnet.embedder.") for k in keys):
        return "resnet", "hf"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet", "reference" if "fc.1.weight" in keys else "torchvision"
    sample = ", ".join(sorted(keys)[:5])
    raise InteropError(
        "unrecognised state dict layout (expected HF transformers ResNet/EfficientNet/"
        f"MobileViT or torchvision ResNet keys); first keys: {sample}"
    )


# --------------------------------------------------------------------------- reading files


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InteropError(f"{path}: not a readable safetensors file ({error})") from error


def _read_torch(path: Path) -> object:
    try:
        import torch
    except ImportError as error:
        raise InteropError(
            f"{path}: reading PyTorch checkpoints needs torch (pip install -e '.[torch]'); "
            "safetensors files load without it"
        ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, disallowed globals, ...
        raise InteropError(
            f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error


def _checkpoint_file(path: Path) -> Path:
    """The weights file of an HF model directory."""
    for candidate in ("model.safetensors", "pytorch_model.bin"):
        if (path / candidate).is_file():
            return path / candidate
    found = sorted(p.name for p in path.iterdir())[:10]
    raise InteropError(
        f"{path}: no model.safetensors or pytorch_model.bin in this directory "
        f"(found {found}); sharded checkpoints are not supported"
    )


def load_state_dict(source) -> tuple[dict[str, np.ndarray], str]:
    """A flat {key: float32 array} state dict from a path or mapping, and its origin."""
    origin = "the given state dict"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise InteropError(f"{path}: no such file or directory")
        if path.is_dir():
            path = _checkpoint_file(path)
        origin = str(path)
        source = (
            _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
        )
    if isinstance(source, Mapping) and isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]  # a Lightning checkpoint
    if isinstance(source, Mapping) and not source:
        raise InteropError(f"{origin}: an empty state dict")
    if not isinstance(source, Mapping):
        raise InteropError(
            f"{origin}: expected a state dict (a mapping of names to tensors) or a "
            f"Lightning checkpoint holding one, got {type(source).__name__}"
        )
    state = {}
    for key, value in source.items():
        array = _to_numpy(value)
        if array is None:
            raise InteropError(
                f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        if not key.endswith("num_batches_tracked"):  # a counter, not a weight
            state[str(key)] = array
    return _strip_wrapper(state), origin


def _to_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        array = value
    elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        array = (value.float() if value.is_floating_point() else value).numpy()
    else:
        return None
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _strip_wrapper(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a `model.` (Lightning) or `module.` (DDP) prefix shared by every key."""
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            return _strip_wrapper({key[len(prefix) :]: v for key, v in state.items()})
    return state


# --------------------------------------------------------------------------- conversion


def _abstract(name: str, num_classes: int, overrides: dict) -> dict:
    return jax.eval_shape(
        lambda: models.init(name, num_classes, jax.random.key(0), _INIT_SHAPE, **overrides)
    )


def _torch_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """The axis order taking a Flax array to PyTorch's layout (None: the same)."""
    if path[-1] != "kernel":
        return None
    return (3, 2, 0, 1) if ndim == 4 else (1, 0)  # conv (kh, kw, in, out); dense (in, out)


def _to_torch_array(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    axes = _torch_axes(path, array.ndim)
    return array if axes is None else np.transpose(array, axes)


def _from_torch_array(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    axes = _torch_axes(path, array.ndim)
    return array if axes is None else np.transpose(array, np.argsort(axes))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _torch_axes(path, len(shape))
    return shape if axes is None else tuple(shape[axis] for axis in axes)


def _check_name(name: str) -> None:
    if name not in LAYOUTS:
        raise InteropError(
            f"no PyTorch layout for model {name!r}; known: {sorted(LAYOUTS)}"
        )


def import_torch(
    name: str,
    state_dict_or_path,
    *,
    num_classes: int | None = None,
    drop_head: bool = False,
    rng: jax.Array | None = None,
    **overrides,
) -> dict:
    """Flax variables (`params`, `batch_stats`) of model `name` from PyTorch weights.

    `state_dict_or_path`: a state dict, a `.safetensors`/`.bin`/`.pt`/`.ckpt` file, or an
    HF model directory. `num_classes` defaults to the checkpoint's head size. With
    `drop_head=True` the checkpoint's head is ignored and a fresh one of `num_classes`
    outputs is initialised from `rng` (fine-tuning on a new label set). `overrides` are
    passed to `grasp_jax.models.create` (e.g. `depthwise_padding`).
    """
    _check_name(name)
    state, origin = load_state_dict(state_dict_or_path)
    family, layout = detect_layout(state)
    if not name.startswith(family):
        raise InteropError(
            f"{origin}: holds a {family} state dict ({layout} layout), not {name}; "
            "pass the matching model name"
        )
    head = HEAD_PREFIX[name]
    if drop_head and num_classes is None:
        raise InteropError("drop_head=True needs num_classes for the new head")
    if num_classes is None:
        weight = state.get(_to_layout(name, head + "weight", layout))
        if weight is None:
            raise InteropError(f"{origin}: no head weight {head}weight; pass num_classes")
        num_classes = int(weight.shape[0])

    abstract = flatten_dict(_abstract(name, num_classes, overrides))
    expected = {_torch_key(path): path for path in abstract}
    # The layout's names, from the one canonical -> layout mapping; a key the model lacks
    # keeps its name (and is reported as unexpected).
    renamed = {_to_layout(name, key, layout): key for key in expected}
    state = {renamed.get(key, key): value for key, value in state.items()}
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    _check_keys(origin, name, state, expected, abstract, skip=head if drop_head else None)

    fresh = {}
    if drop_head:  # a new head, initialised as the model initialises it
        module = head[:-1]
        features = abstract["params", module, "kernel"].shape[0]
        rng = jax.random.key(0) if rng is None else rng
        layer = nn.Dense(num_classes, param_dtype=jnp.float32)
        params = layer.init(rng, jnp.zeros((1, features), jnp.float32))["params"]
        fresh = {("params", module, leaf): value for leaf, value in params.items()}
    flat = {}
    for key, path in expected.items():
        if key in state:
            flat[path] = jnp.asarray(_from_torch_array(path, state[key]), jnp.float32)
        else:
            flat[path] = fresh[path]
    return unflatten_dict(flat)


def checkpoint_num_classes(name: str, state_dict_or_path) -> int | None:
    """The head size of a checkpoint for model `name` (None if it has no head)."""
    _check_name(name)
    state, _ = load_state_dict(state_dict_or_path)
    _, layout = detect_layout(state)
    weight = state.get(_to_layout(name, HEAD_PREFIX[name] + "weight", layout))
    return None if weight is None else int(weight.shape[0])


def _check_keys(origin, name, state, expected, abstract, skip) -> None:
    shapes = {
        key: _torch_shape(path, abstract[path].shape) for key, path in expected.items()
    }
    wanted = {key for key in expected if skip is None or not key.startswith(skip)}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)}, model {shapes[key]}"
        for key in wanted & set(state)
        if tuple(state[key].shape) != shapes[key]
    )
    if not (missing or unexpected or wrong):
        return
    lines = [f"{origin} does not match {name}:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape", wrong),
    ):
        if items:
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
    if wrong and all(item.startswith(HEAD_PREFIX[name]) for item in wrong):
        lines.append(
            "  only the head differs: pass num_classes to match it, or drop_head=True "
            "to start a new head"
        )
    raise InteropError("\n".join(lines))


def export_numpy(name: str, variables: Mapping, *, layout: str | None = None) -> dict:
    """`variables` as a flat {PyTorch key: NumPy array} state dict in `layout`."""
    _check_name(name)
    layout = layout or LAYOUTS[name][0]
    if layout not in LAYOUTS[name]:
        raise InteropError(
            f"{name} has no {layout!r} layout; choose one of {LAYOUTS[name]}"
        )
    state = {}
    for path, value in flatten_dict(
        {k: variables[k] for k in ("params", "batch_stats")}
    ).items():
        key = _to_layout(name, _torch_key(path), layout)
        state[key] = np.ascontiguousarray(_to_torch_array(path, np.asarray(value)))
        if path[-1] == "mean":  # PyTorch BatchNorm also carries a batch counter
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            state[counter] = np.zeros((), np.int64)
    return state


def export_torch(name: str, variables: Mapping, *, layout: str | None = None) -> dict:
    """A PyTorch state dict of `variables`, loadable with `strict=True` into the HF or
    torchvision-layout model (`layout`: see `LAYOUTS`; ResNet-50's "reference" writes the
    head as `fc.1.*`, "hf" as HF's `ResNetForImageClassification`)."""
    import torch

    return {
        k: torch.from_numpy(v)
        for k, v in export_numpy(name, variables, layout=layout).items()
    }


def save_safetensors(
    path, name: str, variables: Mapping, *, layout: str | None = None
) -> Path:
    """Write `variables` as a PyTorch-layout safetensors file (atomically)."""
    from safetensors.numpy import save_file

    state = export_numpy(name, variables, layout=layout)
    return files.write_atomic(path, lambda tmp: save_file(state, str(tmp)))
