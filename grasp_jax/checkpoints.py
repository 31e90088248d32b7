"""Checkpoints: finished models (`save_variables`) and resumable training (`TrainProgress`).

A model is saved as params, batch_stats and metadata, separate Orbax items because Orbax
restores whole items: the GRASP runner can restore only `params` (what the merge kernels
see) or both, into an abstract target made with `jax.eval_shape`, so no throwaway
initialisation is ever allocated. A training run saves its state, its best variables so
far and its history after every epoch, and resumes from the last one.

Every saved item carries a SHA-256 of its arrays (`checksums.json`), checked on restore:
Orbax reads some corrupted files without complaint, and a model restored wrong would
silently poison every number computed from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from grasp_jax import input_pipeline as ip
from grasp_jax.tree_checks import PyTree, leaves_with_paths

ITEMS = ("params", "batch_stats")
CHECKSUMS = "checksums.json"
# What `save_variables` writes: the only names it may replace in an existing folder.
OUR_FILES = frozenset({*ITEMS, "metadata.json", CHECKSUMS})


class CheckpointError(ValueError):
    """A source checkpoint is missing, partial or does not fit the model."""


# Orbax's saves in one process share its signalling and temporary folders: two at once
# from threads (runs side by side) fail or time out.
_ONE_SAVE_AT_A_TIME = threading.Lock()


def save_variables(path: str | Path, variables: dict, metadata: dict[str, Any]) -> Path:
    """Writes `variables` and `metadata` to `path` atomically (temp folder, then rename).

    Layout: `path/params/`, `path/batch_stats/` (Orbax), `path/metadata.json` and
    `path/checksums.json`. An existing `path` is replaced only if it is a checkpoint of
    ours: any other folder or file is refused, never deleted.
    """
    path = Path(path).absolute()
    tmp = path.with_name(path.name + ".tmp")
    _refuse_foreign(path)
    _refuse_foreign(tmp)
    leader = jax.process_index() == 0  # file operations: one process; arrays: all
    if leader:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices(f"grasp_jax save start {path}")
    with _ONE_SAVE_AT_A_TIME, ocp.StandardCheckpointer() as checkpointer:
        for item in ITEMS:
            checkpointer.save(tmp / item, variables.get(item, {}))
        checkpointer.wait_until_finished()
    if leader:
        sums = {item: checksum(variables.get(item, {})) for item in ITEMS}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, default=_plain))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    multihost_utils.sync_global_devices(f"grasp_jax save done {path}")
    return path


def _refuse_foreign(path: Path) -> None:
    """Raises unless `path` is absent or a folder holding only what we write."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint folder; choose a new path."
        )
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OUR_FILES)
    if foreign:
        raise CheckpointError(
            f"{path} exists and holds files that are not a grasp-jax checkpoint "
            f"({foreign[:5]}); choose a new or empty folder (nothing was changed)."
        )


def checksum(tree: PyTree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in flatten order."""
    digest = hashlib.sha256()
    for name, leaf in leaves_with_paths(tree):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def is_complete(path: str | Path) -> bool:
    """True when `path` holds a finished checkpoint with every item."""
    path = Path(path)
    files = ("metadata.json", CHECKSUMS)
    return all((path / f).is_file() for f in files) and all(
        (path / i).is_dir() for i in ITEMS
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata saved with a checkpoint (no arrays are read)."""
    _require(path, "metadata.json", f"checkpoint {path}", "train or import it again")
    return _read_json(Path(path) / "metadata.json")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{file} is unreadable ({err}); delete its folder to train it again."
        ) from None


