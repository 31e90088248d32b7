"""Benchmark: `merge_step` against the memory-bandwidth bound and a per-leaf NumPy loop.

A merge reads four trees (current, source, two gradients) and writes one, so it cannot
beat about 5 x P x 4 bytes at the machine's best bandwidth. We measure that bandwidth in
the same run (STREAM-style: a NumPy copy and a jitted, donated in-place update; the
faster counts), time `merge_step` as a caller sees it (dispatch and pytree flattening
included), the reference's algorithm written as a NumPy loop over leaves, and the same
as a tuned PyTorch loop (foreach norms, in-place copies of the taken tensors only).

    python benchmarks/merge_kernel.py [--reps 7] [--only resnet50] [--granularities]
        [--baseline /path/to/older/checkout]

With `--baseline`, `merge_step` of this checkout and of the other one are also timed
side by side: each in its own process with its checkout first on PYTHONPATH,
alternating, tensor/hard and channel/soft, the best of all rounds counting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import grasp_jax as gj
from grasp_jax import models

MODELS = ("resnet50", "efficientnet_b1", "mobilevit_xs", "mobilevit_xxs")


def architecture_shapes() -> dict[str, list[tuple[int, ...]]]:
    """The model zoo's parameter shapes with 1000 classes (no memory spent on an init)."""
    shapes = {}
    for name in MODELS:
        abstract = jax.eval_shape(
            lambda name=name: models.init(name, 1000, jax.random.key(0), (1, 64, 64, 3))
        )
        shapes[name] = [
            leaf.shape for leaf in jax.tree_util.tree_leaves(abstract["params"])
        ]
    return shapes


def best_bandwidth(n_bytes: int = 512 * 2**20, reps: int = 7) -> dict[str, float]:
    """GB/s of a NumPy copy and of a jitted, donated in-place update (read + write)."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    numpy_times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        numpy_times.append(time.perf_counter() - start)
    update = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)
    x = update(jnp.ones(n_bytes // 4, jnp.float32)).block_until_ready()
    jax_times = []
    for _ in range(reps):
        start = time.perf_counter()
        x = update(x).block_until_ready()
        jax_times.append(time.perf_counter() - start)
    return {
        "numpy_copy": 2 * n_bytes / min(numpy_times) / 1e9,
        "jax_donated_update": 2 * n_bytes / min(jax_times) / 1e9,
    }


def reference_style_merge(current, source, grad_current, grad_source, threshold=0.3):
    """The reference's algorithm as it is written there: a Python loop over tensors.

    Per parameter: flatten both gradients, cosine in float32, a Python float compared
    with the threshold; then every tensor is copied into a new state (the reference's
    `load_state_dict` copies all of them).
    """
    merged = {}
    for name in current:
        a = grad_current[name].reshape(-1).astype(np.float32, copy=False)
        b = grad_source[name].reshape(-1).astype(np.float32, copy=False)
        score = float(np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b)) + 1e-8))
        merged[name] = (source[name] if score > threshold else current[name]).copy()
    return merged


def time_torch_foreach(trees_np, reps: int, threshold: float = 0.3) -> list[float] | None:
    """The reference's algorithm as a tuned PyTorch loop would run it: per-tensor dots,
    `torch._foreach_norm` for the norms, one host sync for all scores, then an in-place
    copy of the taken tensors only (the best PyTorch can do; the reference itself
    copies every tensor through `load_state_dict`). None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from throughput import torch_device

    torch.set_num_threads(os.cpu_count() or 1)
    device, synchronize = torch_device()
    grads = [[torch.from_numpy(v).to(device) for v in t.values()] for t in trees_np[2:]]
    timings = []
    for _ in range(reps):
        current, source = (
            [torch.from_numpy(v).to(device, copy=True) for v in t.values()]
            for t in trees_np[:2]
        )
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            dots = torch.stack(
                [torch.dot(a.view(-1), b.view(-1)) for a, b in zip(*grads, strict=True)]
            )
            norms = torch.stack(torch._foreach_norm(grads[0])) * torch.stack(
                torch._foreach_norm(grads[1])
            )
            taken = ((dots / (norms + 1e-8)) > threshold).tolist()
            for cur, src, take in zip(current, source, taken, strict=True):
                if take:
                    cur.copy_(src)
            synchronize()
        timings.append(time.perf_counter() - start)
    return timings


def make_trees(shapes, seed: int = 0):
    """current, source and two gradients that agree on about half of the leaves."""
    rng = np.random.default_rng(seed)
    trees = [{}, {}, {}, {}]
    for i, shape in enumerate(shapes):
        name = f"layer_{i:03d}"
        g = rng.standard_normal(shape, np.float32)
        noise = rng.standard_normal(shape, np.float32)
        values = (
            rng.standard_normal(shape, np.float32),
            rng.standard_normal(shape, np.float32),
            g,
            g + noise if i % 2 else noise,
        )
        for tree, value in zip(trees, values, strict=True):
            tree[name] = value
    return trees


