"""Weights in and out of PyTorch: every layout, exact round trips, strict errors."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import torch

from grasp_jax import interop, torch_models
from tests.trees import random_variables

ZOO = ["resnet50", "efficientnet_b1", "mobilevit_xxs", "mobilevit_xs"]


def _assert_identical(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ZOO)
def test_round_trip_through_the_transformers_model_is_bit_identical(name):
    """Flax -> PyTorch (strict load into the HF model) -> Flax changes no bit."""
    variables = random_variables(name)
    torch_model = torch_models.hf_model(name, 5)
    torch_model.load_state_dict(
        interop.export_torch(name, variables, layout="hf"), strict=True
    )
    _assert_identical(interop.import_torch(name, torch_model.state_dict()), variables)


@pytest.mark.parametrize("layout", ["torchvision", "reference"])
def test_resnet50_torchvision_layouts_round_trip_and_agree_with_transformers(layout):
    """torchvision keys (`fc.*`) and the reference's (`fc.1.*`) load strictly into a
    torchvision-layout ResNet-50 whose logits equal the transformers model's."""
    variables = random_variables("resnet50")
    state = interop.export_torch("resnet50", variables, layout=layout)
    assert ("fc.1.weight" in state) == (layout == "reference")
    vision = torch_models.TorchvisionResNet50(5)
    if layout == "torchvision":  # plain torchvision: fc is a Linear
        vision.fc = vision.fc[1]
    vision.load_state_dict(state, strict=True)
    _assert_identical(interop.import_torch("resnet50", vision.state_dict()), variables)

    hf = torch_models.hf_model("resnet50", 5)
    hf.load_state_dict(
        interop.export_torch("resnet50", variables, layout="hf"), strict=True
    )
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(vision.eval()(images), hf.eval()(images).logits)


def test_lightning_checkpoint_imports(tmp_path):
    """The reference's `.ckpt`: Lightning keys, a state dict under `model.`, `fc.1` head."""
    variables = random_variables("resnet50", num_classes=3)
    state = interop.export_torch("resnet50", variables, layout="reference")
    checkpoint = {
        "epoch": 7,
        "global_step": 840,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{key}": value for key, value in state.items()},
        "hyper_parameters": {
            "model_name": "resnet-50",
            "num_classes": 3,
            "dropout_rate": 0.2,
        },
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "resnet-50_year_1-2-best-acc-epoch-07-0.8123.ckpt"
    torch.save(checkpoint, path)
    _assert_identical(interop.import_torch("resnet50", path), variables)


def test_safetensors_file_and_hf_directory_import(tmp_path):
    variables = random_variables("mobilevit_xxs")
    path = interop.save_safetensors(
        tmp_path / "w" / "model.safetensors", "mobilevit_xxs", variables
    )
    _assert_identical(interop.import_torch("mobilevit_xxs", path), variables)

    hf = torch_models.hf_model("mobilevit_xxs", 5)
    hf.load_state_dict(interop.export_torch("mobilevit_xxs", variables), strict=True)
    hf.save_pretrained(tmp_path / "hf")
    _assert_identical(interop.import_torch("mobilevit_xxs", tmp_path / "hf"), variables)
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    if (tmp_path / "bin" / "pytorch_model.bin").exists():
        _assert_identical(
            interop.import_torch("mobilevit_xxs", tmp_path / "bin"), variables
        )


def test_head_of_another_size_is_an_error_unless_dropped():
    variables = random_variables("efficientnet_b1", num_classes=5)
    state = interop.export_torch("efficientnet_b1", variables)
    with pytest.raises(
        interop.InteropError, match=r"classifier\.weight.*\n.*drop_head=True"
    ):
        interop.import_torch("efficientnet_b1", state, num_classes=3)
    fresh = interop.import_torch(
        "efficientnet_b1", state, num_classes=3, drop_head=True, rng=jax.random.key(1)
    )
    assert fresh["params"]["classifier"]["kernel"].shape == (1280, 3)
    backbone = {k: v for k, v in fresh["params"].items() if k != "classifier"}
    original = {k: v for k, v in variables["params"].items() if k != "classifier"}
    _assert_identical(backbone, original)


def test_missing_unexpected_and_misshapen_keys_are_listed():
    state = interop.export_numpy("mobilevit_xxs", random_variables("mobilevit_xxs"))
    del state["mobilevit.conv_stem.convolution.weight"]
    state["mobilevit.extra.weight"] = np.zeros(3, np.float32)
    state["mobilevit.conv_1x1_exp.normalization.bias"] = np.zeros(7, np.float32)
    with pytest.raises(interop.InteropError) as error:
        interop.import_torch("mobilevit_xxs", state)
    message = str(error.value)
    assert "1 missing:\n    mobilevit.conv_stem.convolution.weight" in message
    assert "1 unexpected:\n    mobilevit.extra.weight" in message
    assert (
        "mobilevit.conv_1x1_exp.normalization.bias: checkpoint (7,), model (320,)"
        in message
    )


def test_another_architecture_is_named(tmp_path):
    state = interop.export_torch("efficientnet_b1", random_variables("efficientnet_b1"))
    path = tmp_path / "effnet.pt"
    torch.save(state, path)
    with pytest.raises(interop.InteropError, match=r"effnet\.pt: holds a efficientnet"):
        interop.import_torch("resnet50", path)
    xs = interop.export_numpy("mobilevit_xs", random_variables("mobilevit_xs"))
    with pytest.raises(interop.InteropError, match=r"shape:\n.*checkpoint .* model "):
        interop.import_torch("mobilevit_xxs", xs)


def test_unreadable_files_name_the_file_and_the_problem(tmp_path):
    state = interop.export_torch("mobilevit_xxs", random_variables("mobilevit_xxs"))
    whole = tmp_path / "whole.pt"
    torch.save(state, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(interop.InteropError, match=r"truncated\.pt: cannot be read"):
        interop.import_torch("mobilevit_xxs", truncated)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(interop.InteropError, match=r"broken\.safetensors: not a readable"):
        interop.import_torch("mobilevit_xxs", broken)

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(interop.InteropError, match=r"list\.pt: expected a state dict"):
        interop.import_torch("mobilevit_xxs", not_a_state_dict)

    foreign = tmp_path / "foreign.pkl"  # arbitrary objects are never unpickled
    foreign.write_bytes(pickle.dumps({"weights": np.dtype}))
    with pytest.raises(
        interop.InteropError, match=r"foreign\.pkl: cannot be read .*weights_only"
    ):
        interop.import_torch("mobilevit_xxs", foreign)

    with pytest.raises(
        interop.InteropError, match=r"no model\.safetensors or pytorch_model\.bin"
    ):
        interop.import_torch("mobilevit_xxs", tmp_path)
    with pytest.raises(interop.InteropError, match=r"nowhere\.pt: no such file"):
        interop.import_torch("mobilevit_xxs", tmp_path / "nowhere.pt")


def test_unknown_layout_and_model_are_errors():
    with pytest.raises(interop.InteropError, match="unrecognised state dict layout"):
        interop.import_torch("resnet50", {"encoder.weight": np.zeros(3, np.float32)})
    with pytest.raises(interop.InteropError, match="an empty state dict"):
        interop.import_torch("resnet50", {})
    with pytest.raises(
        interop.InteropError, match="no PyTorch layout for model 'small_cnn'"
    ):
        interop.import_torch("small_cnn", {})
    with pytest.raises(interop.InteropError, match="has no 'timm' layout"):
        interop.export_numpy("resnet50", random_variables("resnet50"), layout="timm")
