"""The model zoo against the PyTorch models it mirrors (transformers, torchvision layout).

Weights are random (signal-preserving, BatchNorm statistics randomised) and moved with
`grasp_jax.interop`; logits, BatchNorm updates and gradients are compared in float32.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from grasp_jax import interop, models, torch_models
from grasp_jax.models.efficientnet import round_filters

ZOO = ["resnet50", "efficientnet_b1", "mobilevit_xxs", "mobilevit_xs"]
# The PyTorch models' parameter counts with 1000 classes (the paper: 25.6M, 7.8M, 1.3M,
# 2.3M); HF's own count of the same configs is checked beside them.
PARAMETERS_1000 = {
    "resnet50": 25_557_032,
    "efficientnet_b1": 7_794_184,
    "mobilevit_xxs": 1_272_024,
    "mobilevit_xs": 2_317_848,
}
# A second input size per model: native sizes for EfficientNet (240) and MobileViT (256),
# an odd one for ResNet (its 7x7 stride-2 stem and pools round down).
OTHER_SIZE = {
    "resnet50": 193,
    "efficientnet_b1": 240,
    "mobilevit_xxs": 256,
    "mobilevit_xs": 256,
}
NUM_CLASSES = 7


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)
    )


def _nhwc(images_nchw: np.ndarray) -> jax.Array:
    return jnp.asarray(images_nchw.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_equal_pytorch(name):
    abstract = jax.eval_shape(
        lambda: models.init(name, 1000, jax.random.key(0), (1, 224, 224, 3))
    )
    hf = torch_models.hf_model(name, 1000)
    hf_count = sum(p.numel() for p in hf.parameters())
    print(f"{name}: {_count(abstract['params']):,} parameters (PyTorch {hf_count:,})")
    assert _count(abstract["params"]) == hf_count == PARAMETERS_1000[name]


@pytest.fixture(scope="module", params=ZOO)
def pair(request):
    """(name, randomised eval-mode transformers model, imported Flax variables)."""
    name = request.param
    torch_model = torch_models.randomize(torch_models.hf_model(name, NUM_CLASSES), seed=1)
    torch_model.eval()
    return name, torch_model, interop.import_torch(name, torch_model.state_dict())


def test_eval_logits_match_transformers_at_two_sizes(pair):
    name, torch_model, variables = pair
    module = models.create(name, NUM_CLASSES)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    for size in (224, OTHER_SIZE[name]):
        images = _images(size)
        with torch.no_grad():
            expected = torch_models.logits(torch_model, images).numpy()
        got = np.asarray(forward(variables, _nhwc(images)))
        assert got.shape == (2, NUM_CLASSES)
        # Logits must be large and depend on the image, or the comparison tests nothing.
        assert np.abs(expected).max() > 0.5 and np.ptp(expected, axis=0).max() > 0.1
        np.testing.assert_allclose(
            got, expected, rtol=0, atol=1e-4, err_msg=f"{name}@{size}"
        )


def _torch_train_step(model, images, labels):
    """Train-mode logits, parameter gradients and BatchNorm statistics after one step."""
    model.train()
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    logits = torch_models.logits(model, torch.as_tensor(images, dtype=dtype))
    torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels)).backward()
    grads = {key: p.grad.double().numpy() for key, p in model.named_parameters()}
    stats = {
        k: v.double().numpy() for k, v in model.state_dict().items() if "running_" in k
    }
    return logits.detach().double().numpy(), grads, stats


def _jax_train_step(name, variables, images, labels, dtype, overrides):
    """The same step in Flax, its gradients and statistics under PyTorch's names."""
    module = models.create(
        name, NUM_CLASSES, dtype=dtype, **torch_models.FLAX_NO_DROPOUT[name], **overrides
    )
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)

    def loss_fn(params):
        logits, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            jnp.asarray(images.transpose(0, 2, 3, 1), dtype),
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    step = jax.jit(jax.grad(loss_fn, has_aux=True))
    grads, (logits, stats) = step(variables["params"])
    flat = interop.export_numpy(name, {"params": grads, "batch_stats": stats}, layout="hf")
    return np.asarray(logits, np.float64), {
        k: v.astype(np.float64) for k, v in flat.items()
    }


def _relative_errors(got: dict, expected: dict) -> dict:
    """Per-tensor relative errors. Some gradients are mathematically zero (e.g. the bias
    of a BatchNorm whose output only reaches train-mode BatchNorms through 1x1 convs and
    residuals) and hold only rounding noise: errors are relative to at least 1e-6 of the
    whole gradient's norm."""
    floor = 1e-6 * np.sqrt(sum(np.sum(np.square(v)) for v in expected.values()))
    return {
        key: np.linalg.norm(got[key] - value) / max(np.linalg.norm(value), floor)
        for key, value in expected.items()
    }


# A narrow, shallow EfficientNet (10 blocks, every block kind of B1's: expansion 1 and 6,
# kernels 3 and 5, strides 1 and 2, squeeze-excite, residuals, the symmetric depthwise
# padding at block 7) so that CI checks the architecture's train mode in seconds; the
# full B1 runs with the slow tests. The fields are named alike in HF and in our module.
NARROW_EFFICIENTNET = {
    "width_coefficient": 0.25,
    "depth_coefficient": 0.5,
    "depthwise_padding": (7,),
}


