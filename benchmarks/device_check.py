"""`make device-check`: the accelerator proof, in one run on a machine with a GPU or TPU.

Sections, each a subprocess with a time limit (a hung compiler cannot eat the budget),
written to `benchmarks/results/<date>-<device>.md` after every section:
1. the GRASP stage alone (MobileViT-XXS, batch 32), with a long limit: if it fails, it
   is rerun with `--xla_dump_to` and the dump's file list and both ends of stderr are
   kept, to diagnose a compiler abort;
2. the tests marked `accelerator` (the kernels inside a caller's jit, scan, vmap and a
   transfer guard; one program per stage);
3. the merge kernel on the four architectures against a CUDA PyTorch foreach loop and
   the bandwidth bound (`merge_kernel.py`);
4. the GRASP stage, MobileViT-XXS and ResNet-50 at batch 32, against the reference's
   way in PyTorch (`grasp_stage.py`);
5. `python -m experiments.main --config=digits:trials=1` end to end.

    python benchmarks/device_check.py [--sections stage-alone tests ...] [--budget 600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_all import RESULTS, ROOT, machine, write_results

STAGE_ALONE = [
    "benchmarks/grasp_stage.py",
    *("--worker", "jax", "--models", "mobilevit_xxs", "--batch", "32", "--steps", "3"),
]
SECTIONS = {  # name: (title, command after the interpreter, limit in seconds)
    "stage-alone": ("The GRASP stage alone (compile + 3 runs)", STAGE_ALONE, 300),
    "tests": (
        "Tests marked accelerator",
        ["-m", "pytest", "-q", "-m", "accelerator", "-p", "no:cacheprovider"],
        240,
    ),
    "merge": ("Merge kernel", ["benchmarks/merge_kernel.py", "--reps", "5"], 240),
    "stage": (
        "One GRASP stage against PyTorch",
        [
            "benchmarks/grasp_stage.py",
            *("--models", "mobilevit_xxs", "resnet50", "--batch", "32"),
            *("--allocators", "default"),
        ],
        300,
    ),
    "main": ("The main job (digits, one trial)", None, 420),
}
# `--budget` never cuts these below: compiling the stage alone took 140 s on an H200
# (the model's init 44 s, the stage 96 s), and a worker that stops first prints nothing.
FLOORS = {"stage-alone": 240}


def run(command: list[str], limit: float, env: dict | None = None) -> tuple[str, float]:
    """Standard output (or both ends of stderr on a failure) and the seconds it took."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=limit,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return f"TIMED OUT after {limit:.0f} s; stderr ends:\n{tail}", limit
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        err = done.stderr
        shown = err if len(err) <= 4000 else f"{err[:2000]}\n[...]\n{err[-2000:]}"
        return f"FAILED (exit {done.returncode}):\n{shown}", seconds
    return done.stdout.strip() or "(no output)", seconds


def stage_alone(limit: float) -> tuple[str, float]:
    """The stage by itself; on a failure, again with XLA's dump of what it compiled."""
    text, seconds = run(STAGE_ALONE, limit)
    if not text.startswith(("FAILED", "TIMED OUT")):
        return f"median seconds per stage: {text}", seconds
    dump = Path(tempfile.mkdtemp(prefix="xla-dump-"))
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text"
    again, more = run(STAGE_ALONE, limit, env=dict(os.environ, XLA_FLAGS=flags.strip()))
    files = sorted(p.name for p in dump.iterdir())
    listing = "\n".join(files[:40]) + (
        f"\n... {len(files) - 40} more" if len(files) > 40 else ""
    )
    return (
        f"{text}\n\nrerun with --xla_dump_to={dump}:\n{again}\n\ndump files:\n{listing}",
        seconds + more,
    )


def main_job(limit: float) -> tuple[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            "-m",
            "experiments.main",
            "--config=digits:trials=1",
            f"--workdir={workdir}",
        ]
        text, seconds = run(command, limit)
    return "\n".join(text.splitlines()[-25:]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS)
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--budget", type=float, default=None, help="scale every limit to fit"
    )
    args = parser.parse_args()
    info = machine()
    if info["device"].startswith("cpu"):
        print("note: no accelerator visible; the check runs on the CPU", file=sys.stderr)
    chosen = [key for key in SECTIONS if key in args.sections]
    scale = 1.0
    if args.budget:
        scale = min(1.0, args.budget / sum(SECTIONS[k][2] for k in chosen))
    slug = "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")
    path = Path(args.out) / f"{time.strftime('%Y-%m-%d')}-device-check-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    for key in chosen:
        title, command, limit = SECTIONS[key]
        limit = max(limit * scale, FLOORS.get(key, 0))
        if key == "stage-alone":
            result = stage_alone(limit)
        elif key == "main":
            result = main_job(limit)
        else:
            result = run(command, limit)
        sections.append((title, result))
        write_results(path, info, sections, None, "`make device-check`")
        print(f"{title}: {result[1]:.0f} s", file=sys.stderr, flush=True)
    print(path)


if __name__ == "__main__":
    main()
