"""Peak memory readings: host RSS grows with a real allocation; CPU has no device stats."""

from __future__ import annotations

import numpy as np
import pytest

from grasp_jax import memory


def test_peak_host_memory_sees_an_allocation():
    """The block is sized to push resident memory 300 MiB above the peak so far (which
    earlier tests, e.g. torch's import, may have set high), so the peak must move."""
    before = memory.peak_host_memory_bytes()
    now = memory.current_host_memory_bytes()
    block = np.ones((before - now + 300 * 2**20) // 8)  # touched: resident
    after = memory.peak_host_memory_bytes()
    assert block.sum() > 0
    assert after >= before + 250 * 2**20
    assert memory.current_host_memory_bytes() >= before + 250 * 2**20


def test_device_memory_is_none_on_cpu():
    assert memory.peak_device_memory_bytes() is None


def test_reset_makes_the_peak_that_of_what_follows():
    block = np.ones(200 * 2**20 // 8)  # a 200 MiB peak, then freed
    assert block.sum() > 0
    del block
    if not memory.reset_peak_host_memory():
        pytest.skip("no /proc/self/clear_refs here")
    now = memory.current_host_memory_bytes()
    assert memory.peak_host_memory_bytes() < now + 50 * 2**20
    small = np.ones(80 * 2**20 // 8)
    assert small.sum() > 0
    assert memory.peak_host_memory_bytes() >= now + 70 * 2**20
