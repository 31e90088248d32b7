"""Benchmark: peak memory against the number of sources K, per method.

For each K a fresh process per mode: `grasp` restores K source checkpoints from disk one
at a time (each loader is called when its stage starts) and runs GRASP on digits_drift;
`hold_all` runs the same GRASP after first holding all K models at once; `fusion`
trains the K models jointly through their mean logits for one epoch (the `fusion`
method: K models, their gradients and AdamW state); `ties` merges the K sources with the
streaming two-pass TIES (the weight-space merges' worst case). Peak memory is the
process's VmHWM (peak resident set), so each run gets its own process.
The model is a wide small_cnn (about 5.9M parameters, 24 MB per copy) so that one model
stands out above the runtime's own footprint.

    python benchmarks/grasp_memory.py [--ks 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTHS = (256, 512, 1024)


def child(mode: str, k: int, ckpt_dir: str, data_dir: str) -> None:
    import jax
    import tensorflow_datasets as tfds

    from grasp_jax import checkpoints, grasp, memory, models
    from grasp_jax import input_pipeline as ip

    model = models.create("small_cnn", 10, widths=WIDTHS)
    abstract = jax.eval_shape(
        lambda: models.init(
            "small_cnn", 10, jax.random.PRNGKey(0), (1, 32, 32, 3), widths=WIDTHS
        )
    )

    def loader(i):
        return lambda: checkpoints.restore_variables(Path(ckpt_dir) / f"s{i}", abstract)

    splits = tfds.data_source("digits_drift/d0", data_dir=data_dir)
    pipeline = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
    if mode == "fusion":
        from grasp_jax import logit_average, loop, recipe

        stacked = logit_average.stack([loader(i) for i in range(k)])
        train = recipe.TrainConfig(
            epochs=1, head_lr_multiplier=1.0, grad_clip_norm=None, augment=False
        )
        loop.fit(
            logit_average.LogitAverage(model),
            stacked,
            splits["train"],
            splits["validation"],
            config=train,
            pipeline=pipeline,
            progress=False,
        )
        print(json.dumps({"peak_mb": memory.peak_host_memory_bytes() / 2**20}))
        return
    if mode == "ties":
        from grasp_jax import merging

        base = loader(0)()["params"]
        params = [lambda i=i: loader(i)()["params"] for i in range(k)]
        jax.block_until_ready(merging.merge_streaming(merging.Ties(), base, params))
        print(json.dumps({"peak_mb": memory.peak_host_memory_bytes() / 2**20}))
        return
    if mode == "hold_all":  # every source in memory at once, as fusion would need
        held = [loader(i)() for i in range(k)]
        first = held[0]
        sources = [(f"s{i}", lambda v=held[i]: v) for i in range(1, k)]
    else:  # GRASP: each source restored when its stage starts
        first = loader(0)()
        sources = [(f"s{i}", loader(i)) for i in range(1, k)]
    config = grasp.GraspConfig(initial_epochs=1, finetune_epochs=1, augment=False)
    steps = grasp.default_steps(
        model,
        splits,
        config=config,
        pipeline=pipeline,
        progress=False,
        validate_merges=False,
    )
    grasp.run_grasp(first, sources, steps, config=config, key=jax.random.PRNGKey(0))
    print(json.dumps({"peak_mb": memory.peak_host_memory_bytes() / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--data_dir", default="/tmp/grasp_jax_tfds")
    parser.add_argument(
        "--max_k_holding",
        type=int,
        default=8,
        help="largest K for the modes that hold all K models (memory grows with K)",
    )
    parser.add_argument("--json", help="also write the table here as JSON")
    args = parser.parse_args()
    import jax

    from data.build import build
    from grasp_jax import checkpoints, models

    build("digits_drift", data_dir=args.data_dir, configs=["d0"])
    with tempfile.TemporaryDirectory() as ckpt_dir:
        base = models.init(
            "small_cnn", 10, jax.random.PRNGKey(0), (1, 32, 32, 3), widths=WIDTHS
        )
        n_params = sum(x.size for x in jax.tree.leaves(base["params"]))
        for i in range(max(args.ks)):
            noisy = jax.tree.map(lambda x, i=i: x * (1 + 0.01 * i), base)
            checkpoints.save_variables(Path(ckpt_dir) / f"s{i}", noisy, {})
        print(f"model: {n_params:,} parameters, {n_params * 4 / 2**20:.1f} MiB per copy")
        modes = ("grasp", "hold_all", "fusion", "ties")
        print("peak MiB per mode (VmHWM of a fresh process)")
        print(f"{'K':>3}" + "".join(f"{m:>12}" for m in modes))
        table = {"modes": modes, "parameters": n_params, "rows": {}}
        for k in args.ks:
            peaks = []
            for mode in modes:
                if mode in ("hold_all", "fusion") and k > args.max_k_holding:
                    peaks.append(float("nan"))
                    continue
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        str(k),
                        ckpt_dir,
                        args.data_dir,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
            print(f"{k:>3}" + "".join(f"{p:>12.0f}" for p in peaks), flush=True)
            table["rows"][k] = peaks
        if args.json:
            Path(args.json).write_text(json.dumps(table))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
