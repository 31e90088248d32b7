"""Benchmark: one GRASP alignment stage, JAX against the reference's way in PyTorch.

A stage as the reference runs it: both models' gradients on one target batch (the
current model in train mode, the source in eval mode), the per-tensor cosine of the two
gradients, and the transfer of every tensor scoring above 0.3. JAX computes both
gradients and merges in one program (`grasp_jax.grasp_stage`); PyTorch does what the
reference does: two backward passes, a Python loop over parameters with one `.item()`
per tensor, then `load_state_dict` of the merged state. Same model, batch and image
size, float32, each side in its own process; the median of the timed stages counts.
Like `throughput.py`, each side runs with glibc's default allocator and tuned (huge
pages, `GLIBC_TUNED`) and is compared at its faster setting.

    python benchmarks/grasp_stage.py [--models mobilevit_xxs ...] [--batch 32]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

from throughput import (
    MODELS,
    NUM_CLASSES,
    ROOT,
    allocator_settings,
    median_seconds,
    run_worker,
    torch_device,
)


def measure_jax(name: str, batch: int, size: int, warmup: int, steps: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grasp_jax as gj
    from grasp_jax import models, objective

    module = models.create(name, NUM_CLASSES)
    init = [
        models.init(name, NUM_CLASSES, jax.random.key(k), (1, size, size, 3))
        for k in (0, 1)
    ]
    rng = np.random.default_rng(0)
    data = {  # one alignment batch, stacked
        "image": jnp.asarray(rng.normal(size=(1, batch, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (1, batch))),
        "rng": jax.random.key_data(jax.random.split(jax.random.key(2), 1)),
    }
    stage_program = functools.partial(
        gj.grasp_stage,
        current_loss=objective.loss_fn(module, train=True),
        source_loss=objective.loss_fn(module, train=False),
    )

    def stage():
        current = jax.tree.map(jnp.copy, init[0])  # the stage donates the current model
        jax.block_until_ready(current)
        start = time.perf_counter()
        merged, stats = stage_program(current, init[1], data)
        jax.block_until_ready((merged, stats))
        return time.perf_counter() - start

    for _ in range(warmup):
        stage()
    return statistics.median(stage() for _ in range(steps))


def measure_torch(name: str, batch: int, size: int, warmup: int, steps: int) -> float:
    import torch

    sys.path.insert(0, str(ROOT))
    from grasp_jax.torch_models import hf_model

    device, synchronize = torch_device()
    torch.manual_seed(0)
    current, source = (hf_model(name, NUM_CLASSES).to(device) for _ in range(2))
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def gradients(model, train: bool) -> dict:
        model.train(train)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images).logits, labels).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    def stage():
        g_cur, g_src = gradients(current, True), gradients(source, False)
        state = current.state_dict()
        source_state = source.state_dict()
        for n in g_cur:  # the reference: one Python float per tensor
            a, b = g_cur[n].flatten().float(), g_src[n].flatten().float()
            score = (torch.dot(a, b) / (a.norm() * b.norm() + 1e-8)).item()
            if score > 0.3:
                state[n] = source_state[n].clone()
        current.load_state_dict(state)
        synchronize()

    return median_seconds(stage, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--allocators", choices=["both", "default"], default="both")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure = measure_jax if args.worker == "jax" else measure_torch
        print(
            json.dumps(
                measure(args.models[0], args.batch, args.size, args.warmup, args.steps)
            )
        )
        return
    print(
        f"one GRASP stage: two gradients (batch {args.batch}, {args.size}x{args.size}, "
        f"float32) and the merge; median of {args.steps} after {args.warmup} warm-up; "
        "seconds at glibc's default allocator / tuned where both ran (lower is better)"
    )
    print("| model | JAX s | PyTorch (reference's way) s | speed-up (faster of each) |")
    print("|---|---|---|---|")
    for name in args.models:
        runs = {
            side: [
                run_worker(__file__, side, name, args, tuned)
                for tuned in allocator_settings(args)
            ]
            for side in ("jax", "torch")
        }
        ours, theirs = min(runs["jax"]), min(runs["torch"])
        cells = [" / ".join(f"{t:.3g}" for t in times) for times in runs.values()]
        print(f"| {name} | {' | '.join(cells)} | {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
