"""Classification metrics with the reference's key names, computed the same way for every
method (the reference reports weighted metrics for most methods but macro for the
ensemble; we report both for all). A failed AUROC is `None` with a warning, not 0.0."""

from __future__ import annotations

import warnings

import numpy as np

# scikit-learn (~1 s to import, with SciPy) is imported where a metric is computed: a
# command that stops at a user error, prints its help or only plans never needs it.


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _auroc(labels: np.ndarray, probs: np.ndarray, average: str) -> float | None:
    """ROC AUC, or None (with a warning) where undefined: a class absent from the labels
    (scikit-learn then warns and gives NaN)."""
    from sklearn import metrics as skm
    from sklearn.exceptions import UndefinedMetricWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        if probs.shape[1] == 2:
            value = float(skm.roc_auc_score(labels, probs[:, 1]))
        else:
            value = float(
                skm.roc_auc_score(
                    labels,
                    probs,
                    multi_class="ovr",
                    average=average,
                    labels=np.arange(probs.shape[1]),
                )
            )
    if np.isfinite(value):
        return value
    missing = sorted(set(range(probs.shape[1])) - set(np.unique(labels).tolist()))
    warnings.warn(
        f"AUROC ({average}) undefined: classes {missing} never occur in the labels",
        stacklevel=3,
    )
    return None


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, predictions: np.ndarray | None = None
) -> dict:
    """accuracy, precision, recall, f1_score (weighted, as the reference), their macro
    versions, auroc/auroc_macro and the confusion matrix over all classes. The class
    scores are softmax(logits); `predictions` (default: their argmax) are the predicted
    classes where a method does not predict by its scores (a majority vote)."""
    from sklearn import metrics as skm

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    num_classes = logits.shape[1]
    if predictions is None:
        predictions = logits.argmax(axis=1)
    probs = softmax(logits)
    out: dict = {"accuracy": float(np.mean(predictions == labels)), "n": len(labels)}
    for average, suffix in (("weighted", ""), ("macro", "_macro")):
        p, r, f, _ = skm.precision_recall_fscore_support(
            labels,
            predictions,
            average=average,
            zero_division=0,
            labels=np.arange(num_classes),
        )
        out |= {
            f"precision{suffix}": float(p),
            f"recall{suffix}": float(r),
            f"f1_score{suffix}": float(f),
            f"auroc{suffix}": _auroc(labels, probs, average),
        }
    out["confusion_matrix"] = skm.confusion_matrix(
        labels, predictions, labels=np.arange(num_classes)
    ).tolist()
    return out
