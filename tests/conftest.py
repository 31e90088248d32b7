"""Shared fixtures: hypothesis profiles, a persistent compilation cache, one PyTorch and
OpenBLAS thread per worker, and a counter of XLA compilations."""

from __future__ import annotations

import fcntl
import os
import shutil
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
# `make test` runs one worker per core, so PyTorch's OpenMP threads and NumPy's OpenBLAS
# threads would only spin against the other worker between their calls (measured: a
# sixth of the CPU while the PyTorch comparisons ran, 10-13 s of their 110 s). Set before
# either library loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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


def shared_folder(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """Folder `name`, made by `make(path)` once per test session, whichever worker needs
    it first (the others wait on a file lock), then read by all. Never written to after:
    a test that changes it copies it first."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: the session folder the workers' folders are in
        root = root.parent
    return made_once(root, name, make)


def made_once(root: Path, name: str, make) -> Path:
    """`root / name`, made by `make` unless a finished one is there (under a file lock)."""
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory, worker_id):
    """digits_drift built once per test session (all configs, ~4 s)."""
    from data.build import build

    return shared_folder(
        tmp_path_factory, worker_id, "tfds", lambda out: build("digits_drift", data_dir=out)
    )


@pytest.fixture(scope="session")
def small_sources(digits_dir, tmp_path_factory, worker_id):
    """A work folder holding the start, the sources and the source matrix of
    `pinned_experiment.small_config`, trained once per test session: the experiment
    tests start from a copy (`pinned_experiment.with_sources`), which the runner reuses
    after its checks, instead of each training the same ones (~10 s each). The kill
    test trains its own, in the process it kills. `make mutation` keeps them between
    sessions (`GRASP_TESTS_KEPT_SOURCES`, made before any mutant runs): each mutant's
    test session would otherwise train them again."""

    def make(workdir, data_dir=digits_dir):
        from experiments import runner
        from tests.pinned_experiment import small_config

        config = small_config(data_dir, targets="d2", trials=1)
        runner.prepare_sources(config, workdir, progress=False)

    kept = os.environ.get("GRASP_TESTS_KEPT_SOURCES")
    if kept:  # trained once, on data built there, by the first session that needs them
        from data.build import build

        root = Path(kept)
        root.mkdir(parents=True, exist_ok=True)
        data_dir = made_once(root, "tfds", lambda out: build("digits_drift", data_dir=out))
        return made_once(root, "small_sources", lambda w: make(w, data_dir))
    return shared_folder(tmp_path_factory, worker_id, "small_sources", make)


# The files that take longest, longest first (seconds of one worker in a fresh-clone
# `make test`, 2026-12-05): `make test` hands whole files to its workers in collection
# order (`--no-loadscope-reorder`; xdist would otherwise order files by their number of
# tests, which put the long experiment files with few tests last, to run alone at the
# end). The files not listed follow in their usual order.
LONGEST_FIRST = (
    "test_models.py",  # 171
    "test_baselines.py",  # 128
    "test_data_parallel.py",  # 126
    "test_main.py",  # 106
    "test_kill.py",  # 80
    "test_study.py",  # 74
    "test_grasp.py",  # 73
    "test_train.py",  # 58
    "test_transfer.py",  # 54
    "test_bad_inputs.py",  # 42
    "test_merge.py",  # 41
    "test_merging.py",  # 38
    "test_evaluate.py",  # 37
    "test_grasp_reference_stage.py",  # 31
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
