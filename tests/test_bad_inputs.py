"""Bad input across the whole surface: each case must end in one clear error that names
the file, key or value and the fix, and leave everything written before unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grasp_jax as gj
from data.build import build, load_splits
from data.clear10 import Clear10
from data.folder_layout import LayoutError
from experiments import cli, report, runner, settings, sources
from experiments.configs import digits, override
from experiments.import_weights import import_weights
from grasp_jax import checkpoints, files, interop, models
from grasp_jax.checkpoints import CheckpointError
from tests.test_data_builders import make_bin
from tests.trees import random_variables

REPO = Path(__file__).resolve().parents[1]


def small_variables(num_classes=10, seed=0):
    return models.init("small_cnn", num_classes, jax.random.PRNGKey(seed), (1, 32, 32, 3))


def abstract(num_classes=10):
    return jax.eval_shape(lambda: small_variables(num_classes))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def saved(tmp_path):
    """A finished checkpoint and the snapshot of the folder holding it."""
    path = checkpoints.save_variables(tmp_path / "ckpt", small_variables(), {"bin": "d0"})
    return path


def largest_file(folder: Path) -> Path:
    return max(
        (p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


# --- checkpoints -------------------------------------------------------------------------


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"d3: checkpoint .*nowhere does not exist"):
        checkpoints.restore_variables(tmp_path / "nowhere", abstract(), name="d3")


def test_checkpoint_without_an_item_names_the_item(saved):
    os.rename(saved / "batch_stats", saved.parent / "elsewhere")
    with pytest.raises(CheckpointError, match=r"has no 'batch_stats'"):
        checkpoints.restore_variables(saved, abstract())


def test_truncated_array_file_names_the_item_and_the_fix(saved):
    victim = largest_file(saved / "params")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = snapshot(saved)
    with pytest.raises(CheckpointError, match=r"'params' (is unreadable|does not match)"):
        checkpoints.restore_variables(saved, abstract())
    assert snapshot(saved) == before  # a failed restore changes nothing


def test_flipped_bytes_are_caught_by_the_checksum(saved):
    victim = largest_file(saved / "params")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'params' (is unreadable|does not match)"):
        checkpoints.restore_variables(saved, abstract())


def test_corrupt_metadata_names_the_file(saved):
    (saved / "metadata.json").write_text('{"bin": "d0", ')
    with pytest.raises(CheckpointError, match=r"metadata\.json is unreadable"):
        checkpoints.read_metadata(saved)


def test_corrupt_checksums_name_the_file(saved):
    (saved / checkpoints.CHECKSUMS).write_bytes(b"\x00\xff")
    with pytest.raises(CheckpointError, match=r"checksums\.json is unreadable"):
        checkpoints.restore_variables(saved, abstract())


def test_checkpoint_of_another_class_count_lists_the_keys(saved):
    with pytest.raises(CheckpointError, match=r"does not fit the model.*head"):
        checkpoints.restore_variables(saved, abstract(num_classes=5))


def test_saving_over_a_foreign_folder_is_refused_and_it_stays(tmp_path):
    (tmp_path / "notes.txt").write_text("my thesis")
    (tmp_path / "params").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a grasp-jax checkpoint.*notes\.txt"):
        checkpoints.save_variables(tmp_path, small_variables(), {})
    assert snapshot(tmp_path) == before


def test_saving_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match=r"model is a file"):
        checkpoints.save_variables(target, small_variables(), {})
    assert target.read_text() == "keep me"


def test_import_weights_never_empties_the_output_folder(tmp_path, monkeypatch):
    """`--out=.` used to delete the current folder's contents."""
    weights = tmp_path / "weights.safetensors"
    interop.save_safetensors(weights, "mobilevit_xxs", mobilevit_variables())
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2,3")
    before = snapshot(work)
    monkeypatch.chdir(work)
    with pytest.raises(CheckpointError, match=r"--out=\. already exists; choose a new"):
        import_weights("mobilevit_xxs", str(weights), 10, ".")
    assert snapshot(work) == before
    with pytest.raises(CheckpointError, match=r"not a grasp-jax checkpoint.*data\.csv"):
        import_weights("mobilevit_xxs", str(weights), 10, ".", overwrite=True)
    assert snapshot(work) == before


