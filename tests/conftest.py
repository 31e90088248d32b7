"""Shared fixtures: hypothesis profiles, a persistent compilation cache and a counter of
XLA compilations."""

from __future__ import annotations

import os
from pathlib import Path

# Tests rebuild the same programs many times (fresh closures, child processes, the same
# model in many files); XLA's persistent cache compiles each once. Set through the
# environment, before JAX is imported, so that the child processes tests start share it.
# A cached program is the same executable, so results do not change.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


def _on_compile(name: str, _duration: float, **_kwargs) -> None:
    # JAX times the compilation and the persistent cache's read under this one event,
    # so it counts a program once whether it was compiled or read back.
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_compile)


@pytest.fixture
def compile_count():
    """A callable returning how many programs were compiled (or read from the
    persistent cache) so far."""
    return lambda: _COMPILES[0]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """digits_drift built once per test session (all configs, ~4 s)."""
    from data.build import build

    out = tmp_path_factory.mktemp("tfds")
    build("digits_drift", data_dir=out)
    return out


# The files that run whole experiments, longest first: `make test` hands files to its
# workers in collection order, so these start at once and the short files fill in
# around them instead of one long file starting last and running alone at the end.
# (Not shown to matter by a measurement: 992 s without the ordering, 972-1005 s with it,
# in runs that differ in other ways too.)
LONGEST_FIRST = (
    "test_baselines.py",
    "test_study.py",
    "test_kill.py",
    "test_main.py",
    "test_data_parallel.py",
    "test_models.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
