"""Peak memory readings: host RSS grows with a real allocation; CPU has no device stats."""

from __future__ import annotations

import numpy as np

from grasp_jax import memory


def test_peak_host_memory_sees_an_allocation():
    before = memory.peak_host_memory_bytes()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    after = memory.peak_host_memory_bytes()
    assert block.sum() > 0
    assert after >= before and after >= 300 * 2**20


def test_device_memory_is_none_on_cpu():
    assert memory.peak_device_memory_bytes() is None
