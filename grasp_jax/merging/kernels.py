"""The merging literature's weight-space merges, all sources at once.

Each function takes the K source trees (and the shared pretrained `base` where the method
works on task vectors, tau_k = theta_k - base) and returns one tree of the same structure
and dtypes. Arithmetic runs in float32 and the result is cast back to each leaf's dtype.
Hyperparameters are keywords with the defaults FusionBench and the papers use; the
numeric ones are traced, so changing them does not recompile (TIES' `keep` is static:
it fixes an index). `streaming.py` has the same merges taking one source at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from grasp_jax.arguments import check_fraction
from grasp_jax.tree_checks import PyTree, check_floating, check_same_structure


def check_sources(
    sources: Sequence[PyTree], base: PyTree | None = None, label: str = "sources"
) -> list:
    """The trees to merge, base first when given; raises ValueError naming the problem."""
    trees = ([base] if base is not None else []) + list(sources)
    if not sources:
        raise ValueError(f"merging needs at least one tree in {label}; got none")
    names = (("base",) if base is not None else ()) + tuple(
        f"{label}[{k}]" for k in range(len(sources))
    )
    check_same_structure(names, *trees)
    check_floating(names, *trees)
    return trees


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _merged(base_or_ref: PyTree, merged_f32: PyTree) -> PyTree:
    return jax.tree.map(lambda r, m: m.astype(jnp.result_type(r)), base_or_ref, merged_f32)


@jax.jit
def _soup(sources):
    mean = jax.tree.map(lambda *xs: sum(map(_f32, xs)) / len(xs), *sources)
    return _merged(sources[0], mean)


def soup(sources: Sequence[PyTree]) -> PyTree:
    """The uniform mean of the sources' weights (a uniform model soup)."""
    return _soup(check_sources(sources))


def task_vector(base: PyTree, source: PyTree) -> PyTree:
    """tau = theta - base, in float32."""
    return jax.tree.map(lambda s, b: _f32(s) - _f32(b), source, base)


def task_vectors(base: PyTree, sources: Sequence[PyTree]) -> list[PyTree]:
    return [task_vector(base, s) for s in sources]


def base_plus(base: PyTree, delta: PyTree, scale) -> PyTree:
    """base + scale * delta (float32 delta), cast back to each base leaf's dtype."""
    return jax.tree.map(lambda b, d: (_f32(b) + scale * d).astype(b.dtype), base, delta)


def _summed(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: sum(xs), *trees)


@jax.jit
def _task_arithmetic(base, sources, scale):
    return base_plus(base, _summed(task_vectors(base, sources)), scale)


def task_arithmetic(base: PyTree, sources: Sequence[PyTree], *, scale=0.3) -> PyTree:
    """base + scale * sum_k tau_k (Ilharco et al. 2023; scale 0.3 as in FusionBench)."""
    base, *sources = check_sources(sources, base)
    return _task_arithmetic(base, sources, scale)


def trim_threshold(tau: PyTree, keep: float) -> jax.Array:
    """The magnitude at or above which `tau` keeps its entries: as in the TIES authors'
    code, the k-th smallest magnitude over the whole task vector, k = n - int(keep * n)
    (1-based; 0 keeps everything), so int(keep * n) + 1 entries survive barring ties."""
    magnitudes = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(tau)])
    kth = magnitudes.size - int(keep * magnitudes.size)
    if kth == 0:
        return jnp.float32(0.0)
    return jnp.sort(magnitudes)[kth - 1]


def trim(tau: PyTree, threshold) -> PyTree:
    return jax.tree.map(lambda x: jnp.where(jnp.abs(x) >= threshold, x, 0.0), tau)


TIES_AGGREGATES = ("sum", "mean")


def disjoint_merge(trimmed: Sequence[PyTree], sign: PyTree, aggregate: str) -> PyTree:
    """Per element, the sum (or mean) of the entries whose sign is the elected one (0 if
    none)."""

    def merge(s, *xs):
        agree = [(jnp.sign(x) == s) & (x != 0) for x in xs]
        total = sum(jnp.where(a, x, 0.0) for a, x in zip(agree, xs, strict=True))
        if aggregate == "sum":
            return total
        return total / jnp.maximum(sum(a.astype(jnp.float32) for a in agree), 1.0)

    return jax.tree.map(merge, sign, *trimmed)


def check_aggregate(aggregate: str) -> str:
    if aggregate not in TIES_AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}; use one of {list(TIES_AGGREGATES)}")
    return aggregate


@functools.partial(jax.jit, static_argnames=("keep", "aggregate"))
def _ties(base, sources, scale, *, keep, aggregate):
    trimmed = [trim(t, trim_threshold(t, keep)) for t in task_vectors(base, sources)]
    sign = jax.tree.map(lambda *xs: jnp.sign(sum(xs)), *trimmed)
    return base_plus(base, disjoint_merge(trimmed, sign, aggregate), scale)


