"""Configs: one base from the library's defaults, `key=value` arguments, validation of
every option before any work."""

from __future__ import annotations

import json
import re
import types

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import configs, methods, runner, settings
from experiments.configs import clear10, clear100, digits, yearbook

# The reference's settings, written out from docs/reference.md §3-§4 (not from code).
REFERENCE_GRASP = {
    "initial_epochs": 3,
    "finetune_epochs": 3,
    "learning_rate": 5e-5,
    "weight_decay": 0.01,
    "num_alignment_batches": 1,
    "threshold": 0.3,
    "granularity": "tensor",
    "mode": "hard",
    "alignment_current_mode": "train",
    "augment": True,
}
REFERENCE_SOURCE_TRAINING = {
    "epochs": 15,
    "learning_rate": 3e-4,
    "head_lr_multiplier": 10.0,
    "weight_decay": 0.01,
    "warmup_fraction": 2 / 15,
    "grad_clip_norm": 1.0,
    "schedule": "warmup_cosine",
    "augment": True,
}


def parse(argument: str):
    """`--config=<argument>` as the commands read it."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["prog", *configs.expand_config_argument([f"--config={argument}"])])
    return values.config


@pytest.mark.parametrize("module", [clear10, clear100, yearbook])
def test_reference_configs_hold_the_reference_recipe(module):
    config = module.get_config()
    assert config.grasp.to_dict() == REFERENCE_GRASP
    assert config.source_training.to_dict() == REFERENCE_SOURCE_TRAINING
    assert (config.pipeline.resize_size, config.pipeline.crop_size) == (256, 224)
    assert config.trials == 3 and config.init == "imagenet"


def test_key_value_arguments_on_the_command_line():
    config = parse("clear100:model=resnet50,trials=5,grasp.threshold=0.5")
    assert (config.model, config.name) == ("resnet50", "clear100_resnet50")
    assert config.trials == 5 and config.grasp.threshold == 0.5
    assert parse("clear100:resnet50").model == "resnet50"  # the bare form still works
    assert parse("clear100").model == "mobilevit_xxs"


def test_digits_overrides_keep_their_types():
    config = digits.get_config(
        "trials=1,methods=grasp+ensemble,grasp.augment=true,grasp.learning_rate=1"
    )
    assert config.trials == 1 and config.methods == ("grasp", "ensemble")
    assert config.grasp.augment is True
    assert config.grasp.learning_rate == 1.0 and isinstance(
        config.grasp.learning_rate, float
    )
    # A list of numbers is read as numbers (the study's documented smaller grid).
    config = digits.get_config("study.thresholds=0.3+1.01+-1")
    assert config.study.thresholds == (0.3, 1.01, -1.0)
    assert all(isinstance(t, float) for t in config.study.thresholds)
    # What digits changes, and only that, differs from the base.
    config = digits.get_config("")
    assert config.source_training.learning_rate == 5e-4
    assert config.source_training.head_lr_multiplier == 10.0


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("nope=1", r"unknown config key 'nope'; valid keys here: \["),
        ("grasp.nope=1", r"unknown config key 'grasp.nope'; valid keys here: \[.*'mode'"),
        ("trials=many", r"trials='many'; expected a value of type int"),
        ("grasp.augment=maybe", r"grasp.augment='maybe'; use true or false"),
        ("study.thresholds=0.3+high", r"study.thresholds='high'; expected .* float"),
    ],
)
def test_bad_arguments_name_the_key(argument, message):
    with pytest.raises(ValueError, match=message):
        digits.get_config(argument)


@pytest.mark.parametrize(
    ("section", "key", "value", "valid"),
    [
        ("grasp", "alignment_current_mode", "trian", "['train', 'eval']"),
        ("grasp", "granularity", "layer", "['tensor', 'channel', 'element']"),
        ("grasp", "mode", "hardd", "['hard', 'soft']"),
        (
            "source_training",
            "schedule",
            "cosine",
            "['warmup_cosine', 'cosine_per_epoch', 'constant']",
        ),
        (
            "pretrain",
            "schedule",
            "linear",
            "['warmup_cosine', 'cosine_per_epoch', 'constant']",
        ),
    ],
)
def test_every_string_option_is_checked_before_any_work(
    tmp_path, section, key, value, valid
):
    config = digits.get_config()
    config[section][key] = value
    with pytest.raises(settings.ConfigError, match=f"{value!r}; use one of") as err:
        settings.check(config, methods.REGISTRY)
    assert valid in str(err.value)
    with pytest.raises(settings.ConfigError):
        runner.run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_seeds_differ_by_stream_and_index():
    """Every (target, trial) run and every source gets its own seed from config.seed."""
    config = digits.get_config()
    seeds = {
        settings.run_seed(config, target, trial)
        for target, trial in (("d0", 1), ("d0", 2), ("d1", 1))
    } | {settings.source_seed(config, b) for b in ("d0", "d1", "d2")}
    assert len(seeds) == 6
    config.seed = 1
    assert settings.run_seed(config, "d0", 1) not in seeds


def test_seeds_follow_names_not_positions(tmp_path, monkeypatch):
    """`targets=d1` gets the seed the full run gives d1, and `bins=d1,d2` trains d1 with
    the full run's d1 seed (the runner once seeded by position in the target list)."""
    seen = {}

    def fake_run_one(ctx, method, trial, costs, out_dir, class_names, **_):
        seen.setdefault(ctx.target, set()).add((trial, ctx.seed))
        return {"method_label": method.name, "target": ctx.target, "trial": trial}

    fake_split = types.SimpleNamespace(
        dataset_info=types.SimpleNamespace(
            features={"label": types.SimpleNamespace(names=[])}
        )
    )
    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(runner.src, "train_sources", lambda config, workdir: None)
    monkeypatch.setattr(runner.data_checks, "check", lambda *a, **k: None)
    monkeypatch.setattr(runner.src, "load_splits", lambda *a: {"train": fake_split})
    monkeypatch.setattr(runner, "step_costs", lambda config: None)
    monkeypatch.setattr(
        runner.source_matrix, "compute", lambda *a, **k: {"accuracy": [], "rows": []}
    )
    monkeypatch.setattr(runner.report, "write_source_matrix", lambda *a: None)
    full = digits.get_config("methods=finetune,trials=2")
    runner.run_methods(full, tmp_path / "full", progress=False)
    everything = dict(seen)
    seen.clear()
    runner.run_methods(
        digits.get_config("methods=finetune,trials=2,targets=d1"),
        tmp_path / "one",
        progress=False,
    )
    assert seen == {"d1": everything["d1"]}
    assert len({seed for runs in everything.values() for _, seed in runs}) == 10
    subset = digits.get_config("bins=d1+d2")
    assert settings.source_seed(subset, "d1") == settings.source_seed(full, "d1")