def test_import_weights_never_replaces_a_checkpoint_of_ours(tmp_path):
    """`--out=<a trained source>` once replaced the source with the imported model."""
    weights = tmp_path / "weights.safetensors"
    interop.save_safetensors(weights, "mobilevit_xxs", mobilevit_variables())
    source = tmp_path / "sources" / "d0"
    checkpoints.save_variables(source, mobilevit_variables(), {"bin": "d0"})
    before = snapshot(source)
    with pytest.raises(CheckpointError, match=r"sources/d0 already exists.*--overwrite"):
        import_weights("mobilevit_xxs", str(weights), 10, str(source))
    assert snapshot(source) == before
    import_weights("mobilevit_xxs", str(weights), 10, str(source), overwrite=True)
    assert checkpoints.read_metadata(source)["model"] == "mobilevit_xxs"


def mobilevit_variables():
    return random_variables("mobilevit_xxs", 10)


def test_exported_safetensors_get_a_plain_file_mode(tmp_path):
    path = interop.save_safetensors(
        tmp_path / "m.safetensors", "mobilevit_xxs", mobilevit_variables()
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("evil.pt", "evil.ckpt", "evil.bin"):
        (tmp_path / name).write_bytes(pickle.dumps({"state_dict": Payload()}))
        with pytest.raises(interop.InteropError, match=rf"{name}: cannot be read"):
            import_weights("mobilevit_xxs", str(tmp_path / name), 10, str(tmp_path / "o"))
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


# --- kernels -----------------------------------------------------------------------------


def test_mismatched_trees_name_the_leaf():
    a = {"conv": {"kernel": jnp.ones((3, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
    b = {"conv": {"kernel": jnp.ones((3, 3))}, "head": {"kernel": jnp.ones((3, 5))}}
    grads = jax.tree.map(jnp.copy, a)  # not `a` itself: merge_step donates `a`
    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(3, 2\)"):
        gj.merge_step(a, b, grads, grads)


def test_integer_leaves_are_refused_by_name():
    params = {"dense": {"kernel": jnp.ones((2, 2))}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"leaf 'step' of grad_current has dtype int32"):
        gj.alignment_scores(params, params)
    grads = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
    with pytest.raises(ValueError, match=r"leaf 'step' of current has dtype int32"):
        gj.transfer(params, params, gj.alignment_scores(grads, grads))


def test_empty_trees_merge_to_empty_trees():
    merged, stats = gj.merge_step({}, {}, {}, {})
    assert merged == {} and float(stats.fraction) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients_are_reported_and_never_transferred(bad):
    current = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
    source = {"a": jnp.ones(4), "b": jnp.ones(4)}
    grads = {"a": jnp.ones(4), "b": jnp.ones(4)}
    poisoned = {"a": jnp.ones(4).at[1].set(bad), "b": jnp.ones(4)}
    merged, stats = gj.merge_step(current, source, grads, poisoned, threshold=-1.0)
    assert int(stats.nonfinite) == 1
    np.testing.assert_array_equal(merged["a"], np.zeros(4))  # kept
    np.testing.assert_array_equal(merged["b"], np.ones(4))  # taken


# --- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad_epoch", [0, 1])
def test_a_nan_loss_stops_the_stage_and_keeps_the_last_good_state(
    digits_dir, monkeypatch, bad_epoch
):
    from grasp_jax import input_pipeline as ip
    from grasp_jax import loop, recipe, train

    module = models.create("small_cnn", 10)
    start = small_variables()
    data = load_splits("digits_drift", "d0", digits_dir)
    pipe = ip.PipelineConfig(resize_size=32, crop_size=32, batch_size=32)
    steps = ip.steps_per_epoch(data["train"], pipe.batch_size)
    real_step, calls, seen = train.train_step, [0], {}

    def poisoned_step(state, batch, **kwargs):
        calls[0] += 1
        if calls[0] == steps + 1:  # the first step of epoch 1
            seen["epoch0"] = jax.tree.map(np.asarray, state.variables)
        state, metrics = real_step(state, batch, **kwargs)
        if calls[0] > bad_epoch * steps:
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return state, metrics

    monkeypatch.setattr(train, "train_step", poisoned_step)
    config = recipe.TrainConfig(epochs=3, learning_rate=3e-3, augment=False)
    kept = "epoch 0" if bad_epoch else "the start"
    with pytest.warns(
        RuntimeWarning,
        match=rf"training loss nan in epoch {bad_epoch}; stopped there, keeping the "
        rf"variables of {kept}",
    ):
        result = loop.fit(
            module,
            start,
            data["train"],
            data["validation"],
            config=config,
            pipeline=pipe,
            progress=False,
        )
    assert result.best_epoch == bad_epoch - 1 and f"epoch {bad_epoch}" in result.stopped
    assert [h["epoch"] for h in result.history] == list(range(bad_epoch + 1))
    assert "stopped" in result.history[-1]
    expected = seen["epoch0"] if bad_epoch else start
    jax.tree.map(np.testing.assert_array_equal, result.variables, expected)
    if not bad_epoch:  # the start's own validation accuracy
        again = gj.evaluation.predict(module, start, data["validation"], pipe)
        assert result.best_val_accuracy == again["accuracy"]


# --- data --------------------------------------------------------------------------------


def test_an_empty_image_file_names_the_file(tmp_path):
    make_bin(tmp_path / "manual", "year_1-2", Clear10.CLASS_NAMES, split=False, per_class=5)
    (tmp_path / "manual" / "year_1-2" / "bus" / "img_001.jpg").write_bytes(b"")
    before = snapshot(tmp_path / "manual")
    with pytest.raises(LayoutError, match=r"bus/img_001\.jpg: not a readable image"):
        build("clear10", manual_dir=tmp_path / "manual", data_dir=tmp_path / "out")
    assert snapshot(tmp_path / "manual") == before


def test_a_bin_that_was_never_built_gives_the_build_command(tmp_path):
    with pytest.raises(LayoutError, match=r"clear10/year_3-4 is not built .*data\.build"):
        load_splits("clear10", "year_3-4", tmp_path)


# --- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ({"grasp.treshold": "0.2"}, r"grasp\.treshold"),
        ({"trials": "three"}, r"trials"),
        ({"grasp.threshold": "abc"}, r"grasp\.threshold"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(pairs, message):
    with pytest.raises(ValueError, match=message):
        override(digits.get_config(), pairs)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("grasp.threshold", 1.5, r"grasp\.threshold=1\.5; a cosine threshold lies in"),
        ("grasp.threshold", -2.0, r"grasp\.threshold=-2\.0"),
        ("grasp.num_alignment_batches", -1, r"num_alignment_batches=-1; use a whole"),
        ("grasp.alignment_current_mode", "trian", r"alignment_current_mode='trian'"),
        ("grasp.granularity", "tensors", r"granularity='tensors'"),
        ("grasp.learning_rate", 0.0, r"learning_rate=0\.0; use a positive"),
        ("trials", 0, r"trials=0; run at least one"),
        ("init", "imagenet", r"no official weights for small_cnn"),
        ("pipeline.crop_size", 40, r"crop_size=40 must lie in \[1, resize_size=32\]"),
        ("pipeline.batch_size", 0, r"pipeline\.batch_size=0; use at least 1"),
        ("pipeline.hue", 0.7, r"pipeline\.hue=0\.7; a hue shift lies in \[0, 0\.5\]"),
        ("dataset", "clear1000", r"config\.dataset='clear1000'; choose one of \['clear10'"),
        ("save_final", True, r"config\.save_final: small_cnn has no PyTorch layout"),
        ("mesh.model", 0, r"config\.mesh\.model=0; use a whole number that divides the 1 "),
        ("mesh.model", 3, r"config\.mesh\.model=3; use a whole number that divides"),
    ],
)
def test_out_of_range_values_fail_before_any_work(key, value, message):
    config = digits.get_config()
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[leaf] = value
    with pytest.raises(settings.ConfigError, match=message):
        settings.check(config)


def test_the_edges_of_the_valid_ranges_are_accepted():
    config = digits.get_config()
    for threshold in (-1.0, 1.0, gj.grasp.NOTHING_MOVES):
        config.grasp.threshold = threshold
        settings.check(config)
    config.trials = 1
    config.grasp.num_alignment_batches = 0
    assert settings.check(config) == list(config.bins)


def test_a_missing_init_checkpoint_says_what_init_must_be(tmp_path):
    config = digits.get_config()
    config.init = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"does not exist; config\.init must be"):
        sources.initial_variables(config, tmp_path, writer=None)


def test_a_source_copied_into_another_bins_folder_is_refused(tmp_path):
    """A d2 checkpoint copied over d0's (checksums and all) was accepted as d0's."""
    config = digits.get_config()
    seed = settings.source_seed(config, "d2")
    copied = {
        "bin": "d2",
        "settings": sources.source_dependencies(config, "source_training", seed),
    }
    path = sources.source_dir(config, tmp_path, "d0")
    checkpoints.save_variables(path, small_variables(), copied)
    expected = sources.source_dependencies(
        config, "source_training", settings.source_seed(config, "d0")
    )
    with pytest.raises(
        settings.ConfigError, match=r"holds the source of bin d2, not of d0"
    ):
        sources.reuse_checked(config, tmp_path, "d0", expected)


def test_a_source_is_not_reused_after_the_seed_changed(tmp_path):
    config = digits.get_config()
    seed = settings.source_seed(config, config.bins[0])
    path = sources.source_dir(config, tmp_path, "d0")
    metadata = {"settings": sources.source_dependencies(config, "source_training", seed)}
    assert not sources.reuse_checked(config, tmp_path, "d0", metadata["settings"])
    checkpoints.save_variables(path, small_variables(), metadata)
    before = snapshot(tmp_path)
    assert sources.reuse_checked(config, tmp_path, "d0", metadata["settings"])
    config.seed = 7
    changed = sources.source_dependencies(
        config, "source_training", settings.source_seed(config, config.bins[0])
    )
    with pytest.raises(
        settings.ConfigError,
        match=rf"^source {re.escape(str(path))} was trained with other settings "
        rf"\(\['seed'\]\); use another --workdir for this configuration, or delete "
        rf"{re.escape(str(path))} to retrain it\.$",
    ):
        sources.reuse_checked(config, tmp_path, "d0", changed)
    assert snapshot(tmp_path) == before
    # a checkpoint saved without settings (an older version) is not trusted either
    checkpoints.save_variables(path, small_variables(), {})
    with pytest.raises(settings.ConfigError, match=r"other settings \(\['data_version'"):
        sources.reuse_checked(config, tmp_path, "d0", metadata["settings"])


def test_an_interrupted_source_does_not_resume_under_another_recipe(digits_dir, tmp_path):
    config = digits.get_config()
    config.data_dir = str(digits_dir)
    seed = settings.source_seed(config, config.bins[0])
    run_dir = tmp_path / "train_state" / config.dataset / config.model / "d0"
    started = sources.source_dependencies(config, "source_training", seed)
    report.write_json(run_dir / "settings.json", started)
    before = snapshot(tmp_path)
    config.source_training.epochs += 1
    with pytest.raises(settings.ConfigError, match=r"\(\['recipe\.epochs'\]\); rerun with"):
        sources.train_one(config, tmp_path, "d0", "d0", "source_training", None, seed, None)
    assert snapshot(tmp_path) == before


# --- the work directory and the disk -----------------------------------------------------


def test_a_work_directory_that_is_a_file(tmp_path):
    target = tmp_path / "runs"
    target.write_text("not a folder")
    with pytest.raises(settings.ConfigError, match=r"--workdir=.*runs is a file"):
        cli.check_workdir(target)
    assert target.read_text() == "not a folder"


def test_a_work_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(settings.ConfigError, match=r"--workdir=.* cannot be created"):
        cli.check_workdir(tmp_path / "file" / "runs")


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    report.write_json(path, {"grasp": 0.9})
    before = snapshot(tmp_path)
    real_write_text = Path.write_text

    def on_a_full_disk(self, text, *args, **kwargs):  # half written, then ENOSPC
        real_write_text(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", on_a_full_disk)
    with pytest.raises(
        report.OutputError,
        match=r"could not write .*summary\.json \(No space left on device\); free some "
        "space or choose a writable --workdir",
    ):
        report.write_json(path, {"grasp": 0.1} | {"pad": "x" * 100_000})
    assert snapshot(tmp_path) == before  # old file intact, no temp file left


# --- the commands: one line, no traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=digits:grasp.alignment_current_mode=trian"], "alignment_current_mode"),
        (["--config=digits:grasp.threshold=3"], "grasp.threshold=3.0"),
        (["--config=digits", "--config.init=/missing/ckpt"], "config.init must be"),
    ],
)
def test_commands_end_a_user_error_in_one_line(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.main", *args, f"--workdir={tmp_path}/w"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("experiments.main: ") and message in last
    assert not (tmp_path / "w").exists()  # refused before any folder or data build


def test_imagenet_init_without_its_weights_is_refused_before_the_data_is_built(tmp_path):
    config = digits.get_config("model=mobilevit_xxs,init=imagenet")
    fix = r"no weights in \S+/init/mobilevit_xxs; download the official ImageNet weights"
    with pytest.raises(settings.ConfigError, match=fix):
        runner.run_experiment(config, tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "tfds").exists()


def test_a_bad_config_makes_no_folder_and_tilde_means_home(tmp_path):
    """`--workdir=~/x` with a bad config once made a literal `./~/x` before the config
    was read; now the config is checked first and `~` is the home folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    command = ["-m", "experiments.main", "--config=digits:bins=d0+d9", "--workdir=~/x"]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=cwd,
        env=dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no bin(s) ['d9']" in result.stderr.strip().splitlines()[-1]
    assert not list(cwd.iterdir()) and not list(home.iterdir())


def test_result_files_are_written_beside_their_target_then_renamed(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def spy(src, dst):
        renamed.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    report.write_json(tmp_path / "out" / "m.json", {"a": np.float32(0.5), "p": tmp_path})
    ((src, dst),) = renamed
    assert src.parent == dst.parent == tmp_path / "out"  # same filesystem: atomic
    assert src.name.startswith(".m.")  # hidden while incomplete
    expected = '{\n  "a": 0.5,\n  "p": "' + str(tmp_path) + '"\n}'
    assert dst.read_text() == expected  # NumPy scalars as numbers, the rest as text
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~_umask()
    assert os.listdir(dst.parent) == ["m.json"]


def test_a_results_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "results").write_text("a file")
    with pytest.raises(report.OutputError, match=r"could not write .*results/m\.json"):
        report.write_json(tmp_path / "results" / "m.json", {})


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_save_final_without_torch_says_how_to_install_it(monkeypatch):
    config = digits.get_config("model=mobilevit_xxs")
    config.save_final = True
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(
        settings.ConfigError,
        match=r"^config\.save_final writes a PyTorch checkpoint: install the torch extra "
        r"\(pip install -e '\.\[torch\]'\) or set save_final=False$",
    ):
        settings.check(config)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("methods=grasp+grasp+finetune", r"names \['grasp'\] more than once"),
        ("methods=ensemble+ensemble_soft", r"names \['ensemble_soft'\] more than once"),
        ("methods=all+grasp", r"all already runs every method"),
        ("bins=d0+d0+d1", r"config\.bins names \['d0'\] more than once"),
        ("targets=d1+d1", r"config\.targets names \['d1'\] more than once"),
        ("bins=d0+d1+d9", r"digits_drift has no bin\(s\) \['d9'\]; its bins are"),
        ("source_training.epochs=0", r"source_training\.epochs=0: it must produce a"),
        ("pretrain.epochs=0", r"pretrain\.epochs=0: it must produce a trained model"),
        ("grasp.learning_rate=1e999", r"grasp\.learning_rate=inf; use a finite"),
        ("fusion.learning_rate=1e999", r"fusion\.learning_rate=inf; use a finite"),
    ],
)
def test_a_request_that_cannot_work_is_refused_before_any_work(arg, message, tmp_path):
    """Found by a probe of new inputs: each ran (or trained twice, or saved untrained
    sources) before; now one line, and the work folder is never made."""
    config = digits.get_config(arg)
    with pytest.raises(settings.ConfigError, match=message):
        runner.run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_second_command_on_one_workdir_is_refused_and_a_dead_ones_lock_taken(tmp_path):
    """Two commands on one folder trained the same sources twice, raced in TFDS's build
    or called each other's live training "interrupted"."""
    from experiments import workdir_lock

    with workdir_lock.held(tmp_path, "experiments.main"):
        lock = json.loads((tmp_path / ".lock").read_text())
        assert lock["pid"] == os.getpid() and lock["command"] == "experiments.main"
        with (
            pytest.raises(
                settings.ConfigError,
                match=rf"in use by experiments\.main \(pid {os.getpid()} on .*; wait",
            ),
            workdir_lock.held(tmp_path, "experiments.study"),
        ):
            pass
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = {"pid": int(dead.stdout), "host": lock["host"], "command": "x", "started": 0}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with workdir_lock.held(tmp_path, "experiments.main"):  # its holder is gone
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_taking_a_workdir_deletes_the_temp_files_of_killed_writes_and_nothing_else(
    tmp_path,
):
    """A process killed between writing a result's temp file and renaming it left
    `.flops_report.<random>.tmp.json` in a run folder for good (found by the kill
    chain)."""
    from experiments import workdir_lock

    run = tmp_path / "results" / "digits_drift" / "run"
    run.mkdir(parents=True)
    stale = [run / ".metrics.k3_x9q0a.tmp.json", tmp_path / ".curves.abcdefgh.tmp.png"]
    kept = [
        run / "metrics.json",
        run / ".hidden",
        run / "notes.tmp.json",  # not hidden: not one of ours
        run / ".metrics.short.tmp.json",  # not mkstemp's 8 characters
        tmp_path / "sources" / ".orbax-checkpoint-tmp-12" / "x",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with workdir_lock.held(tmp_path, "experiments.main"):
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)


def test_ctrl_c_says_what_is_kept_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop, cli.one_line_errors("experiments.main"):
        raise KeyboardInterrupt
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "experiments.main: interrupted; finished runs, trained sources and the last "
        "finished epoch are saved: rerun the same command to resume"
    ]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),  # errno 28: ENOSPC on Linux
        ValueError(
            "RESOURCE_EXHAUSTED: Error writing local file "
            '"/w/sources/d0/ocdbt.process_0/d/1a2b": [OS error: No space left on device]'
        ),  # TensorStore's words, as Orbax raises them from a save
    ],
    ids=["oserror", "tensorstore"],
)
def test_a_full_disk_is_one_line_saying_what_is_kept(capsys, error):
    with pytest.raises(SystemExit) as stop, cli.one_line_errors("experiments.main"):
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("Orbax: the save failed") from inner
    assert str(stop.value.code).startswith(
        "experiments.main: no space left on the disk of --workdir; free some and rerun"
    )
    with pytest.raises(ZeroDivisionError), cli.one_line_errors("experiments.main"):
        raise ZeroDivisionError  # a bug keeps its traceback


