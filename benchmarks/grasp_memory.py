"""Benchmark: GRASP's peak memory does not grow with the number of sources K.

For K = 2, 4, 8, a fresh process restores K source checkpoints from disk one at a time
(each loader is called when its stage starts) and runs GRASP on digits_drift; a second
process per K first holds all K models at once, as parameter fusion or an ensemble must.
Peak memory is the process's VmHWM (peak resident set), so each run gets its own process.
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

    if mode == "hold_all":  # every source in memory at once, as fusion would need
        held = [loader(i)() for i in range(k)]
        first = held[0]
        sources = [(f"s{i}", lambda v=held[i]: v) for i in range(1, k)]
    else:  # GRASP: each source restored when its stage starts
        first = loader(0)()
        sources = [(f"s{i}", loader(i)) for i in range(1, k)]
    splits = tfds.data_source("digits_drift/d0", data_dir=data_dir)
    config = grasp.GraspConfig(initial_epochs=1, finetune_epochs=1, augment=False)
    steps = grasp.default_steps(
        model,
        splits,
        config=config,
        pipeline=ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32),
        progress=False,
        validate_merges=False,
    )
    grasp.run_grasp(first, sources, steps, config=config, key=jax.random.PRNGKey(0))
    print(json.dumps({"peak_mb": memory.peak_host_memory_bytes() / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--data_dir", default="/tmp/grasp_jax_tfds")
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
        print(f"{'K':>3}{'GRASP peak MiB':>18}{'all K held MiB':>18}")
        for k in args.ks:
            peaks = []
            for mode in ("grasp", "hold_all"):
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
            print(f"{k:>3}{peaks[0]:>18.0f}{peaks[1]:>18.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