def test_reuse_check_names_every_differing_key_path():
    stored = {"a": 1, "only_stored": 2, "nested": {"x": 1, "y": {"z": 1}}, "flat": 3}
    expected = {"a": 1, "only_expected": 2, "nested": {"x": 2, "y": {"z": 1}}, "flat": {}}
    with pytest.raises(
        settings.ConfigError,
        match=r"run with other settings \(\['flat', 'nested\.x', 'only_expected', "
        r"'only_stored'\]\); fix it\.",
    ):
        settings.require_same(stored, expected, "run", "fix it")
    many = {f"k{i}": i for i in range(9)}
    with pytest.raises(settings.ConfigError, match=r"\['k0', .*'k7'\]\)"):
        settings.require_same(many, {}, "run", "fix it")
    settings.require_same(stored, dict(stored), "run", "fix it")  # equal: no error


def test_a_runs_settings_are_everything_its_numbers_depend_on(tmp_path):
    config = digits.get_config()
    method = methods.REGISTRY["grasp"]
    got = runner.run_dependencies(config, method, "d2", 1)
    assert got == {
        "hyperparameters": method.hyperparameters(config),
        "seed": settings.run_seed(config, "d2", 1),
        "sources": ["d0", "d1", "d3", "d4"],
        "data_version": "3.0.0",
        "model": "small_cnn",
        "model_overrides": {},
        "num_classes": 10,
        "pipeline": config.pipeline.to_dict(),
        "init": "pretrain",
        "pretrain": config.pretrain.to_dict(),
        "source_training": config.source_training.to_dict(),
    }
    assert got["hyperparameters"]["threshold"] == config.grasp.threshold
    config.init = "scratch"  # no pretraining: its settings do not matter
    assert runner.run_dependencies(config, method, "d2", 1)["pretrain"] is None


def test_a_finished_run_is_reused_only_under_the_same_settings(tmp_path):
    config = digits.get_config()
    method = methods.REGISTRY["grasp"]
    expected = runner.run_dependencies(config, method, "d2", 1)
    record = {"accuracy": 0.5, "method_label": "old name", "settings": expected}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    reused = runner.reuse_finished(tmp_path, method, expected)
    assert reused == {**record, "method_label": "grasp"}
    other = runner.run_dependencies(config, method, "d2", 2)
    with pytest.raises(
        settings.ConfigError,
        match=rf"^{re.escape(str(tmp_path))} holds a finished run with other settings "
        r"\(\['seed'\]\); use another --workdir for this configuration, or delete that "
        r"folder\.$",
    ):
        runner.reuse_finished(tmp_path, method, other)
    del record["settings"]  # a run written before settings were recorded
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(settings.ConfigError, match=r"other settings \(\['data_version'"):
        runner.reuse_finished(tmp_path, method, expected)
