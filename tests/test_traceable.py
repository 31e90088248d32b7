"""The kernels as JAX transforms: merge_step, random_merge_step and grasp_stage inside a
caller's jit, scan and vmap, with traced scalars, no host transfer, and no recompile."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.interpreters import pxla

import grasp_jax as gj
from tests import numpy_reference as ref

pytestmark = pytest.mark.accelerator  # `make device-check` runs these on the device
SHAPES = ((3, 4), (5,), (2, 2, 3), (), (4, 6))
CASES = [(g, m) for g in gj.GRANULARITIES for m in gj.MODES]


def trees(seed: int, n: int = 4) -> list[dict]:
    """`n` trees of SHAPES; the gradients (trees 2, 3) agree on some leaves only."""
    rng = np.random.default_rng(seed)
    out = [
        {
            f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
            for i, s in enumerate(SHAPES)
        }
        for _ in range(n)
    ]
    return out


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def assert_trees_equal(got, want):
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(("granularity", "mode"), CASES)
def test_merge_step_inside_a_callers_jit_with_traced_scalars(granularity, mode):
    current, source, g_cur, g_src = trees(0)
    want = gj.merge_step(
        copy(current),
        source,
        g_cur,
        g_src,
        threshold=0.1,
        granularity=granularity,
        mode=mode,
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def user_step(current, source, g_cur, g_src, threshold, eps):
        return gj.merge_step(
            current,
            source,
            g_cur,
            g_src,
            threshold=threshold,
            eps=eps,
            granularity=granularity,
            mode=mode,
        )

    got = user_step(copy(current), source, g_cur, g_src, jnp.float32(0.1), 1e-8)
    assert_trees_equal(got, want)
    # and the program agrees with NumPy (test_merge checks every case in depth)
    for name in current:
        score = ref.cosine(np.asarray(g_cur[name]), np.asarray(g_src[name]), granularity)
        np.testing.assert_allclose(got[1].scores[name], score, rtol=1e-5, atol=1e-6)


def test_random_merge_step_inside_a_callers_jit_with_a_traced_key():
    current, source, g_cur, g_src = trees(1)
    want = gj.random_merge_step(
        copy(current), source, g_cur, g_src, key=jax.random.PRNGKey(3), threshold=0.0
    )
    step = jax.jit(
        lambda c, s, a, b, key, t: gj.random_merge_step(c, s, a, b, key=key, threshold=t)
    )
    got = step(copy(current), source, g_cur, g_src, jax.random.PRNGKey(3), 0.0)
    assert_trees_equal(got, want)


def test_merge_step_under_scan_merges_source_after_source():
    """A caller's `lax.scan` over three stacked sources equals three top-level calls."""
    current, *_ = trees(2, 1)
    sources, grads = trees(3, 3), trees(4, 3)
    g_cur = trees(5, 1)[0]

    def body(carry, xs):
        source, g_src = xs
        merged, stats = gj.merge_step(carry, source, g_cur, g_src, threshold=0.0)
        return merged, (stats.fraction, stats.taken)

    def stack(ts):
        return jax.tree.map(lambda *x: jnp.stack(x), *ts)

    final, (fractions, taken) = jax.lax.scan(
        body, copy(current), (stack(sources), stack(grads))
    )
    want = copy(current)
    for i, (source, g_src) in enumerate(zip(sources, grads, strict=True)):
        want, stats = gj.merge_step(want, source, g_cur, g_src, threshold=0.0)
        assert fractions[i] == stats.fraction
        assert_trees_equal(jax.tree.map(lambda t, i=i: t[i], taken), stats.taken)
    assert_trees_equal(final, want)
    assert float(fractions.min()) > 0 and float(fractions.max()) < 1  # real choices


@pytest.mark.parametrize(("granularity", "mode"), [("tensor", "hard"), ("channel", "soft")])
def test_merge_step_vmapped_over_stacked_models(granularity, mode):
    """Two independent merges as one vmapped call (whole-tensor decisions become a
    batched select)."""
    pairs = [trees(10), trees(11)]
    stacked = [
        jax.tree.map(lambda a, b: jnp.stack([a, b]), *p) for p in zip(*pairs, strict=True)
    ]
    merged, stats = jax.vmap(
        lambda c, s, a, b: gj.merge_step(
            c, s, a, b, threshold=0.1, granularity=granularity, mode=mode
        )
    )(*stacked)
    for i, (c, s, a, b) in enumerate(pairs):
        want, want_stats = gj.merge_step(
            copy(c), s, a, b, threshold=0.1, granularity=granularity, mode=mode
        )
        assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], merged), want)
        assert stats.fraction[i] == want_stats.fraction


