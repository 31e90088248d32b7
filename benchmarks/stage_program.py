"""Benchmark: one GRASP stage of the library (alignment batches' gradients of both models,
then the merge), this checkout against another, side by side in one run.

Each side runs in its own process with its checkout first on PYTHONPATH, alternating, on
the same synthetic target split: `run_grasp`'s stage body as that checkout writes it
(before the one-program stage: per-batch gradient programs, a copy of the current
parameters, the merge). Reports each side's best and median seconds, the ratio, and the
compiled stage's memory (XLA's `memory_analysis`) against two models + two gradient
trees.

    python benchmarks/stage_program.py --baseline /path/to/older/checkout \
        [--models mobilevit_xxs resnet50] [--batch 32] [--size 64] [--batches 2]
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

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def measure(name: str, batch: int, size: int, batches: int, reps: int) -> dict:
    """Seconds per stage (block_until_ready included; the first call compiles)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grasp_jax import grasp, models, seeding
    from grasp_jax import input_pipeline as ip

    pipeline = ip.PipelineConfig(resize_size=size, crop_size=size, batch_size=batch)
    rng = np.random.default_rng(0)
    rows = [
        {"image": rng.integers(0, 255, (size, size, 3), np.uint8), "label": i % 10}
        for i in range(batch * batches)
    ]
    config = grasp.GraspConfig(num_alignment_batches=batches)
    model = models.create(name, NUM_CLASSES)
    steps = grasp.default_steps(
        model, {"train": rows, "validation": rows}, config=config, pipeline=pipeline
    )
    init = [
        models.init(name, NUM_CLASSES, jax.random.key(k), (1, size, size, 3))
        for k in (0, 1)
    ]
    key = jax.random.PRNGKey(0)
    one_program = hasattr(grasp, "library_stage")
    times = []
    for rep in range(reps + 1):
        current, source = (jax.tree.map(jnp.copy, v) for v in init)  # merges consume
        jax.block_until_ready((current, source))
        stats = grasp.StageStats(source="s")
        start = time.perf_counter()

        def load(source=source):  # a restored source, already in memory
            return source

        if one_program:
            merged = grasp._align_and_merge(current, load, steps, stats, key, 1)
        else:
            merged = grasp._align_and_merge(current, load, steps, config, stats, key, 1)
        jax.block_until_ready(merged)
        if rep:
            times.append(time.perf_counter() - start)
    out = {"times": times, "fraction": stats.fraction}
    if one_program:
        abstract = jax.eval_shape(lambda: init[0])
        lowered = grasp.library_stage.lower(
            abstract,
            abstract,
            steps.alignment_batches(seeding.stream(key, "alignment", 1)),
            key,
            key,
            0.3,
            model=model,
            pipeline=pipeline,
            augment=True,
            train_mode=True,
            granularity="tensor",
            mode="hard",
            rule="aligned",
        )
        memory = lowered.compile().memory_analysis()
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["params"]))
        variables = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
        out["memory_mib"] = {
            "arguments": memory.argument_size_in_bytes / 2**20,
            "outputs": memory.output_size_in_bytes / 2**20,
            "aliased": memory.alias_size_in_bytes / 2**20,
            "temporaries": memory.temp_size_in_bytes / 2**20,
            "two models + two gradient trees": (2 * variables + 2 * params) / 2**20,
        }
    return out


def run_side(checkout: Path, args, name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--models",
        name,
        *("--batch", str(args.batch), "--size", str(args.size)),
        *("--batches", str(args.batches), "--reps", str(args.reps)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{checkout} ({name}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--models", nargs="+", default=["mobilevit_xxs", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternations per side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.models[0], args.batch, args.size, args.batches, args.reps)
        print(json.dumps(result))
        return
    sides = {"this checkout": ROOT}
    if args.baseline:
        sides["baseline"] = args.baseline.resolve()
    print(
        f"one GRASP stage: {args.batches} alignment batches of {args.batch} at "
        f"{args.size}x{args.size}, both gradients and the merge; seconds, best (median) "
        f"of {args.reps} x {args.rounds} alternating rounds"
    )
    print("| model | " + " | ".join(sides) + " | baseline / this |")
    print("|---|" + "---|" * (len(sides) + 1))
    for name in args.models:
        times = {side: [] for side in sides}
        memory = None
        for _ in range(args.rounds):
            for side, checkout in sides.items():
                result = run_side(checkout, args, name)
                times[side] += result["times"]
                memory = result.get("memory_mib", memory)
        cells = [f"{min(t):.3f} ({statistics.median(t):.3f})" for t in times.values()]
        ratio = (
            f"{min(times['baseline']) / min(times['this checkout']):.2f}x"
            if "baseline" in times
            else "-"
        )
        print(f"| {name} | {' | '.join(cells)} | {ratio} |", flush=True)
        if memory:
            print(
                "    compiled stage, MiB: "
                + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