def test_a_diverged_history_is_drawn_and_recorded(tmp_path):
    """`grasp.learning_rate=1e999` went NaN and the curves crashed with KeyError
    'train_loss' after the work, leaving the run unrecorded."""
    from experiments.report import plots

    history = [
        {"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5},
        {"epoch": 1, "stopped": "training loss nan in epoch 1; stopped there"},
    ]
    plots.training_curves_png(history, tmp_path / "curves.png", "t")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("main", "--config.grasp.threshold=0.5"),
        ("train_sources", "--config.grasp.threshold=0.5"),
        ("study", "--config.grasp.threshold=0.5"),
        ("evaluate", "--checkpoint: What to evaluate"),
        ("compare", "--reference: The reference's results folder."),
    ],
)
def test_help_lists_flags_without_importing_jax(command, expected):
    """`--help` took 18-33 s (JAX, TFDS and the config loaded before absl printed it)
    and exited 1. (import_weights lists the zoo's models, so it imports them.)"""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['experiments.{command}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('experiments.{command}', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, 'jax' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip().endswith("exit 0 False"), result.stderr[-2000:]
    assert expected in result.stdout
    if command != "compare":
        assert "clear10, clear100, digits, yearbook" in result.stdout


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{tmp}/missing.py", "--config={tmp}/missing.py: no such config file; use one of "),
        (
            "{tmp}/raises.py",
            "--config={tmp}/raises.py: get_config raised RuntimeError: boom",
        ),
        ("{tmp}/no_get.py", "--config={tmp}/no_get.py: the file defines no get_config("),
        ("{tmp}/a_dict.py", "--config={tmp}/a_dict.py: get_config returned a dict; return"),
        ("{tmp}/broken.py", "--config={tmp}/broken.py: loading it raised SyntaxError"),
        ("digits:trails=1", "did you mean 'trials'?"),
        (
            "digits:trials=abc",
            "--config=digits:trials=abc: trials='abc'; expected a value of type int",
        ),
    ],
)
def test_a_config_file_or_argument_that_cannot_work_is_one_line(tmp_path, config, message):
    """These were 48-line chained tracebacks from absl's flag parsing."""
    from experiments.configs import loading

    (tmp_path / "raises.py").write_text(
        "def get_config(arg=None):\n    raise RuntimeError('boom')\n"
    )
    (tmp_path / "no_get.py").write_text("X = 1\n")
    (tmp_path / "a_dict.py").write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    argument = "--config=" + config.format(tmp=tmp_path)
    with pytest.raises(loading.ConfigFileError) as caught:
        loading.check_arguments([argument])
    assert message.format(tmp=tmp_path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--config.grasp.treshold=0.5",
            "no key 'treshold' in grasp; did you mean 'threshold'?",
        ),
        ("--config.trails=2", "no key 'trails' in the config; did you mean 'trials'?"),
        ("--config.trials=abc", "--config.trials='abc'; expected a value of type int"),
        ("--config.trials", "--config.trials: give a value"),
    ],
)
def test_a_config_flag_typo_names_the_nearest_key(flag, message):
    from experiments.configs import loading

    with pytest.raises(loading.ConfigFileError, match=re.escape(message)):
        loading.check_arguments(["--config=digits", flag])


