"""The reported metrics on fixed logits against hand-written NumPy definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from grasp_jax.metrics import classification_metrics

LOGITS = np.array(
    [
        [2.0, 0.1, 0.3, -1.0],
        [0.2, 1.5, 0.1, 0.0],
        [0.0, 0.3, 2.2, 0.1],
        [1.1, 1.0, 0.2, 0.9],
        [0.1, 0.2, 0.3, 1.7],
        [0.4, 2.0, 0.1, 0.2],
        [0.3, 0.2, 0.1, 0.05],
        [0.1, 0.9, 1.0, 0.0],
        [0.0, 0.1, 0.2, 1.2],
        [1.3, 0.2, 0.2, 1.4],
    ]
)
LABELS = np.array([0, 1, 2, 1, 3, 1, 2, 2, 3, 0])


def per_class(labels, predictions, num_classes):
    """Precision, recall, F1 and support per class (0 where undefined, as reported)."""
    out = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out.append((p, r, f, np.sum(labels == c)))
    return np.array(out, dtype=float)


def binary_auroc(positive_scores, negative_scores):
    """Mann-Whitney: share of (positive, negative) pairs ranked right, ties half."""
    pairs = list(itertools.product(positive_scores, negative_scores))
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_weighted_and_macro_scores_and_the_confusion_matrix():
    out = classification_metrics(LOGITS, LABELS)
    predictions = LOGITS.argmax(axis=1)
    table = per_class(LABELS, predictions, 4)
    support = table[:, 3]
    assert out["accuracy"] == pytest.approx(np.mean(predictions == LABELS))
    assert out["n"] == len(LABELS)
    for i, name in enumerate(("precision", "recall", "f1_score")):
        assert out[name] == pytest.approx(np.sum(table[:, i] * support) / support.sum())
        assert out[f"{name}_macro"] == pytest.approx(np.mean(table[:, i]))
    confusion = np.zeros((4, 4), int)
    for t, p in zip(LABELS, predictions, strict=True):
        confusion[t, p] += 1
    assert out["confusion_matrix"] == confusion.tolist()
    probs = softmax(LOGITS)
    y = LABELS
    aurocs = [binary_auroc(probs[y == c, c], probs[y != c, c]) for c in range(4)]
    assert out["auroc_macro"] == pytest.approx(np.mean(aurocs))
    assert out["auroc"] == pytest.approx(np.sum(np.array(aurocs) * support) / support.sum())


def test_a_class_missing_from_the_labels_counts_zero_and_has_no_auroc():
    labels = np.where(LABELS == 3, 0, LABELS)  # class 3 never occurs, but is predicted
    with pytest.warns(UserWarning, match=r"AUROC \(macro\) undefined: classes \[3\]"):
        out = classification_metrics(LOGITS, labels)
    table = per_class(labels, LOGITS.argmax(axis=1), 4)
    assert table[3, 3] == 0 and table[3, 0] == 0.0  # predicted, never right
    assert out["precision_macro"] == pytest.approx(np.mean(table[:, 0]))
    assert out["recall_macro"] == pytest.approx(np.mean(table[:, 1]))
    assert out["auroc_macro"] is None  # class 3's AUROC is undefined
    probs, present = softmax(LOGITS), [0, 1, 2]  # weighted: class 3 has weight 0
    aurocs = [binary_auroc(probs[labels == c, c], probs[labels != c, c]) for c in present]
    weights = [np.sum(labels == c) for c in present]
    assert out["auroc"] == pytest.approx(np.average(aurocs, weights=weights))


def test_binary_auroc_uses_the_positive_class_probability():
    logits = np.array([[0.0, 1.0], [0.5, 0.2], [0.1, 0.3], [1.0, 0.9], [0.2, 0.2]])
    labels = np.array([1, 0, 1, 0, 1])
    out = classification_metrics(logits, labels)
    p = softmax(logits)[:, 1]
    assert out["auroc"] == pytest.approx(binary_auroc(p[labels == 1], p[labels == 0]))
    assert out["auroc_macro"] == out["auroc"]


def test_a_class_never_labelled_nor_predicted_still_counts_in_macro_averages():
    logits = np.concatenate([LOGITS[:, :3], np.full((10, 1), -9.0)], axis=1)
    labels = np.where(LABELS == 3, 2, LABELS)
    with pytest.warns(UserWarning, match=r"AUROC \(macro\) undefined: classes \[3\]"):
        out = classification_metrics(logits, labels)
    table = per_class(labels, logits.argmax(axis=1), 4)
    assert out["f1_score_macro"] == pytest.approx(np.mean(table[:, 2]))  # 4 classes
    assert np.array(out["confusion_matrix"]).shape == (4, 4)


def test_softmax_is_row_wise_and_survives_large_logits():
    from grasp_jax.metrics import softmax as ours

    logits = np.array([[1000.0, 999.0, 0.0], [-5.0, 3.0, 2.0]])
    expected = np.array(
        [
            [1 / (1 + np.exp(-1.0)), np.exp(-1.0) / (1 + np.exp(-1.0)), 0.0],
            softmax(logits[1:])[0],
        ]
    )
    np.testing.assert_allclose(ours(logits), expected, atol=1e-12)


def test_float32_logits_are_ranked_in_float64():
    """The model's float32 logits 9.000001 and 9.0 give equal float32 softmax
    probabilities (a tie: AUROC 0.5) but distinct float64 ones (AUROC 1.0)."""
    logits = np.array([[0.0, 9.000001], [0.0, 9.0]], np.float32)
    assert classification_metrics(logits, np.array([1, 0]))["auroc"] == 1.0
