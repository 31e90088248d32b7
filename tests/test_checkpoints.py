"""Source checkpoints: round trip, abstract restore, and errors that name what is wrong."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from grasp_jax import checkpoints, models


def variables(num_classes=10, seed=0):
    return models.init("small_cnn", num_classes, jax.random.PRNGKey(seed), (1, 32, 32, 3))


def abstract(num_classes=10):
    return jax.eval_shape(lambda: variables(num_classes))


def test_round_trip_into_an_abstract_target(tmp_path):
    original = variables()
    checkpoints.save_variables(
        tmp_path / "d0", original, {"best_val_accuracy": np.float32(0.5)}
    )
    assert checkpoints.is_complete(tmp_path / "d0")
    assert not (tmp_path / "d0.tmp").exists()  # written aside, then renamed
    assert checkpoints.read_metadata(tmp_path / "d0") == {"best_val_accuracy": 0.5}
    restored = checkpoints.restore_variables(tmp_path / "d0", abstract())
    jax.tree.map(np.testing.assert_array_equal, restored, original)


def test_params_alone_can_be_restored(tmp_path):
    checkpoints.save_variables(tmp_path / "d0", variables(), {})
    restored = checkpoints.restore_variables(tmp_path / "d0", abstract(), items=("params",))
    assert set(restored) == {"params"}


def test_saving_again_replaces_the_old_checkpoint(tmp_path):
    checkpoints.save_variables(tmp_path / "d0", variables(seed=0), {"v": 1})
    checkpoints.save_variables(tmp_path / "d0", variables(seed=1), {"v": 2})
    restored = checkpoints.restore_variables(tmp_path / "d0", abstract())
    jax.tree.map(np.testing.assert_array_equal, restored, variables(seed=1))
    assert checkpoints.read_metadata(tmp_path / "d0") == {"v": 2}


def test_missing_checkpoint_names_bin_and_path(tmp_path):
    with pytest.raises(
        checkpoints.CheckpointError, match=r"d3: checkpoint .*d3 does not exist"
    ):
        checkpoints.restore_variables(tmp_path / "d3", abstract(), name="d3")


def test_partial_checkpoint_is_an_error(tmp_path):
    checkpoints.save_variables(tmp_path / "d0", variables(), {})
    import shutil

    shutil.rmtree(tmp_path / "d0" / "batch_stats")
    assert not checkpoints.is_complete(tmp_path / "d0")
    with pytest.raises(checkpoints.CheckpointError, match="has no 'batch_stats'"):
        checkpoints.restore_variables(tmp_path / "d0", abstract(), name="d0")


def test_mismatched_head_lists_the_keys(tmp_path):
    checkpoints.save_variables(tmp_path / "d0", variables(num_classes=10), {})
    with pytest.raises(
        checkpoints.CheckpointError, match=r"head/kernel \(64, 10\) != \(64, 30\)"
    ):
        checkpoints.restore_variables(tmp_path / "d0", abstract(num_classes=30), name="d0")


def test_saves_from_two_threads_at_once_both_land(tmp_path):
    """Runs side by side save their models at the same moment (Orbax alone fails then:
    its saves in one process share temporary folders and signals)."""
    import threading

    saved = [variables(seed=0), variables(seed=1)]
    start = threading.Barrier(2)
    failures = []

    def save(k):
        for rep in range(3):
            start.wait()
            try:
                checkpoints.save_variables(tmp_path / f"m{k}_{rep}", saved[k], {})
            except Exception as error:  # reported below, in the test's thread
                failures.append(error)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for k in range(2):
        for rep in range(3):
            restored = checkpoints.restore_variables(tmp_path / f"m{k}_{rep}", abstract())
            jax.tree.map(np.testing.assert_array_equal, restored, saved[k])
