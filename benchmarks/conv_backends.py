"""Benchmark: one k x k convolution, forward and forward + backward, per backend.

What stands between our training step and PyTorch's on CPU is the convolution backward.
This measures it layer by layer, side by side in one run, each backend in its own
process: XLA's convolution with this jaxlib's defaults, XLA's with YNNPACK taking the
dots (`--xla_cpu_experimental_ynn_fusion_type=individual_dot`, which must be set before
JAX starts), and PyTorch (oneDNN); our former patch-gathering `Im2colConv` was measured
here too (0.85-1.7x XLA's time) before it was removed. Shapes are ResNet-50's 3x3
convolutions at batch 16, 224 px; float32; the median of 5 after one warm-up; ms (lower
is better).

    python benchmarks/conv_backends.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from throughput import median_seconds

SHAPES = [  # batch, height = width, in channels, out channels, kernel, stride
    (16, 56, 64, 64, 3, 1),
    (16, 28, 128, 128, 3, 1),
    (16, 14, 256, 256, 3, 1),
    (16, 7, 512, 512, 3, 1),
    (16, 56, 128, 128, 3, 2),
]
YNN_DOTS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
BACKENDS = {  # name: (worker, XLA_FLAGS)
    "xla": ("xla", ""),
    "xla+ynn": ("xla", YNN_DOTS),
    "torch": ("torch", ""),
}


def median_ms(run) -> float:
    return 1e3 * median_seconds(run, warmup=1, steps=5)


def _jax_times(module, x) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    variables = module.init(jax.random.key(0), x)
    forward = jax.jit(module.apply)
    both = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), (0, 1)))
    return (
        median_ms(lambda: jax.block_until_ready(forward(variables, x))),
        median_ms(lambda: jax.block_until_ready(both(variables, x))),
    )


def jax_worker() -> list[tuple[float, float]]:
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np

    out = []
    for batch, size, cin, cout, k, s in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, cin)))
        x = x.astype(jnp.float32)
        pad = ((k // 2, k // 2), (k // 2, k // 2))
        module = nn.Conv(cout, (k, k), strides=(s, s), padding=pad, use_bias=False)
        out.append(_jax_times(module, x))
    return out


def torch_worker() -> list[tuple[float, float]]:
    import torch

    torch.set_num_threads(os.cpu_count())
    out = []
    for batch, size, cin, cout, k, s in SHAPES:
        conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        x = torch.randn(batch, cin, size, size, requires_grad=True)
        out.append(_torch_times(conv, x))
    return out


def _torch_times(conv, x) -> tuple[float, float]:
    import torch

    def forward():
        with torch.no_grad():
            conv(x)

    def both():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        (conv(x) ** 2).sum().backward()

    return median_ms(forward), median_ms(both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["xla", "torch"])
    args = parser.parse_args()
    if args.worker:
        times = torch_worker() if args.worker == "torch" else jax_worker()
        print(json.dumps(times))
        return
    results = {}
    for name, (worker, flags) in BACKENDS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", worker],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} worker failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "one convolution, float32, median of 5 after 1 warm-up, ms; "
        "fwd = forward, f+b = forward + both gradients; ratio = backend / torch"
    )
    print("| shape (N, H, Cin->Cout, k, s) | " + " | ".join(BACKENDS) + " |")
    print("|---|" + "---|" * len(BACKENDS))
    for i, (batch, size, cin, cout, k, s) in enumerate(SHAPES):
        theirs = results["torch"][i]
        cells = []
        for name in BACKENDS:
            fwd, both = results[name][i]
            ratio = "" if name == "torch" else f" ({both / theirs[1]:.2f})"
            cells.append(f"fwd {fwd:.1f}, f+b {both:.1f}{ratio}")
        shape = f"{batch}, {size}, {cin}->{cout}, {k}, {s}"
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
