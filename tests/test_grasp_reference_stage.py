"""One GRASP transfer stage written in PyTorch the reference's way (docs/reference.md §4,
steps 5.2-5.3) and ours on the same imported weights: the same tensors move, to the same
values, and the BatchNorm statistics are the current model's after its train-mode pass.

Dropout is off on both sides (PyTorch and JAX draw different masks); the current model
runs in train mode, as in the reference, so BatchNorm uses batch statistics and updates
its running statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import grasp_jax as gj
from grasp_jax import interop, models, objective, torch_models

CLASSES = 10


def reference_stage(current, source, images, labels, threshold) -> tuple[dict, dict, dict]:
    """The reference's alignment and transfer: summed per-parameter gradients of both
    models on the batch (current in train mode, source in eval mode), cosine scores
    `dot / (|a| |b| + 1e-8)`, and every parameter scoring above the threshold copied
    from the source. Buffers never move. Also each parameter's smaller gradient norm."""
    current.train()
    source.eval()
    grads = []
    for model in (current, source):
        model.zero_grad()
        logits = model(torch.from_numpy(images)).logits
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    scores, norms = {}, {}
    for key, a in grads[0].items():
        b = grads[1][key]
        scores[key] = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm() + 1e-8))
        norms[key] = min(float(a.norm()), float(b.norm()))
    merged = {k: v.detach().clone() for k, v in current.state_dict().items()}
    source_state = source.state_dict()
    for key, score in scores.items():
        if score > threshold:
            merged[key] = source_state[key].detach().clone()
    return {k: v.numpy() for k, v in merged.items()}, scores, norms


def determined(norms: dict) -> set:
    """The parameters whose score float32 can decide. Some gradients vanish in exact
    arithmetic (a bias followed by a train-mode BatchNorm, attention's key bias) and
    are left as float rounding (MobileViT-XXS: 16 of 251, at most 6e-8 of the largest
    gradient norm, the others at least 4e-4). Their cosine is noise that any change of
    summation order moves, so they are only held to moving whole."""
    scale = max(norms.values())
    return {k for k, n in norms.items() if n > 1e-5 * scale}


# MobileViT-XXS (convolutions, attention, BatchNorm) runs with the slow tests; CI runs
# ResNet-50 with one bottleneck a stage (14 s against 43 s on 2 cores). Each threshold
# splits its random pair's scores (MobileViT's lie wider apart than the ResNet's).
@pytest.mark.parametrize(
    ("name", "changes", "threshold"),
    [
        pytest.param("mobilevit_xxs", {}, 0.3, marks=pytest.mark.slow, id="mobilevit_xxs"),
        pytest.param("resnet50", {"depths": (1, 1, 1, 1)}, 0.05, id="resnet_shallow"),
    ],
)
def test_a_stage_moves_the_same_tensors_to_the_same_values(name, changes, threshold):
    hf_changes = {k: list(v) for k, v in changes.items()}
    current, source = (
        torch_models.randomize(
            torch_models.hf_model(name, CLASSES, dropout=False, **hf_changes), seed
        )
        for seed in (1, 2)
    )
    # before any forward
    ours_current = interop.import_torch(name, current.state_dict(), **changes)
    ours_source = interop.import_torch(name, source.state_dict(), **changes)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 3, 96, 96)).astype(np.float32)
    labels = np.array([0, 3, 5, 9])

    expected, scores, norms = reference_stage(current, source, images, labels, threshold)
    decided = determined(norms)
    assert len(decided) > 0.8 * len(scores)  # the noise-only ones are few

    module = models.create(name, CLASSES, **torch_models.FLAX_NO_DROPOUT[name], **changes)
    batches = {  # one batch, stacked
        "image": images.transpose(0, 2, 3, 1)[None],
        "label": labels.astype(np.int32)[None],
        "rng": gj.seeding.root_key(0)[None],
    }
    merged, merge_stats = gj.grasp_stage(
        ours_current,
        ours_source,
        batches,
        current_loss=objective.loss_fn(module, train=True),
        source_loss=objective.loss_fn(module, train=False),
        threshold=threshold,
    )
    stats = merged["batch_stats"]
    got = interop.export_numpy(name, merged, layout="hf")

    moved = {k for k in decided if scores[k] > threshold}
    assert 0 < len(moved) < len(decided)  # a real split, not all or nothing
    margin = min(abs(scores[k] - threshold) for k in decided)
    assert margin > 1e-4, f"a score lies {margin:.1e} from the threshold: fragile case"
    taken = interop.export_numpy(
        name,
        {"params": merge_stats.mask(merged["params"]), "batch_stats": stats},
        layout="hf",
    )
    assert {k for k in decided if taken[k].all()} == moved
    assert all(taken[k].all() or not taken[k].any() for k in scores)  # whole tensors
    current_state, source_state = current.state_dict(), source.state_dict()
    for key, value in expected.items():
        if "num_batches_tracked" in key:
            continue  # a counter PyTorch keeps and we do not (unused with a momentum)
        if "running_" in key:  # statistics after the train-mode pass: numerically equal
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
        elif key in decided:  # parameters: copied or kept as the reference, bit for bit
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:  # a noise score: either side's tensor, whole and unchanged
            options = (current_state[key].numpy(), source_state[key].numpy())
            assert any(np.array_equal(got[key], o) for o in options), key
