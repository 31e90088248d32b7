"""Peak memory of this process: host RSS everywhere, device memory where JAX reports it."""

from __future__ import annotations

from pathlib import Path

import jax


def peak_host_memory_bytes() -> int | None:
    """VmHWM from /proc/self/status (Linux): this process's own peak resident memory.

    Not `ru_maxrss`, which a child inherits across fork+exec. None where /proc is absent.
    """
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def peak_device_memory_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over local devices; None on CPU, which has none."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
