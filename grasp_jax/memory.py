"""Peak memory of this process: host RSS everywhere, device memory where JAX reports it;
and giving the C heap's free pages back between GRASP's stages."""

from __future__ import annotations

import ctypes
from pathlib import Path

import jax


def _status_bytes(field: str) -> int | None:
    """A /proc/self/status memory field (Linux, in KiB) as bytes; None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def peak_host_memory_bytes() -> int | None:
    """VmHWM: this process's own peak resident memory.

    Not `ru_maxrss`, which a child inherits across fork+exec. None where /proc is absent.
    """
    return _status_bytes("VmHWM")


def reset_peak_host_memory() -> bool:
    """Lowers VmHWM to the current RSS (Linux: `5` to /proc/self/clear_refs), so that the
    next peak is that of what runs from here on; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_host_memory_bytes() -> int | None:
    """VmRSS: this process's resident memory now."""
    return _status_bytes("VmRSS")


def peak_device_memory_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over local devices; None on CPU, which has none."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def trim_host_heap() -> bool:
    """Gives the C heap's free pages back to the system (glibc `malloc_trim(0)`); False
    where the C library has no `malloc_trim`.

    glibc keeps freed buffers below its (moving) mmap threshold resident, so every
    model-sized set of buffers a GRASP stage frees would stay in RSS and the next stage's
    peak would stack on it; trimming before each fine-tune keeps the host peak flat over
    the stages (the figures: `benchmarks/grasp_memory.py`).
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim(0)
    return True