# ResNet-50 with one bottleneck a stage (the stem, all four stages' projections and
# strides): the architecture's train mode in CI at a third of the compile time; the full
# depth runs with the slow tests. `depths` is named alike in HF and in our module.
SHALLOW_RESNET = {"depths": (1, 1, 1, 1)}


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        pytest.param("resnet50", SHALLOW_RESNET, id="resnet_shallow"),
        pytest.param("resnet50", {}, marks=pytest.mark.slow, id="resnet50"),
        ("mobilevit_xxs", {}),
        pytest.param("efficientnet_b1", NARROW_EFFICIENTNET, id="efficientnet_narrow"),
        pytest.param("efficientnet_b1", {}, marks=pytest.mark.slow, id="efficientnet_b1"),
        pytest.param("mobilevit_xs", {}, marks=pytest.mark.slow, id="mobilevit_xs"),
    ],
)
def test_train_mode_batch_stats_and_gradients_match_pytorch(name, changes):
    """One train-mode step (dropout off) as PyTorch takes it: logits, BatchNorm running
    statistics and cross-entropy gradients.

    Compared in float64 on both sides: with random weights and 4 small images, train-mode
    BatchNorm is so ill-conditioned that PyTorch's own float32 gradients differ from its
    float64 ones by ~2% (ResNet-50); only float64 isolates implementation differences.
    Our float32 gradients must then be as close to that float64 truth as PyTorch's.
    """
    hf_changes = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
    if "width_coefficient" in changes:  # HF sizes the head by hand; we derive it
        hf_changes["hidden_dim"] = round_filters(1280, changes["width_coefficient"])
    torch_model = torch_models.hf_model(name, NUM_CLASSES, dropout=False, **hf_changes)
    torch_model = torch_models.randomize(torch_model, seed=2)
    variables = interop.import_torch(name, torch_model.state_dict(), **changes)
    images = _images(96, batch=4, seed=3)  # at 96, MobileViT resizes its last 3x3 map
    labels = np.array([0, 3, 5, 6])

    _, grads32, _ = _torch_train_step(copy.deepcopy(torch_model), images, labels)
    logits, grads, stats = _torch_train_step(torch_model.double(), images, labels)
    with jax.enable_x64(True):
        our_logits, ours = _jax_train_step(
            name, variables, images, labels, jnp.float64, changes
        )
    np.testing.assert_allclose(our_logits, logits, rtol=0, atol=1e-8 * np.abs(logits).max())
    for key, value in stats.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    errors = _relative_errors(ours, grads)
    worst = max(errors, key=errors.get)
    print(f"{name}: float64 gradients, worst relative error {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= 1e-4, worst

    _, ours32 = _jax_train_step(name, variables, images, labels, jnp.float32, changes)
    ours32, theirs32 = _relative_errors(ours32, grads), _relative_errors(grads32, grads)
    print(
        f"{name}: float32 vs float64 truth: ours {max(ours32.values()):.1e}, "
        f"PyTorch {max(theirs32.values()):.1e}"
    )
    assert max(ours32.values()) <= max(3 * max(theirs32.values()), 1e-4)


@pytest.mark.parametrize("name", ZOO)
def test_mixed_precision_keeps_float32_parameters_and_logits(name):
    """bfloat16 compute: parameters, statistics and logits stay float32 (shapes only;
    bfloat16 on CPU is slow to compile and not what the parity tests are about)."""
    module = models.create(name, NUM_CLASSES, dtype="bfloat16")
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {
        np.dtype("float32")
    }
    logits = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, images)
    assert logits.dtype == jnp.float32 and logits.shape == (2, NUM_CLASSES)
    # ...and the convolutions and matmuls really run in bfloat16 (not a no-op dtype).
    jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x, train=False))(variables, images)
    heavy = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in HEAVY]
    assert heavy and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in heavy)


HEAVY = ("conv_general_dilated", "dot_general")


def _equations(jaxpr):
    """Every equation of `jaxpr`, nested calls (pjit, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@pytest.mark.parametrize(
    ("kernel", "stride", "size"), [(3, 1, 8), (3, 2, 9), (3, 2, 8), (5, 2, 10)]
)
def test_depthwise_conv_matches_xla_grouped_convolution_and_its_gradients(
    kernel, stride, size
):
    """The shifted-slice depthwise convolution and its hand-written gradient against
    `lax.conv_general_dilated(feature_group_count=C)` and autodiff, in float64."""
    from grasp_jax.models.convolutions import depthwise_conv

    rng = np.random.default_rng(kernel * 100 + stride * 10 + size)
    with jax.enable_x64(True):
        padded = jnp.asarray(rng.normal(size=(2, size, size, 4)))
        weights = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)))

        def grouped(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (stride, stride), "VALID", feature_group_count=4,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # fmt: skip

        np.testing.assert_allclose(
            depthwise_conv(padded, weights, stride), grouped(padded, weights), rtol=1e-12
        )
        ours = jax.grad(lambda x, w: jnp.sum(depthwise_conv(x, w, stride) ** 3), (0, 1))
        theirs = jax.grad(lambda x, w: jnp.sum(grouped(x, w) ** 3), (0, 1))
        for got, expected in zip(
            ours(padded, weights), theirs(padded, weights), strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
