"""Shared fixtures: hypothesis profiles and a counter of XLA compilations."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from jax import monitoring

# Every new tree layout compiles; keep examples few and without deadlines.
settings.register_profile(
    "default",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_COMPILES = [0]


def _on_event(name: str, _duration: float, **_kwargs) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_event)


@pytest.fixture
def compile_count():
    """A callable returning how many XLA backend compilations happened so far."""
    return lambda: _COMPILES[0]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """digits_drift built once per test session (all configs, ~4 s)."""
    from data.build import build

    out = tmp_path_factory.mktemp("tfds")
    build("digits_drift", data_dir=out)
    return out
