"""Classification metrics with the reference's key names, computed the same way for every
method (the reference reports weighted metrics for most methods but macro for the
ensemble; we report both for all). A failed AUROC is `None` with a warning, not 0.0."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _auroc(labels: np.ndarray, probs: np.ndarray, average: str) -> float | None:
    try:
        if probs.shape[1] == 2:
            return float(skm.roc_auc_score(labels, probs[:, 1]))
        return float(
            skm.roc_auc_score(
                labels,
                probs,
                multi_class="ovr",
                average=average,
                labels=np.arange(probs.shape[1]),
            )
        )
    except ValueError as err:  # e.g. a class absent from this split
        warnings.warn(f"AUROC ({average}) undefined: {err}", stacklevel=2)
        return None


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """accuracy, precision, recall, f1_score (weighted, as the reference), their macro
    versions, auroc/auroc_macro and the confusion matrix over all classes."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    num_classes = logits.shape[1]
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