def test_a_config_mistake_ends_the_command_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config.grasp.treshold=0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("experiments.main: --config.grasp.treshold")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        # 5 on 10-label data went NaN in every stage and saved the untrained start
        (
            "num_classes=5",
            r"^config\.num_classes=5, but digits_drift has 10 classes; set "
            r"num_classes=10$",
        ),
        # 1000 asked, 18 there: 18 were used and 1000 recorded
        (
            "grasp.num_alignment_batches=1000",
            r"grasp\.num_alignment_batches=1000: target d0's train split holds 18 full "
            r"batches of 32; use at most 18",
        ),
        # training drops the partial batch: nothing trained, the start saved as a source
        (
            "pipeline.batch_size=700",
            r"^pipeline\.batch_size=700, but digits_drift/d0's train split holds 600 "
            r"examples; use at most 600$",
        ),
    ],
)
def test_a_request_the_data_cannot_serve_is_refused(arg, message, digits_dir, tmp_path):
    """Checked against the built data set, before any training or folder."""
    config = digits.get_config(arg)
    config.data_dir = str(digits_dir)
    with pytest.raises(settings.ConfigError, match=message):
        runner.run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def _merge_inputs():
    def tree(value):
        return {"w": jnp.full((4, 3), value), "b": jnp.full((3,), value)}

    return tree(0.0), tree(1.0), tree(1.0), tree(2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 30}, r"^threshold=30: cosine scores lie in \[-1, 1\]; use a "),
        ({"threshold": -1.5, "mode": "soft"}, r"^threshold=-1.5: cosine scores lie"),
        ({"threshold": float("nan")}, r"^threshold=nan: "),
        ({"eps": -1e-8}, r"^eps=-1e-08: use a small finite eps >= 0"),
    ],
)
def test_the_kernels_refuse_out_of_range_scalars_by_name(kwargs, message):
    """A typo (30 for 0.3) was a silent merge that moved nothing."""
    current, source, grad_current, grad_source = _merge_inputs()
    for kernel in (gj.merge_step, gj.random_merge_step):
        extra = {"key": jax.random.key(0)} if kernel is gj.random_merge_step else {}
        if "mode" in kwargs and kernel is gj.random_merge_step:
            continue
        with pytest.raises(ValueError, match=message):
            kernel(current, source, grad_current, grad_source, **kwargs, **extra)
    if "eps" not in kwargs:
        with pytest.raises(ValueError, match=message):
            gj.transfer(current, source, grad_current, **kwargs)


