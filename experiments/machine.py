"""Where numbers come from: XLA generates different code for different CPUs, so the same
software gives other floats on another machine. Every summary records this."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
from pathlib import Path

import jax

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain")
# The CPU features XLA:CPU's code generation depends on most (vector widths, FMA).
XLA_FLAGS = re.compile(r"^(avx\w*|fma|sse4_[12]|amx\w*|f16c|bmi2)$")


def cpu() -> tuple[str, list[str]]:
    """The CPU model and its feature flags, from /proc/cpuinfo (empty where absent)."""
    path = Path("/proc/cpuinfo")
    info = path.read_text() if path.exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    name = model.group(1).strip() if model else platform.processor() or "unknown"
    return name, (flags.group(1).split() if flags else [])


def machine_key() -> str:
    """CPU model and a digest of all its flags: one key per kind of machine."""
    name, flags = cpu()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:8]}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """The machine and software a run's numbers were computed with."""
    name, flags = cpu()
    device = jax.devices()[0]
    return {
        "key": machine_key(),
        "cpu": name,
        "cpu_flags_xla_uses": sorted(f for f in flags if XLA_FLAGS.match(f)),
        "cpu_count": os.cpu_count(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "python": platform.python_version(),
        "libraries": {package: _version(package) for package in LIBRARIES},
    }
