"""Benchmark: the embedded job (`make run`) end to end, its wall time split into XLA
compilation and the rest, in a fresh work directory.

    python benchmarks/embedded_job.py [--config digits]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from jax import monitoring

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ runs from the checkout, not installed

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="digits")
    args = parser.parse_args()
    compile_seconds = {name: 0.0 for name in COMPILE_EVENTS}

    def listen(name: str, duration: float, **_) -> None:
        if name in compile_seconds:
            compile_seconds[name] += duration

    monitoring.register_event_duration_secs_listener(listen)
    import importlib

    from experiments import runner
    from grasp_jax import memory

    config = importlib.import_module(f"experiments.configs.{args.config}").get_config()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # TFDS's build messages: not figures
            runner.run_experiment(config, Path(workdir), progress=False)
        wall = time.perf_counter() - start
    compiled = sum(compile_seconds.values())
    print(
        json.dumps(
            {
                "config": args.config,
                "wall_s": wall,
                "compile_s": compiled,
                "compile_parts_s": {
                    k.rsplit("/", 1)[1]: v for k, v in compile_seconds.items()
                },
                "rest_s": wall - compiled,
                "peak_host_mib": memory.peak_host_memory_bytes() / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
