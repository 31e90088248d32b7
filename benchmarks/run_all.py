"""`make bench`: every benchmark in one run, written to
`benchmarks/results/<date>-<machine>.md` (with a PNG of peak memory against K): the
machine, the library versions, the memory bandwidth measured in the same run, and each
benchmark's figures with their ratios to the bound and to PyTorch.

    python benchmarks/run_all.py [--quick] [--sections merge stage ...] [--baseline DIR]
    # --quick: one model, fewer repetitions; --baseline: an older checkout, timed beside
    # this one by the merge and stage-program sections
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "torch",
    "transformers",
)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "device": accelerator(),
        "python": platform.python_version(),
    }


def accelerator() -> str:
    """The default JAX device, asked in a child process: a parent that starts JAX on a GPU
    holds 75 % of its memory (JAX preallocates) while every benchmark it then starts has
    to live in the rest."""
    ask = (
        "import jax; d = jax.devices()[0]; "
        "print(f'{d.platform}: {d.device_kind} x {jax.device_count()}')"
    )
    done = subprocess.run(
        [sys.executable, "-c", ask], capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run(script: str, *args: str) -> tuple[str, float]:
    """The script's standard output (progress bars on stderr are dropped) and seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        err = done.stderr
        shown = err if len(err) <= 4000 else f"{err[:2000]}\n[...]\n{err[-2000:]}"
        return f"FAILED (exit {done.returncode}):\n{shown}", time.perf_counter() - start
    return done.stdout.strip(), time.perf_counter() - start


def memory_plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in table["rows"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, mode in enumerate(table["modes"]):
        ax.plot(ks, [table["rows"][str(k)][i] for k in ks], "o-", label=mode)
    ax.set_xlabel("sources K")
    ax.set_ylabel("peak host memory, MiB (VmHWM)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend()
    ax.set_title(f"peak memory against K ({table['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = {  # name: (title, script)
    "merge": ("Merge kernel", "merge_kernel.py"),
    "stage": ("One GRASP stage", "grasp_stage.py"),
    "stage-program": ("One GRASP stage of the library", "stage_program.py"),
    "throughput": ("Training and evaluation", "throughput.py"),
    "conv": ("One convolution per backend", "conv_backends.py"),
    "memory": ("Peak memory against K", "grasp_memory.py"),
    "embedded": ("The embedded job", "embedded_job.py"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS)
    )
    parser.add_argument("--models", nargs="+", help="for the GRASP stage and throughput")
    parser.add_argument(
        "--baseline", help="another checkout: merge and stage-program time it side by side"
    )
    args = parser.parse_args()
    info = machine()
    name = info["cpu"] if info["device"].startswith("cpu") else info["device"]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name}-{info['cores']}cores".lower()).strip("-")
    stem = f"{datetime.date.today().isoformat()}-{slug}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = ["--only", "mobilevit_xxs", "--reps", "3"] if args.quick else []
    model_args = ["--models", "mobilevit_xxs"] if args.quick else []
    if args.models:
        model_args = ["--models", *args.models]
    # glibc's allocator settings matter for XLA's CPU runtime only.
    if not info["device"].startswith("cpu"):
        model_args += ["--allocators", "default"]
    with tempfile.TemporaryDirectory() as tmp:
        memory_json = Path(tmp) / "memory.json"
        ks = ["2", "4"] if args.quick else ["2", "4", "8", "16"]
        memory = ["--model", "small_cnn"] if args.quick else []
        against = ["--baseline", args.baseline] if args.baseline else []
        extra = {
            "merge": [*quick, *against],
            "stage": model_args,
            "stage-program": against,
            "throughput": model_args,
            "conv": [],
            "memory": ["--ks", *ks, *memory, "--json", str(memory_json)],
            "embedded": [],
        }
        path, sections = out_dir / f"{stem}.md", []
        for key in (key for key in SECTIONS if key in args.sections):
            title, script = SECTIONS[key]
            sections.append((f"{title} (`benchmarks/{script}`)", run(script, *extra[key])))
            write_results(path, info, sections, None)  # what ran so far survives a stop
        plot = None
        if memory_json.exists():
            plot = out_dir / f"{stem}-memory.png"
            memory_plot(json.loads(memory_json.read_text()), plot)
    write_results(path, info, sections, plot)
    print(path)


def write_results(
    path: Path,
    info: dict,
    sections: list,
    plot: Path | None,
    written_by: str = "`make bench` (`benchmarks/run_all.py`)",
) -> None:
    """The results file, written whole to a temporary name and renamed into place."""
    lines = [
        f"# Benchmarks, {datetime.date.today().isoformat()}",
        "",
        f"Written by {written_by}; every figure below was "
        "measured in this one run, ratios side by side.",
        "",
        "| machine | |",
        "|---|---|",
        *(
            f"| {k} | {v if not isinstance(v, float) else f'{v:.1f}'} |"
            for k, v in info.items()
        ),
        *(f"| {k} | {v} |" for k, v in versions().items()),
        "",
    ]
    for title, (text, seconds) in sections:
        lines += [f"## {title}", "", f"({seconds:.0f} s)", "", "```", text, "```", ""]
    if plot is not None:
        lines += [f"![peak memory against K]({plot.name})", ""]
    tmp_path = path.with_suffix(".md.tmp")
    tmp_path.write_text("\n".join(lines))
    os.replace(tmp_path, path)


if __name__ == "__main__":
    main()
