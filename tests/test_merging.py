"""Weight-space merges against hand-written NumPy, under jit and without, and the
streaming forms against the all-at-once ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grasp_jax import merging
from grasp_jax.merging import kernels

K = 3


def random_tree(rng, dtype_of_bias=jnp.bfloat16):
    """Mixed ranks (0-4) and dtypes (float32, bfloat16, float16)."""
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(6, 7)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(7,)), dtype_of_bias),
        },
        "scale": jnp.asarray(rng.normal(), jnp.float16),
        "block": [jnp.asarray(rng.normal(size=(2, 3, 2, 2, 2)), jnp.float32)],
    }


@pytest.fixture
def trees():
    rng = np.random.default_rng(0)
    base = random_tree(rng)
    sources = [random_tree(rng) for _ in range(K)]
    return base, sources


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_matches(merged, expected_leaves, like, atol=1e-5):
    leaves = jax.tree.leaves(merged)
    for got, want, ref in zip(leaves, expected_leaves, jax.tree.leaves(like), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        tol = atol if ref.dtype == jnp.float32 else 2e-2 * (1 + np.abs(want).max())
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol)


MODES = {
    "jit": lambda f: f,
    "nested_jit": lambda f: jax.jit(f),
    "no_jit": lambda f: lambda *a: _no_jit(f, *a),
}


def _no_jit(f, *args):
    with jax.disable_jit():
        return f(*args)


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return MODES[request.param]


def test_soup_is_the_elementwise_mean(trees, mode):
    _, sources = trees
    expected = [np.mean(xs, axis=0) for xs in zip(*map(np_leaves, sources), strict=True)]
    assert_matches(mode(lambda *s: merging.soup(s))(*sources), expected, sources[0])


def test_task_arithmetic_adds_scaled_task_vectors(trees, mode):
    base, sources = trees
    b = np_leaves(base)
    expected = [
        bl + 0.4 * sum(s[i] - bl for s in map(np_leaves, sources)) for i, bl in enumerate(b)
    ]
    got = mode(lambda b, *s: merging.task_arithmetic(b, s, scale=0.4))(base, *sources)
    assert_matches(got, expected, base)


def np_ties(base, sources, keep, scale, aggregate="sum"):
    b = np_leaves(base)
    sizes = [x.size for x in b]
    flat_base = np.concatenate([x.ravel() for x in b])
    taus = [np.concatenate([x.ravel() for x in np_leaves(s)]) - flat_base for s in sources]
    # round like the float32 arithmetic does, so threshold ties break the same way
    taus = [np.float32(t).astype(np.float64) for t in taus]
    trimmed = []
    for tau in taus:
        kth = tau.size - int(keep * tau.size)
        threshold = np.sort(np.abs(tau))[kth - 1] if kth else 0.0
        trimmed.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
    sign = np.sign(sum(trimmed))
    merged = np.zeros_like(flat_base)
    for j in range(flat_base.size):
        agreeing = [t[j] for t in trimmed if t[j] != 0 and np.sign(t[j]) == sign[j]]
        combine = np.sum if aggregate == "sum" else np.mean
        merged[j] = combine(agreeing) if agreeing else 0.0
    out = flat_base + scale * merged
    return [
        c.reshape(x.shape)
        for c, x in zip(np.split(out, np.cumsum(sizes)[:-1]), b, strict=True)
    ]


@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_ties_trims_elects_and_combines_the_agreeing_entries(trees, mode, keep, aggregate):
    base, sources = trees
    expected = np_ties(base, sources, keep, 0.3, aggregate)
    got = mode(lambda b, *s: merging.ties(b, s, keep=keep, aggregate=aggregate))(
        base, *sources
    )
    assert_matches(got, expected, base)


def test_ties_defaults_to_fusionbenchs_disjoint_sum():
    """Two sources agree (+2, +4), one disagrees (-1): the elected sign is +; the sum
    moves 0.3 * 6, the mean 0.3 * 3 (hand-computed)."""
    base = {"w": jnp.zeros(1)}
    sources = [{"w": jnp.array([v])} for v in (2.0, 4.0, -1.0)]
    np.testing.assert_allclose(merging.ties(base, sources, keep=1.0)["w"], [1.8])
    mean = merging.ties(base, sources, keep=1.0, aggregate="mean")["w"]
    np.testing.assert_allclose(mean, [0.9])
    streamed = merging.merge_streaming(
        merging.streaming.ties(keep=1.0), base, [lambda s=s: s for s in sources]
    )
    np.testing.assert_allclose(streamed["w"], [1.8])
    # an entry of exactly 1 agrees like any other: +1 and +3 against -1
    ones = [{"w": jnp.array([v])} for v in (1.0, 3.0, -1.0)]
    np.testing.assert_allclose(merging.ties(base, ones, keep=1.0)["w"], [1.2])
    for ties in (merging.ties, lambda *_, **kw: merging.streaming.ties(**kw)):
        with pytest.raises(ValueError, match=r"aggregate='median'; use one of"):
            ties(base, sources, aggregate="median")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b, s: merging.ties(b, s, keep=20), r"keep=20: use a fraction in \[0, 1\]"),
        (lambda b, s: merging.ties(b, s, keep=-0.1), r"keep=-0.1: use a fraction"),
        (lambda b, s: merging.streaming.ties(keep=1.2), r"keep=1.2: use a fraction"),
        (
            lambda b, s: merging.dare(b, s, key=jax.random.key(0), rate=1.0),
            r"rate=1: use a fraction in \[0, 1\)",
        ),
        (
            lambda b, s: merging.streaming.dare(jax.random.key(0), rate=50),
            r"rate=50: use a fraction in \[0, 1\)",
        ),
    ],
)
def test_a_keep_or_drop_rate_outside_0_1_is_refused_by_name(call, message):
    """keep=1.2 indexes the sorted magnitudes from the end (the same threshold as 0.2
    for this arithmetic), rate=1 divides by zero: neither may merge silently."""
    base = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=message):
        call(base, [{"w": jnp.ones(3)}])


def test_magmax_breaks_equal_magnitudes_toward_the_later_source():
    """FusionBench's rule: |+3| == |-3|, the later source's -3 wins (hand-computed)."""
    base = {"w": jnp.zeros(2)}
    sources = [{"w": jnp.array([3.0, 1.0])}, {"w": jnp.array([-3.0, 2.0])}]
    expected = [0.5 * -3.0, 0.5 * 2.0]
    np.testing.assert_allclose(merging.magmax(base, sources)["w"], expected)
    streamed = merging.merge_streaming(
        merging.streaming.magmax(), base, [lambda s=s: s for s in sources]
    )
    np.testing.assert_allclose(streamed["w"], expected)


def test_ties_keeps_the_top_fraction_of_each_task_vector():
    base = {"w": jnp.zeros(10)}
    source = {"w": jnp.arange(1.0, 11.0)}
    merged = merging.ties(base, [source], keep=0.2, scale=1.0)
    # the TIES authors' rule: magnitudes >= the (10 - int(0.2 * 10)) = 8th smallest
    np.testing.assert_array_equal(merged["w"], [0] * 7 + [8, 9, 10])


def test_dare_drops_with_the_rate_and_rescales(trees, mode):
    base, sources = trees
    key = jax.random.key(3)
    rate = 0.4
    b = np_leaves(base)
    masks = [
        np_leaves(kernels.dare_masks(jax.random.fold_in(key, k), base, rate))
        for k in range(K)
    ]
    expected = [
        bl
        + 0.3
        * sum(
            np.where(masks[k][i], (np_leaves(s)[i] - bl) / (1 - rate), 0.0)
            for k, s in enumerate(sources)
        )
        for i, bl in enumerate(b)
    ]
    got = mode(lambda b, *s: merging.dare(b, s, key=key, rate=rate))(base, *sources)
    assert_matches(got, expected, base)


def test_dare_masks_keep_the_expected_share_and_differ_by_key():
    tree = {"w": jnp.zeros((200, 100))}
    a = kernels.dare_masks(jax.random.key(0), tree, 0.9)["w"]
    b = kernels.dare_masks(jax.random.key(1), tree, 0.9)["w"]
    assert abs(float(a.mean()) - 0.1) < 0.01
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, kernels.dare_masks(jax.random.key(0), tree, 0.9)["w"])


def test_magmax_takes_the_largest_magnitude_entry(trees, mode):
    base, sources = trees
    b = np_leaves(base)
    expected = []
    for i, bl in enumerate(b):
        taus = np.stack([np_leaves(s)[i] - bl for s in sources])
        latest_first = taus[::-1]
        index = np.abs(latest_first).argmax(axis=0)
        expected.append(bl + 0.5 * np.take_along_axis(latest_first, index[None], 0)[0])
    got = mode(lambda b, *s: merging.magmax(b, s))(base, *sources)
    assert_matches(got, expected, base)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merge_weights_as_fusionbench(trees, mode, normalize):
    """FusionBench's rule, written out in NumPy: weight_k = c_k (F_k + 1e-6) with
    c_k = 1 / (global L2 norm of F_k + 1e-6) (1 when not normalising)."""
    _, sources = trees
    rng = np.random.default_rng(1)
    fishers = [
        jax.tree.map(lambda x: jnp.asarray(rng.exponential(size=jnp.shape(x)), x.dtype), s)
        for s in sources
    ]
    fishers[0] = jax.tree.map(jnp.zeros_like, fishers[0])  # only the floor is left
    fishers[1] = jax.tree.map(lambda f: 1000 * f, fishers[1])  # a large-scale Fisher
    coefficients = [
        1 / (np.sqrt(sum(np.sum(np.square(x)) for x in np_leaves(f))) + 1e-6)
        if normalize
        else 1.0
        for f in fishers
    ]
    expected = []
    for i in range(len(np_leaves(sources[0]))):
        w = [
            c * (np_leaves(f)[i] + 1e-6) for c, f in zip(coefficients, fishers, strict=True)
        ]
        x = [np_leaves(s)[i] for s in sources]
        expected.append(sum(a * b for a, b in zip(w, x, strict=True)) / sum(w))
    got = mode(lambda s, f: merging.fisher(s, f, normalize=normalize))(sources, fishers)
    assert_matches(got, expected, sources[0], atol=1e-4)


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.normal(size=(10,)).astype(np.float32)

    def example_loss(p, example):  # squared error: gradient 2 (w.x - y) x
        return (jnp.dot(p["w"], example["x"]) - example["y"]) ** 2

    batches = [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]
    got = merging.fisher_diagonal(example_loss, params, batches)["w"]
    w = np.asarray(params["w"], np.float64)
    grads = 2 * (x @ w - y)[:, None] * x
    np.testing.assert_allclose(got, np.mean(grads**2, axis=0), rtol=1e-4)


def loaders_of(trees):
    return [lambda t=t: t for t in trees]


# (streaming merger, all-at-once kernel), built in the test: a key made at import would
# start JAX's backend while pytest collects (mutmut forks its test runs after that).
PAIRS = {
    "soup": lambda: (merging.streaming.soup(), lambda b, s: merging.soup(s)),
    "task_arithmetic": lambda: (
        merging.streaming.task_arithmetic(scale=0.7),
        lambda b, s: merging.task_arithmetic(b, s, scale=0.7),
    ),
    "ties": lambda: (
        merging.streaming.ties(keep=0.3),
        lambda b, s: merging.ties(b, s, keep=0.3),
    ),
    "ties_mean": lambda: (
        merging.streaming.ties(keep=0.3, aggregate="mean"),
        lambda b, s: merging.ties(b, s, keep=0.3, aggregate="mean"),
    ),
    "ties_defaults": lambda: (merging.streaming.ties(), merging.ties),
    "dare_defaults": lambda: (
        merging.streaming.dare(jax.random.key(5)),
        lambda b, s: merging.dare(b, s, key=jax.random.key(5)),
    ),
    "dare": lambda: (
        merging.streaming.dare(key=jax.random.key(5), rate=0.3),
        lambda b, s: merging.dare(b, s, key=jax.random.key(5), rate=0.3),
    ),
    "magmax": lambda: (merging.streaming.magmax(), lambda b, s: merging.magmax(b, s)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_streaming_equals_all_at_once(trees, name):
    merger, all_at_once = PAIRS[name]()
    base, sources = trees
    streamed = merging.merge_streaming(merger, base, loaders_of(sources))
    expected = all_at_once(base, sources)
    for got, want in zip(jax.tree.leaves(streamed), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-5, atol=1e-5
        )


def _close(got_tree, want_tree, rtol):
    """Leaf by leaf in float32; a bfloat16 leaf may differ by its rounding (2^-8)."""
    for got, want in zip(
        jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True
    ):
        tolerance = max(rtol, 2**-7) if got.dtype == jnp.bfloat16 else rtol
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            rtol=tolerance,
            atol=rtol,
        )


def test_streaming_fisher_equals_all_at_once(trees):
    _, sources = trees
    fishers = [jax.tree.map(lambda x: jnp.abs(x) + 0.1, s) for s in sources]
    streamed = merging.merge_streaming(
        merging.streaming.fisher(),
        sources[0],
        loaders_of(list(zip(sources, fishers, strict=True))),
    )
    expected = merging.fisher(sources, fishers)
    _close(streamed, expected, 1e-5)
    scaled = [jax.tree.map(lambda f, k=k: (k + 1) * f, f) for k, f in enumerate(fishers)]
    normalised = merging.merge_streaming(  # each model's scale is normalised away
        merging.streaming.fisher(),
        sources[0],
        loaders_of(list(zip(sources, scaled, strict=True))),
    )
    _close(normalised, expected, 1e-4)


def test_streaming_restores_each_source_once_per_pass(trees):
    base, sources = trees
    calls = []

    def loader(k):
        def load():
            calls.append(k)
            return sources[k]

        return load

    merging.merge_streaming(merging.streaming.ties(), base, [loader(k) for k in range(K)])
    assert calls == [0, 1, 2, 0, 1, 2]
    calls.clear()
    merging.merge_streaming(
        merging.streaming.task_arithmetic(), base, [loader(k) for k in range(K)]
    )
    assert calls == [0, 1, 2]


def test_mismatched_trees_name_the_leaf(trees):
    base, sources = trees
    bad = dict(sources[1], dense={"kernel": jnp.zeros((6, 8)), "bias": jnp.zeros(7)})
    with pytest.raises(ValueError, match=r"dense/kernel.*sources\[1\]"):
        merging.task_arithmetic(base, [sources[0], bad])
    with pytest.raises(ValueError, match="dense/kernel"):
        merging.merge_streaming(
            merging.streaming.soup(), base, loaders_of([sources[0], bad])
        )
    with pytest.raises(ValueError, match="at least one"):
        merging.soup([])
    with pytest.raises(ValueError, match="dtype int32"):
        merging.soup([{"w": jnp.zeros(3, jnp.int32)}])


def _numpy(tree) -> list:
    def plain(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.array(jax.random.key_data(x))
        return np.array(x)

    return [plain(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", ["soup", "task_arithmetic", "ties", "dare", "magmax"])
def test_streaming_updates_are_pure_and_trace(trees, name):
    """optax's contract: `update` traces under jit and leaves its input state as it was
    (the old mergers mutated a dict state in place)."""
    base, sources = trees
    factory = getattr(merging.streaming, name)
    merger = factory(jax.random.key(0)) if name == "dare" else factory()
    state = merger.init(base)
    before = _numpy(state)
    update = jax.jit(merger.update, static_argnums=4)
    first = update(state, sources[0], base, 0, 0)
    again = update(state, sources[0], base, 0, 0)
    for a, b in zip(_numpy(first), _numpy(again), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_numpy(state), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(state, tuple) and hasattr(state, "_fields")  # a NamedTuple


# (merger, programs a merge of K sources compiles): one per pass; TIES's second pass
# has two, its first update holding the election.
PROGRAMS = {"soup": 1, "task_arithmetic": 1, "dare": 1, "fisher": 1, "ties": 3}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_sources_on_a_mesh_compile_each_update_once(trees, name):
    """Sources restored onto a mesh (as the runner's are) and a start placed alike: the
    state `init` builds enters the first update laid out as that update leaves it, so
    the later updates reuse its program instead of compiling another."""
    base, sources = trees
    mesh = jax.make_mesh((1,), ("data",))
    placed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    base, *sources = jax.device_put([base, *sources], placed)
    factory = getattr(merging.streaming, name)
    merger = factory(jax.random.key(0)) if name == "dare" else factory()
    traces = []

    def update(*args):
        traces.append(args[3])  # the source index; a trace is one compiled program
        return merger.update(*args)

    if name == "fisher":
        sources = [(s, jax.tree.map(jnp.abs, s)) for s in sources]
    if merger.from_base:
        start = base
    else:  # shapes, dtypes and the sources' layout only
        start = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), base
        )
    merging.merge_streaming(merger._replace(update=update), start, loaders_of(sources))
    assert len(traces) == PROGRAMS[name], traces


def test_fisher_names_the_fisher_tree_that_does_not_fit():
    """A caller who passes Fishers of the wrong count or layout learns which one."""
    sources = [{"w": jnp.ones(3)}, {"w": jnp.zeros(3)}]
    fishers = [{"w": jnp.ones(3)}, {"w": jnp.ones(3)}]
    with pytest.raises(ValueError, match=r"^2 sources but 1 Fisher trees$"):
        merging.fisher(sources, fishers[:1])
    with pytest.raises(ValueError, match=r"^fishers\[0\] and fishers\[1\] have different"):
        merging.fisher(sources, [fishers[0], {"v": jnp.ones(3)}])
    with pytest.raises(ValueError, match=r"^sources\[0\] and fishers\[0\] have different"):
        merging.fisher(sources, [{"v": jnp.ones(3)}, {"v": jnp.ones(3)}])


@pytest.mark.parametrize(
    ("merger", "start", "sources", "message"),
    [
        ("soup", "ok", [], r"^merge_streaming needs at least one source loader; got none"),
        (
            "soup",
            "ok",
            ["ok", "other"],
            r"^sources\[1\]: the tree the merge started from and a source have different",
        ),
        (
            "soup",
            "ok",
            ["ok", "int"],
            r"^sources\[1\]: leaf 'w' of a source has dtype int32",
        ),
        ("ties", "int", ["ok"], r"^leaf 'w' of base has dtype int32"),
        ("fisher", "int", [("ok", "ok")], r"^leaf 'w' of start has dtype int32"),
        (
            "fisher",
            "ok",
            [("ok", "ok"), ("ok", "other")],
            r"^sources\[1\]: the source's params and its Fisher have different tree",
        ),
    ],
)
def test_a_bad_streamed_tree_is_named_with_its_index(merger, start, sources, message):
    trees = {
        "ok": lambda: {"w": jnp.ones(3)},
        "other": lambda: {"v": jnp.ones(3)},
        "int": lambda: {"w": jnp.ones(3, jnp.int32)},
    }

    def tree(name):
        return tuple(trees[n]() for n in name) if isinstance(name, tuple) else trees[name]()

    with pytest.raises(ValueError, match=message):
        merging.merge_streaming(
            getattr(merging.streaming, merger)(),
            tree(start),
            [lambda s=s: tree(s) for s in sources],
        )