def time_merge_step(trees_np, reps: int, **kwargs) -> list[float]:
    """Seconds per `merge_step` call, block_until_ready included; inputs made beforehand."""
    grads = [jax.device_put(t) for t in trees_np[2:]]
    timings = []
    for rep in range(reps + 1):  # the first call compiles
        current, source = (jax.device_put(t) for t in trees_np[:2])
        jax.block_until_ready((current, source))
        start = time.perf_counter()
        merged, stats = gj.merge_step(current, source, *grads, **kwargs)
        jax.block_until_ready((merged, stats))
        if rep:
            timings.append(time.perf_counter() - start)
        del merged, stats
    return timings


def xla_bytes_accessed(trees_np) -> float:
    """Bytes the compiled merge program touches, by XLA's own cost analysis."""
    from grasp_jax.flops import cost_analysis

    abstract = [
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t) for t in trees_np
    ]
    lowered = gj.merge_step.lower(
        *abstract, threshold=0.3, granularity="tensor", mode="hard"
    )
    return float(cost_analysis(lowered)["bytes accessed"])


def time_reference(trees_np, reps: int) -> list[float]:
    timings = []
    for _ in range(reps):
        start = time.perf_counter()
        reference_style_merge(*trees_np)
        timings.append(time.perf_counter() - start)
    return timings


SIDE_BY_SIDE = (("tensor", "hard"), ("channel", "soft"))


def checkout_times(checkout: Path, name: str, reps: int) -> dict[str, float]:
    """Best ms of `merge_step` per SIDE_BY_SIDE case, in a process importing `checkout`."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    command = [sys.executable, __file__, "--worker", name, "--reps", str(reps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{checkout} ({name}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(baseline: Path, models: list[str], reps: int, rounds: int = 3) -> None:
    ours = Path(__file__).resolve().parents[1]
    print(
        f"\nmerge_step, this checkout against {baseline} (best ms of {reps} x {rounds} "
        "alternating rounds, each side in its own process)"
    )
    print("| model | case | this checkout | baseline | this / baseline |")
    print("|---|---|---|---|---|")
    for name in models:
        best = {"this": {}, "baseline": {}}
        for _ in range(rounds):
            for side, checkout in (("this", ours), ("baseline", baseline)):
                for case, ms in checkout_times(checkout, name, reps).items():
                    best[side][case] = min(ms, best[side].get(case, float("inf")))
        for case in best["this"]:
            a, b = best["this"][case], best["baseline"][case]
            print(f"| {name} | {case} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", choices=MODELS, action="append")
    parser.add_argument(
        "--granularities", action="store_true", help="also time channel/element, soft"
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trees = make_trees(architecture_shapes()[args.worker])
        times = {
            f"{g}/{m}": 1e3 * min(time_merge_step(trees, args.reps, granularity=g, mode=m))
            for g, m in SIDE_BY_SIDE
        }
        print(json.dumps(times))
        return

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, ", end="")
    print(f"{jax.device_count()} device(s); best of {args.reps} runs, median in ()")
    bandwidth = best_bandwidth()
    best = max(bandwidth.values())
    print(
        "bandwidth (read+write): "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
        + f" -> bound uses {best:.1f} GB/s\n"
    )
    header = (
        f"{'model':<16}{'params':>12}{'leaves':>8}{'merge_step ms':>20}{'bound ms':>10}"
        f"{'ratio':>7}{'numpy loop ms':>20}{'speedup':>9}{'torch ms':>10}"
        f"{'jax/torch':>10}{'XLA bytes/5P4':>15}"
    )
    print(header)
    print("-" * len(header))
    # ratio = merge_step / bound; speedup = numpy loop / merge_step; jax/torch =
    # merge_step / PyTorch foreach loop (all best times).
    for name, shapes in architecture_shapes().items():
        if args.only and name not in args.only:
            continue
        n_params = sum(int(np.prod(s)) for s in shapes)
        trees = make_trees(shapes)
        ours = time_merge_step(trees, args.reps)
        theirs = time_reference(trees, args.reps)
        torch_times = time_torch_foreach(trees, args.reps)
        torch_cells = (
            f"{min(torch_times) * 1e3:>10.2f}{min(ours) / min(torch_times):>10.2f}"
            if torch_times
            else f"{'-':>10}{'-':>10}"
        )
        bound = 5 * n_params * 4 / (best * 1e9)
        print(
            f"{name:<16}{n_params:>12,}{len(shapes):>8}"
            f"{min(ours) * 1e3:>11.2f} ({statistics.median(ours) * 1e3:>6.2f})"
            f"{bound * 1e3:>10.2f}{min(ours) / bound:>7.2f}"
            f"{min(theirs) * 1e3:>11.2f} ({statistics.median(theirs) * 1e3:>6.2f})"
            f"{min(theirs) / min(ours):>8.1f}x"
            f"{torch_cells}"
            f"{xla_bytes_accessed(trees) / (5 * n_params * 4):>15.2f}"
        )
        if args.granularities:
            for granularity in gj.GRANULARITIES:
                for mode in gj.MODES:
                    t = min(
                        time_merge_step(
                            trees, args.reps, granularity=granularity, mode=mode
                        )
                    )
                    print(
                        f"    {granularity:<8} {mode:<5} {t * 1e3:9.2f} ms "
                        f"({t / bound:.2f}x bound)"
                    )
    if args.baseline:
        side_by_side(args.baseline.resolve(), args.only or list(MODELS), args.reps)


if __name__ == "__main__":
    main()