def restore_variables(
    path: str | Path,
    abstract_variables: dict,
    *,
    items: tuple[str, ...] = ITEMS,
    name: str = "",
    fix: str = "delete it and run again to train it anew, or restore it from a copy",
) -> dict:
    """Restores `items` into the shapes of `abstract_variables` (e.g. `jax.eval_shape`)
    and checks them against the checksums saved with them.

    A leaf that names a sharding (a `jax.ShapeDtypeStruct` with one, an array) lands
    there; any other lands replicated over every device of the job, whichever job saved
    it: Orbax would place it as the saving job did (a one-process job's device 0), which
    the other processes of a multi-process job cannot address.

    Raises CheckpointError naming `name` (e.g. the bin), the path, what is wrong (missing,
    partial, unreadable, corrupted, of another architecture) and `fix`.
    """
    where = f"{name}: checkpoint {path}" if name else f"checkpoint {path}"
    for item in (*items, CHECKSUMS):
        _require(path, item, where, fix)
    expected = _read_json(Path(path) / CHECKSUMS)
    restored = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for item in items:
            directory = Path(path).absolute() / item
            target = restore_layout(abstract_variables.get(item, {}))
            try:
                stored = checkpointer.metadata(directory).item_metadata
                _compare(target, stored, where, item)
                restored[item] = checkpointer.restore(directory, target)
            except CheckpointError:
                raise
            except Exception as err:  # Orbax/TensorStore raise plain Exception too
                raise CheckpointError(
                    f"{where}: '{item}' is unreadable ({_first_line(err)}); {fix}."
                ) from err
            if checksum(restored[item]) != expected.get(item):
                raise CheckpointError(
                    f"{where}: '{item}' does not match its checksum in {CHECKSUMS}, the "
                    f"files are corrupted; {fix}."
                )
    return restored


def restore_layout(abstract: PyTree) -> PyTree:
    """Where `restore_variables` lands each leaf of `abstract`: the sharding it names,
    else replicated over all devices, as `loop.fit` places the training state."""
    replicated, _ = ip.data_parallel()

    def place(leaf):
        if getattr(leaf, "sharding", None) is not None:
            return leaf
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=replicated)

    return jax.tree.map(place, abstract)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def _require(path, item: str, where: str, fix: str) -> None:
    if not (Path(path) / item).exists():
        what = "does not exist" if not Path(path).exists() else f"has no '{item}'"
        raise CheckpointError(f"{where} {what}; {fix}.")


def _compare(target: PyTree, stored: PyTree, where: str, item: str) -> None:
    """Lists keys missing, unexpected or of another shape between target and stored."""
    want = {p: tuple(np.shape(x)) for p, x in leaves_with_paths(target)}
    have = {p: tuple(getattr(x, "shape", ())) for p, x in leaves_with_paths(stored)}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    reshaped = sorted(
        f"{p} {have[p]} != {want[p]}" for p in set(want) & set(have) if have[p] != want[p]
    )
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{where}: '{item}' does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {reshaped[:5]}. Was it "
            "trained with another model or number of classes?"
        )


class TrainProgress:
    """Per-epoch checkpoints of a training run under `workdir/checkpoints` (the last one
    kept): the train state, the best variables so far, the best accuracy and history."""

    def __init__(self, workdir: str | Path):
        self._manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )

    def last_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state, best: dict, history: list[dict]) -> None:
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                best_params=ocp.args.StandardSave(best["variables"]["params"]),
                best_batch_stats=ocp.args.StandardSave(best["variables"]["batch_stats"]),
                progress=ocp.args.JsonSave(
                    {
                        "best_accuracy": best["accuracy"],
                        "best_epoch": best["epoch"],
                        "history": history,
                    }
                ),
            ),
        )

    def restore(self, state) -> tuple[Any, dict, list[dict]]:
        """The last epoch's (state, best, history), each array placed as the matching
        array of `state` is (a sharded model stays sharded; nothing lands on the host)."""
        abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        restored = self._manager.restore(
            self.last_epoch(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                best_params=ocp.args.StandardRestore(abstract_state.params),
                best_batch_stats=ocp.args.StandardRestore(abstract_state.batch_stats),
                progress=ocp.args.JsonRestore(),
            ),
        )
        progress = restored.progress
        best = {
            "accuracy": progress["best_accuracy"],
            "epoch": progress["best_epoch"],
            "variables": {
                "params": restored.best_params,
                "batch_stats": restored.best_batch_stats,
            },
        }
        return restored.state, best, progress["history"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def library_versions() -> dict[str, str]:
    """Versions recorded with every checkpoint, for reproducibility."""
    import flax
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "unknown"),
    }