@pytest.mark.parametrize("shared", ["source", "grad_current", "grad_source"])
def test_an_input_sharing_the_donated_current_is_refused_by_name(shared):
    """`merge_step(p, p, ...)` was an XLA error about a buffer donated twice."""
    current, source, grad_current, grad_source = _merge_inputs()
    arguments = {"source": source, "grad_current": grad_current, "grad_source": grad_source}
    arguments[shared] = current
    with pytest.raises(ValueError, match=rf"^{shared} shares arrays with current, which"):
        gj.merge_step(current, **arguments)
    merged, _ = gj.merge_step(jax.tree.map(jnp.copy, current), **arguments)  # the fix
    assert jax.tree.structure(merged) == jax.tree.structure(current)


def test_traced_scalars_pass_to_the_callers_jit():
    """Inside a caller's jit the threshold is traced: no check, no host read."""
    current, source, grad_current, grad_source = _merge_inputs()
    step = jax.jit(
        lambda c, t: gj.merge_step(c, source, grad_current, grad_source, threshold=t)
    )
    _, stats = step(current, 0.3)
    assert float(stats.fraction) == 1.0  # equal-direction gradients: everything moves
    assert gj.merge_step.lower(current, source, grad_current, grad_source) is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["digits_drift", "--data_dir={file}"], "/downloads: Not a directory; choose a"),
        (["clear10", "--manual_dir={tmp}/none"], "clear10 needs --manual_dir, a folder"),
        (["digits_drift", "--configs=d9"], "no config(s) ['d9']"),
    ],
)
def test_data_build_ends_a_user_error_in_one_line(tmp_path, args, message):
    """`data.build` printed its builders' good messages as tracebacks."""
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in args]
    if "--data_dir" not in " ".join(args):
        args.append(f"--data_dir={tmp_path}/out")
    result = subprocess.run(
        [sys.executable, "-m", "data.build", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith("data.build: "), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize(("threshold", "accepted"), [(1.005, True), (1.02, False)])
def test_every_entry_point_accepts_the_same_thresholds(threshold, accepted):
    """The kernels, `GraspConfig` and the study's grid: [-1, 1.01], so a value one of
    them runs is never refused by another (GraspConfig refused (1, 1.01) alone)."""
    from experiments import study
    from grasp_jax.arguments import check_scalars
    from grasp_jax.grasp import GraspConfig

    config = digits.get_config()
    config.study.thresholds = (threshold,)
    checks = [
        lambda: check_scalars({"threshold": threshold}),
        lambda: GraspConfig(threshold=threshold),
        lambda: study.check(config),
    ]
    for check in checks:
        if accepted:
            check()
        else:
            with pytest.raises(ValueError, match=r"1\.02"):
                check()