def ties(
    base: PyTree,
    sources: Sequence[PyTree],
    *,
    keep=0.2,
    scale=0.3,
    aggregate: str = "sum",
) -> PyTree:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its `keep` fraction of
    largest magnitudes, elect each element's sign by total mass (sign of the sum of the
    trimmed vectors; a zero sum elects nothing and the element stays at base), combine
    the entries that agree with it, then base + scale * that. FusionBench's defaults:
    keep 20 %, scale 0.3, the disjoint **sum** (`aggregate="mean"`: the disjoint mean of
    the TIES paper's equations, up to K times smaller steps)."""
    base, *sources = check_sources(sources, base)
    aggregate = check_aggregate(aggregate)
    check_fraction("keep", keep)
    return _ties(base, sources, scale, keep=float(keep), aggregate=aggregate)


def dare_masks(key: jax.Array, tree: PyTree, rate) -> PyTree:
    """DARE's keep masks for one task vector: each entry kept with probability 1 - rate,
    leaf i drawing from fold_in(key, i)."""
    leaves, treedef = jax.tree.flatten(tree)
    masks = [
        jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, jnp.shape(x))
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(masks)


def dare_drop(tau: PyTree, key: jax.Array, rate) -> PyTree:
    """Drop entries with probability `rate` and rescale the rest by 1 / (1 - rate)."""
    masks = dare_masks(key, tau, rate)
    return jax.tree.map(lambda t, m: jnp.where(m, t / (1.0 - rate), 0.0), tau, masks)


@jax.jit
def _dare(base, sources, key, rate, scale):
    taus = [
        dare_drop(t, jax.random.fold_in(key, k), rate)
        for k, t in enumerate(task_vectors(base, sources))
    ]
    return base_plus(base, _summed(taus), scale)


def dare(
    base: PyTree, sources: Sequence[PyTree], *, key: jax.Array, rate=0.5, scale=0.3
) -> PyTree:
    """DARE (Yu et al. 2024) then task arithmetic: source k's task vector is dropped and
    rescaled with fold_in(key, k). FusionBench's defaults: rate 0.5, scale 0.3."""
    base, *sources = check_sources(sources, base)
    check_fraction("rate", rate, one_allowed=False)
    return _dare(base, sources, key, rate, scale)


@jax.jit
def _magmax(base, sources, scale):
    def largest(*taus):
        stacked = jnp.stack(taus[::-1])  # latest first: argmax takes the first maximum
        index = jnp.argmax(jnp.abs(stacked), axis=0)
        return jnp.take_along_axis(stacked, index[None], axis=0)[0]

    return base_plus(base, jax.tree.map(largest, *task_vectors(base, sources)), scale)


def magmax(base: PyTree, sources: Sequence[PyTree], *, scale=0.5) -> PyTree:
    """MagMax (Marczak et al. 2024): per element the task vector entry of largest
    magnitude (on equal magnitudes the later source's, as FusionBench), base + scale *
    it; scale 0.5 as in the authors' code."""
    base, *sources = check_sources(sources, base)
    return _magmax(base, sources, scale)


def fisher_norm(fisher_tree: PyTree) -> jax.Array:
    """The global L2 norm of one model's Fisher over all its parameters."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(f))) for f in jax.tree.leaves(fisher_tree)))


def fisher_coefficient(fisher_tree: PyTree, floor, normalize) -> jax.Array:
    """A model's weight in FusionBench's normalised Fisher merge: 1 / (|F| + floor),
    so that each model's Fisher counts by its shape, not its scale (1 without
    normalisation). A common factor over the models cancels in the weighted mean."""
    scale = 1.0 / (fisher_norm(fisher_tree) + floor)
    return jnp.where(normalize, scale, 1.0)


@jax.jit
def _fisher(sources, fishers, floor, normalize):
    coefficients = [fisher_coefficient(f, floor, normalize) for f in fishers]

    def weighted(*pairs):
        k = len(pairs) // 2
        weights = [
            c * (_f32(f) + floor) for c, f in zip(coefficients, pairs[k:], strict=True)
        ]
        total = sum(w * _f32(x) for w, x in zip(weights, pairs[:k], strict=True))
        return total / sum(weights)

    return _merged(sources[0], jax.tree.map(weighted, *sources, *fishers))


def fisher(
    sources: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    floor=1e-6,
    normalize=True,
) -> PyTree:
    """Fisher merging (Matena & Raffel 2022) as FusionBench computes it: per element the
    mean of the sources weighted by c_k (F_k + floor), where F_k is source k's diagonal
    Fisher, `floor` (1e-6) keeps every weight positive, and c_k = 1 / (|F_k| + floor)
    normalises each model's Fisher by its global L2 norm (`normalize=False`: c_k = 1).
    An element no source is sensitive to gets the c-weighted mean (the plain mean
    without normalisation). `fisher_diagonal` estimates the Fishers."""
    if len(fishers) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(fishers)} Fisher trees")
    sources, fishers = check_sources(sources), check_sources(fishers, label="fishers")
    check_same_structure(("sources[0]", "fishers[0]"), sources[0], fishers[0])
    return _fisher(sources, fishers, floor, normalize)
