"""Hand-written NumPy versions of the kernels, in float64, written from the spec alone.

The tests compare the JAX kernels against these; nothing here calls grasp_jax.
"""

from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray, granularity: str, eps: float = 1e-8):
    """Alignment score(s) of one leaf, as docs/reference.md §4 and the issue define them."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if granularity == "element" or (granularity == "channel" and a.ndim <= 1):
        return a * b / (np.abs(a) * np.abs(b) + eps)
    if granularity == "tensor":
        a, b = a.reshape(-1), b.reshape(-1)
        return np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b)) + eps)
    # channel: one score per index of the last axis, over all other axes.
    a2 = a.reshape(-1, a.shape[-1])
    b2 = b.reshape(-1, b.shape[-1])
    dot = (a2 * b2).sum(axis=0)
    return dot / (np.sqrt((a2 * a2).sum(axis=0)) * np.sqrt((b2 * b2).sum(axis=0)) + eps)


def movable_score(a: np.ndarray, b: np.ndarray, granularity: str, eps: float = 1e-8):
    """The cosine where a unit has a non-zero gradient entry in both models, -inf where
    not (the reference scores only parameters with a gradient in both: never moved)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    score = cosine(a, b, granularity, eps)
    if granularity == "element" or (granularity == "channel" and a.ndim <= 1):
        both = (a != 0) & (b != 0)
    elif granularity == "tensor":
        both = np.any(a != 0) & np.any(b != 0)
    else:
        both = np.any(a.reshape(-1, a.shape[-1]) != 0, axis=0) & np.any(
            b.reshape(-1, b.shape[-1]) != 0, axis=0
        )
    return np.where(both, score, -np.inf)


def source_weight(score, threshold: float, mode: str):
    """0/1 (hard: strictly above) or clip((s - t) / (1 - t), 0, 1) (soft); NaN/Inf -> 0."""
    score = np.asarray(score, np.float64)
    finite = np.isfinite(score)
    safe = np.where(finite, score, -np.inf)
    if mode == "hard":
        return (safe > threshold).astype(np.float64)
    return np.where(finite, np.clip((safe - threshold) / (1.0 - threshold), 0, 1), 0.0)


def transfer_leaf(current, source, score, threshold: float, mode: str):
    """The merged leaf, computed per element with explicit broadcasting of the weight."""
    current = np.asarray(current)
    source = np.asarray(source)
    weight = np.broadcast_to(source_weight(score, threshold, mode), current.shape)
    if mode == "hard":
        return np.where(weight > 0, source, current), weight
    c = current.astype(np.float64)
    blended = c + weight * (source.astype(np.float64) - c)
    out = np.where(weight >= 1, source, np.where(weight <= 0, current, blended))
    return out.astype(current.dtype), weight


def bits(x) -> np.ndarray:
    """The raw bits of an array, to test bit-identity (NaN-safe, -0.0 distinct)."""
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize else x