def _linear_stage_inputs(seed: int):
    """Variables, stacked batches and losses whose gradients the batches carry."""
    current, source, g_cur, g_src = trees(seed)

    def loss(name):
        def f(params, state, batch):
            leaves = zip(*map(jax.tree.leaves, (params, batch[name])), strict=True)
            return sum(jnp.vdot(p, g) for p, g in leaves), (state, None)

        return f

    batches = {
        "cur": jax.tree.map(lambda g: jnp.stack([g, 0.5 * g]), g_cur),
        "src": jax.tree.map(lambda g: jnp.stack([g, -0.25 * g]), g_src),
    }
    return {"params": current}, {"params": source}, batches, loss("cur"), loss("src")


def test_no_host_transfer_in_a_jitted_merge_step_or_stage():
    """Inputs already on device, scalars traced: the programs run under
    `transfer_guard("disallow")` (a host read would not even trace)."""
    current, source, g_cur, g_src = trees(6)
    threshold = jax.device_put(jnp.float32(0.2))
    merge = jax.jit(lambda c, s, a, b, t: gj.merge_step(c, s, a, b, threshold=t))
    merge(copy(current), source, g_cur, g_src, threshold)  # compiles outside the guard
    c = copy(current)
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(merge(c, source, g_cur, g_src, threshold))

    cur, src, batches, current_loss, source_loss = _linear_stage_inputs(7)
    stage = functools.partial(
        gj.grasp_stage, current_loss=current_loss, source_loss=source_loss
    )
    stage(copy(cur), src, batches, threshold=threshold)
    c = copy(cur)
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(stage(c, src, batches, threshold=threshold))


def data_dependent_conditionals(module: str) -> int:
    """Conditionals in a StableHLO module that choose between parameter-sized values:
    `stablehlo.case` ops with more than one branch and a floating-point result. (A
    platform choice made at lowering leaves one-branch cases and integer ones.)"""
    cases = re.finditer(
        r'"stablehlo\.case"\(%[\w#]+\) \(\{(.*?)\}\) '
        r": \(tensor<i32>\) -> \(?tensor<([^>]*)>",
        module,
        re.DOTALL,
    )
    return sum(1 for c in cases if "}, {" in c.group(1) and c.group(2).endswith("f32"))


def test_a_whole_tensor_merge_has_no_conditional_on_an_accelerator():
    """On a GPU a conditional waits for its predicate on the host, once per leaf, so
    tensor/hard merges lower to selects there; the CPU keeps its copy-if-taken
    conditionals. Checked on the exported programs, which the CPU can lower for any
    platform."""
    current, source, g_cur, g_src = trees(8)

    def step(c, s, a, b):
        return gj.merge_step(c, s, a, b, threshold=0.3)

    def module(platform: str) -> str:
        exported = export.export(jax.jit(step), platforms=[platform])
        return exported(current, source, g_cur, g_src).mlir_module()

    assert data_dependent_conditionals(module("cpu")) == len(SHAPES)
    assert data_dependent_conditionals(module("cuda")) == 0
    assert data_dependent_conditionals(module("rocm")) == 0
    assert data_dependent_conditionals(module("tpu")) == 0


def test_a_stage_is_one_program_and_new_thresholds_do_not_recompile(compile_count):
    """After a cache clear, one stage compiles one program and runs one (every other
    program would run through JAX's Python dispatch on its first call, counted here);
    then other thresholds reuse it."""
    cur, src, batches, current_loss, source_loss = _linear_stage_inputs(8)
    cur_copies = [copy(cur) for _ in range(4)]
    stage = functools.partial(
        gj.grasp_stage, current_loss=current_loss, source_loss=source_loss
    )
    executions = []
    original = pxla.ExecuteReplicated.__call__

    def counted(self, *args):
        executions.append(self.name)
        return original(self, *args)

    jax.clear_caches()
    before = compile_count()
    pxla.ExecuteReplicated.__call__ = counted
    try:
        jax.block_until_ready(stage(cur_copies[0], src, batches, threshold=0.1))
    finally:
        pxla.ExecuteReplicated.__call__ = original
    assert compile_count() == before + 1
    assert executions == ["jit(grasp_stage)"]
    for copy_, threshold in zip(cur_copies[1:], (0.5, -0.3, 0.9), strict=True):
        stage(copy_, src, batches, threshold=threshold)
    assert compile_count() == before + 1


def test_the_docs_jitted_training_step_runs_as_written():
    """docs/api.md's "merge_step inside your own jitted step" block, executed verbatim."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = readme.split("<!-- jitted-merge-example -->")[1].split("```python")[1]
    namespace: dict = {}
    exec(compile(block.split("```")[0], "docs/api.md", "exec"), namespace)
    fractions = namespace["fractions"]
    assert len(fractions) == 5 and all(0.0 <= f <= 1.0 for f in fractions)
