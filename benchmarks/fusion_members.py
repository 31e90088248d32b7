"""Benchmark: FUSION's training step with its K members vmapped or unrolled, side by side.

`grasp_jax.logit_average.each_member` vmaps the members on GPU and TPU but unrolls them
on the CPU, where vmap's grouped convolutions are slower. This measures both ways in one
process on this machine's default backend: the compile time and the median step time
(3 after one warm-up) of the gradient of the averaged logits' cross-entropy, batch 32.

    python benchmarks/fusion_members.py --models small_cnn mobilevit_xxs --members 2
"""

from __future__ import annotations

import argparse
import time

from throughput import median_seconds

SIZES = {"small_cnn": 32}  # the rest at 64 px


def measure(name: str, members: int, size: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from grasp_jax import logit_average, models

    module = models.create(name, 10)
    one = models.init(name, 10, jax.random.key(0), (1, size, size, 3))
    stacked = jax.tree.map(lambda x: jnp.stack([x] * members), one)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(32, size, size, 3)))
    labels = jnp.arange(32) % 10
    keys = jax.random.split(jax.random.key(1), members)

    def member(variables, key):
        return module.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )

    ways = {
        "vmapped": lambda v: jax.vmap(member)(v, keys),
        "unrolled": lambda v: logit_average.members_unrolled(member, v, keys),
    }
    out = {}
    for way, each in ways.items():

        def loss(params, each=each):
            logits, updates = each(dict(stacked, params=params))
            mean = logits.mean(axis=0)
            value = optax.softmax_cross_entropy_with_integer_labels(mean, labels).mean()
            return value, updates

        start = time.perf_counter()
        step = jax.jit(jax.grad(loss, has_aux=True)).lower(stacked["params"]).compile()
        compile_s = time.perf_counter() - start
        seconds = median_seconds(
            lambda step=step: jax.block_until_ready(step(stacked["params"])), 1, 3
        )
        out[way] = (compile_s, seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "mobilevit_xxs"])
    parser.add_argument("--members", type=int, default=2)
    args = parser.parse_args()
    import jax

    print(f"backend {jax.default_backend()}, K = {args.members}, batch 32")
    print("| model | px | vmapped step ms | unrolled step ms | vmapped / unrolled |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        size = SIZES.get(name, 64)
        result = measure(name, args.members, size)
        (cv, v), (cu, u) = result["vmapped"], result["unrolled"]
        print(
            f"| {name} | {size} | {1e3 * v:.1f} (compile {cv:.1f} s) | "
            f"{1e3 * u:.1f} (compile {cu:.1f} s) | {v / u:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
