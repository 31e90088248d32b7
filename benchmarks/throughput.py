"""Benchmark: training and evaluation images/s of the model zoo, JAX against PyTorch.

One run measures, side by side on the same CPU, same batch and image size, float32:
- JAX: a jitted, donating step (forward, cross-entropy, backward, AdamW) of our Flax
  model, and a jitted eval forward;
- PyTorch: the same step with the transformers model (`torch.optim.AdamW`), and an
  eval forward under `torch.inference_mode`.

Each side runs once with glibc's default allocator and once tuned (`GLIBC_TUNABLES`:
large thresholds for trimming and mmap, and transparent huge pages for malloc's memory,
`glibc.malloc.hugetlb=1`); each is compared at its faster setting. On this machine
tuning made PyTorch's CPU training 1.2-2.3x faster and ours 1.1-1.5x: XLA's CPU runtime
takes the buffers of every step fresh from the kernel, 350-750 thousand 4 KiB page
faults a step (0.6-1.7 s of kernel time), which huge pages cut to 1-3 thousand.

Each measurement runs in its own process (glibc reads its tunables at start-up; nothing
else is shared). Steps are timed after warm-up (compilation, allocator growth); the
median step counts.

    python benchmarks/throughput.py [--models resnet50 ...] [--batch 16] [--size 224]
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

MODELS = ["mobilevit_xxs", "mobilevit_xs", "efficientnet_b1", "resnet50"]
NUM_CLASSES = 10
GLIBC_TUNED = (
    "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184"
    ":glibc.malloc.hugetlb=1"
)
ROOT = Path(__file__).resolve().parents[1]


def torch_device():
    """CUDA where PyTorch sees a GPU (then JAX runs there too), else the CPU; and a
    function that waits for the device's queued work."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def median_seconds(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_jax(name: str, batch: int, size: int, warmup: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from grasp_jax import models, objective

    module = models.create(name, NUM_CLASSES)
    variables = models.init(name, NUM_CLASSES, jax.random.key(0), (1, size, size, 3))
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))

    loss_fn = objective.loss_fn(module, train=True)

    def train_step(state, images, labels, key):
        params, batch_stats, opt_state = state
        batch = {"image": images, "label": labels, "rng": key}
        grads, (batch_stats, _) = jax.grad(loss_fn, has_aux=True)(
            params, batch_stats, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    train = jax.jit(train_step, donate_argnums=0)
    evaluate = jax.jit(
        lambda v, x: objective.forward(
            module, v["params"], v["batch_stats"], x, train=False
        )[0]
    )
    params = variables["params"]
    state = [(params, variables["batch_stats"], optimizer.init(params))]
    key = jax.random.key(1)

    def one_train_step():
        state[0] = train(state[0], images, labels, key)
        jax.block_until_ready(state[0])

    train_s = median_seconds(one_train_step, warmup, steps)
    params, batch_stats, _ = state[0]
    frozen = {"params": params, "batch_stats": batch_stats}
    eval_s = median_seconds(
        lambda: jax.block_until_ready(evaluate(frozen, images)), warmup, steps
    )
    return {"train": batch / train_s, "eval": batch / eval_s}


def measure_torch(name: str, batch: int, size: int, warmup: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from grasp_jax.torch_models import hf_model

    device, synchronize = torch_device()
    torch.manual_seed(0)
    model = hf_model(name, NUM_CLASSES).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = model(images).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        synchronize()

    def eval_step():
        model.eval()
        with torch.inference_mode():
            model(images)
        synchronize()

    train_s = median_seconds(train_step, warmup, steps)
    eval_s = median_seconds(eval_step, warmup, steps)
    return {"train": batch / train_s, "eval": batch / eval_s}


def run_worker(script: str, framework: str, name: str, args, tuned: bool = False):
    """`script --worker framework` for one model in a fresh process, with glibc's default
    allocator or the tuned one (`GLIBC_TUNED`); its JSON answer."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tuned:
        env["GLIBC_TUNABLES"] = GLIBC_TUNED
    command = [sys.executable, script, "--worker", framework, "--models", name]
    command += ["--batch", str(args.batch), "--size", str(args.size)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} worker for {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocator_settings(args) -> tuple[bool, ...]:
    """The `tuned` values to run each side with."""
    return (False, True) if args.allocators == "both" else (False,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--allocators",
        choices=["both", "default"],
        default="both",
        help="glibc's default and tuned allocator, or the default only (e.g. on GPU)",
    )
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        measure = measure_jax if args.worker == "jax" else measure_torch
        result = measure(args.models[0], args.batch, args.size, args.warmup, args.steps)
        print(json.dumps(result))
        return

    print(
        f"float32, batch {args.batch}, {args.size}x{args.size}, median of {args.steps} "
        f"steps after {args.warmup} warm-up; {os.cpu_count()} CPUs; images/s (higher is "
        "better)"
    )
    settings = allocator_settings(args)
    which = " (default / tuned)" if len(settings) == 2 else ""
    header = (
        f"| model | JAX train{which} | PyTorch train{which} | train ratio "
        f"| JAX eval{which} | PyTorch eval{which} | eval ratio |"
    )
    print(header)
    print("|" + "---|" * 7)
    for name in args.models:
        cells = [name]
        runs = {
            side: [run_worker(__file__, side, name, args, tuned) for tuned in settings]
            for side in ("jax", "torch")
        }
        for phase in ("train", "eval"):
            best = {}
            for side in ("jax", "torch"):
                rates = [run[phase] for run in runs[side]]
                best[side] = max(rates)
                cells.append(" / ".join(f"{rate:.1f}" for rate in rates))
            cells.append(f"{best['jax'] / best['torch']:.2f}x")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
